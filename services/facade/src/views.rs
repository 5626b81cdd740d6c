//! The public JSON of the API: request bodies and the views of resources.
//! Views are built from the cached resources and leave out what callers must
//! not see (payment tokens, other stages' internals, managed fields).

use std::collections::BTreeMap;

use dishpatch_api::courier::Courier;
use dishpatch_api::order::{DeliveryState, KitchenState, PaymentState};
use dishpatch_api::{Money, Order, OrderPhase, Restaurant};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Annotation holding a delivered order's rating (1..5).
pub const RATING_ANNOTATION: &str = "dishpatch.dev/rating";
/// Annotation holding a delivered order's feedback comment.
pub const FEEDBACK_ANNOTATION: &str = "dishpatch.dev/feedback";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct MoneyView {
    /// Minor units (cents).
    pub amount: i64,
    pub currency: String,
    /// For people: `9.50 EUR`.
    pub display: String,
}

impl From<&Money> for MoneyView {
    fn from(m: &Money) -> Self {
        Self {
            amount: m.amount,
            currency: m.currency.clone(),
            display: dishpatch_api::money::format_amount(m.amount, &m.currency),
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MenuItemView {
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub price: MoneyView,
    pub prep_time_seconds: i32,
    /// How many can still be ordered, for stock-limited items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available: Option<i64>,
    /// The staff marked it sold out: it cannot be ordered now.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sold_out: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestaurantView {
    /// The Restaurant's name; use it as `restaurant` when ordering.
    pub name: String,
    pub display_name: String,
    pub zone: String,
    pub open: bool,
    /// The staff mark orders ready (`kitchen.mode: Manual`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub manual_kitchen: bool,
    pub currency: String,
    pub menu: Vec<MenuItemView>,
}

impl From<&Restaurant> for RestaurantView {
    fn from(r: &Restaurant) -> Self {
        let inventory = r.status.as_ref().map(|s| &s.inventory);
        let menu = r
            .spec
            .menu
            .iter()
            .map(|m| MenuItemView {
                id: m.id.clone(),
                name: m.name.clone(),
                description: m.description.clone(),
                price: MoneyView::from(&Money::new(m.price, r.spec.currency.clone())),
                prep_time_seconds: m.prep_time_seconds,
                available: m.stock.map(|stock| {
                    inventory
                        .and_then(|inv| inv.iter().find(|e| e.menu_item == m.id))
                        .map(|e| e.available)
                        .unwrap_or(stock)
                }),
                sold_out: m.sold_out,
            })
            .collect();
        Self {
            name: r.metadata.name.clone().unwrap_or_default(),
            display_name: r.spec.display_name.clone(),
            zone: r.spec.zone.clone(),
            open: r.spec.open,
            manual_kitchen: r.spec.kitchen.mode == dishpatch_api::restaurant::KitchenMode::Manual,
            currency: r.spec.currency.clone(),
            menu,
        }
    }
}

/// One line of an order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrderLine {
    /// The `id` of a menu item of the restaurant.
    #[schema(min_length = 1, max_length = 63)]
    pub menu_item: String,
    /// 1 to 99.
    #[schema(minimum = 1, maximum = 99)]
    pub quantity: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddressBody {
    pub street: String,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, e.g. `DE`.
    pub country: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instructions: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PaymentBody {
    /// A payment provider token (`tok_…`, `pm_…`, `src_…`). Never card data:
    /// 12 or more digits in a row are refused as a card number.
    #[schema(
        min_length = 5,
        max_length = 128,
        pattern = "^(tok|pm|src)_[A-Za-z0-9_]+$"
    )]
    pub token: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContactBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// E.164, e.g. `+4915112345678`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

/// Body of `POST /api/v1/orders`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlaceOrder {
    /// The restaurant's `name`.
    #[schema(min_length = 1, max_length = 253)]
    pub restaurant: String,
    #[schema(min_items = 1, max_items = 50)]
    pub items: Vec<OrderLine>,
    pub delivery_address: AddressBody,
    pub payment: PaymentBody,
    /// How to reach you; defaults to the token's `email`/`phone` claims.
    #[serde(default)]
    pub contact: Option<ContactBody>,
    /// Your name on the order; defaults to the token's `name` claim, then its subject.
    #[serde(default)]
    pub customer_name: Option<String>,
}

/// Body of `POST /api/v1/orders/{id}/cancel`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    /// Why, in a sentence (1 to 500 characters).
    #[schema(min_length = 1, max_length = 500)]
    pub reason: String,
}

/// Body of `POST /api/v1/orders/{id}/feedback`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackBody {
    /// 1 to 5 stars.
    #[schema(minimum = 1, maximum = 5)]
    pub rating: u8,
    #[serde(default)]
    pub comment: Option<String>,
}

