//! Watch-backed caches of Orders, Restaurants and Couriers. Every GET is
//! served from here, so a busy read path never touches the apiserver; the
//! Orders watch also feeds the live-tracking broadcast.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use dishpatch_api::courier::Courier;
use dishpatch_api::{Order, Restaurant};
use dishpatch_runtime::Health;
use futures::StreamExt;
use kube::ResourceExt;
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::utils::ResetTimerBackoff;
use kube::runtime::watcher::ExponentialBackoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

/// The latest the Orders watch saw of one order.
#[derive(Clone, Debug)]
pub enum OrderChange {
    Unseen,
    Applied(Arc<Order>),
    Deleted,
}

/// One feed per order someone follows live: a stream wakes only when its own
/// order changes, not on every order's change. Feeds nobody listens to any
/// more are dropped when their order next changes or goes.
#[derive(Default)]
pub struct Feeds {
    feeds: std::sync::Mutex<std::collections::HashMap<String, watch::Sender<OrderChange>>>,
}

impl Feeds {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, watch::Sender<OrderChange>>>
    {
        self.feeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Changes of order `name` from now on. The feed lives as long as
    /// someone follows it: dropping the last [`Following`] drops it, so a
    /// stream refused after subscribing (no such order, too many streams)
    /// leaves nothing behind.
    pub fn subscribe(self: &Arc<Self>, name: &str) -> Following {
        let rx = self
            .lock()
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(OrderChange::Unseen).0)
            .subscribe();
        Following {
            rx: Some(rx),
            feeds: self.clone(),
            name: name.to_string(),
        }
    }

    fn publish(&self, name: &str, change: OrderChange) {
        let mut feeds = self.lock();
        let gone = matches!(change, OrderChange::Deleted);
        if let Some(tx) = feeds.get(name) {
            tx.send_replace(change);
            if gone || tx.receiver_count() == 0 {
                feeds.remove(name);
            }
        }
    }

    /// The orders someone follows.
    fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Drops the feed of `name` if nobody follows it any more.
    fn release(&self, name: &str) {
        let mut feeds = self.lock();
        if feeds.get(name).is_some_and(|tx| tx.receiver_count() == 0) {
            feeds.remove(name);
        }
    }

    #[cfg(test)]
    fn followed(&self) -> usize {
        self.lock().len()
    }
}

/// One follower of an order's feed: the changes, and the feed's release
/// when it goes.
pub struct Following {
    /// Always `Some` until dropped; taken in `drop` so the receiver is gone
    /// before the feed counts its receivers.
    rx: Option<watch::Receiver<OrderChange>>,
    feeds: Arc<Feeds>,
    name: String,
}

impl Following {
    /// Waits for the next change; `None` once the feed is gone.
    pub async fn changed(&mut self) -> Option<OrderChange> {
        let rx = self.rx.as_mut()?;
        rx.changed().await.ok()?;
        // Only the latest state matters; a slow client skips straight to it.
        Some(rx.borrow_and_update().clone())
    }

    #[cfg(test)]
    fn has_changed(&self) -> bool {
        self.rx
            .as_ref()
            .is_some_and(|rx| rx.has_changed().unwrap_or(false))
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        drop(self.rx.take());
        self.feeds.release(&self.name);
    }
}

/// Where an order sorts in a list: newest first by creation time, then name.
pub type SortKey = (i64, i32, String);

pub fn sort_key(o: &Order) -> SortKey {
    let ts = o
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_default();
    (ts.as_second(), ts.subsec_nanosecond(), o.name_any())
}

fn write(index: &std::sync::RwLock<OrderIndex>) -> std::sync::RwLockWriteGuard<'_, OrderIndex> {
    index
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The orders by customer, in list order, kept from the Orders watch: a
/// customer's page costs the page, not a scan and sort of every order in
/// the namespace.
#[derive(Default)]
pub struct OrderIndex {
    by_customer: HashMap<String, BTreeSet<SortKey>>,
    all: BTreeSet<SortKey>,
    /// name → (customer, key), to find an order's old entry.
    entries: HashMap<String, (String, SortKey)>,
}

