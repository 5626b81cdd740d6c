//! Orders whose object no longer parses as an `Order` (a field some tool
//! wrote that the schema admits but the types can't hold). They must not
//! jam anything: the orphan sweep counts them as live, so their stock stays
//! held, and their deletion is handled here from metadata and the few raw
//! fields it needs.

use dishpatch_api::Order;
use dishpatch_api::inventory;
use dishpatch_api::lifecycle::annotation;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType as K8sEventType;
use serde_json::{Value, json};

use crate::context::Context;
use crate::error::{Error, Result};
use crate::orders::{FINALIZER, record_on};

/// What deletion needs to know, read leniently from the raw object.
#[derive(Debug, Default, PartialEq)]
pub struct RawFacts {
    pub restaurant: Option<String>,
    /// The customer's money is outstanding: a charge pending, or succeeded
    /// and neither refunded nor delivered.
    pub money_outstanding: bool,
}

impl RawFacts {
    pub fn of(object: &Value) -> Self {
        let payment = object
            .pointer("/status/payment/state")
            .and_then(Value::as_str);
        let delivered = object
            .pointer("/status/delivery/state")
            .and_then(Value::as_str)
            == Some("Delivered");
        Self {
            restaurant: object
                .pointer("/spec/restaurantRef/name")
                .and_then(Value::as_str)
                .map(String::from),
            money_outstanding: match payment {
                Some("Pending") => true,
                Some("Succeeded") => !delivered,
                _ => false,
            },
        }
    }
}

/// Finishes deleting an order that does not parse: releases its stock and
/// drops the finalizer, unless money may be outstanding, which no worker can
/// settle for an object it cannot read either: then a Warning Event asks a
/// person to settle it and annotate `dishpatch.dev/compensation-resolved`.
pub async fn cleanup(meta: &ObjectMeta, ctx: &Context) -> Result<Action> {
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let uid = meta.uid.clone().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &namespace,
        &ApiResource::erase::<Order>(&()),
    );
    let Some(object) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if object.metadata.uid.as_deref() != Some(uid.as_str()) {
        return Ok(Action::await_change()); // another object by the same name
    }
    let raw = serde_json::to_value(&object)?;
    let facts = RawFacts::of(&raw);
    let resolved = object
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(annotation::COMPENSATION_RESOLVED));
    if facts.money_outstanding && !resolved {
        if ctx.memory.should_compensate(&uid, 0) {
            let regarding = ObjectReference {
                api_version: Some("dishpatch.dev/v1alpha1".into()),
                kind: Some("Order".into()),
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                uid: Some(uid.clone()),
                ..Default::default()
            };
            record_on(
                ctx,
                &regarding,
                K8sEventType::Warning,
                "CannotCompensate",
                format!(
                    "the order does not parse, so its payment can't be settled automatically; refund it by hand, then annotate it {}=<what was done>",
                    annotation::COMPENSATION_RESOLVED
                ),
            )
            .await;
        }
        return Err(Error::Waiting(
            format!("unparsable order {name} has money outstanding"),
            std::time::Duration::from_secs(300),
        ));
    }

    let restaurants = match facts.restaurant {
        Some(r) => vec![r],
        None => ctx.stock.holding(&namespace, &uid),
    };
    for restaurant in restaurants {
        ctx.stock
            .update(&namespace, &restaurant, |_, st| {
                inventory::release(st, &uid)
            })
            .await?;
    }

    // Only our finalizer goes, and only from the object we looked at.
    let finalizers: Vec<String> = object
        .metadata
        .finalizers
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f != FINALIZER)
        .collect();
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": object.metadata.resource_version,
    }});
    ctx.metrics.write("orders");
    match api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            return Err(Error::Conflict(format!(
                "order {name} changed; trying again"
            )));
        }
        Err(e) => return Err(e.into()),
    }
    ctx.memory.forget(&uid);
    tracing::info!(order = %name, %namespace, "released an unparsable order");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_deletion_needs_from_raw_fields() {
        let o = json!({"spec": {"restaurantRef": {"name": "roma"}}});
        assert_eq!(
            RawFacts::of(&o),
            RawFacts {
                restaurant: Some("roma".into()),
                money_outstanding: false
            }
        );
        let charged = json!({"status": {"payment": {"state": "Succeeded"}}});
        assert!(RawFacts::of(&charged).money_outstanding);
        let pending = json!({"status": {"payment": {"state": "Pending"}}});
        assert!(RawFacts::of(&pending).money_outstanding);
        let delivered = json!({"status": {"payment": {"state": "Succeeded"}, "delivery": {"state": "Delivered"}}});
        assert!(!RawFacts::of(&delivered).money_outstanding);
        let refunded = json!({"status": {"payment": {"state": "Refunded"}}});
        assert!(!RawFacts::of(&refunded).money_outstanding);
        assert_eq!(RawFacts::of(&json!(42)), RawFacts::default());
    }
}
