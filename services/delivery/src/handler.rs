//! Delivery's stage: offer ready orders to couriers, drive each delivery to
//! the door (the courier is simulated), and free couriers of cancelled orders.
//!
//! The Order and the Courier objects are the truth; memory only holds what
//! can be rebuilt: the orders waiting for a courier (the operator re-publishes
//! `kitchen.ready` for orders stuck in Ready) and which deliveries this
//! process is driving (recovered from the orders' timestamps).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dishpatch_api::Order;
use dishpatch_api::courier::Courier;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::order::{DeliveryState, DeliveryStatus, KitchenState};
use dishpatch_api::restaurant::Restaurant;
use dishpatch_messaging::trace;
use dishpatch_worker::{HandleError, Handler, OrderAccess};
use jiff::Timestamp;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::{Client, ResourceExt};
use tokio::sync::{OwnedMutexGuard, watch};
use tracing::Instrument as _;

use crate::active::Active;
use crate::couriers::{Cas, Couriers};
use crate::dispatch::{
    Claim, Next, accepted, after, assigned, cancel_pending, candidates, ceil_second, claimed,
    delivered, delivery, event_of, freed, is_free, kitchen, next_step, offered, picked_up,
    points_at, refined, released, settled,
};
use crate::timing::Timing;

/// Set on a Courier (by the façade) to accept the offered order named in it;
/// removed once acted on or refused.
pub const ACCEPT_ANNOTATION: &str = "dishpatch.dev/accept";
/// A courier's "I have it" (set through the façade), value = the order's name.
pub const PICKED_UP_ANNOTATION: &str = "dishpatch.dev/picked-up";
/// A courier's "handed over" (set through the façade), value = the order's name.
pub const DELIVERED_ANNOTATION: &str = "dishpatch.dev/delivered";

/// How often orders are scanned for deliveries nobody drives and couriers
/// for assignments nobody holds.
const HOUSEKEEPING: Duration = Duration::from_secs(5);
/// A delivery this late is adopted by any replica: whoever drove it is gone.
const ORPHAN_GRACE: Duration = Duration::from_secs(5);
/// A courier that points at an order which does not point back, unchanged for
/// this long, is a claim whose process died before recording it. Claims in
/// flight take milliseconds.
const STALE_CLAIM: Duration = Duration::from_secs(30);

pub struct Settings {
    pub timing: Timing,
    /// Couriers take an offer at once (until the façade lets them answer).
    pub auto_accept: bool,
    /// Only this namespace (default: all) for start-up recovery and sweeps.
    pub namespace: Option<String>,
}

/// An order waiting for a free courier.
#[derive(Debug, Clone)]
struct Waiting {
    order: OrderRef,
    zone: String,
    parent: String,
}

/// Per-order mutual exclusion within this process: a duplicated message,
/// the retry loop and the driver never act on one order at the same time.
#[derive(Default)]
struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        let lock = {
            let mut map = held(&self.0);
            // Drop the locks nobody holds or waits for.
            map.retain(|_, l| Arc::strong_count(l) > 1);
            map.entry(key.to_string()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

/// A std mutex guard; a panic elsewhere never leaves these maps inconsistent.
fn held<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100_u64.saturating_mul(1 << attempt.min(6)).min(5_000))
}

fn until(at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO)
}

fn section(d: &DeliveryStatus) -> Result<serde_json::Value, HandleError> {
    serde_json::to_value(d).map_err(|e| HandleError::Permanent(e.to_string()))
}

/// The span a delivery's later work hangs under: the incoming message's
/// handler, or the order's root when it has none.
fn parent_of(traceparent: &str, uid: &str) -> String {
    if trace::parse(traceparent).is_some() {
        traceparent.to_string()
    } else {
        trace::order_root(uid, None)
    }
}

/// A span for work on `r` that no message started, under `parent`.
fn work_span(what: &'static str, r: &OrderRef, parent: &str) -> tracing::Span {
    let span = tracing::info_span!(
        "delivery",
        otel.name = what,
        order.name = %r.name,
        order.namespace = %r.namespace,
        order.uid = %r.uid,
    );
    trace::adopt(&span, parent);
    span
}

