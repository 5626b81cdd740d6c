-- Terminal Orders, kept after the operator deletes them from the cluster.
-- `object` is the Order as the apiserver last served it (without managed
-- fields): spec, metadata, and the final status with every condition's time,
-- the payment and the delivery. The other columns are what history is
-- searched and paged by.
CREATE TABLE archived_orders (
    uid              text PRIMARY KEY,
    namespace        text NOT NULL,
    name             text NOT NULL,
    customer         text NOT NULL,
    restaurant       text NOT NULL,
    phase            text NOT NULL,
    created_at       timestamptz NOT NULL,
    resource_version text NOT NULL,
    archived_at      timestamptz NOT NULL DEFAULT now(),
    object           jsonb NOT NULL
);

-- Newest first, as the façade lists: by namespace, by customer, by restaurant.
CREATE INDEX archived_orders_newest ON archived_orders (namespace, created_at DESC, name DESC);
CREATE INDEX archived_orders_customer ON archived_orders (namespace, customer, created_at DESC, name DESC);
CREATE INDEX archived_orders_restaurant ON archived_orders (namespace, restaurant, created_at DESC, name DESC);
-- GET /orders/{id}: a name can be used again once its order is gone.
CREATE INDEX archived_orders_name ON archived_orders (namespace, name, created_at DESC);
