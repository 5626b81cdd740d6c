//! Order history in PostgreSQL.
//!
//! The operator writes every terminal Order here before its retention
//! delete, and deletes only once the row is committed; the façade reads
//! history from here once an order has left the cluster. A row is keyed by
//! the Order's uid, so writing the same order again (after a crash between
//! the insert and the delete) changes nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dishpatch_api::Order;
use kube::ResourceExt;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder, Row};

/// The schema, from `crates/archive/migrations`, applied in order once per
/// database (sqlx records what ran in `_sqlx_migrations`, under a lock, so
/// replicas may race to apply it).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// SQLSTATE of a query on a table that does not exist (yet).
const UNDEFINED_TABLE: &str = "42P01";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("order history database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("order history schema migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("archived order {uid} does not parse: {source}")]
    Decode {
        uid: String,
        source: serde_json::Error,
    },
    #[error("order cannot be archived: {0}")]
    Unarchivable(String),
}

/// A connection pool to the history database. Connections are opened on
/// first use, so a process starts (and serves what it can) while the
/// database is down.
pub struct Archive {
    pool: PgPool,
    migrated: AtomicBool,
}

/// Where a page of history starts: strictly older than this order, in the
/// façade's list order (creation time, then name, newest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub created: jiff::Timestamp,
    pub name: String,
}

/// What a page of history is filtered by; every filter is optional.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub customer: Option<String>,
    pub restaurant: Option<String>,
    /// Created at or after.
    pub created_from: Option<jiff::Timestamp>,
    /// Created before.
    pub created_before: Option<jiff::Timestamp>,
}

impl Archive {
    /// A pool for `url` (`postgres://user:password@host:port/db`, with
    /// `?sslmode=require` for TLS). Fails only on a malformed URL.
    pub fn connect(url: &str) -> Result<Self, Error> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            // A database that is down fails the call quickly; the caller retries.
            .acquire_timeout(Duration::from_secs(3))
            .connect_lazy(url)?;
        Ok(Self {
            pool,
            migrated: AtomicBool::new(false),
        })
    }

    /// Applies the schema once for this process (the writer's job; readers
    /// treat a missing table as empty history).
    pub async fn migrate(&self) -> Result<(), Error> {
        if self.migrated.load(Ordering::Acquire) {
            return Ok(());
        }
        MIGRATOR.run(&self.pool).await?;
        self.migrated.store(true, Ordering::Release);
        Ok(())
    }

    /// Stores `order` as history. Idempotent: the row is keyed by uid, and
    /// a copy at the same resourceVersion is left as it is.
    pub async fn put(&self, order: &Order) -> Result<(), Error> {
        self.migrate().await?;
        let row = Columns::of(order)?;
        sqlx::query(
            "INSERT INTO archived_orders \
               (uid, namespace, name, customer, restaurant, phase, created_at, resource_version, object) \
             VALUES ($1, $2, $3, $4, $5, $6, $7::timestamptz, $8, $9) \
             ON CONFLICT (uid) DO UPDATE SET \
               phase = EXCLUDED.phase, resource_version = EXCLUDED.resource_version, \
               object = EXCLUDED.object, archived_at = now() \
             WHERE archived_orders.resource_version IS DISTINCT FROM EXCLUDED.resource_version",
        )
        .bind(row.uid)
        .bind(row.namespace)
        .bind(row.name)
        .bind(row.customer)
        .bind(row.restaurant)
        .bind(row.phase)
        .bind(row.created)
        .bind(row.resource_version)
        .bind(sqlx::types::Json(row.object))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The newest archived order named `name` in `namespace`.
    pub async fn get(&self, namespace: &str, name: &str) -> Result<Option<Order>, Error> {
        let row = sqlx::query(
            "SELECT uid, object FROM archived_orders WHERE namespace = $1 AND name = $2 \
             ORDER BY created_at DESC LIMIT 1",
        )
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.pool)
        .await;
        match missing_table_is_empty(row)? {
            Some(Some(row)) => decode(&row).map(Some),
            _ => Ok(None),
        }
    }

    /// Up to `limit` archived orders of `namespace` matching `filter`,
    /// strictly older than `after`, newest first.
    pub async fn page(
        &self,
        namespace: &str,
        filter: &Filter,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Vec<Order>, Error> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT uid, object FROM archived_orders WHERE namespace = ",
        );
        q.push_bind(namespace);
        if let Some(c) = &filter.customer {
            q.push(" AND customer = ").push_bind(c);
        }
        if let Some(r) = &filter.restaurant {
            q.push(" AND restaurant = ").push_bind(r);
        }
        if let Some(t) = filter.created_from {
            q.push(" AND created_at >= ")
                .push_bind(t.to_string())
                .push("::timestamptz");
        }
        if let Some(t) = filter.created_before {
            q.push(" AND created_at < ")
                .push_bind(t.to_string())
                .push("::timestamptz");
        }
        if let Some(a) = after {
            q.push(" AND (created_at, name) < (")
                .push_bind(a.created.to_string())
                .push("::timestamptz, ")
                .push_bind(a.name.clone())
                .push(")");
        }
        q.push(" ORDER BY created_at DESC, name DESC LIMIT ")
            .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows = q.build().fetch_all(&self.pool).await;
        missing_table_is_empty(rows)?
            .unwrap_or_default()
            .iter()
            .map(decode)
            .collect()
    }

    /// How many orders the archive holds for `namespace` (for tests and
    /// operators checking a backfill).
    pub async fn count(&self, namespace: &str) -> Result<i64, Error> {
        let row = sqlx::query("SELECT count(*) FROM archived_orders WHERE namespace = $1")
            .bind(namespace)
            .fetch_one(&self.pool)
            .await;
        Ok(missing_table_is_empty(row)?.map_or(0, |r| r.get::<i64, _>(0)))
    }
}