/// Body of `POST /api/v1/courier/shift`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShiftBody {
    pub on_shift: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PaymentView {
    /// `Pending`, `RequiresAction`, `Succeeded`, `Failed` or `Refunded`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount: Option<MoneyView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// While `RequiresAction`: the page where the customer completes the
    /// payment (3-D Secure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_url: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KitchenView {
    /// `Queued`, `Preparing`, `Ready` or `Dropped`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_ready_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryView {
    /// `Offered`, `Assigned`, `PickedUp`, `Delivered` or `Released`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub courier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub picked_up_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct FeedbackView {
    pub rating: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
}

/// An order as its customer sees it.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    /// The order's id (the Order resource's name).
    pub id: String,
    /// `Pending`, `Accepted`, `Rejected`, `Paid`, `Preparing`, `Ready`,
    /// `OutForDelivery`, `Delivered` or `Cancelled`.
    pub phase: String,
    pub customer_id: String,
    pub restaurant: String,
    pub items: Vec<OrderLine>,
    pub delivery_address: AddressBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<MoneyView>,
    /// Why the order was rejected or cancelled, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The cancellation the customer asked for, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cancellation_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payment: Option<PaymentView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kitchen: Option<KitchenView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<FeedbackView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// Changes with every change of the order; the SSE event id.
    pub resource_version: String,
    /// Every condition the order went through, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimelineEntry>,
    /// True when the order has left the cluster and is read from the order
    /// history: it no longer changes, and cannot be cancelled or tracked.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub archived: bool,
}

/// One condition of an order, as last set.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimelineEntry {
    /// `Accepted`, `StockReserved`, `Cancelled`, …
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub at: String,
}

impl OrderView {
    /// The view of an order read from the history database.
    pub fn archived(o: &Order) -> Self {
        Self {
            archived: true,
            ..Self::from(o)
        }
    }
}

fn time(t: &Option<Time>) -> Option<String> {
    t.as_ref().map(|t| t.0.to_string())
}

fn debug_name<T: std::fmt::Debug>(v: T) -> String {
    format!("{v:?}")
}

/// The phase of an order; one the operator has not looked at yet is Pending.
pub fn phase(o: &Order) -> OrderPhase {
    o.status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or(OrderPhase::Pending)
}

impl From<&Order> for OrderView {
    fn from(o: &Order) -> Self {
        let status = o.status.as_ref();
        let phase = phase(o);
        let reason = match phase {
            OrderPhase::Rejected | OrderPhase::Cancelled => status.and_then(|s| {
                ["Cancelled", "Accepted"].iter().find_map(|t| {
                    dishpatch_api::lifecycle::find(&s.conditions, t)
                        .filter(|c| {
                            (*t == "Cancelled" && c.status == "True")
                                || (*t == "Accepted" && c.status == "False")
                        })
                        .map(|c| {
                            if c.message.is_empty() {
                                c.reason.clone()
                            } else {
                                c.message.clone()
                            }
                        })
                })
            }),
            _ => None,
        };
        let annotations = o.metadata.annotations.as_ref();
        let feedback = annotations
            .and_then(|a| a.get(RATING_ANNOTATION))
            .and_then(|r| r.parse::<u8>().ok())
            .map(|rating| FeedbackView {
                rating,
                comment: annotations
                    .and_then(|a| a.get(FEEDBACK_ANNOTATION))
                    .cloned(),
            });
        Self {
            id: o.metadata.name.clone().unwrap_or_default(),
            phase: phase.to_string(),
            customer_id: o.spec.customer.id.clone(),
            restaurant: o.spec.restaurant_ref.name.clone(),
            items: o
                .spec
                .items
                .iter()
                .map(|i| OrderLine {
                    menu_item: i.menu_item.clone(),
                    quantity: i.quantity,
                    notes: i.notes.clone(),
                })
                .collect(),
            delivery_address: AddressBody {
                street: o.spec.delivery_address.street.clone(),
                city: o.spec.delivery_address.city.clone(),
                postal_code: o.spec.delivery_address.postal_code.clone(),
                country: o.spec.delivery_address.country.clone(),
                instructions: o.spec.delivery_address.instructions.clone(),
            },
            total: status.and_then(|s| s.total.as_ref()).map(MoneyView::from),
            reason,
            cancellation_reason: o.spec.cancellation.as_ref().map(|c| c.reason.clone()),
            payment: status
                .and_then(|s| s.payment.as_ref())
                .map(|p| PaymentView {
                    state: debug_name::<PaymentState>(p.state),
                    amount: p.amount.as_ref().map(MoneyView::from),
                    failure_reason: p.failure_reason.clone(),
                    action_url: p
                        .action_url
                        .clone()
                        .filter(|_| p.state == PaymentState::RequiresAction),
                }),
            kitchen: status
                .and_then(|s| s.kitchen.as_ref())
                .map(|k| KitchenView {
                    state: debug_name::<KitchenState>(k.state),
                    estimated_ready_at: time(&k.estimated_ready_at),
                    ready_at: time(&k.ready_at),
                }),
            delivery: status
                .and_then(|s| s.delivery.as_ref())
                .map(|d| DeliveryView {
                    state: debug_name::<DeliveryState>(d.state),
                    courier: d.courier.clone(),
                    eta: time(&d.eta),
                    picked_up_at: time(&d.picked_up_at),
                    delivered_at: time(&d.delivered_at),
                }),
            feedback,
            created_at: time(&o.metadata.creation_timestamp),
            resource_version: o.metadata.resource_version.clone().unwrap_or_default(),
            timeline: {
                let mut t: Vec<TimelineEntry> = status
                    .map(|s| s.conditions.as_slice())
                    .unwrap_or_default()
                    .iter()
                    .map(|c| TimelineEntry {
                        type_: c.type_.clone(),
                        status: c.status.clone(),
                        reason: c.reason.clone(),
                        message: c.message.clone(),
                        at: c.last_transition_time.0.to_string(),
                    })
                    .collect();
                // RFC 3339 UTC times sort as text.
                t.sort_by(|a, b| a.at.cmp(&b.at));
                t
            },
            archived: false,
        }
    }
}