impl OrderIndex {
    fn insert(&mut self, o: &Order) {
        self.remove(&o.name_any());
        let key = sort_key(o);
        let customer = o.spec.customer.id.clone();
        self.by_customer
            .entry(customer.clone())
            .or_default()
            .insert(key.clone());
        self.all.insert(key.clone());
        self.entries.insert(o.name_any(), (customer, key));
    }

    fn remove(&mut self, name: &str) {
        if let Some((customer, key)) = self.entries.remove(name) {
            self.all.remove(&key);
            if let Some(keys) = self.by_customer.get_mut(&customer) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_customer.remove(&customer);
                }
            }
        }
    }

    /// Up to `n` orders strictly older than `after` (all when `None`),
    /// newest first: of `customer`'s orders, or of everyone's. `get` reads
    /// an order from the store; one it does not return (the store and the
    /// index are updated one after the other) is passed over.
    pub fn page<T>(
        &self,
        customer: Option<&str>,
        after: Option<&SortKey>,
        n: usize,
        get: impl Fn(&SortKey) -> Option<T>,
    ) -> Vec<(SortKey, T)> {
        let keys = match customer {
            Some(c) => match self.by_customer.get(c) {
                Some(keys) => keys,
                None => return Vec::new(),
            },
            None => &self.all,
        };
        let older = match after {
            Some(a) => keys.range(..a.clone()),
            None => keys.range::<SortKey, _>(..),
        };
        older
            .rev()
            .filter_map(|k| get(k).map(|o| (k.clone(), o)))
            .take(n)
            .collect()
    }
}

/// The three stores plus the per-order live feeds.
#[derive(Clone)]
pub struct Caches {
    pub namespace: String,
    pub orders: Store<Order>,
    pub restaurants: Store<Restaurant>,
    pub couriers: Store<Courier>,
    pub feeds: Arc<Feeds>,
    pub index: Arc<std::sync::RwLock<OrderIndex>>,
}

impl Caches {
    /// Starts the watches; `health` turns ready once all three stores have
    /// listed their objects.
    pub fn start(client: &Client, namespace: &str, health: Health) -> Self {
        let feeds = Arc::new(Feeds::default());
        let index = Arc::new(std::sync::RwLock::new(OrderIndex::default()));
        let orders = spawn_orders(
            Api::namespaced(client.clone(), namespace),
            feeds.clone(),
            index.clone(),
        );
        let restaurants = spawn_plain::<Restaurant>(Api::namespaced(client.clone(), namespace));
        let couriers = spawn_plain::<Courier>(Api::namespaced(client.clone(), namespace));
        let caches = Self {
            namespace: namespace.to_string(),
            orders,
            restaurants,
            couriers,
            feeds,
            index,
        };
        let ready = caches.clone();
        tokio::spawn(async move {
            health.set_ready(false, "syncing caches");
            let synced = ready.orders.wait_until_ready().await.is_ok()
                && ready.restaurants.wait_until_ready().await.is_ok()
                && ready.couriers.wait_until_ready().await.is_ok();
            if synced {
                tracing::info!("caches synced");
                health.set_ready(true, "caches synced");
            }
        });
        caches
    }

    pub fn order(&self, name: &str) -> Option<Arc<Order>> {
        self.orders
            .get(&ObjectRef::new(name).within(&self.namespace))
    }
    pub fn restaurant(&self, name: &str) -> Option<Arc<Restaurant>> {
        self.restaurants
            .get(&ObjectRef::new(name).within(&self.namespace))
    }
    pub fn courier(&self, name: &str) -> Option<Arc<Courier>> {
        self.couriers
            .get(&ObjectRef::new(name).within(&self.namespace))
    }

