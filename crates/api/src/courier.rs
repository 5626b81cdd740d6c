//! The `Courier` custom resource: a person who delivers orders.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A courier as dispatch knows them.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "dishpatch.dev",
    version = "v1alpha1",
    kind = "Courier",
    plural = "couriers",
    shortname = "cour",
    category = "dishpatch",
    namespaced,
    status = "CourierStatus",
    derive = "PartialEq",
    doc = "A courier who delivers orders within a zone.",
    printcolumn(name = "On shift", type_ = "boolean", json_path = ".spec.onShift"),
    printcolumn(name = "Available", type_ = "boolean", json_path = ".status.available"),
    printcolumn(
        name = "Current order",
        type_ = "string",
        json_path = ".status.currentOrder"
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
    ),
    selectable = ".spec.zone"
)]
#[serde(rename_all = "camelCase")]
pub struct CourierSpec {
    #[schemars(length(min = 1, max = 100))]
    pub display_name: String,
    /// Delivery zone the courier works in.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub zone: String,
    /// Whether the courier is working now.
    pub on_shift: bool,
    pub vehicle: Vehicle,
    /// E.164 phone number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^\+[1-9][0-9]{6,14}$"))]
    pub phone: Option<String>,
}

/// How the courier travels.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Vehicle {
    Bicycle,
    Scooter,
    Car,
    OnFoot,
}

/// Observed state, written by the delivery service.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CourierStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// On shift and not carrying an order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub available: Option<bool>,
    /// Name of the Order being delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_order: Option<String>,
    /// An order offered to the courier and waiting for an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<CourierOffer>,
}

/// An offer of a delivery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CourierOffer {
    /// Name of the offered Order.
    pub order: String,
    /// When the offer moves on to another courier.
    pub expires_at: Time,
}
