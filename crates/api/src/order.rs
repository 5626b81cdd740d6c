//! The `Order` custom resource: one customer's food order and its lifecycle.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::money::Money;

/// Most lines one order may carry.
pub const MAX_ORDER_ITEMS: usize = 50;
/// Largest quantity of one menu item in one order.
pub const MAX_QUANTITY: i32 = 99;

/// What the customer asked for. Immutable once created, except that a
/// cancellation may be requested (and never withdrawn).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dishpatch.dev",
    version = "v1alpha1",
    kind = "Order",
    plural = "orders",
    shortname = "ord",
    category = "dishpatch",
    namespaced,
    status = "OrderStatus",
    derive = "PartialEq",
    doc = "A customer's food order. The operator owns its lifecycle from Pending to a terminal phase.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Customer", type_ = "string", json_path = ".spec.customer.name"),
    printcolumn(
        name = "Restaurant",
        type_ = "string",
        json_path = ".spec.restaurantRef.name"
    ),
    printcolumn(name = "Total", type_ = "string", json_path = ".status.total.display"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    selectable = ".spec.customer.id",
    selectable = ".spec.restaurantRef.name"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.cancellation) || (has(self.cancellation) && self.cancellation == oldSelf.cancellation)"
).message("a cancellation request cannot be withdrawn or changed").field_path(".cancellation"))]
#[x_kube(validation = Rule::new(
    "!has(oldSelf.confirmation) || (has(self.confirmation) && self.confirmation == oldSelf.confirmation)"
).message("the restaurant's decision cannot be withdrawn or changed").field_path(".confirmation"))]
pub struct OrderSpec {
    /// Who ordered.
    #[x_kube(validation = Rule::new("self == oldSelf").message("customer is immutable once the order is placed"))]
    pub customer: Customer,
    /// The restaurant, in the order's namespace.
    #[x_kube(validation = Rule::new("self == oldSelf").message("restaurantRef is immutable once the order is placed"))]
    pub restaurant_ref: RestaurantRef,
    /// What to cook: 1 to 50 lines, each menu item at most once.
    #[schemars(length(min = 1, max = 50))]
    #[x_kube(
        validation = Rule::new("self.all(i, self.exists_one(j, j.menuItem == i.menuItem))")
            .message("each menu item may appear only once; raise its quantity instead"),
        validation = Rule::new("self == oldSelf").message("items are immutable once the order is placed"),
        merge_strategy = ListMerge::Atomic
    )]
    pub items: Vec<OrderItem>,
    /// Where to bring it.
    #[x_kube(validation = Rule::new("self == oldSelf").message("deliveryAddress is immutable once the order is placed"))]
    pub delivery_address: Address,
    /// How to pay: a payment token or a Secret holding one. Never card data.
    #[x_kube(validation = Rule::new("self == oldSelf").message("payment is immutable once the order is placed"))]
    pub payment: PaymentMethod,
    /// Set to ask for cancellation. Allowed until the courier picks the order up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancellation: Option<CancellationRequest>,
    /// At restaurants that confirm by hand: their staff's decision (set
    /// through the façade), final once set. The operator then sends the
    /// order to payment, or cancels it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmation: Option<RestaurantDecision>,
}

/// The customer placing the order.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Customer {
    /// Stable customer identifier (the subject of the customer's token).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
    )]
    pub id: String,
    /// Display name.
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    /// How to reach the customer about this order.
    pub contact: Contact,
}

/// E-mail and/or phone; at least one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.email) || has(self.phone)").message("contact needs an email or a phone"))]
pub struct Contact {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(email, length(max = 254))]
    pub email: Option<String>,
    /// E.164, for example `+4915112345678`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\+[1-9][0-9]{6,14}$"))]
    pub phone: Option<String>,
}

/// A reference to a Restaurant in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestaurantRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// One line of an order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderItem {
    /// The `id` of an item on the restaurant's menu.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub menu_item: String,
    /// How many, 1 to 99.
    #[schemars(range(min = 1, max = 99))]
    pub quantity: i32,
    /// Notes for the kitchen ("no onions").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    pub notes: Option<String>,
}

