//! Watch streams that keep a reflector cache and report their health, so
//! `/readyz` tells whether the operator still sees the cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use dishpatch_runtime::Health;
use futures::{Stream, StreamExt};
use kube::Api;
use kube::Resource;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, Event};
use serde::de::DeserializeOwned;

/// Whether each watch has listed once and has not failed since.
#[derive(Clone)]
pub struct WatchHealth {
    health: Health,
    orders: Arc<AtomicBool>,
    restaurants: Arc<AtomicBool>,
}

impl WatchHealth {
    pub fn new(health: Health) -> Self {
        Self {
            health,
            orders: Arc::default(),
            restaurants: Arc::default(),
        }
    }

    pub fn orders_synced(&self) -> bool {
        self.orders.load(Ordering::SeqCst)
    }

    fn update(&self) {
        let orders = self.orders.load(Ordering::SeqCst);
        let restaurants = self.restaurants.load(Ordering::SeqCst);
        match (orders, restaurants) {
            (true, true) => self.health.set_ready(true, "leading; watches healthy"),
            (false, _) => self
                .health
                .set_ready(false, "the Orders watch is not synced"),
            (_, false) => self
                .health
                .set_ready(false, "the Restaurants watch is not synced"),
        }
    }

    fn observe<K>(&self, flag: &AtomicBool, name: &str, event: &Result<Event<K>, watcher::Error>) {
        match event {
            Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => {
                flag.store(true, Ordering::SeqCst)
            }
            Ok(Event::Init | Event::InitApply(_)) => {}
            Err(e) => {
                tracing::warn!(watch = name, error = %e, "watch failed; retrying");
                flag.store(false, Ordering::SeqCst);
            }
        }
        self.update();
    }
}

/// Which watch a stream feeds.
#[derive(Clone, Copy)]
pub enum Watched {
    Orders,
    Restaurants,
}

/// A watch of `api` that fills a cache and reports to `health`.
pub fn cached<K>(
    api: Api<K>,
    watched: Watched,
    health: WatchHealth,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(|o| dishpatch_api::slim(o.meta_mut()))
        .reflect(writer)
        .inspect(move |event| {
            let (flag, name) = match watched {
                Watched::Orders => (&health.orders, "orders"),
                Watched::Restaurants => (&health.restaurants, "restaurants"),
            };
            health.observe(flag, name, event);
        })
        .touched_objects();
    (reader, stream)
}
