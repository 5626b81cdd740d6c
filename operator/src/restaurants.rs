//! The Restaurant reconciler: keeps `status` (menu size, inventory after a
//! restock, observed generation) and drops stock holds of orders that no
//! longer exist.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use dishpatch_api::Restaurant;
use dishpatch_api::inventory;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;

use crate::context::Context;
use crate::error::{Error, Result};

pub async fn reconcile(
    guard: Arc<DeserializeGuard<Restaurant>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let restaurant = match &guard.0 {
        Ok(r) => r,
        Err(invalid) => {
            tracing::warn!(name = ?invalid.metadata.name, error = %invalid.error, "skipping a Restaurant that does not parse");
            return Ok(Action::await_change());
        }
    };
    let namespace = restaurant.namespace().unwrap_or_default();
    let name = restaurant.name_any();
    let labels = crate::metrics::ControllerLabels {
        controller: "restaurant".into(),
    };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    if restaurant.metadata.deletion_timestamp.is_some() {
        ctx.stock.forget(&namespace, &name);
        return Ok(Action::await_change());
    }
    let orphans = ctx
        .stock
        .update(&namespace, &name, |_, st| {
            // Holds of orders that vanished without compensation (their
            // finalizer was removed by hand) would keep stock forever. Read
            // the cache under the restaurant's lock: an order that reserved
            // before this point is in it. Only trust the cache once synced.
            let live: Option<HashSet<String>> = ctx.watches.orders_synced().then(|| {
                ctx.orders
                    .state()
                    .iter()
                    // An order that does not parse still exists and still
                    // holds its stock.
                    .filter_map(|o| match &o.0 {
                        Ok(o) => o.uid(),
                        Err(invalid) => invalid.metadata.uid.clone(),
                    })
                    .collect()
            });
            let mut orphans = Vec::new();
            if let Some(live) = &live {
                orphans = st
                    .holds
                    .iter()
                    .filter(|h| !live.contains(&h.order_uid))
                    .map(|h| h.order_uid.clone())
                    .collect();
                for uid in &orphans {
                    inventory::release(st, uid);
                }
            }
            orphans
        })
        .await?;
    if let Some(orphans) = orphans
        && !orphans.is_empty()
    {
        tracing::warn!(restaurant = %name, ?orphans, "released stock held by orders that no longer exist");
    }
    Ok(Action::requeue(Duration::from_secs(600)))
}

pub fn error_policy(
    _: Arc<DeserializeGuard<Restaurant>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics
        .errors
        .get_or_create(&crate::metrics::ErrorLabels {
            controller: "restaurant".into(),
            error: error.kind().into(),
        })
        .inc();
    tracing::warn!(error = %error, "restaurant reconcile failed");
    Action::requeue(Duration::from_secs(5))
}
