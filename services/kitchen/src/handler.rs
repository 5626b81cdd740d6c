//! The kitchen's stage: take a ticket when an order is paid, cook it, say
//! when it is ready; drop it when the order is cancelled.
//!
//! Capacity and the queue are cluster-wide: every replica books onto the
//! restaurant's rail (`rail.rs`, rules in `schedule.rs`). An Order says
//! Preparing only after the rail started its ticket, and its ticket leaves
//! the rail only after the Order says Ready or Dropped, so no sample of the
//! Orders shows a restaurant cooking more than its capacity. Each replica
//! runs a driver per rail it has touched that finishes the tickets it owns
//! when they are done.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::lifecycle::{annotation, condition, find};
use dishpatch_api::order::{KitchenState, KitchenStatus, PaymentState};
use dishpatch_api::restaurant::KitchenMode;
use dishpatch_api::{Order, Restaurant};
use dishpatch_worker::{HandleError, Handler, OrderAccess, trace};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::DeserializeGuard;
use tokio::sync::Notify;
use tracing::Instrument as _;

use crate::rail::{MAX_TICKETS, RailError, RailKey, Store};
use crate::schedule::{Rail, Ticket, plan, prep_time};

impl From<RailError> for HandleError {
    fn from(e: RailError) -> Self {
        match e {
            RailError::Kube(e) => e.into(),
            // A rail that does not parse is a fault to repair, not a reason
            // to dead-letter every ticket of the restaurant.
            e => HandleError::Retryable(e.to_string()),
        }
    }
}

/// How the kitchen runs, from its flags.
pub struct Settings {
    pub scale: f64,
    /// This replica's name on the rails (the pod name).
    pub identity: String,
    /// How long past its end another replica's ticket must be before this
    /// one finishes it (its owner died or lost the apiserver).
    pub adopt_after: Duration,
}

/// The rails this replica drives: a wake-up for each, and how many times it
/// was asked to look again (so a driver about to stop notices a new ticket).
type Drivers = Mutex<HashMap<RailKey, (Arc<Notify>, u64)>>;

struct Shared {
    access: OrderAccess,
    settings: Settings,
    drivers: Drivers,
    /// Tickets whose Orders this replica has seen say Preparing.
    announced: Mutex<HashSet<String>>,
}