fn order_ref(o: &Order) -> OrderRef {
    OrderRef {
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
        uid: o.uid().unwrap_or_default(),
    }
}

enum Assign {
    Done,
    NoCourier { zone: String },
}

enum Claimed {
    Courier(Box<Courier>),
    /// Another replica claimed a courier for the same order at the same time.
    Contended,
    NoneFree,
}

/// What a driver does after one step.
enum Step {
    Again,
    Until(Timestamp),
    Stop,
}

pub struct Dispatcher {
    access: OrderAccess,
    couriers: Couriers,
    settings: Settings,
    shutdown: watch::Receiver<bool>,
    locks: KeyedLocks,
    /// Orders (by uid) whose delivery a task in this process drives.
    drivers: Mutex<HashSet<String>>,
    waiting: Mutex<HashMap<String, Waiting>>,
    /// Couriers an order was already offered to (offer mode), tried last.
    tried: Mutex<HashMap<String, HashSet<String>>>,
    /// The sub-second time this process entered an order's delivery state.
    precise: Mutex<HashMap<String, (DeliveryState, Timestamp)>>,
    /// Courier claims that looked stale: key → (resourceVersion, first seen).
    suspects: Mutex<HashMap<String, (String, Instant)>>,
    /// Deliveries under way, from a watch of the Orders.
    active: Arc<Active>,
    active_synced: watch::Receiver<bool>,
}

/// The worker's handler.
pub struct Delivery(pub Arc<Dispatcher>);

impl Handler for Delivery {
    async fn handle(&self, event: CloudEvent, traceparent: String) -> Result<(), HandleError> {
        let kind = event
            .event_type()
            .map_err(|e| HandleError::Permanent(e.to_string()))?;
        match kind {
            EventType::KitchenReady => self.0.on_ready(&event.data.order, &traceparent).await,
            EventType::OrderCancelled => self.0.on_cancelled(&event.data.order).await,
            // Not bound to this queue; nothing to do.
            _ => Ok(()),
        }
    }
}

impl Dispatcher {
    /// Builds the dispatcher and starts its background work: start-up
    /// recovery and housekeeping, and retrying orders that wait for a courier.
    pub fn start(
        access: OrderAccess,
        settings: Settings,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let couriers = Couriers {
            client: access.client.clone(),
            manager: access.stage.manager,
        };
        let (active, active_synced) = Active::start(
            access.client.clone(),
            settings.namespace.clone(),
            shutdown.clone(),
        );
        let this = Arc::new(Self {
            access,
            couriers,
            settings,
            shutdown,
            locks: KeyedLocks::default(),
            drivers: Mutex::default(),
            waiting: Mutex::default(),
            tried: Mutex::default(),
            precise: Mutex::default(),
            suspects: Mutex::default(),
            active,
            active_synced,
        });
        tokio::spawn(this.clone().housekeeping());
        tokio::spawn(this.clone().retry_waiting());
        this
    }

    fn client(&self) -> Client {
        self.access.client.clone()
    }

    async fn on_ready(
        self: &Arc<Self>,
        r: &OrderRef,
        traceparent: &str,
    ) -> Result<(), HandleError> {
        let _lock = self.locks.lock(&r.uid).await;
        match self.try_assign(r, traceparent).await? {
            Assign::Done => {
                held(&self.waiting).remove(&r.uid);
            }
            Assign::NoCourier { zone } => {
                // Ack and keep it here rather than fail the message: a queue
                // would dead-letter it after its delivery limit.
                tracing::info!(order = %format!("{}/{}", r.namespace, r.name), %zone, "no courier free; the order waits");
                held(&self.waiting).insert(
                    r.uid.clone(),
                    Waiting {
                        order: r.clone(),
                        zone,
                        parent: parent_of(traceparent, &r.uid),
                    },
                );
            }
        }
        Ok(())
    }