    /// Waits (briefly) until the cache holds `name` at least as new as
    /// `resource_version`, so a client that just wrote reads its own write.
    pub async fn wait_for_order(&self, name: &str, resource_version: Option<&str>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while tokio::time::Instant::now() < deadline {
            if let Some(o) = self.order(name)
                && !rv_older(o.metadata.resource_version.as_deref(), resource_version)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether `have` is older than `want`. Resource versions are opaque to
/// clients, but etcd's are integers; when they don't parse, assume not older.
pub fn rv_older(have: Option<&str>, want: Option<&str>) -> bool {
    match (
        have.and_then(|h| h.parse::<u64>().ok()),
        want.and_then(|w| w.parse::<u64>().ok()),
    ) {
        (Some(h), Some(w)) => h < w,
        (None, Some(_)) => true,
        _ => false,
    }
}

/// A watch event with its object parsed; `None` for an object that does
/// not parse, which is skipped (and logged). Its deletion is not: the copy
/// the cache kept from before it broke goes with it, or a deleted order
/// would be served, and followed, until the next relist. (A change that
/// breaks an object leaves that last good copy in place: an order exists,
/// and its stream should not end as if it were deleted.)
fn parsed<K>(
    event: watcher::Event<DeserializeGuard<K>>,
    cached: &Store<K>,
) -> Option<watcher::Event<K>>
where
    K: kube::Resource<DynamicType = ()> + Clone,
{
    let ok = |guard: DeserializeGuard<K>| match guard.0 {
        Ok(object) => Ok(object),
        Err(invalid) => {
            tracing::warn!(kind = %K::kind(&()), name = ?invalid.metadata.name,
                error = %invalid.error, "skipping an object that does not parse");
            // Where the cache would hold it.
            Err(invalid.metadata.name.map(|name| {
                let at = ObjectRef::<K>::new(&name);
                match &invalid.metadata.namespace {
                    Some(ns) => at.within(ns),
                    None => at,
                }
            }))
        }
    };
    Some(match event {
        watcher::Event::Apply(g) => watcher::Event::Apply(ok(g).ok()?),
        watcher::Event::InitApply(g) => watcher::Event::InitApply(ok(g).ok()?),
        watcher::Event::Delete(g) => watcher::Event::Delete(match ok(g) {
            Ok(object) => object,
            Err(at) => cached.get(&at?)?.as_ref().clone(),
        }),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitDone => watcher::Event::InitDone,
    })
}

/// Keeps the index and the live feeds in step with the Orders watch (the
/// reflector keeps the store).
struct Follow {
    feeds: Arc<Feeds>,
    index: Arc<std::sync::RwLock<OrderIndex>>,
    /// A relist builds a fresh index and swaps it in when complete, as the
    /// reflector does with its store.
    relisting: Option<OrderIndex>,
}

impl Follow {
    fn new(feeds: Arc<Feeds>, index: Arc<std::sync::RwLock<OrderIndex>>) -> Self {
        Self {
            feeds,
            index,
            relisting: None,
        }
    }

    fn on(&mut self, event: watcher::Event<Order>) {
        match event {
            watcher::Event::Init => self.relisting = Some(OrderIndex::default()),
            watcher::Event::InitDone => {
                if let Some(fresh) = self.relisting.take() {
                    // An order deleted while the watch was down never gets
                    // a Delete event: the relist is the only news of it, and
                    // its streams would otherwise wait for good.
                    let gone: Vec<String> = self
                        .feeds
                        .names()
                        .into_iter()
                        .filter(|name| !fresh.entries.contains_key(name))
                        .collect();
                    *write(&self.index) = fresh;
                    for name in gone {
                        self.feeds.publish(&name, OrderChange::Deleted);
                    }
                }
            }
            watcher::Event::InitApply(o) => {
                match self.relisting.as_mut() {
                    Some(fresh) => fresh.insert(&o),
                    None => write(&self.index).insert(&o),
                }
                let name = o.name_any();
                self.feeds.publish(&name, OrderChange::Applied(Arc::new(o)));
            }
            watcher::Event::Apply(o) => {
                write(&self.index).insert(&o);
                let name = o.name_any();
                self.feeds.publish(&name, OrderChange::Applied(Arc::new(o)));
            }
            watcher::Event::Delete(o) => {
                write(&self.index).remove(&o.name_any());
                self.feeds.publish(&o.name_any(), OrderChange::Deleted);
            }
        }
    }
}

/// The Orders watch reads every object through `DeserializeGuard`: one
/// Order that does not parse would otherwise fail the whole list, and the
/// cache would never fill. Such an order is skipped (and logged).
fn spawn_orders(
    api: Api<DeserializeGuard<Order>>,
    feeds: Arc<Feeds>,
    index: Arc<std::sync::RwLock<OrderIndex>>,
) -> Store<Order> {
    let (reader, writer) = reflector::store();
    let cached = reader.clone();
    let stream = watcher(api, watcher::Config::default())
        .backoff(retry())
        .modify(|o| dishpatch_api::slim(kube::Resource::meta_mut(o)))
        .filter_map(move |event| std::future::ready(event.map(|e| parsed(e, &cached)).transpose()))
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut follow = Follow::new(feeds, index);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => follow.on(event),
                Err(e) => tracing::warn!(error = %e, "orders watch failed; retrying"),
            }
        }
    });
    reader
}