#[derive(Clone)]
pub struct Kitchen {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn json(status: &KitchenStatus) -> Result<serde_json::Value, HandleError> {
    serde_json::to_value(status).map_err(|e| HandleError::Permanent(e.to_string()))
}

fn cancelled(order: &Order) -> bool {
    order.metadata.deletion_timestamp.is_some()
        || order
            .status
            .as_ref()
            .and_then(|s| find(&s.conditions, condition::CANCELLED))
            .is_some_and(|c| c.status == "True")
}

fn kitchen(order: &Order) -> Option<&KitchenStatus> {
    order.status.as_ref().and_then(|s| s.kitchen.as_ref())
}

fn order_ref(key: &RailKey, t: &Ticket) -> OrderRef {
    OrderRef {
        namespace: key.namespace.clone(),
        name: t.order.clone(),
        uid: t.uid.clone(),
    }
}

/// The ticket as the Order should now show it, keeping what it said before.
fn status(
    order: &Order,
    state: KitchenState,
    ticket: Option<i64>,
    estimated: Option<Timestamp>,
) -> KitchenStatus {
    let before = kitchen(order);
    let now = Timestamp::now();
    KitchenStatus {
        state,
        ticket: ticket.or(before.and_then(|k| k.ticket)),
        ticket_accepted_at: before
            .and_then(|k| k.ticket_accepted_at.clone())
            .or(Some(Time(now))),
        estimated_ready_at: estimated
            .map(Time)
            .or(before.and_then(|k| k.estimated_ready_at.clone())),
        ready_at: (state == KitchenState::Ready).then_some(Time(now)),
    }
}

/// What a conditional Order update found.
enum Outcome {
    /// The Order is gone (or is another one by now).
    Gone,
    /// `decide` saw nothing to write; the Order as read.
    Unchanged(Box<Order>),
    /// Written.
    Written(KitchenStatus),
}

/// A span for the rail's work on one ticket, under the span that took it.
fn ticket_span(what: &'static str, t: &Ticket) -> tracing::Span {
    let span = tracing::info_span!(
        "ticket",
        otel.name = what,
        order.name = %t.order,
        order.uid = %t.uid,
        ticket = t.number,
    );
    let parent = t
        .traceparent
        .clone()
        .unwrap_or_else(|| trace::order_root(&t.uid, None));
    trace::adopt(&span, &parent);
    span
}

/// Attempts at a conditional Order write before the caller retries later.
const WRITE_ATTEMPTS: usize = 10;

/// Reads the Order and writes the kitchen section `decide` makes of it, only
/// if nobody wrote in between; otherwise reads and decides again. Racing
/// writers (replicas, a cancellation) never move a ticket backwards.
async fn update_order(
    access: &OrderAccess,
    r: &OrderRef,
    decide: impl Fn(&Order) -> Option<KitchenStatus>,
) -> Result<Outcome, HandleError> {
    for _ in 0..WRITE_ATTEMPTS {
        let Some(order) = access.order(r).await? else {
            return Ok(Outcome::Gone);
        };
        let Some(next) = decide(&order) else {
            return Ok(Outcome::Unchanged(Box::new(order)));
        };
        if access
            .write_if_unchanged(&order, json(&next)?)
            .await?
            .is_some()
        {
            return Ok(Outcome::Written(next));
        }
    }
    Err(HandleError::Retryable(format!(
        "the order {} kept changing",
        r.name
    )))
}

impl Kitchen {
    pub fn new(access: OrderAccess, settings: Settings) -> Self {
        Self {
            shared: Arc::new(Shared {
                access,
                settings,
                drivers: Mutex::default(),
                announced: Mutex::default(),
            }),
        }
    }
}

impl Shared {
    fn store(&self, key: RailKey) -> Store {
        Store::new(&self.access.client, key)
    }

