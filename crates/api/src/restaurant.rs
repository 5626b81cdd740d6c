//! The `Restaurant` custom resource: a kitchen with a menu.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A restaurant as its manager declares it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dishpatch.dev",
    version = "v1alpha1",
    kind = "Restaurant",
    plural = "restaurants",
    shortname = "rest",
    category = "dishpatch",
    namespaced,
    status = "RestaurantStatus",
    derive = "PartialEq",
    doc = "A restaurant: its menu, kitchen capacity and whether it takes orders.",
    printcolumn(name = "Open", type_ = "boolean", json_path = ".spec.open"),
    printcolumn(
        name = "Menu items",
        type_ = "integer",
        json_path = ".status.menuItems"
    ),
    printcolumn(
        name = "Zone",
        type_ = "string",
        json_path = ".spec.zone",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RestaurantSpec {
    #[schemars(length(min = 1, max = 100))]
    pub display_name: String,
    /// Delivery zone; couriers in the same zone deliver its orders.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub zone: String,
    /// Whether the restaurant takes new orders.
    pub open: bool,
    /// ISO 4217 currency of every price on the menu.
    #[schemars(regex(pattern = r"^[A-Z]{3}$"))]
    pub currency: String,
    pub kitchen: KitchenSpec,
    /// How new orders are confirmed. Absent: `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmation: Option<ConfirmationSpec>,
    /// The menu, keyed by item id.
    #[schemars(length(min = 1, max = 200))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["id".into()]))]
    pub menu: Vec<MenuItem>,
}

/// Who confirms a new order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum ConfirmationMode {
    /// The operator's checks (open, menu, stock) are the confirmation.
    #[default]
    Auto,
    /// After the checks, the restaurant's staff confirm or decline each
    /// order through the façade; an order nobody confirms within `timeout`
    /// is cancelled (`RestaurantDidNotConfirm`).
    Manual,
}

/// The restaurant's confirmation of new orders.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfirmationSpec {
    pub mode: ConfirmationMode,
    /// How long staff have to confirm (`90s`, `5m`), default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub timeout: Option<String>,
}

impl RestaurantSpec {
    /// How long staff have to confirm a new order, when they must.
    pub fn manual_confirmation(&self) -> Option<std::time::Duration> {
        let c = self.confirmation.as_ref()?;
        if c.mode != ConfirmationMode::Manual {
            return None;
        }
        let timeout = c.timeout.as_deref().unwrap_or("5m");
        let split = timeout.find(|ch: char| !ch.is_ascii_digit())?;
        let (n, unit) = timeout.split_at(split);
        let n: u64 = n.parse().ok()?;
        Some(match unit {
            "ms" => std::time::Duration::from_millis(n),
            "s" => std::time::Duration::from_secs(n),
            "m" => std::time::Duration::from_secs(n * 60),
            "h" => std::time::Duration::from_secs(n * 3600),
            _ => return None,
        })
    }
}

/// The kitchen's shape.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KitchenSpec {
    /// Orders prepared in parallel; more wait in FIFO order.
    #[schemars(range(min = 1, max = 100))]
    pub capacity: i32,
    /// `Timed` (default): an order is ready when its dishes' preparation
    /// time has passed. `Manual`: when the staff mark it ready (the menu's
    /// times are then only the estimate the customer sees).
    #[serde(default, skip_serializing_if = "KitchenMode::is_timed")]
    pub mode: KitchenMode,
}

/// How the kitchen knows an order is ready.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum KitchenMode {
    #[default]
    Timed,
    Manual,
}

impl KitchenMode {
    pub fn is_timed(&self) -> bool {
        *self == KitchenMode::Timed
    }
}

/// One dish.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MenuItem {
    /// Stable id that orders refer to (a DNS label).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub id: String,
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 500))]
    pub description: Option<String>,
    /// Unit price in minor units of `spec.currency` (1250 EUR = 12.50 EUR).
    #[schemars(range(min = 0, max = 100_000_000))]
    pub price: i64,
    /// Preparation time of one portion, in seconds.
    #[schemars(range(min = 1, max = 7200))]
    pub prep_time_seconds: i32,
    /// Portions the restaurant offers; absent means unlimited. Raise it to
    /// restock: the operator tracks what orders hold in `status.inventory`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub stock: Option<i64>,
    /// Not offered for now (the staff marked it sold out): new orders with
    /// it are rejected. Clear it to offer the dish again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sold_out: bool,
}

/// Observed state, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RestaurantStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Number of dishes on the menu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub menu_items: Option<i32>,
    /// Stock bookkeeping per menu item that has a stock limit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["menuItem".into()]))]
    pub inventory: Vec<InventoryEntry>,
    /// Stock held by in-flight orders, one entry per order: the ledger that
    /// makes reserving and releasing idempotent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["orderUid".into()]))]
    pub holds: Vec<StockHold>,
}

/// Stock bookkeeping for one menu item.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InventoryEntry {
    pub menu_item: String,
    /// The `spec.menu[].stock` these counts refer to; a new value is a restock.
    #[schemars(range(min = 0))]
    pub stock: i64,
    /// Portions taken since the last restock: held by in-flight orders or
    /// delivered. Released when an order is cancelled.
    #[schemars(range(min = 0))]
    pub reserved: i64,
    /// `stock - reserved`: what new orders can still get.
    #[schemars(range(min = 0))]
    pub available: i64,
}

/// Stock held for one in-flight order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StockHold {
    /// The holding Order's uid (names can be reused; uids can't).
    pub order_uid: String,
    /// The holding Order's name, for people.
    pub order: String,
    pub items: Vec<HeldItem>,
}

/// Portions of one menu item held for an order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HeldItem {
    pub menu_item: String,
    #[schemars(range(min = 1))]
    pub quantity: i64,
}

impl RestaurantSpec {
    /// The menu item with this id.
    pub fn item(&self, id: &str) -> Option<&MenuItem> {
        self.menu.iter().find(|m| m.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn spec(confirmation: serde_json::Value) -> RestaurantSpec {
        let mut v = serde_json::json!({
            "displayName": "R", "zone": "z", "open": true, "currency": "EUR",
            "kitchen": {"capacity": 1},
            "menu": [{"id": "pizza", "name": "Pizza", "price": 950, "prepTimeSeconds": 60}]
        });
        if !confirmation.is_null() {
            v["confirmation"] = confirmation;
        }
        serde_json::from_value(v).unwrap_or_else(|e| panic!("spec: {e}"))
    }

    #[test]
    fn only_manual_restaurants_confirm_by_hand_and_within_their_timeout() {
        assert_eq!(spec(serde_json::Value::Null).manual_confirmation(), None);
        let auto = spec(serde_json::json!({"mode": "Auto", "timeout": "1m"}));
        assert_eq!(auto.manual_confirmation(), None);
        let default = spec(serde_json::json!({"mode": "Manual"}));
        assert_eq!(
            default.manual_confirmation(),
            Some(Duration::from_secs(300))
        );
        for (t, d) in [
            ("90s", Duration::from_secs(90)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("500ms", Duration::from_millis(500)),
        ] {
            let s = spec(serde_json::json!({"mode": "Manual", "timeout": t}));
            assert_eq!(s.manual_confirmation(), Some(d), "{t}");
        }
    }
}