/// A query on the table before the writer created it answers "nothing".
fn missing_table_is_empty<T>(r: Result<T, sqlx::Error>) -> Result<Option<T>, Error> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNDEFINED_TABLE) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn decode(row: &sqlx::postgres::PgRow) -> Result<Order, Error> {
    let uid: String = row.try_get("uid")?;
    let sqlx::types::Json(value): sqlx::types::Json<serde_json::Value> = row.try_get("object")?;
    serde_json::from_value(value).map_err(|source| Error::Decode { uid, source })
}

/// The columns of one archived order.
struct Columns {
    uid: String,
    namespace: String,
    name: String,
    customer: String,
    restaurant: String,
    phase: String,
    created: String,
    resource_version: String,
    object: serde_json::Value,
}

impl Columns {
    fn of(order: &Order) -> Result<Self, Error> {
        let uid = order
            .uid()
            .ok_or_else(|| Error::Unarchivable(format!("{} has no uid", order.name_any())))?;
        let created = order
            .creation_timestamp()
            .ok_or_else(|| Error::Unarchivable(format!("{} has no creation time", uid)))?
            .0
            .to_string();
        let phase = order
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .map(|p| p.to_string())
            .unwrap_or_default();
        let object = history_object(order).map_err(|source| Error::Decode {
            uid: uid.clone(),
            source,
        })?;
        Ok(Self {
            namespace: order.namespace().unwrap_or_default(),
            name: order.name_any(),
            customer: order.spec.customer.id.clone(),
            restaurant: order.spec.restaurant_ref.name.clone(),
            phase,
            created,
            resource_version: order.resource_version().unwrap_or_default(),
            object,
            uid,
        })
    }
}

/// The Order as history keeps it: everything but managed fields, which say
/// which component wrote which field and mean nothing once it is gone.
pub fn history_object(order: &Order) -> Result<serde_json::Value, serde_json::Error> {
    let mut o = order.clone();
    o.metadata.managed_fields = None;
    serde_json::to_value(&o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dishpatch_api::order::{OrderPhase, OrderStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    fn order() -> Order {
        let mut o = dishpatch_testkit::fixtures::order("o-1", "pizzeria", &[("margherita", 1)]);
        o.metadata.namespace = Some("shop".into());
        o.metadata.uid = Some("u-1".into());
        o.metadata.resource_version = Some("7".into());
        o.metadata.creation_timestamp =
            Some(Time("2026-12-01T10:00:00Z".parse().unwrap_or_default()));
        o.metadata.managed_fields = Some(vec![Default::default()]);
        o.status = Some(OrderStatus {
            phase: Some(OrderPhase::Delivered),
            ..Default::default()
        });
        o
    }

    #[test]
    fn a_row_keeps_the_order_without_managed_fields() {
        let row = Columns::of(&order()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(row.uid, "u-1");
        assert_eq!(row.customer, "cust-1");
        assert_eq!(row.restaurant, "pizzeria");
        assert_eq!(row.phase, "Delivered");
        assert_eq!(row.created, "2026-12-01T10:00:00Z");
        assert!(row.object["metadata"].get("managedFields").is_none());
        assert_eq!(row.object["spec"]["customer"]["id"], "cust-1");
        assert_eq!(row.object["status"]["phase"], "Delivered");
    }

    #[test]
    fn an_order_without_uid_is_refused() {
        let mut o = order();
        o.metadata = ObjectMeta {
            name: Some("o-1".into()),
            ..Default::default()
        };
        assert!(matches!(Columns::of(&o), Err(Error::Unarchivable(_))));
    }
}