    async fn restaurant(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Restaurant>, HandleError> {
        let api: Api<Restaurant> = Api::namespaced(self.access.client.clone(), namespace);
        Ok(api.get_opt(name).await?)
    }

    async fn accept(self: &Arc<Self>, r: &OrderRef, traceparent: &str) -> Result<(), HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(());
        };
        if let Some(k) = kitchen(&order) {
            // Seen before (a redelivery, or the operator nudging a stalled
            // order): make sure its rail is driven, and say again what we said.
            match k.state {
                KitchenState::Queued | KitchenState::Preparing if cancelled(&order) => {
                    self.drop_ticket(r).await?;
                }
                KitchenState::Queued | KitchenState::Preparing => {
                    self.resume(&order, None).await?;
                    self.access
                        .publish(r, EventType::KitchenAccepted, None, traceparent)
                        .await?;
                }
                KitchenState::Ready => {
                    self.access
                        .publish(r, EventType::KitchenReady, None, traceparent)
                        .await?;
                }
                KitchenState::Dropped => {}
            }
            return Ok(());
        }
        if cancelled(&order) {
            return Ok(());
        }
        if order
            .status
            .as_ref()
            .and_then(|s| s.payment.as_ref())
            .map(|p| p.state)
            != Some(PaymentState::Succeeded)
        {
            return Err(HandleError::Retryable("the order is not paid yet".into()));
        }
        let Some(restaurant) = self
            .restaurant(&r.namespace, &order.spec.restaurant_ref.name)
            .await?
        else {
            // Nobody can cook it: the operator cancels (KitchenFailed) and refunds.
            let dropped = status(&order, KitchenState::Dropped, None, None);
            self.access.write(&order, json(&dropped)?).await?;
            return Ok(());
        };
        let prep = prep_time(
            order.spec.items.iter().filter_map(|i| {
                restaurant
                    .spec
                    .item(&i.menu_item)
                    .map(|m| m.prep_time_seconds)
            }),
            self.settings.scale,
        );
        let capacity = u32::try_from(restaurant.spec.kitchen.capacity).unwrap_or(1);
        let key = RailKey::of(&restaurant)?;
        let store = self.store(key.clone());
        let me = self.settings.identity.clone();
        let (uid, name) = (r.uid.clone(), r.name.clone());
        let tp = traceparent.to_string();
        let manual = restaurant.spec.kitchen.mode == KitchenMode::Manual;
        let (rail, booked) = store
            .update(Some(&restaurant), move |rail| {
                if rail.get(&uid).is_none() && rail.tickets.len() >= MAX_TICKETS {
                    return (false, None);
                }
                let (booked, started) =
                    rail.book(&uid, &name, prep, capacity, &me, Timestamp::now());
                rail.trace(&uid, &tp);
                if manual {
                    rail.manual(&uid);
                }
                (!booked.existed, Some((booked, started)))
            })
            .await?;
        let Some((booked, started)) = booked else {
            return Err(HandleError::Retryable(format!(
                "the kitchen of {} has {MAX_TICKETS} tickets waiting",
                key.restaurant
            )));
        };
        let mine = rail.get(&r.uid).cloned();
        let cooking = mine.as_ref().is_some_and(Ticket::cooking);
        let window = rail.estimate(&r.uid, Timestamp::now());
        let written = update_order(&self.access, r, |o| {
            if kitchen(o).is_some() || cancelled(o) {
                return None; // another replica started it already, or it is called off
            }
            let state = if cooking {
                KitchenState::Preparing
            } else {
                KitchenState::Queued
            };
            Some(status(o, state, Some(booked.number), window.map(|w| w.end)))
        })
        .await?;
        if cooking && matches!(written, Outcome::Written(_)) {
            lock(&self.announced).insert(r.uid.clone());
        }
        if let Outcome::Gone = written {
            self.take_off(&store, &r.uid).await?;
        } else if let Outcome::Unchanged(o) = &written
            && cancelled(o)
        {
            self.drop_ticket(r).await?;
        }
        // The booking may have started tickets other replicas took, when the
        // restaurant's capacity grew.
        let others: Vec<Ticket> = self
            .still_mine(&rail, started)
            .into_iter()
            .filter(|t| t.uid != r.uid)
            .collect();
        self.settle(&store, others).await?;
        self.ensure_driver(key);
        self.access
            .publish(r, EventType::KitchenAccepted, None, traceparent)
            .await
    }