    /// Offers a ready order to a free courier. The caller holds the order's lock.
    async fn try_assign(
        self: &Arc<Self>,
        r: &OrderRef,
        traceparent: &str,
    ) -> Result<Assign, HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(Assign::Done); // gone
        };
        if let Some(d) = delivery(&order) {
            // Handled before: the announcement may have been lost with a crash,
            // and so may the task driving it.
            if let Some(kind) = event_of(d.state) {
                self.access.publish(r, kind, None, traceparent).await?;
            }
            self.ensure_driver(r.clone(), parent_of(traceparent, &r.uid));
            return Ok(Assign::Done);
        }
        if cancel_pending(&order) {
            return Ok(Assign::Done);
        }
        match kitchen(&order) {
            Some(KitchenState::Ready) => {}
            Some(KitchenState::Dropped) => return Ok(Assign::Done),
            _ => {
                return Err(HandleError::Retryable(
                    "the kitchen has not reported the order ready yet".into(),
                ));
            }
        }
        let zone = self.zone(&order).await?;
        let claim = self.claim_kind();
        match self.claim(&order, &zone, &claim).await? {
            Claimed::Courier(c) => {
                self.commit(r, None, &c, &claim, traceparent).await?;
                Ok(Assign::Done)
            }
            Claimed::Contended | Claimed::NoneFree => Ok(Assign::NoCourier { zone }),
        }
    }

    fn claim_kind(&self) -> Claim {
        if self.settings.auto_accept {
            Claim::Assign
        } else {
            Claim::Offer {
                expires_at: ceil_second(after(
                    Timestamp::now(),
                    self.settings.timing.offer_timeout,
                )),
            }
        }
    }

    /// The zone of the order's restaurant.
    async fn zone(&self, order: &Order) -> Result<String, HandleError> {
        let api: Api<Restaurant> =
            Api::namespaced(self.client(), &order.namespace().unwrap_or_default());
        let name = &order.spec.restaurant_ref.name;
        match api.get_opt(name).await? {
            Some(r) => Ok(r.spec.zone),
            None => Err(HandleError::Permanent(format!(
                "restaurant {name} does not exist"
            ))),
        }
    }

    /// Claims a free courier of `zone` for the order with a compare-and-swap
    /// on its status, so no courier is ever claimed twice.
    ///
    /// Two replicas handling the same order at once could each claim a
    /// different courier; after claiming, each looks again and yields if any
    /// other courier points at the order too. One that saw no rival claimed
    /// before the other, whose look then sees it: at most one proceeds.
    async fn claim(
        &self,
        order: &Order,
        zone: &str,
        claim: &Claim,
    ) -> Result<Claimed, HandleError> {
        let r = order_ref(order);
        let couriers = self.couriers.in_zone(&r.namespace, zone).await?;
        let tried = held(&self.tried).get(&r.uid).cloned().unwrap_or_default();
        for candidate in candidates(&couriers, zone, &r.uid, &tried) {
            let name = candidate.name_any();
            let outcome = self
                .couriers
                .update(&r.namespace, &name, Some(candidate.clone()), |c| {
                    is_free(c, zone).then(|| claimed(c.status.as_ref(), &r.name, claim))
                })
                .await?;
            let Cas::Written(mine) = outcome else {
                continue; // taken, gone or off shift meanwhile: the next one
            };
            let rivals = match self.couriers.in_zone(&r.namespace, zone).await {
                Ok(all) => all
                    .iter()
                    .filter(|c| c.name_any() != name && points_at(c, &r.name))
                    .count(),
                Err(e) => {
                    self.release_claim(&r, &name).await;
                    return Err(e.into());
                }
            };
            if rivals > 0 {
                tracing::info!(order = %r.name, courier = %name, "another claim for this order raced ours; yielding");
                self.couriers.free(&r.namespace, &name, &r.name).await?;
                return Ok(Claimed::Contended);
            }
            return Ok(Claimed::Courier(mine));
        }
        Ok(Claimed::NoneFree)
    }

    async fn release_claim(&self, r: &OrderRef, courier: &str) {
        if let Err(e) = self.couriers.free(&r.namespace, courier, &r.name).await {
            // Housekeeping frees it once it is clearly stale.
            tracing::warn!(order = %r.name, %courier, error = %e, "could not release a claimed courier");
        }
    }

    /// Records a claimed courier in the order, if the order's section is
    /// still `expect` (nothing else moved it on meanwhile); otherwise, or if
    /// the write fails, gives the courier back. Returns whether it recorded.
    async fn commit(
        self: &Arc<Self>,
        r: &OrderRef,
        expect: Option<&DeliveryStatus>,
        courier: &Courier,
        claim: &Claim,
        traceparent: &str,
    ) -> Result<bool, HandleError> {
        let name = courier.name_any();
        let written = async {
            // Read again after claiming: a replica that finished with this
            // order frees its courier only after recording that, so this
            // read sees it.
            let Some(fresh) = self.access.order(r).await? else {
                return Ok(None);
            };
            if delivery(&fresh) != expect || cancel_pending(&fresh) {
                return Ok(None);
            }
            let now = Timestamp::now();
            let next = match claim {
                Claim::Assign => assigned(&name, now, &self.settings.timing),
                Claim::Offer { .. } => offered(&name),
            };
            self.access.write(&fresh, section(&next)?).await?;
            held(&self.precise).insert(r.uid.clone(), (next.state, now));
            Ok::<_, HandleError>(Some(next))
        }
        .await;
        match written {
            Ok(Some(next)) => {
                let subject = format!("{}/{}", r.namespace, r.name);
                if let Some(kind) = event_of(next.state) {
                    tracing::info!(order = %subject, courier = %name, "courier assigned");
                    self.announce(r, kind, traceparent).await?;
                } else {
                    tracing::info!(order = %subject, courier = %name, "delivery offered");
                }
                self.ensure_driver(r.clone(), parent_of(traceparent, &r.uid));
                Ok(true)
            }
            Ok(None) => {
                self.release_claim(r, &name).await;
                Ok(false)
            }
            Err(e) => {
                // The write may have landed even though we saw an error.
                let recorded = matches!(self.access.order(r).await,
                    Ok(Some(o)) if delivery(&o).and_then(|d| d.courier.as_deref()) == Some(name.as_str()));
                if !recorded {
                    self.release_claim(r, &name).await;
                }
                Err(e)
            }
        }
    }

    /// The courier accepted the order offered to it. The façade asks for it
    /// with the Courier annotation `dishpatch.dev/accept: <order>`, which the
    /// offer's driver notices. Returns whether the order is now assigned to
    /// `courier`. The caller holds the order's lock.
    pub async fn accept(
        self: &Arc<Self>,
        r: &OrderRef,
        courier: &str,
        traceparent: &str,
    ) -> Result<bool, HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(false);
        };
        let Some(d) = delivery(&order) else {
            return Ok(false);
        };
        if d.state != DeliveryState::Offered
            || d.courier.as_deref() != Some(courier)
            || cancel_pending(&order)
        {
            return Ok(false);
        }
        let outcome = self
            .couriers
            .update(&r.namespace, courier, None, |c| {
                accepted(c.status.as_ref(), &r.name)
            })
            .await?;
        let Cas::Written(c) = outcome else {
            return Ok(false);
        };
        self.commit(r, Some(d), &c, &Claim::Assign, traceparent)
            .await
    }

    async fn on_cancelled(self: &Arc<Self>, r: &OrderRef) -> Result<(), HandleError> {
        let _lock = self.locks.lock(&r.uid).await;
        held(&self.waiting).remove(&r.uid);
        held(&self.tried).remove(&r.uid);
        let Some(order) = self.access.order(r).await? else {
            return self.free_orphans(r).await;
        };
        let Some(d) = delivery(&order).cloned() else {
            return Ok(()); // no courier was involved
        };
        match d.state {
            DeliveryState::Offered | DeliveryState::Assigned => self.release(&order, &d).await,
            // Released before: make sure the courier really is free.
            DeliveryState::Released => match &d.courier {
                Some(c) => self.couriers.free(&r.namespace, c, &r.name).await.map(drop),
                None => Ok(()),
            },
            // Too late to take back.
            DeliveryState::PickedUp | DeliveryState::Delivered => Ok(()),
        }
    }

    /// Records the delivery as released, then frees its courier. In that
    /// order: a courier is free only once no order claims it.
    async fn release(&self, order: &Order, d: &DeliveryStatus) -> Result<(), HandleError> {
        let r = order_ref(order);
        self.access.write(order, section(&released(d))?).await?;
        tracing::info!(order = %format!("{}/{}", r.namespace, r.name), courier = ?d.courier, "delivery released");
        if let Some(c) = &d.courier {
            self.couriers.free(&r.namespace, c, &r.name).await?;
        }
        Ok(())
    }

    /// The order is gone: free couriers still pointing at its name, unless a
    /// new order took that name.
    async fn free_orphans(&self, r: &OrderRef) -> Result<(), HandleError> {
        // Existence is all this asks, so an Order that does not parse counts.
        let orders: Api<DeserializeGuard<Order>> = Api::namespaced(self.client(), &r.namespace);
        if orders.get_opt(&r.name).await?.is_some() {
            return Ok(());
        }
        for c in self.couriers.all(Some(&r.namespace)).await? {
            if points_at(&c, &r.name) {
                self.couriers
                    .free(&r.namespace, &c.name_any(), &r.name)
                    .await?;
            }
        }
        Ok(())
    }

    /// Publishes and waits for the confirm, retrying until it is confirmed:
    /// the state is recorded already, and nothing else would announce it.
    async fn announce(
        &self,
        r: &OrderRef,
        kind: EventType,
        traceparent: &str,
    ) -> Result<(), HandleError> {
        let mut shutdown = self.shutdown.clone();
        let mut attempt = 0;
        loop {
            match self.access.publish(r, kind, None, traceparent).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(order = %r.name, event = %kind, error = %e, "publishing; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff(attempt)) => {}
                _ = shutdown.wait_for(|s| *s) => {
                    return Err(HandleError::Retryable(format!("shutting down before {kind} was confirmed")));
                }
            }
        }
    }

    /// Starts driving the order's delivery unless this process already does.
    fn ensure_driver(self: &Arc<Self>, r: OrderRef, parent: String) {
        if !held(&self.drivers).insert(r.uid.clone()) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let span = work_span("delivery drive", &r, &parent);
            // What the driver writes and publishes is a child of its span.
            let parent = trace::traceparent_of(&span, || parent.clone());
            this.drive(&r, &parent).instrument(span).await;
            held(&this.drivers).remove(&r.uid);
            held(&this.tried).remove(&r.uid);
            held(&this.precise).remove(&r.uid);
        });
    }

    /// Moves the delivery along until it is finished (or the process stops).
    async fn drive(self: &Arc<Self>, r: &OrderRef, parent: &str) {
        let mut shutdown = self.shutdown.clone();
        let mut failures = 0;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let wait = match self.step(r, parent).await {
                Ok(Step::Stop) => return,
                Ok(Step::Again) => {
                    failures = 0;
                    continue;
                }
                Ok(Step::Until(at)) => {
                    failures = 0;
                    until(at)
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(order = %format!("{}/{}", r.namespace, r.name), error = %e, "delivery step failed; retrying");
                    backoff(failures)
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// One step of the simulated courier, from the order as it is now.
    async fn step(self: &Arc<Self>, r: &OrderRef, parent: &str) -> Result<Step, HandleError> {
        let _lock = self.locks.lock(&r.uid).await;
        let Some(order) = self.access.order(r).await? else {
            return Ok(Step::Stop);
        };
        let Some(d) = delivery(&order).cloned() else {
            return Ok(Step::Stop);
        };
        let subject = format!("{}/{}", r.namespace, r.name);
        let now = Timestamp::now();
        let known = held(&self.precise).get(&r.uid).copied();
        match next_step(&refined(&d, known), &self.settings.timing) {
            Next::AwaitAnswer => self.offer_step(&order, &d, parent).await,
            Next::PickUp { at } => {
                if cancel_pending(&order) {
                    // It is being cancelled: the courier does not set off.
                    self.release(&order, &d).await?;
                    return Ok(Step::Stop);
                }
                if self.settings.auto_accept {
                    if now < at {
                        return Ok(Step::Until(at));
                    }
                } else if !self.courier_says(&order, &d, PICKED_UP_ANNOTATION).await? {
                    // A real courier confirms the pick-up through the façade.
                    return Ok(Step::Until(after(now, self.settings.timing.tick)));
                }
                // Only onto the order we checked: a cancellation recorded
                // since then makes this a conflict, and the next step
                // decides again (and releases). Exactly one of the two wins.
                if self
                    .access
                    .write_if_unchanged(&order, section(&picked_up(&d, now))?)
                    .await?
                    .is_none()
                {
                    return Ok(Step::Again);
                }
                self.clear_said(&order, &d, PICKED_UP_ANNOTATION).await?;
                held(&self.precise).insert(r.uid.clone(), (DeliveryState::PickedUp, now));
                tracing::info!(order = %subject, courier = ?d.courier, "picked up");
                self.announce(r, EventType::DeliveryPickedUp, &trace::child_of(parent))
                    .await?;
                Ok(Step::Again)
            }
            Next::Deliver { at } => {
                if self.settings.auto_accept {
                    if now < at {
                        return Ok(Step::Until(at));
                    }
                } else if !self.courier_says(&order, &d, DELIVERED_ANNOTATION).await? {
                    return Ok(Step::Until(after(now, self.settings.timing.tick)));
                }
                self.access
                    .write(&order, section(&delivered(&d, now))?)
                    .await?;
                self.clear_said(&order, &d, DELIVERED_ANNOTATION).await?;
                tracing::info!(order = %subject, courier = ?d.courier, "delivered");
                self.announce(r, EventType::DeliveryDelivered, &trace::child_of(parent))
                    .await?;
                // The next step (Finish) frees the courier.
                Ok(Step::Again)
            }
            Next::Finish => {
                if let Some(c) = &d.courier {
                    self.couriers.free(&r.namespace, c, &r.name).await?;
                }
                Ok(Step::Stop)
            }
        }
    }

    /// Whether the order's courier asked (through the façade) for `request`
    /// on this order.
    async fn courier_says(
        &self,
        order: &Order,
        d: &DeliveryStatus,
        request: &str,
    ) -> Result<bool, HandleError> {
        let Some(name) = &d.courier else {
            return Ok(false);
        };
        let r = order_ref(order);
        let courier = self.couriers.api(&r.namespace).get_opt(name).await?;
        Ok(courier.is_some_and(|c| c.annotations().get(request) == Some(&r.name)))
    }

    /// The request is done: take it off the Courier.
    async fn clear_said(
        &self,
        order: &Order,
        d: &DeliveryStatus,
        request: &str,
    ) -> Result<(), HandleError> {
        if self.settings.auto_accept {
            return Ok(());
        }
        if let Some(name) = &d.courier {
            let r = order_ref(order);
            self.couriers
                .clear_request(&r.namespace, name, request, &r.name)
                .await?;
        }
        Ok(())
    }

    /// An offer is out: wait for the answer until it expires, then move on.
    async fn offer_step(
        self: &Arc<Self>,
        order: &Order,
        d: &DeliveryStatus,
        parent: &str,
    ) -> Result<Step, HandleError> {
        let r = order_ref(order);
        let tick = self.settings.timing.tick;
        let now = Timestamp::now();
        if cancel_pending(order) {
            self.release(order, d).await?;
            return Ok(Step::Stop);
        }
        if let Some(name) = &d.courier {
            let courier = self.couriers.api(&r.namespace).get_opt(name).await?;
            let status = courier.as_ref().and_then(|c| c.status.as_ref());
            let wants = courier
                .as_ref()
                .is_some_and(|c| c.annotations().get(ACCEPT_ANNOTATION) == Some(&r.name));
            if let Some(offer) = status
                .and_then(|s| s.offer.as_ref())
                .filter(|o| o.order == r.name)
            {
                if now < offer.expires_at.0 {
                    if !wants {
                        return Ok(Step::Until(offer.expires_at.0.min(after(now, tick))));
                    }
                    let tp = trace::child_of(parent);
                    let taken = self.accept(&r, name, &tp).await?;
                    self.couriers
                        .clear_request(&r.namespace, name, ACCEPT_ANNOTATION, &r.name)
                        .await?;
                    return Ok(if taken {
                        Step::Again
                    } else {
                        Step::Until(after(now, tick))
                    });
                }
                tracing::info!(order = %r.name, courier = %name, "offer unanswered; moving on");
                self.couriers.free(&r.namespace, name, &r.name).await?;
            }
            if wants {
                // Too late: the offer lapsed. Refused, so the request goes.
                self.couriers
                    .clear_request(&r.namespace, name, ACCEPT_ANNOTATION, &r.name)
                    .await?;
            }
            held(&self.tried)
                .entry(r.uid.clone())
                .or_default()
                .insert(name.clone());
        }
        let zone = self.zone(order).await?;
        let claim = Claim::Offer {
            expires_at: ceil_second(after(now, self.settings.timing.offer_timeout)),
        };
        match self.claim(order, &zone, &claim).await? {
            Claimed::Courier(c) => {
                self.commit(&r, Some(d), &c, &claim, &trace::child_of(parent))
                    .await?;
                Ok(Step::Again)
            }
            Claimed::Contended | Claimed::NoneFree => Ok(Step::Until(after(now, tick))),
        }
    }

    /// Retries the waiting orders every tick, one courier list per zone.
    async fn retry_waiting(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.settings.timing.tick) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let mut zones: BTreeMap<(String, String), Vec<Waiting>> = BTreeMap::new();
            for w in held(&self.waiting).values() {
                zones
                    .entry((w.order.namespace.clone(), w.zone.clone()))
                    .or_default()
                    .push(w.clone());
            }
            for ((namespace, zone), group) in zones {
                match self.couriers.in_zone(&namespace, &zone).await {
                    Ok(cs) if cs.iter().any(|c| is_free(c, &zone)) => {}
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(%namespace, %zone, error = %e, "listing couriers");
                        continue;
                    }
                }
                for w in group {
                    let _lock = self.locks.lock(&w.order.uid).await;
                    let span = work_span("delivery assign", &w.order, &w.parent);
                    let tp = trace::traceparent_of(&span, || trace::child_of(&w.parent));
                    match self.try_assign(&w.order, &tp).instrument(span).await {
                        Ok(Assign::Done) => {
                            held(&self.waiting).remove(&w.order.uid);
                        }
                        Ok(Assign::NoCourier { .. }) => {}
                        Err(HandleError::Permanent(why)) => {
                            tracing::warn!(order = %w.order.name, %why, "giving up on a waiting order");
                            held(&self.waiting).remove(&w.order.uid);
                        }
                        Err(HandleError::Retryable(why)) => {
                            tracing::info!(order = %w.order.name, %why, "waiting order; retrying");
                        }
                    }
                }
            }
        }
    }

    /// Start-up recovery, then the same scan periodically (for deliveries
    /// whose driver died with another replica), and stale courier claims.
    async fn housekeeping(self: Arc<Self>) {
        let mut shutdown = self.shutdown.clone();
        let mut recovered = false;
        loop {
            match self.resume(!recovered).await {
                Ok(n) => {
                    if !recovered {
                        tracing::info!(resumed = n, "resumed deliveries in progress");
                    }
                    recovered = true;
                }
                Err(e) => tracing::warn!(error = %e, "scanning orders"),
            }
            if let Err(e) = self.sweep_couriers().await {
                tracing::warn!(error = %e, "sweeping couriers");
            }
            tokio::select! {
                _ = tokio::time::sleep(HOUSEKEEPING) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Drives every unfinished delivery in scope that nobody here drives: at
    /// start-up all of them, later only those overdue (their driver is gone).
    async fn resume(self: &Arc<Self>, at_start: bool) -> Result<usize, kube::Error> {
        // Start-up recovery needs the whole picture: wait for the first list.
        let mut synced = self.active_synced.clone();
        if synced.wait_for(|s| *s).await.is_err() {
            return Ok(0);
        }
        let now = Timestamp::now();
        let mut resumed = 0;
        for o in self.active.snapshot() {
            let Some(d) = delivery(&o) else { continue };
            let overdue = match next_step(d, &self.settings.timing) {
                Next::AwaitAnswer => true,
                Next::PickUp { at } | Next::Deliver { at } => after(at, ORPHAN_GRACE) < now,
                Next::Finish => continue,
            };
            let r = order_ref(&o);
            if held(&self.drivers).contains(&r.uid) || !(at_start || overdue) {
                continue;
            }
            let parent = trace::order_root_of(&o);
            if at_start && let Some(kind) = event_of(d.state) {
                // Its announcement may have died with the last process.
                if let Err(e) = self
                    .access
                    .publish(&r, kind, None, &trace::child_of(&parent))
                    .await
                {
                    tracing::warn!(order = %r.name, error = %e, "re-publishing on resume");
                }
            }
            self.ensure_driver(r, parent);
            resumed += 1;
        }
        Ok(resumed)
    }

    /// Frees couriers that point at an order that is finished, gone, or has
    /// stayed without them for longer than any claim takes to record.
    async fn sweep_couriers(&self) -> Result<(), HandleError> {
        let mut seen = HashSet::new();
        for c in self
            .couriers
            .all(self.settings.namespace.as_deref())
            .await?
        {
            let namespace = c.namespace().unwrap_or_default();
            let name = c.name_any();
            if let Some(wanted) = c.annotations().get(ACCEPT_ANNOTATION) {
                let offered = c
                    .status
                    .as_ref()
                    .and_then(|s| s.offer.as_ref())
                    .is_some_and(|o| &o.order == wanted);
                // An offer's driver answers requests for it; any other was
                // acted on or is refused.
                if !offered {
                    self.couriers
                        .clear_request(&namespace, &name, ACCEPT_ANNOTATION, wanted)
                        .await?;
                }
            }
            // `update` writes only when `settled` has something to say, and
            // starts from the listed copy: no extra read for a settled courier.
            self.couriers
                .update(&namespace, &name, Some(c.clone()), settled)
                .await?;
            let Some(s) = &c.status else { continue };
            // Through DeserializeGuard: one Order that does not parse must
            // not abort the sweep for every courier listed after its own.
            let orders: Api<DeserializeGuard<Order>> = Api::namespaced(self.client(), &namespace);
            let pointed: Vec<String> = s
                .current_order
                .iter()
                .cloned()
                .chain(s.offer.as_ref().map(|o| o.order.clone()))
                .collect();
            for order_name in pointed {
                let order = match orders.get_opt(&order_name).await? {
                    None => None,
                    Some(DeserializeGuard(Ok(order))) => Some(order),
                    Some(DeserializeGuard(Err(invalid))) => {
                        // Nobody can tell what it needs: leave its courier be
                        // until the order is fixed or deleted.
                        tracing::warn!(courier = %name, order = %order_name, error = %invalid.error,
                            "a courier points at an Order that does not parse; leaving it");
                        continue;
                    }
                };
                let section = order.as_ref().and_then(delivery);
                let done = order.is_none()
                    || section.is_some_and(|d| {
                        matches!(d.state, DeliveryState::Delivered | DeliveryState::Released)
                    });
                if done {
                    self.couriers.free(&namespace, &name, &order_name).await?;
                    continue;
                }
                if section.is_some_and(|d| d.courier.as_deref() == Some(name.as_str())) {
                    continue; // consistent
                }
                let key = format!("{namespace}/{name}/{order_name}");
                let version = c.resource_version().unwrap_or_default();
                seen.insert(key.clone());
                let stale = {
                    let mut suspects = held(&self.suspects);
                    let entry = suspects
                        .entry(key.clone())
                        .or_insert_with(|| (version.clone(), Instant::now()));
                    if entry.0 != version {
                        *entry = (version.clone(), Instant::now());
                    }
                    entry.1.elapsed() >= STALE_CLAIM
                };
                if stale {
                    tracing::warn!(courier = %name, order = %order_name, "freeing a courier claimed for an order that never recorded it");
                    // Only if nothing changed since it looked stale.
                    self.couriers
                        .update(&namespace, &name, Some(c.clone()), |now| {
                            (now.resource_version().as_deref() == Some(version.as_str()))
                                .then(|| freed(now.status.as_ref(), &order_name, now.spec.on_shift))
                                .flatten()
                        })
                        .await?;
                }
            }
        }
        held(&self.suspects).retain(|k, _| seen.contains(k));
        Ok(())
    }
}
