//! The kitchen's stage: take a ticket when an order is paid, cook it, say
//! when it is ready; drop it when the order is cancelled.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::lifecycle::{condition, find};
use dishpatch_api::order::{KitchenState, KitchenStatus, PaymentState};
use dishpatch_api::{Order, Restaurant};
use dishpatch_worker::{HandleError, Handler, OrderAccess};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::DeserializeGuard;

use crate::schedule::{Kitchens, Window, prep_time};

pub struct Kitchen {
    pub access: OrderAccess,
    pub scale: f64,
    /// Bookings: which tickets hold a station (capacity, FIFO).
    pub kitchens: Arc<Mutex<Kitchens>>,
    /// Order uids whose cook task runs in this process. Kept apart from
    /// the bookings: a ticket can be booked (and written) while its task is
    /// not running, when the process failed right after booking.
    pub cooking: Arc<Mutex<HashSet<String>>>,
}

fn lock(k: &Mutex<Kitchens>) -> std::sync::MutexGuard<'_, Kitchens> {
    k.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn json(status: &KitchenStatus) -> Result<serde_json::Value, HandleError> {
    serde_json::to_value(status).map_err(|e| HandleError::Permanent(e.to_string()))
}

fn order_ref(order: &Order) -> OrderRef {
    OrderRef {
        namespace: order.namespace().unwrap_or_default(),
        name: order.name_any(),
        uid: order.uid().unwrap_or_default(),
    }
}

fn kitchen_key(order: &Order) -> String {
    format!(
        "{}/{}",
        order.namespace().unwrap_or_default(),
        order.spec.restaurant_ref.name
    )
}

fn cancelled(order: &Order) -> bool {
    order.metadata.deletion_timestamp.is_some()
        || order
            .status
            .as_ref()
            .and_then(|s| find(&s.conditions, condition::CANCELLED))
            .is_some_and(|c| c.status == "True")
}

impl Kitchen {
    async fn accept(&self, r: &OrderRef, traceparent: &str) -> Result<(), HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(());
        };
        let status = order.status.clone().unwrap_or_default();
        if let Some(k) = &status.kitchen {
            // Seen before (a redelivery, or the operator nudging a stalled
            // order): make sure it is cooking, and say again what we said.
            match k.state {
                KitchenState::Queued | KitchenState::Preparing => {
                    self.resume(&order);
                    self.access
                        .publish(r, EventType::KitchenAccepted, None, traceparent)
                        .await?;
                }
                KitchenState::Ready => {
                    self.access
                        .publish(r, EventType::KitchenReady, None, traceparent)
                        .await?
                }
                KitchenState::Dropped => {}
            }
            return Ok(());
        }
        if cancelled(&order) {
            return Ok(());
        }
        if status.payment.as_ref().map(|p| p.state) != Some(PaymentState::Succeeded) {
            return Err(HandleError::Retryable("the order is not paid yet".into()));
        }
        let restaurants: Api<Restaurant> =
            Api::namespaced(self.access.client.clone(), &r.namespace);
        let Some(restaurant) = restaurants.get_opt(&order.spec.restaurant_ref.name).await? else {
            // Nobody can cook it: the operator cancels (KitchenFailed) and refunds.
            let dropped = KitchenStatus {
                state: KitchenState::Dropped,
                ticket_accepted_at: None,
                estimated_ready_at: None,
                ready_at: None,
            };
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
            self.scale,
        );
        let now = Timestamp::now();
        let capacity = usize::try_from(restaurant.spec.kitchen.capacity).unwrap_or(1);
        let window = lock(&self.kitchens).book(&kitchen_key(&order), &r.uid, capacity, now, prep);
        let ticket = KitchenStatus {
            state: if window.start <= now {
                KitchenState::Preparing
            } else {
                KitchenState::Queued
            },
            ticket_accepted_at: Some(Time(now)),
            estimated_ready_at: Some(Time(window.end)),
            ready_at: None,
        };
        let written = self.access.write(&order, json(&ticket)?).await?;
        // Cook first, announce second: if the announcement fails, the retry
        // finds the ticket cooking and only announces again.
        self.cook(written, window);
        self.access
            .publish(r, EventType::KitchenAccepted, None, traceparent)
            .await
    }

    async fn drop_ticket(&self, r: &OrderRef) -> Result<(), HandleError> {
        let Some(order) = self.access.order(r).await? else {
            return Ok(());
        };
        let Some(mut ticket) = order.status.as_ref().and_then(|s| s.kitchen.clone()) else {
            return Ok(());
        };
        if matches!(ticket.state, KitchenState::Queued | KitchenState::Preparing) {
            ticket.state = KitchenState::Dropped;
            self.access.write(&order, json(&ticket)?).await?;
            tracing::info!(order = %order.name_any(), "dropped the ticket");
        }
        lock(&self.kitchens).release(&kitchen_key(&order), &r.uid);
        Ok(())
    }

    /// Picks up a ticket found in an Order's status (a restart, or a nudge).
    fn resume(&self, order: &Order) {
        let Some(k) = order.status.as_ref().and_then(|s| s.kitchen.as_ref()) else {
            return;
        };
        let (Some(start), Some(end)) =
            (k.ticket_accepted_at.as_ref(), k.estimated_ready_at.as_ref())
        else {
            return;
        };
        let window = Window {
            start: start.0,
            end: end.0,
        };
        let uid = order.uid().unwrap_or_default();
        let mut kitchens = lock(&self.kitchens);
        if !kitchens.contains(&kitchen_key(order), &uid) {
            kitchens.restore(&kitchen_key(order), &uid, window);
        }
        drop(kitchens);
        // Booked is not cooking: start the task unless it already runs.
        self.cook(order.clone(), window);
    }

    /// Cooks in the background: Preparing at the window's start, Ready at
    /// its end. At most one task per order runs in this process.
    fn cook(&self, order: Order, window: Window) {
        let r = order_ref(&order);
        {
            let mut cooking = self
                .cooking
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !cooking.insert(r.uid.clone()) {
                return; // already cooking here
            }
        }
        let access = self.access.clone();
        let kitchens = self.kitchens.clone();
        let cooking = self.cooking.clone();
        tokio::spawn(async move {
            let key = kitchen_key(&order);
            let traceparent = dishpatch_messaging_trace(&r);
            cook_through(&access, &r, window, &traceparent).await;
            lock(&kitchens).release(&key, &r.uid);
            cooking
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&r.uid);
        });
    }
}