/// How the watches retry. Not kube's default (doubling up to 30 s): after
/// an apiserver outage of half a minute that would leave the façade up to
/// 30 s behind once the apiserver is back, and a watch resumed that late
/// relists (410 Gone), folding every phase written meanwhile into one, so
/// live order streams would skip transitions. Capped at 2 s instead: a
/// handful of lists per outage.
fn retry() -> ResetTimerBackoff<ExponentialBackoff> {
    let exponential = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(2))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(exponential.into(), Duration::from_secs(60))
}

/// Restaurants and Couriers are watched through `DeserializeGuard` too:
/// one that does not parse would fail the list, and the façade would never
/// become ready.
fn spawn_plain<K>(api: Api<DeserializeGuard<K>>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let cached = reader.clone();
    let stream = watcher(api, watcher::Config::default())
        .backoff(retry())
        .modify(|o| dishpatch_api::slim(kube::Resource::meta_mut(o)))
        .filter_map(move |event| std::future::ready(event.map(|e| parsed(e, &cached)).transpose()))
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                tracing::warn!(error = %e, kind = %K::kind(&()), "watch failed; retrying");
            }
        }
    });
    reader
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(name: &str) -> Arc<Order> {
        Arc::new(dishpatch_testkit_free_order(name))
    }

    /// An Order object without going through fixtures (no test dependency).
    fn dishpatch_testkit_free_order(name: &str) -> Order {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "metadata": {"name": name},
            "spec": {"customer": {"id": "c", "name": "C", "contact": {"email": "c@example.com"}},
                "restaurantRef": {"name": "r"}, "items": [{"menuItem": "pizza", "quantity": 1}],
                "deliveryAddress": {"street": "s", "city": "c", "postalCode": "1", "country": "DE"},
                "payment": {"token": "tok_visa"}}
        }))
        .unwrap_or_else(|e| panic!("order: {e}"))
    }

    fn order_at(name: &str, customer: &str, second: i64) -> Order {
        let mut o = dishpatch_testkit_free_order(name);
        o.spec.customer.id = customer.to_string();
        o.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::from_second(second).unwrap_or_else(|e| panic!("{e}")),
        ));
        o
    }

    #[test]
    fn the_index_pages_one_customer_newest_first() {
        let mut idx = OrderIndex::default();
        for (i, customer) in ["ann", "bob", "ann", "ann", "bob"].iter().enumerate() {
            idx.insert(&order_at(&format!("o{i}"), customer, 100 + i as i64));
        }
        let all = |k: &SortKey| Some(k.2.clone());
        let names =
            |keys: Vec<(SortKey, String)>| keys.into_iter().map(|k| k.1).collect::<Vec<_>>();
        let first = idx.page(Some("ann"), None, 2, all);
        assert_eq!(names(first.clone()), vec!["o3", "o2"]);
        let last = first.last().map(|(k, _)| k.clone());
        assert_eq!(
            names(idx.page(Some("ann"), last.as_ref(), 2, all)),
            vec!["o0"]
        );
        assert_eq!(
            names(idx.page(None, None, 10, all)),
            vec!["o4", "o3", "o2", "o1", "o0"]
        );
        // An update moves nothing twice; a delete leaves no trace.
        idx.insert(&order_at("o3", "ann", 103));
        idx.remove("o2");
        assert_eq!(
            names(idx.page(Some("ann"), None, 10, all)),
            vec!["o3", "o0"]
        );
        assert!(idx.page(Some("carl"), None, 10, all).is_empty());
    }

    #[test]
    fn a_page_is_full_even_when_the_store_lags_the_index() {
        let mut idx = OrderIndex::default();
        for i in 0..4 {
            idx.insert(&order_at(&format!("o{i}"), "ann", 100 + i));
        }
        // o3 is in the index but not (yet, or any more) in the store.
        let stored = |k: &SortKey| (k.2 != "o3").then(|| k.2.clone());
        let page = idx.page(Some("ann"), None, 2, stored);
        assert_eq!(
            page.into_iter().map(|k| k.1).collect::<Vec<_>>(),
            vec!["o2", "o1"],
            "a short page: the client would stop before o1 and o0"
        );
    }

    #[test]
    fn a_stream_wakes_only_for_its_own_order() {
        let feeds = Arc::new(Feeds::default());
        let a = feeds.subscribe("a");
        feeds.publish("b", OrderChange::Applied(order("b")));
        assert!(!a.has_changed(), "woken by another order");
        feeds.publish("a", OrderChange::Applied(order("a")));
        assert!(a.has_changed());
        assert_eq!(feeds.followed(), 1, "nobody follows b: no feed for it");
        drop(a);
        assert_eq!(feeds.followed(), 0, "an abandoned feed is dropped");
    }

    #[test]
    fn a_subscription_dropped_unused_leaves_no_feed() {
        let feeds = Arc::new(Feeds::default());
        // A stream refused after subscribing (no such order, someone
        // else's, too many streams) follows nothing: it must not leave a
        // feed behind, or made-up ids would grow the map without end.
        for i in 0..100 {
            drop(feeds.subscribe(&format!("no-such-order-{i}")));
        }
        assert_eq!(feeds.followed(), 0, "refused streams left feeds behind");
        let kept = feeds.subscribe("a");
        let second = feeds.subscribe("a");
        drop(second);
        assert_eq!(feeds.followed(), 1, "a feed still followed was dropped");
        drop(kept);
        assert_eq!(feeds.followed(), 0);
    }

    #[test]
    fn an_order_gone_while_the_watch_was_down_ends_its_streams() {
        let feeds = Arc::new(Feeds::default());
        let index = Arc::new(std::sync::RwLock::new(OrderIndex::default()));
        let mut follow = Follow::new(feeds.clone(), index.clone());
        follow.on(watcher::Event::Init);
        follow.on(watcher::Event::InitApply(order_at("a", "ann", 1)));
        follow.on(watcher::Event::InitApply(order_at("b", "ann", 2)));
        follow.on(watcher::Event::InitDone);
        let mut a = feeds.subscribe("a");
        let mut b = feeds.subscribe("b");
        // The watch broke; `a` was deleted meanwhile, so the relist has
        // only `b`: no Delete event ever comes for `a`.
        follow.on(watcher::Event::Init);
        follow.on(watcher::Event::InitApply(order_at("b", "ann", 2)));
        follow.on(watcher::Event::InitDone);
        let names =
            |keys: Vec<(SortKey, String)>| keys.into_iter().map(|k| k.1).collect::<Vec<_>>();
        let page = index
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .page(Some("ann"), None, 10, |k| Some(k.2.clone()));
        assert_eq!(names(page), vec!["b"]);
        // What a stream would see next, without waiting.
        let now = |f: &mut Following| futures::FutureExt::now_or_never(f.changed()).flatten();
        assert!(
            matches!(now(&mut a), Some(OrderChange::Deleted)),
            "the stream of an order deleted during the gap waits forever"
        );
        assert!(matches!(now(&mut b), Some(OrderChange::Applied(_))));
    }

    #[test]
    fn resource_version_order() {
        assert!(rv_older(Some("9"), Some("10")));
        assert!(!rv_older(Some("10"), Some("10")));
        assert!(!rv_older(Some("11"), Some("10")));
        assert!(rv_older(None, Some("10")));
        assert!(!rv_older(Some("x"), Some("y")));
        assert!(!rv_older(Some("1"), None));
    }
}