    /// Makes sure a ticket the Orders say is cooking is on its rail and the
    /// rail is driven here: after a restart, or when the operator nudges an
    /// order that is taking long. A ticket the rail lost (or one from before
    /// the rails) is taken again, at the end of the queue.
    async fn resume(
        self: &Arc<Self>,
        order: &Order,
        restaurant: Option<&Restaurant>,
    ) -> Result<(), HandleError> {
        let r = OrderRef {
            namespace: order.namespace().unwrap_or_default(),
            name: order.name_any(),
            uid: order.uid().unwrap_or_default(),
        };
        let fetched;
        let restaurant = match restaurant {
            Some(found) => found,
            None => match self
                .restaurant(&r.namespace, &order.spec.restaurant_ref.name)
                .await?
            {
                Some(found) => {
                    fetched = found;
                    &fetched
                }
                None => {
                    // Its rail went with the restaurant: nobody will finish it.
                    let dropped = status(order, KitchenState::Dropped, None, None);
                    update_order(&self.access, &r, |o| {
                        kitchen(o)
                            .is_some_and(|k| {
                                matches!(k.state, KitchenState::Queued | KitchenState::Preparing)
                            })
                            .then(|| dropped.clone())
                    })
                    .await?;
                    return Ok(());
                }
            },
        };
        let key = RailKey::of(restaurant)?;
        let store = self.store(key.clone());
        if store.read().await?.get(&r.uid).is_none() {
            // Off the rail: finished or dropped since `order` was read (both
            // write the Order first), or its rail was lost. A fresh read
            // tells which; only a lost ticket is taken again.
            let still = self.access.order(&r).await?.is_some_and(|o| {
                !cancelled(&o)
                    && kitchen(&o).is_some_and(|k| {
                        matches!(k.state, KitchenState::Queued | KitchenState::Preparing)
                    })
            });
            if !still {
                return Ok(());
            }
        }
        let remaining = kitchen(order)
            .and_then(|k| k.estimated_ready_at.as_ref())
            .and_then(|e| Duration::try_from(e.0.duration_since(Timestamp::now())).ok())
            .unwrap_or_default();
        let capacity = u32::try_from(restaurant.spec.kitchen.capacity).unwrap_or(1);
        let me = self.settings.identity.clone();
        let (uid, name) = (r.uid.clone(), r.name.clone());
        let tp = trace::order_root_of(order);
        let manual = restaurant.spec.kitchen.mode == KitchenMode::Manual;
        let (rail, started) = store
            .update(Some(restaurant), move |rail| {
                if rail.get(&uid).is_some() {
                    return (false, Vec::new());
                }
                let (_, started) =
                    rail.book(&uid, &name, remaining, capacity, &me, Timestamp::now());
                rail.trace(&uid, &tp);
                if manual {
                    rail.manual(&uid);
                }
                (true, started)
            })
            .await?;
        let started = self.still_mine(&rail, started);
        self.settle(&store, started).await?;
        self.ensure_driver(key);
        Ok(())
    }

