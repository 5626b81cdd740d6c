//! Writes to Restaurant status, one restaurant at a time.
//!
//! Every order decision for a restaurant runs under that restaurant's lock
//! against the copy this replica last wrote, and the write carries its
//! resourceVersion: a concurrent change elsewhere (a restock, a menu edit)
//! makes it fail with 409, and the decision is made again on fresh data. So
//! stock is never promised twice, and under load there is one write per
//! reservation instead of a storm of conflicts.
//!
//! A decision that writes nothing (an unlimited item, a closed restaurant)
//! meets no conflict, so the copy is also checked against the Restaurants
//! watch: when the watch has seen a newer generation (a price change,
//! closing, a restock), the copy is fetched again before deciding.

use std::collections::HashMap;
use std::sync::Arc;

use dishpatch_api::{Restaurant, RestaurantStatus};
use kube::api::{Api, PostParams};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Field manager of every write the operator makes.
pub const MANAGER: &str = "dishpatch-operator";
const ATTEMPTS: usize = 8;

type Slot = Arc<Mutex<Option<Restaurant>>>;

/// What every status write brings up to date, whoever makes it.
fn summarize(r: &Restaurant, status: &mut RestaurantStatus) {
    dishpatch_api::inventory::refresh(&r.spec, status);
    status.menu_items = i32::try_from(r.spec.menu.len()).ok();
    status.observed_generation = r.metadata.generation;
}

pub struct StockKeeper {
    client: Client,
    metrics: Arc<Metrics>,
    /// The Restaurants watch cache: tells when a kept copy is out of date.
    watched: Store<DeserializeGuard<Restaurant>>,
    slots: std::sync::Mutex<HashMap<(String, String), Slot>>,
}

impl StockKeeper {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        watched: Store<DeserializeGuard<Restaurant>>,
    ) -> Self {
        Self {
            client,
            metrics,
            watched,
            slots: Default::default(),
        }
    }

    /// Whether the watch has seen a newer Restaurant than `kept`: another
    /// generation of its spec, or another object under the same name.
    fn outdated(&self, kept: &Restaurant, namespace: &str, name: &str) -> bool {
        let key = ObjectRef::new(name).within(namespace);
        match self.watched.get(&key).as_deref() {
            Some(DeserializeGuard(Ok(seen))) => {
                seen.uid() != kept.uid() || seen.metadata.generation > kept.metadata.generation
            }
            // It no longer parses: let the fetch report why.
            Some(DeserializeGuard(Err(_))) => true,
            // Not listed yet, or just deleted: the kept copy is all we know.
            None => false,
        }
    }

    fn slot(&self, namespace: &str, name: &str) -> Slot {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slots
            .entry((namespace.to_string(), name.to_string()))
            .or_default()
            .clone()
    }

    /// How long staff of the restaurant have to confirm a new order by hand,
    /// as the Restaurants watch last saw it (`None`: they don't confirm).
    pub fn manual_confirmation(&self, namespace: &str, name: &str) -> Option<std::time::Duration> {
        let key = ObjectRef::new(name).within(namespace);
        let guard = self.watched.get(&key)?;
        guard.0.as_ref().ok()?.spec.manual_confirmation()
    }

    /// Forgets a restaurant (it was deleted).
    pub fn forget(&self, namespace: &str, name: &str) {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slots.remove(&(namespace.to_string(), name.to_string()));
    }

    /// Runs `decide` on the restaurant and its status under the restaurant's
    /// lock and writes the status if `decide` changed it. `decide` may run
    /// more than once (after a conflict), always on the latest object.
    /// Returns `None` when the restaurant does not exist.
    pub async fn update<T>(
        &self,
        namespace: &str,
        name: &str,
        mut decide: impl FnMut(&Restaurant, &mut RestaurantStatus) -> T,
    ) -> Result<Option<T>> {
        let api: Api<Restaurant> = Api::namespaced(self.client.clone(), namespace);
        let slot = self.slot(namespace, name);
        let mut cached = slot.lock().await;
        for _ in 0..ATTEMPTS {
            let restaurant = match cached.take() {
                Some(r) if !self.outdated(&r, namespace, name) => r,
                _ => match api.get_opt(name).await? {
                    Some(r) => r,
                    None => return Ok(None),
                },
            };
            let before = restaurant.status.clone().unwrap_or_default();
            let mut status = before.clone();
            summarize(&restaurant, &mut status);
            let out = decide(&restaurant, &mut status);
            if status == before {
                *cached = Some(restaurant);
                return Ok(Some(out));
            }
            let mut next = restaurant;
            next.status = Some(status);
            next.metadata.managed_fields = None;
            let params = PostParams {
                field_manager: Some(MANAGER.to_string()),
                ..Default::default()
            };
            self.metrics.write("restaurants/status");
            match api.replace_status(name, &params, &next).await {
                Ok(written) => {
                    *cached = Some(written);
                    return Ok(Some(out));
                }
                // Someone else changed it: decide again on the fresh object.
                Err(kube::Error::Api(e)) if e.code == 409 => continue,
                Err(kube::Error::Api(e)) if e.code == 404 => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Conflict(format!(
            "restaurant {namespace}/{name} kept changing; giving up after {ATTEMPTS} attempts"
        )))
    }

    /// Restaurants in `namespace` that, as the watch last saw them, hold
    /// stock for the order `uid`: for orders whose spec can't be read.
    pub fn holding(&self, namespace: &str, uid: &str) -> Vec<String> {
        self.watched
            .state()
            .iter()
            .filter_map(|r| r.0.as_ref().ok())
            .filter(|r| r.namespace().as_deref() == Some(namespace))
            .filter(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| dishpatch_api::inventory::holds(s, uid))
            })
            .map(|r| r.name_any())
            .collect()
    }
}
