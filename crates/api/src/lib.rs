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

/// Drops what a watch cache never reads and every object carries: managed
/// fields (one entry per writer, the largest part of an Order once six
/// components have written it) and kubectl's last-applied copy of the
/// object. Applied to objects as they enter a reflector store, so memory
/// follows what the components use.
pub fn slim(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

#[cfg(test)]
mod slim_tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

    #[test]
    fn slim_keeps_the_annotations_the_components_read() {
        let mut meta = ObjectMeta {
            managed_fields: Some(vec![ManagedFieldsEntry::default()]),
            annotations: Some(
                [
                    ("kubectl.kubernetes.io/last-applied-configuration", "{}"),
                    ("dishpatch.dev/compensation-resolved", "refunded by hand"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ),
            ..Default::default()
        };
        slim(&mut meta);
        assert!(meta.managed_fields.is_none());
        let left: Vec<_> = meta.annotations.unwrap().into_keys().collect();
        assert_eq!(
            left,
            vec!["dishpatch.dev/compensation-resolved".to_string()]
        );

        let mut only_kubectl = ObjectMeta {
            annotations: Some(
                [(
                    "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                    "{}".to_string(),
                )]
                .into(),
            ),
            ..Default::default()
        };
        slim(&mut only_kubectl);
        assert!(only_kubectl.annotations.is_none());
    }
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