    async fn drop_ticket(self: &Arc<Self>, r: &OrderRef) -> Result<(), HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(());
        };
        let dropped = update_order(&self.access, r, |o| {
            kitchen(o)
                .is_some_and(|k| matches!(k.state, KitchenState::Queued | KitchenState::Preparing))
                .then(|| status(o, KitchenState::Dropped, None, None))
        })
        .await?;
        if let Outcome::Written(_) = dropped {
            tracing::info!(order = %r.name, "dropped the ticket");
        }
        // Off the rail even if the Order never showed the ticket: a booking
        // that raced the cancellation may have put it there.
        let Some(restaurant) = self
            .restaurant(&r.namespace, &order.spec.restaurant_ref.name)
            .await?
        else {
            return Ok(());
        };
        let key = RailKey::of(&restaurant)?;
        let store = self.store(key.clone());
        if self.take_off(&store, &r.uid).await? {
            self.ensure_driver(key);
        }
        Ok(())
    }

    /// Takes a ticket off its rail, and sees to the tickets that started in
    /// its place. Whether anything started.
    async fn take_off(self: &Arc<Self>, store: &Store, uid: &str) -> Result<bool, HandleError> {
        Ok(self.take_off_all(store, &[uid.to_string()]).await?.0)
    }

    /// [`take_off`](Self::take_off) for several tickets, in one rail write;
    /// also returns the rail as written.
    async fn take_off_all(
        self: &Arc<Self>,
        store: &Store,
        uids: &[String],
    ) -> Result<(bool, Rail), HandleError> {
        let (rail, started) = self.remove_all(store, uids.to_vec()).await?;
        {
            let mut announced = lock(&self.announced);
            for uid in uids {
                announced.remove(uid);
            }
        }
        let any = !started.is_empty();
        self.settle(store, started).await?;
        Ok((any, rail))
    }

    /// Tickets this replica started on the rail: their Orders say Preparing,
    /// all at once. Those whose orders are gone, called off or already Ready
    /// leave the rail, which may start the next.
    async fn settle(
        self: &Arc<Self>,
        store: &Store,
        started: Vec<Ticket>,
    ) -> Result<(), HandleError> {
        let mut work = started;
        // One already done (no preparation time) goes straight to Ready in
        // the rail's driver, without saying Preparing first.
        let now = Timestamp::now();
        work.retain(|t| t.end().is_none_or(|end| end > now));
        while !work.is_empty() {
            let outcomes = futures::future::join_all(work.iter().map(|t| {
                self.announce(store.key(), t)
                    .instrument(ticket_span("kitchen prepare", t))
            }))
            .await;
            let mut off = Vec::new();
            let mut failed = None;
            for (t, outcome) in work.iter().zip(outcomes) {
                match outcome {
                    Ok(true) => {
                        lock(&self.announced).insert(t.uid.clone());
                    }
                    Ok(false) => off.push(t.uid.clone()),
                    Err(e) => failed = Some(e),
                }
            }
            work = Vec::new();
            if !off.is_empty() {
                let (_, next) = self.remove_all(store, off).await?;
                let now = Timestamp::now();
                work = next
                    .into_iter()
                    .filter(|t| t.end().is_none_or(|end| end > now))
                    .collect();
            }
            if let Some(e) = failed {
                // The driver looks at its own unannounced tickets again.
                self.settle_later(store.key());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Removes tickets from the rail in one write; returns the tickets this
    /// replica started in their place.
    async fn remove_all(
        &self,
        store: &Store,
        uids: Vec<String>,
    ) -> Result<(Rail, Vec<Ticket>), HandleError> {
        let me = self.settings.identity.clone();
        let (rail, started) = store
            .update(None, move |rail| {
                let now = Timestamp::now();
                let mut changed = false;
                let mut started = Vec::new();
                for uid in &uids {
                    let (removed, next) = rail.remove(uid, &me, now);
                    changed |= removed;
                    started.extend(next);
                }
                (changed, started)
            })
            .await?;
        let started = self.still_mine(&rail, started);
        Ok((rail, started))
    }

    /// Of the tickets a change started, those still cooking as this
    /// replica's on the rail as written: a later change in the same write
    /// may have taken one off again.
    fn still_mine(&self, rail: &Rail, started: Vec<Ticket>) -> Vec<Ticket> {
        started
            .into_iter()
            .filter_map(|t| rail.get(&t.uid).cloned())
            .filter(|t| t.cooking() && t.owner == self.settings.identity)
            .collect()
    }

    /// Makes a started ticket's Order say Preparing. `Ok(false)`: it should
    /// leave the rail instead.
    async fn announce(&self, key: &RailKey, t: &Ticket) -> Result<bool, HandleError> {
        let r = order_ref(key, t);
        let end = t.end();
        let outcome = update_order(&self.access, &r, |o| {
            if cancelled(o) {
                return kitchen(o)
                    .is_some_and(|k| {
                        matches!(k.state, KitchenState::Queued | KitchenState::Preparing)
                    })
                    .then(|| status(o, KitchenState::Dropped, None, None));
            }
            match kitchen(o).map(|k| k.state) {
                None | Some(KitchenState::Queued) => {
                    Some(status(o, KitchenState::Preparing, Some(t.number), end))
                }
                _ => None,
            }
        })
        .await?;
        Ok(match &outcome {
            Outcome::Gone => false,
            Outcome::Written(k) => k.state == KitchenState::Preparing,
            Outcome::Unchanged(o) => {
                !cancelled(o) && kitchen(o).is_some_and(|k| k.state == KitchenState::Preparing)
            }
        })
    }

    /// Wakes the rail's driver if it runs here, without starting one.
    fn settle_later(&self, key: &RailKey) {
        if let Some((notify, asked)) = lock(&self.drivers).get_mut(key) {
            *asked += 1;
            notify.notify_one();
        }
    }

    /// Makes a done ticket's Order say Ready (and announces kitchen.ready),
    /// or Dropped if it was called off meanwhile; then it may leave the rail.
    async fn close(&self, key: &RailKey, t: &Ticket) -> Result<(), HandleError> {
        let r = order_ref(key, t);
        let outcome = update_order(&self.access, &r, |o| {
            let cooking = kitchen(o)
                .is_none_or(|k| matches!(k.state, KitchenState::Queued | KitchenState::Preparing));
            if !cooking {
                None
            } else if cancelled(o) {
                Some(status(o, KitchenState::Dropped, None, None))
            } else {
                Some(status(o, KitchenState::Ready, Some(t.number), None))
            }
        })
        .await?;
        if let Outcome::Written(k) = &outcome
            && k.state == KitchenState::Ready
        {
            tracing::info!(order = %r.name, ticket = t.number, "ready");
            let traceparent = trace::traceparent_of(&tracing::Span::current(), || {
                dishpatch_worker::child_traceparent(&r.uid)
            });
            // The Order says Ready: the operator moves on from its status
            // even if this announcement is lost.
            if let Err(e) = self
                .access
                .publish(&r, EventType::KitchenReady, None, &traceparent)
                .await
            {
                tracing::warn!(order = %r.name, error = %e, "could not announce kitchen.ready");
            }
        }
        Ok(())
    }

    /// Starts driving a rail here, or wakes its driver to look again.
    fn ensure_driver(self: &Arc<Self>, key: RailKey) {
        let mut drivers = lock(&self.drivers);
        if let Some((notify, asked)) = drivers.get_mut(&key) {
            *asked += 1;
            notify.notify_one();
            return;
        }
        let notify = Arc::new(Notify::new());
        drivers.insert(key.clone(), (notify.clone(), 0));
        tokio::spawn(self.clone().drive(key, notify));
    }

    /// Stops driving `key` unless someone asked again since `asked`.
    fn retire(&self, key: &RailKey, asked: u64) -> bool {
        let mut drivers = lock(&self.drivers);
        if drivers.get(key).map(|(_, a)| *a) == Some(asked) {
            drivers.remove(key);
            true
        } else {
            false
        }
    }

    fn asked(&self, key: &RailKey) -> u64 {
        lock(&self.drivers).get(key).map_or(0, |(_, a)| *a)
    }

    /// One rail's driver: reads the rail when one of its tickets is due or
    /// when woken, finishes what is due, and stops when the rail is empty.
    async fn drive(self: Arc<Self>, key: RailKey, notify: Arc<Notify>) {
        let store = self.store(key.clone());
        let mut backoff = Duration::from_millis(500);
        // The rail as this driver last wrote it: due tickets it started are
        // finished from it without reading the rail again. Acting on a rail
        // another replica has changed since is safe: every step re-checks.
        let mut known = None;
        loop {
            let asked = self.asked(&key);
            let wait = match self.drive_once(&store, known.take()).await {
                Ok((Some(wait), written)) => {
                    backoff = Duration::from_millis(500);
                    known = written.filter(|_| wait.is_zero());
                    wait
                }
                Ok((None, _)) if self.retire(&key, asked) => return,
                Ok((None, _)) => continue,
                Err(e) => {
                    tracing::warn!(restaurant = %key.restaurant, error = %e, retry_in = ?backoff,
                        "driving the kitchen's rail failed");
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    wait
                }
            };
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = notify.notified() => {}
                }
            }
        }
    }

    /// When to look again (`None`: the rail is empty), and the rail as this
    /// pass wrote it.
    async fn drive_once(
        self: &Arc<Self>,
        store: &Store,
        known: Option<Rail>,
    ) -> Result<(Option<Duration>, Option<Rail>), HandleError> {
        let rail = match known {
            Some(rail) => rail,
            None => store.read().await?,
        };
        let now = Timestamp::now();
        let plan = plan(
            &rail,
            &self.settings.identity,
            now,
            self.settings.adopt_after,
        );
        // Ours but not seen Preparing: this replica restarted, or died
        // between starting the ticket and saying so.
        let unannounced: Vec<Ticket> = {
            let announced = lock(&self.announced);
            plan.mine
                .iter()
                .filter(|t| !announced.contains(&t.uid) && !plan.finish.contains(t))
                .cloned()
                .collect()
        };
        self.settle(store, unannounced).await?;
        // A manual kitchen's tickets are due when the staff marked them ready.
        let mut finish = plan.finish.clone();
        for t in &plan.check {
            let marked = self
                .access
                .order(&order_ref(store.key(), t))
                .await?
                .is_none_or(|o| o.annotations().contains_key(annotation::KITCHEN_READY));
            if marked {
                finish.push(t.clone());
            }
        }
        // Every ticket due at once: their Orders concurrently, the rail in one write.
        let closed = futures::future::join_all(finish.iter().map(|t| {
            if t.owner != self.settings.identity {
                tracing::warn!(order = %t.order, owner = %t.owner, "finishing a ticket its replica left overdue");
            }
            self.close(store.key(), t)
                .instrument(ticket_span("kitchen ready", t))
        }))
        .await;
        let mut done = Vec::new();
        let mut failed = None;
        for (t, result) in finish.iter().zip(closed) {
            match result {
                Ok(()) => done.push(t.uid.clone()),
                Err(e) => failed = Some(e),
            }
        }
        let mut written = None;
        if !done.is_empty() {
            written = Some(self.take_off_all(store, &done).await?.1);
        }
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((plan.wake_in, written))
    }
}