/// A postal delivery address.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    #[schemars(length(min = 1, max = 200))]
    pub street: String,
    #[schemars(length(min = 1, max = 100))]
    pub city: String,
    #[schemars(length(min = 1, max = 20), regex(pattern = r"^[A-Za-z0-9 -]+$"))]
    pub postal_code: String,
    /// ISO 3166-1 alpha-2 country code.
    #[schemars(regex(pattern = r"^[A-Z]{2}$"))]
    pub country: String,
    /// Directions for the courier ("ring twice").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 300))]
    pub instructions: Option<String>,
}

/// A payment method: a token from the payment provider, or a reference to a
/// Secret that holds one. Card numbers never enter the cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.token) != has(self.secretRef)").message("set exactly one of payment.token or payment.secretRef"))]
pub struct PaymentMethod {
    /// A provider token such as `tok_visa` or `pm_card_visa`. Never card
    /// data: twelve or more digits in a row are refused as a card number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 5, max = 128),
        regex(pattern = r"^(tok|pm|src)_[A-Za-z0-9_]+$")
    )]
    #[x_kube(validation = Rule::new("!self.matches('[0-9]{12,}')").message("a payment token must not carry a card number (12 or more digits in a row); send a provider token such as tok_visa"))]
    pub token: Option<String>,
    /// A key of a Secret in the order's namespace holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
}

/// A key within a Secret in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A request to cancel the order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CancellationRequest {
    /// Why, in a sentence.
    #[schemars(length(min = 1, max = 500))]
    pub reason: String,
}

/// Lifecycle phase: a summary the operator computes from conditions and the
/// stage sections. The conditions are the detailed truth.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum OrderPhase {
    Pending,
    Accepted,
    Rejected,
    Paid,
    Preparing,
    Ready,
    OutForDelivery,
    Delivered,
    Cancelled,
}

impl OrderPhase {
    pub const ALL: [OrderPhase; 9] = [
        OrderPhase::Pending,
        OrderPhase::Accepted,
        OrderPhase::Rejected,
        OrderPhase::Paid,
        OrderPhase::Preparing,
        OrderPhase::Ready,
        OrderPhase::OutForDelivery,
        OrderPhase::Delivered,
        OrderPhase::Cancelled,
    ];

    /// Terminal phases never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            OrderPhase::Rejected | OrderPhase::Delivered | OrderPhase::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OrderPhase::Pending => "Pending",
            OrderPhase::Accepted => "Accepted",
            OrderPhase::Rejected => "Rejected",
            OrderPhase::Paid => "Paid",
            OrderPhase::Preparing => "Preparing",
            OrderPhase::Ready => "Ready",
            OrderPhase::OutForDelivery => "OutForDelivery",
            OrderPhase::Delivered => "Delivered",
            OrderPhase::Cancelled => "Cancelled",
        }
    }
}

impl std::fmt::Display for OrderPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Observed state. Each section has exactly one writer (field manager), so
/// writers apply side by side without overwriting each other.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct OrderStatus {
    /// Summary of the lifecycle (operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<OrderPhase>,
    /// Detailed state, keyed by condition type (operator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The priced total (operator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Money>,
    /// Payment stage (payment service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentStatus>,
    /// Kitchen stage (kitchen service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kitchen: Option<KitchenStatus>,
    /// Delivery stage (delivery service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryStatus>,
    /// E-mails and webhooks claimed and sent, one entry per event and
    /// channel (notification service). Every replica reads it before
    /// sending, so a notification goes out once across replicas and restarts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["event".into(), "channel".into()]))]
    pub notifications: Vec<NotificationRecord>,
}

/// A restaurant's decision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConfirmationDecision {
    Confirmed,
    Declined,
}

/// What the restaurant's staff decided, and who.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestaurantDecision {
    pub decision: ConfirmationDecision,
    /// Why, for a decline (the customer is told).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub reason: Option<String>,
    /// The staff member (their token's subject).
    #[schemars(length(max = 253))]
    pub by: String,
    pub at: Time,
}