/// What a live-tracking event is about.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderEventKind {
    /// The order changed; `data` is the order.
    Order,
    /// The order was deleted; `data` is `{"id": …}` and the stream ends.
    Deleted,
}

impl OrderEventKind {
    /// The SSE `event:` name.
    pub fn name(self) -> &'static str {
        match self {
            OrderEventKind::Order => "order",
            OrderEventKind::Deleted => "deleted",
        }
    }
}

/// One server-sent event of `GET /api/v1/orders/{id}/events` (the stream
/// is a sequence of these). Documentation only: axum writes the events.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderEvent {
    pub event: OrderEventKind,
    /// The order's resourceVersion (on `order` events): send it back as
    /// `Last-Event-ID` to resume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// JSON: an `OrderView` for `order`, `{"id": …}` for `deleted`.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// A page of the caller's orders, newest first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OrderPage {
    pub items: Vec<OrderView>,
    /// True when the order history could not be read: the page holds only
    /// orders still in the cluster, and older ones may be missing.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub incomplete: bool,
    /// Pass as `continue` for the next page; absent on the last page.
    #[serde(rename = "continue", skip_serializing_if = "Option::is_none")]
    pub continue_: Option<String>,
}

/// An offer or current delivery of a courier.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CourierView {
    pub name: String,
    pub on_shift: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available: Option<bool>,
    /// The order offered to this courier, waiting for accept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offer: Option<OfferView>,
    /// The order this courier is delivering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_order: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_order_details: Option<CourierOrderView>,
    /// Requests the façade has passed to the delivery service and that it
    /// has not acted on yet (annotation → order).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub pending_requests: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OfferView {
    pub order: String,
    pub expires_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<CourierOrderView>,
}

/// What a courier needs to know about an order: where from, where to.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CourierOrderView {
    pub id: String,
    pub phase: String,
    pub restaurant: String,
    pub delivery_address: AddressBody,
    pub items: usize,
}

impl CourierOrderView {
    pub fn of(o: &Order) -> Self {
        let v = OrderView::from(o);
        Self {
            id: v.id,
            phase: v.phase,
            restaurant: v.restaurant,
            delivery_address: v.delivery_address,
            items: v.items.iter().map(|i| i.quantity.max(0) as usize).sum(),
        }
    }
}

/// Annotations on a Courier that ask the delivery service to act.
pub const COURIER_REQUESTS: [&str; 3] = [
    crate::courier::ACCEPT_ANNOTATION,
    crate::courier::PICKED_UP_ANNOTATION,
    crate::courier::DELIVERED_ANNOTATION,
];

impl CourierView {
    pub fn of(c: &Courier, lookup: impl Fn(&str) -> Option<CourierOrderView>) -> Self {
        let status = c.status.as_ref();
        let pending_requests = c
            .metadata
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| COURIER_REQUESTS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Self {
            name: c.metadata.name.clone().unwrap_or_default(),
            on_shift: c.spec.on_shift,
            available: status.and_then(|s| s.available),
            offer: status.and_then(|s| s.offer.as_ref()).map(|o| OfferView {
                order: o.order.clone(),
                expires_at: o.expires_at.0.to_string(),
                details: lookup(&o.order),
            }),
            current_order: status.and_then(|s| s.current_order.clone()),
            current_order_details: status
                .and_then(|s| s.current_order.as_deref())
                .and_then(&lookup),
            pending_requests,
        }
    }
}