/// Retries of one kitchen update that keeps failing transiently, with a
/// doubling pause up to half a minute, before the task gives up. The
/// operator re-publishes payment.succeeded for an order overdue in the
/// kitchen, and that starts the task again.
const TRANSIENT_RETRIES: u32 = 10;

/// The cook task's steps. A permanent error (the apiserver refusing the
/// write) ends it at once rather than retrying every second forever.
async fn cook_through(access: &OrderAccess, r: &OrderRef, window: Window, traceparent: &str) {
    for (at, next) in [
        (window.start, KitchenState::Preparing),
        (window.end, KitchenState::Ready),
    ] {
        sleep_until(at).await;
        let mut attempt = 0;
        loop {
            match advance(access, r, next, traceparent).await {
                Ok(true) => break,
                Ok(false) => return,
                Err(HandleError::Permanent(e)) => {
                    tracing::error!(order = %r.name, error = %e, "kitchen update refused; giving up on this ticket");
                    return;
                }
                Err(HandleError::Retryable(e)) if attempt < TRANSIENT_RETRIES => {
                    let pause =
                        Duration::from_millis(500 << attempt.min(6)).min(Duration::from_secs(30));
                    tracing::warn!(order = %r.name, error = %e, retry_in = ?pause, "kitchen update failed; retrying");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(HandleError::Retryable(e)) => {
                    tracing::error!(order = %r.name, error = %e, "kitchen update kept failing; the operator's deadline will bring the order back");
                    return;
                }
            }
        }
    }
}

fn dishpatch_messaging_trace(r: &OrderRef) -> String {
    dishpatch_worker::child_traceparent(&r.uid)
}

async fn sleep_until(at: Timestamp) {
    let wait = Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or_default();
    tokio::time::sleep(wait).await;
}

/// Moves the ticket to `next` if it is still cooking. `Ok(false)`: the order
/// is gone or its ticket was dropped; stop.
async fn advance(
    access: &OrderAccess,
    r: &OrderRef,
    next: KitchenState,
    traceparent: &str,
) -> Result<bool, HandleError> {
    let Some(order) = access.order(r).await? else {
        return Ok(false);
    };
    let Some(mut ticket) = order.status.as_ref().and_then(|s| s.kitchen.clone()) else {
        return Ok(false);
    };
    match (ticket.state, next) {
        (KitchenState::Dropped, _) => return Ok(false),
        (KitchenState::Queued, KitchenState::Preparing) => {
            ticket.state = KitchenState::Preparing;
            access.write(&order, json(&ticket)?).await?;
        }
        (KitchenState::Queued | KitchenState::Preparing, KitchenState::Ready) => {
            ticket.state = KitchenState::Ready;
            ticket.ready_at = Some(Time(Timestamp::now()));
            access.write(&order, json(&ticket)?).await?;
            access
                .publish(r, EventType::KitchenReady, None, traceparent)
                .await?;
            tracing::info!(order = %r.name, "ready");
        }
        _ => {}
    }
    Ok(true)
}

/// At start-up: resume every ticket still cooking according to the Orders.
pub async fn resume_all(kitchen: &Kitchen, namespace: Option<&str>) -> Result<usize, kube::Error> {
    // Through DeserializeGuard: one Order that does not parse is skipped,
    // instead of failing the list and with it the kitchen's start.
    let api: Api<DeserializeGuard<Order>> = match namespace {
        Some(ns) => Api::namespaced(kitchen.access.client.clone(), ns),
        None => Api::all(kitchen.access.client.clone()),
    };
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
        let cooking = order
            .status
            .as_ref()
            .and_then(|s| s.kitchen.as_ref())
            .is_some_and(|k| matches!(k.state, KitchenState::Queued | KitchenState::Preparing));
        if cooking && !cancelled(&order) {
            kitchen.resume(&order);
            resumed += 1;
        }
    }
    Ok(resumed)
}

impl Handler for Kitchen {
    async fn handle(&self, event: CloudEvent, traceparent: String) -> Result<(), HandleError> {
        match event
            .event_type()
            .map_err(|e| HandleError::Permanent(e.to_string()))?
        {
            EventType::PaymentSucceeded => self.accept(&event.data.order, &traceparent).await,
            EventType::OrderCancelled => self.drop_ticket(&event.data.order).await,
            _ => Ok(()),
        }
    }
}