/// Outcome of the payment stage.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PaymentState {
    /// A charge was requested and its outcome is not recorded yet. Written
    /// before the provider is called, so money can never move for an order
    /// that shows no payment: deletion and cancellation wait for it to settle.
    Pending,
    /// The provider waits for the customer (3-D Secure, a bank's page):
    /// `actionUrl` says where. The provider's webhook settles it, or the
    /// payment deadline cancels the order and the intent with it.
    RequiresAction,
    Succeeded,
    Failed,
    Refunded,
}

/// What the payment service did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentStatus {
    pub state: PaymentState,
    /// Gateway that handled the charge (`simulated`, `stripe`).
    #[schemars(length(max = 32))]
    pub provider: String,
    /// The provider's id for the charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub payment_id: Option<String>,
    /// Amount charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<Money>,
    /// When the charge succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charged_at: Option<Time>,
    /// Why the charge failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub failure_reason: Option<String>,
    /// The provider's id for the refund.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub refund_id: Option<String>,
    /// When the charge was refunded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refunded_at: Option<Time>,
    /// Where the customer completes the payment, while `RequiresAction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub action_url: Option<String>,
    /// When the customer's bank opened a dispute over the charge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disputed_at: Option<Time>,
    /// The dispute's reason, as the provider gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub dispute_reason: Option<String>,
    /// Ids of the provider's webhook events applied, newest last (the last
    /// 32): a redelivered event is recognised and applied once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 255)))]
    pub webhook_events: Vec<String>,
}

impl PaymentStatus {
    /// A payment section in `state` from `provider`, with no other facts yet.
    pub fn new(state: PaymentState, provider: &str) -> Self {
        Self {
            state,
            provider: provider.to_string(),
            payment_id: None,
            amount: None,
            charged_at: None,
            failure_reason: None,
            refund_id: None,
            refunded_at: None,
            action_url: None,
            disputed_at: None,
            dispute_reason: None,
            webhook_events: Vec::new(),
        }
    }
}

/// Where the order is in the kitchen.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum KitchenState {
    Queued,
    Preparing,
    Ready,
    Dropped,
}

/// What the kitchen service did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KitchenStatus {
    pub state: KitchenState,
    /// The restaurant's ticket number: tickets start cooking in this order,
    /// whichever kitchen replica took them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ticket: Option<i64>,
    /// When the kitchen took the ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_accepted_at: Option<Time>,
    /// When the food should be ready, from the menu's preparation times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_ready_at: Option<Time>,
    /// When the food was ready for pick-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<Time>,
}

/// Where the order is on the road.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum DeliveryState {
    Offered,
    Assigned,
    PickedUp,
    Delivered,
    Released,
}

/// What the delivery service did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryStatus {
    pub state: DeliveryState,
    /// Name of the Courier resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub courier: Option<String>,
    /// When the courier accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_at: Option<Time>,
    /// When the courier collected the food.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub picked_up_at: Option<Time>,
    /// When the customer got it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<Time>,
    /// Estimated arrival at the customer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta: Option<Time>,
}

/// How a customer or integrator is told about an event.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum NotificationChannel {
    /// An e-mail to the customer.
    Email,
    /// A signed webhook to the integrator.
    Webhook,
}

impl NotificationChannel {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationChannel::Email => "email",
            NotificationChannel::Webhook => "webhook",
        }
    }
}

/// Where one notification is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum NotificationState {
    /// A replica is sending it. Written before sending; taken over by
    /// another replica once older than the claim timeout.
    Claimed,
    /// It went out; never sent again.
    Sent,
}

/// One channel's notification about one event.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotificationRecord {
    /// The event's id, `<order uid>.<event type>`.
    #[schemars(length(min = 1, max = 128))]
    pub event: String,
    pub channel: NotificationChannel,
    pub state: NotificationState,
    /// Who claimed or sent it: `<replica>/<process>-<attempt>`.
    #[schemars(length(min = 1, max = 300))]
    pub holder: String,
    /// When it was claimed, or sent.
    pub at: Time,
}
