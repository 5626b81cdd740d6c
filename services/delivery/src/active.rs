//! The deliveries under way (offered, assigned, picked up), kept current by
//! a watch of the Orders. Housekeeping walks these instead of listing every
//! Order in the cluster every few seconds: its work grows with what is on
//! the road, not with the order history. Orders that do not parse are
//! skipped, so one such object can't stop the watch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use dishpatch_api::Order;
use dishpatch_api::order::DeliveryState;
use futures::StreamExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use crate::dispatch::delivery;

/// Whether someone must still drive the order's delivery.
pub fn under_way(order: &Order) -> bool {
    delivery(order).is_some_and(|d| {
        matches!(
            d.state,
            DeliveryState::Offered | DeliveryState::Assigned | DeliveryState::PickedUp
        )
    })
}

#[derive(Default)]
pub struct Active {
    orders: Mutex<HashMap<String, Order>>,
}

impl Active {
    /// Starts the watch; the receiver turns true once the first list is in.
    pub fn start(
        client: Client,
        namespace: Option<String>,
        mut shutdown: watch::Receiver<bool>,
    ) -> (Arc<Self>, watch::Receiver<bool>) {
        let this = Arc::new(Self::default());
        let (synced_tx, synced) = watch::channel(false);
        let active = this.clone();
        tokio::spawn(async move {
            let api: Api<DeserializeGuard<Order>> = match &namespace {
                Some(ns) => Api::namespaced(client, ns),
                None => Api::all(client),
            };
            let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
            futures::pin_mut!(stream);
            let mut relisting: Option<HashMap<String, Order>> = None;
            loop {
                let next = tokio::select! {
                    next = stream.next() => next,
                    _ = shutdown.wait_for(|s| *s) => return,
                };
                match next {
                    Some(Ok(Event::Init)) => relisting = Some(HashMap::new()),
                    Some(Ok(Event::InitApply(guard))) => {
                        if let (Some(fresh), Some(order)) = (relisting.as_mut(), parsed(guard))
                            && under_way(&order)
                        {
                            fresh.insert(order.uid().unwrap_or_default(), order);
                        }
                    }
                    Some(Ok(Event::InitDone)) => {
                        if let Some(fresh) = relisting.take() {
                            *active.lock() = fresh;
                        }
                        let _ = synced_tx.send(true);
                    }
                    Some(Ok(Event::Apply(guard))) => {
                        if let Some(order) = parsed(guard) {
                            let uid = order.uid().unwrap_or_default();
                            let mut orders = active.lock();
                            if under_way(&order) {
                                orders.insert(uid, order);
                            } else {
                                orders.remove(&uid);
                            }
                        }
                    }
                    Some(Ok(Event::Delete(guard))) => {
                        let uid = match &guard.0 {
                            Ok(o) => o.uid(),
                            Err(invalid) => invalid.metadata.uid.clone(),
                        };
                        if let Some(uid) = uid {
                            active.lock().remove(&uid);
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "watching orders; retrying"),
                    None => return,
                }
            }
        });
        (this, synced)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Order>> {
        self.orders.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The deliveries under way, as last seen.
    pub fn snapshot(&self) -> Vec<Order> {
        self.lock().values().cloned().collect()
    }
}

fn parsed(guard: DeserializeGuard<Order>) -> Option<Order> {
    match guard.0 {
        Ok(order) => Some(order),
        Err(invalid) => {
            tracing::warn!(name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace,
                error = %invalid.error, "skipping an Order that does not parse");
            None
        }
    }
}
