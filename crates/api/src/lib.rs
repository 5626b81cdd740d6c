//! Shared types of dishpatch: the `dishpatch.dev/v1alpha1` custom resources,
//! money, and the event schema. Every other crate depends on this one.

// `#[kube(printcolumn(...))]` repeats `type_ = ...` per column by design;
// clippy mistakes the derive's arguments for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

pub mod courier;
pub mod events;
pub mod inventory;
pub mod lifecycle;
pub mod money;
pub mod order;
pub mod restaurant;

pub use courier::{Courier, CourierSpec, CourierStatus};
pub use money::Money;
pub use order::{Order, OrderPhase, OrderSpec, OrderStatus};
pub use restaurant::{Restaurant, RestaurantSpec, RestaurantStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every dishpatch resource.
pub const GROUP: &str = "dishpatch.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Every CRD dishpatch defines, generated from the Rust types.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![Order::crd(), Restaurant::crd(), Courier::crd()]
}

/// A CRD rendered as the file that lives under `crds/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdFile {
    /// File name, `<plural>.<group>.yaml`.
    pub file_name: String,
    pub contents: String,
}

/// Header of every generated CRD file.
pub const GENERATED_HEADER: &str = "# Generated from the Rust types in crates/api by `cargo run -p dishpatch-operator -- crds`.\n# Do not edit: change the types and regenerate.\n";

/// The contents of `crds/`, exactly as `dishpatch-operator crds` writes them.
pub fn crd_files() -> Result<Vec<CrdFile>, serde_yaml::Error> {
    crds()
        .into_iter()
        .map(|crd| {
            let file_name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
            let yaml = serde_yaml::to_string(&crd)?;
            Ok(CrdFile {
                file_name,
                contents: format!("{GENERATED_HEADER}{yaml}"),
            })
        })
        .collect()
}