/// At start-up: every ticket the Orders say is cooking gets its rail driven.
pub async fn resume_all(k: &Kitchen, namespace: Option<&str>) -> Result<usize, HandleError> {
    let shared = &k.shared;
    // Through DeserializeGuard: one Order that does not parse is skipped,
    // instead of failing the list and with it the kitchen's start.
    let api: Api<DeserializeGuard<Order>> = match namespace {
        Some(ns) => Api::namespaced(shared.access.client.clone(), ns),
        None => Api::all(shared.access.client.clone()),
    };
    let mut restaurants: HashMap<(String, String), Option<Restaurant>> = HashMap::new();
    let mut resumed = 0;
    for guard in api.list(&ListParams::default()).await? {
        let order = match guard.0 {
            Ok(order) => order,
            Err(invalid) => {
                tracing::warn!(name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace,
                    error = %invalid.error, "skipping an Order that does not parse");
                continue;
            }
        };
        let cooking = kitchen(&order)
            .is_some_and(|k| matches!(k.state, KitchenState::Queued | KitchenState::Preparing));
        if !cooking {
            continue;
        }
        let namespace = order.namespace().unwrap_or_default();
        if cancelled(&order) {
            let r = OrderRef {
                namespace,
                name: order.name_any(),
                uid: order.uid().unwrap_or_default(),
            };
            shared.drop_ticket(&r).await?;
            continue;
        }
        let at = (namespace.clone(), order.spec.restaurant_ref.name.clone());
        if !restaurants.contains_key(&at) {
            let found = shared.restaurant(&at.0, &at.1).await?;
            restaurants.insert(at.clone(), found);
        }
        shared
            .resume(&order, restaurants.get(&at).and_then(Option::as_ref))
            .await?;
        resumed += 1;
    }
    Ok(resumed)
}

impl Handler for Kitchen {
    async fn handle(&self, event: CloudEvent, traceparent: String) -> Result<(), HandleError> {
        match event
            .event_type()
            .map_err(|e| HandleError::Permanent(e.to_string()))?
        {
            EventType::PaymentSucceeded => {
                self.shared.accept(&event.data.order, &traceparent).await
            }
            EventType::OrderCancelled => self.shared.drop_ticket(&event.data.order).await,
            _ => Ok(()),
        }
    }
}
