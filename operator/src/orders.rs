//! The Order reconciler: accepts or rejects, follows the stages the workers
//! report, cancels and compensates, enforces deadlines, and cleans up.
//!
//! Level-triggered: every decision is made from the Order as it is now (plus
//! its Restaurant), never from the event that woke the reconciler up.

use std::sync::Arc;
use std::time::Duration;

use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::inventory;
use dishpatch_api::lifecycle::{
    Advance, Facts, Status, advance, annotation, cancellable, condition, find, phase_of, reason,
    set_condition,
};
use dishpatch_api::order::{
    ConfirmationDecision, KitchenState, OrderPhase, OrderStatus, PaymentState,
};
use dishpatch_api::{Money, Order};
use dishpatch_messaging::trace;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as K8sEvent, EventType as K8sEventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::admission::{self, Rejection};
use crate::context::Context;
use crate::deadline::{self, Awaiting};
use crate::error::{Error, Result};
use crate::stock::MANAGER;
use tracing::Instrument as _;

/// Held until the operator has compensated a deleted order.
pub const FINALIZER: &str = "dishpatch.dev/compensate";
/// How often a quiet order is looked at anyway, in case a watch event was missed.
const RESYNC: Duration = Duration::from_secs(300);

/// One pass over an Order, as a span on the order's trace (under the
/// façade's request that placed it): the API calls and publishes it makes
/// are its children.
pub async fn reconcile(guard: Arc<DeserializeGuard<Order>>, ctx: Arc<Context>) -> Result<Action> {
    let span = match &guard.0 {
        Ok(order) => {
            let uid = order.uid().unwrap_or_default();
            let span = tracing::info_span!(
                "reconcile",
                otel.name = "reconcile order",
                order.name = %order.name_any(),
                order.namespace = %order.namespace().unwrap_or_default(),
                order.uid = %uid,
                order.phase = ?order.status.as_ref().and_then(|s| s.phase),
            );
            trace::adopt(&span, &trace::order_root_of(order));
            span
        }
        Err(_) => tracing::info_span!("reconcile", otel.name = "reconcile unparsed order"),
    };
    reconcile_order(guard, ctx).instrument(span).await
}

async fn reconcile_order(guard: Arc<DeserializeGuard<Order>>, ctx: Arc<Context>) -> Result<Action> {
    let order = match &guard.0 {
        Ok(order) => order.clone(),
        Err(invalid) => {
            // One malformed object must not stop the others: report and skip
            // it. Its stock stays held (the orphan sweep counts it as live);
            // its deletion is handled from metadata and raw fields alone.
            tracing::warn!(name = ?invalid.metadata.name, namespace = ?invalid.metadata.namespace,
                error = %invalid.error, "skipping an Order that does not parse");
            let ours = invalid
                .metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
            if invalid.metadata.deletion_timestamp.is_some() && ours {
                return crate::unparsed::cleanup(&invalid.metadata, &ctx).await;
            }
            return Ok(Action::await_change());
        }
    };
    let started = std::time::Instant::now();
    let api: Api<Order> =
        Api::namespaced(ctx.client.clone(), &order.namespace().unwrap_or_default());
    let uid = order.uid().unwrap_or_default();
    let result = finalizer(&api, FINALIZER, Arc::new(order), |event| async {
        match event {
            Finalizer::Apply(order) => apply(&order, &ctx).await,
            Finalizer::Cleanup(order) => cleanup(&order, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(Box::new(other)),
    });
    let labels = crate::metrics::ControllerLabels {
        controller: "order".into(),
    };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    if result.is_ok() {
        ctx.memory.succeeded(&uid);
    }
    result
}

pub fn error_policy(
    guard: Arc<DeserializeGuard<Order>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let uid = guard
        .0
        .as_ref()
        .ok()
        .and_then(|o| o.uid())
        .unwrap_or_default();
    ctx.metrics
        .errors
        .get_or_create(&crate::metrics::ErrorLabels {
            controller: "order".into(),
            error: error.kind().into(),
        })
        .inc();
    if let Error::Waiting(why, retry) = error {
        tracing::debug!(%uid, %why, "waiting");
        return Action::requeue(*retry);
    }
    if let Error::Conflict(why) = error {
        // Someone wrote first (a stage writer, usually): the watch brings the
        // newer copy at once; this requeue is only the fallback.
        tracing::debug!(%uid, %why, "conflict");
        return Action::requeue(Duration::from_millis(500));
    }
    let delay = ctx.memory.backoff(&uid);
    tracing::warn!(%uid, error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The part of the status the operator owns and re-sends on every apply.
#[derive(Debug, Clone, PartialEq, Default)]
struct Owned {
    phase: Option<OrderPhase>,
    conditions: Vec<Condition>,
    observed_generation: Option<i64>,
    total: Option<Money>,
}

impl Owned {
    fn of(status: &OrderStatus) -> Self {
        Self {
            phase: status.phase,
            conditions: status.conditions.clone(),
            observed_generation: status.observed_generation,
            total: status.total.clone(),
        }
    }

    fn set(
        &mut self,
        type_: &str,
        status: impl Into<Status>,
        reason: &str,
        message: &str,
        generation: Option<i64>,
        now: &Time,
    ) {
        set_condition(
            &mut self.conditions,
            type_,
            status,
            reason,
            message,
            generation,
            now,
        );
    }

    fn is(&self, type_: &str, status: &str) -> bool {
        find(&self.conditions, type_).is_some_and(|c| c.status == status)
    }
}

/// Server-side applies the operator's fields of the status, and nothing else.
async fn write_status(ctx: &Context, order: &Order, owned: &Owned) -> Result<()> {
    apply_status(ctx, order, owned, None).await
}

/// Like [`write_status`], but only if the Order is still the object the
/// decision was made from (its resourceVersion is the apply's precondition).
/// For every write after acceptance, when the stage writers write too: a
/// cancellation races the courier's pick-up, and exactly one of them may
/// win; a phase computed from a stale copy must not overwrite theirs. On a
/// conflict the order is reconciled again from what is there now.
async fn write_status_if_unchanged(ctx: &Context, order: &Order, owned: &Owned) -> Result<()> {
    match apply_status(ctx, order, owned, order.resource_version()).await {
        Err(Error::Kube(kube::Error::Api(e))) if e.code == 409 => Err(Error::Conflict(format!(
            "order {} changed while deciding; deciding again",
            order.name_any()
        ))),
        other => other,
    }
}

async fn apply_status(
    ctx: &Context,
    order: &Order,
    owned: &Owned,
    resource_version: Option<String>,
) -> Result<()> {
    let api: Api<Order> =
        Api::namespaced(ctx.client.clone(), &order.namespace().unwrap_or_default());
    let mut status = serde_json::Map::new();
    if let Some(phase) = owned.phase {
        status.insert("phase".into(), json!(phase));
    }
    if !owned.conditions.is_empty() {
        status.insert(
            "conditions".into(),
            serde_json::to_value(&owned.conditions)?,
        );
    }
    if let Some(g) = owned.observed_generation {
        status.insert("observedGeneration".into(), json!(g));
    }
    if let Some(total) = &owned.total {
        status.insert("total".into(), serde_json::to_value(total)?);
    }
    let mut patch = json!({
        "apiVersion": "dishpatch.dev/v1alpha1",
        "kind": "Order",
        "status": status,
    });
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({ "resourceVersion": rv });
    }
    ctx.metrics.write("orders/status");
    api.patch_status(
        &order.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

/// Publishes an event about the order and waits for the broker's confirm.
async fn publish(
    ctx: &Context,
    order: &Order,
    kind: EventType,
    reason: Option<String>,
    republish: bool,
) -> Result<()> {
    let uid = order.uid().unwrap_or_default();
    let event = CloudEvent::new(
        kind,
        "operator",
        OrderRef {
            namespace: order.namespace().unwrap_or_default(),
            name: order.name_any(),
            uid: uid.clone(),
        },
        reason,
        Timestamp::now().to_string(),
    );
    let trace_id = trace::trace_id(
        &uid,
        order
            .annotations()
            .get(trace::TRACEPARENT_ANNOTATION)
            .map(String::as_str),
    );
    let traceparent = trace::child_traceparent(&trace_id);
    ctx.broker.publish(&event, &traceparent).await?;
    ctx.metrics.published(kind.routing_key(), republish);
    tracing::info!(order = %order.name_any(), namespace = ?order.namespace(), event = %kind, %traceparent, republish, "published");
    Ok(())
}

/// Records a Kubernetes Event on the order; failures only get logged.
/// How long recording a Kubernetes Event may take before it is given up.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

async fn record(ctx: &Context, order: &Order, type_: K8sEventType, reason: &str, note: String) {
    record_on(ctx, &order.object_ref(&()), type_, reason, note).await;
}

/// Records a Kubernetes Event on any object; failures only get logged.
pub(crate) async fn record_on(
    ctx: &Context,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
    type_: K8sEventType,
    reason: &str,
    note: String,
) {
    ctx.metrics.write("events");
    let event = K8sEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    // Best effort, and bounded: a reconcile must not wait on an Event.
    match tokio::time::timeout(EVENT_TIMEOUT, ctx.recorder.publish(&event, regarding)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "recording an event"),
        Err(_) => tracing::warn!(timeout = ?EVENT_TIMEOUT, "recording an event timed out"),
    }
}

async fn apply(order: &Order, ctx: &Context) -> Result<Action> {
    let uid = order.uid().unwrap_or_default();
    // Events committed to status earlier whose publish failed go out first.
    for kind in ctx.memory.queued(&uid) {
        let reason = match kind {
            EventType::OrderCancelled => cancel_message(order),
            EventType::OrderRejected => rejection_message(order),
            _ => None,
        };
        publish(ctx, order, kind, reason, false).await?;
        ctx.memory.sent(&uid, kind);
    }
    let status = order.status.clone().unwrap_or_default();
    match Facts::of(Some(&status)).accepted {
        None => decide(order, &status, ctx).await,
        Some(_) => progress(order, &status, ctx).await,
    }
}

fn rejection_message(order: &Order) -> Option<String> {
    order
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, condition::ACCEPTED))
        .filter(|c| c.status == "False")
        .map(|c| format!("{}: {}", c.reason, c.message))
}

fn cancel_message(order: &Order) -> Option<String> {
    order
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, condition::CANCELLED))
        .filter(|c| c.status == "True")
        .map(|c| format!("{}: {}", c.reason, c.message))
}

enum Decision {
    Accept {
        total: Money,
        held: bool,
        /// Staff confirm by hand within this long; payment waits.
        confirm_within: Option<Duration>,
    },
    Reject(Rejection),
}

/// A new order: check it against its restaurant, price it, reserve stock.
async fn decide(order: &Order, status: &OrderStatus, ctx: &Context) -> Result<Action> {
    let now = Time(Timestamp::now());
    let generation = order.metadata.generation;
    let uid = order.uid().unwrap_or_default();
    let name = order.name_any();
    let namespace = order.namespace().unwrap_or_default();
    let restaurant = order.spec.restaurant_ref.name.clone();

    let decision = ctx
        .stock
        .update(&namespace, &restaurant, |r, st| {
            match admission::quote(&order.spec, &restaurant, &r.spec) {
                Err(rejection) => {
                    inventory::release(st, &uid);
                    Decision::Reject(rejection)
                }
                Ok(quote) => match inventory::reserve(&r.spec, st, &uid, &name, &quote.lines) {
                    Ok(_) => Decision::Accept {
                        total: quote.total,
                        held: inventory::holds(st, &uid),
                        confirm_within: r.spec.manual_confirmation(),
                    },
                    Err(e) => Decision::Reject(Rejection {
                        reason: reason::OUT_OF_STOCK,
                        message: e.to_string(),
                    }),
                },
            }
        })
        .await?;

    let mut owned = Owned::of(status);
    owned.observed_generation = generation;
    let decision = match decision {
        Some(d) => d,
        None => {
            // The restaurant may simply not be applied yet (`kubectl apply -f
            // examples/` sends orders first): wait a while before rejecting.
            let created = order.creation_timestamp().map_or(now.0, |t| t.0);
            let age = Duration::try_from(now.0.duration_since(created)).unwrap_or_default();
            let message =
                format!("restaurant {restaurant} does not exist in namespace {namespace}");
            if age < ctx.config.restaurant_grace {
                owned.phase = Some(OrderPhase::Pending);
                owned.set(
                    condition::ACCEPTED,
                    Status::Unknown,
                    reason::WAITING_FOR_RESTAURANT,
                    &message,
                    generation,
                    &now,
                );
                if owned != Owned::of(status) {
                    write_status(ctx, order, &owned).await?;
                }
                let wait = (ctx.config.restaurant_grace - age).min(Duration::from_secs(5));
                return Ok(Action::requeue(wait));
            }
            Decision::Reject(Rejection {
                reason: reason::RESTAURANT_NOT_FOUND,
                message,
            })
        }
    };

    match decision {
        Decision::Reject(rejection) => {
            owned.phase = Some(OrderPhase::Rejected);
            owned.set(
                condition::ACCEPTED,
                false,
                rejection.reason,
                &rejection.message,
                generation,
                &now,
            );
            ctx.memory.queue(&uid, EventType::OrderRejected);
            write_status(ctx, order, &owned).await?;
            // The customer hears why (notification sends it on).
            let why = format!("{}: {}", rejection.reason, rejection.message);
            publish(ctx, order, EventType::OrderRejected, Some(why), false).await?;
            ctx.memory.sent(&uid, EventType::OrderRejected);
            record(
                ctx,
                order,
                K8sEventType::Warning,
                "Rejected",
                format!("{}: {}", rejection.reason, rejection.message),
            )
            .await;
            tracing::info!(order = %name, %namespace, reason = rejection.reason, "rejected");
            Ok(Action::requeue(ctx.config.retention.min(RESYNC)))
        }
        Decision::Accept {
            total,
            held,
            confirm_within,
        } => {
            owned.phase = Some(OrderPhase::Accepted);
            owned.set(
                condition::ACCEPTED,
                true,
                reason::ACCEPTED,
                &format!("priced at {total}"),
                generation,
                &now,
            );
            if held {
                owned.set(
                    condition::STOCK_RESERVED,
                    true,
                    reason::RESERVED,
                    &format!("stock held at restaurant {restaurant}"),
                    generation,
                    &now,
                );
            } else {
                owned.set(
                    condition::STOCK_RESERVED,
                    false,
                    reason::NOT_LIMITED,
                    "no item of this order has limited stock",
                    generation,
                    &now,
                );
            }
            owned.total = Some(total.clone());
            if let Some(within) = confirm_within {
                // Priced and held; payment waits for the staff's decision.
                let by = Timestamp::now()
                    .checked_add(jiff::SignedDuration::try_from(within).unwrap_or_default())
                    .unwrap_or_else(|_| Timestamp::now());
                owned.set(
                    condition::RESTAURANT_CONFIRMED,
                    Status::Unknown,
                    reason::AWAITING_CONFIRMATION,
                    &format!("restaurant {restaurant} confirms or declines by {by}"),
                    generation,
                    &now,
                );
                write_status(ctx, order, &owned).await?;
                tracing::info!(order = %name, %namespace, %total, "accepted; awaiting the restaurant's confirmation");
                return Ok(Action::requeue(within.min(RESYNC)));
            }
            ctx.memory.queue(&uid, EventType::OrderAccepted);
            write_status(ctx, order, &owned).await?;
            publish(ctx, order, EventType::OrderAccepted, None, false).await?;
            ctx.memory.sent(&uid, EventType::OrderAccepted);
            ctx.memory.published(&uid, EventType::OrderAccepted);
            tracing::info!(order = %name, %namespace, %total, "accepted");
            Ok(Action::requeue(ctx.config.stage_deadline))
        }
    }
}

/// At a restaurant that confirms by hand, for an order still waiting on it:
/// the staff's confirmation, or why the order is called off (declined, or
/// not confirmed in time).
fn restaurant_decision(
    order: &Order,
    status: &OrderStatus,
    ctx: &Context,
    now: Timestamp,
) -> (
    Option<dishpatch_api::order::RestaurantDecision>,
    Option<(&'static str, String)>,
) {
    let Some(waiting) =
        find(&status.conditions, condition::RESTAURANT_CONFIRMED).filter(|c| c.status == "Unknown")
    else {
        return (None, None);
    };
    let restaurant = &order.spec.restaurant_ref.name;
    match &order.spec.confirmation {
        Some(c) if c.decision == ConfirmationDecision::Confirmed => (Some(c.clone()), None),
        Some(c) => (
            None,
            Some((
                reason::RESTAURANT_DECLINED,
                match &c.reason {
                    Some(r) => format!("restaurant {restaurant} declined the order: {r}"),
                    None => format!("restaurant {restaurant} declined the order"),
                },
            )),
        ),
        None => {
            let within = confirmation_window(order, ctx);
            let waited = Duration::try_from(now.duration_since(waiting.last_transition_time.0))
                .unwrap_or_default();
            if waited < within {
                return (None, None);
            }
            (
                None,
                Some((
                    reason::RESTAURANT_DID_NOT_CONFIRM,
                    format!(
                        "restaurant {restaurant} did not confirm within {}s",
                        within.as_secs()
                    ),
                )),
            )
        }
    }
}

fn confirmation_window(order: &Order, ctx: &Context) -> Duration {
    ctx.stock
        .manual_confirmation(
            &order.namespace().unwrap_or_default(),
            &order.spec.restaurant_ref.name,
        )
        .unwrap_or(DEFAULT_CONFIRMATION)
}

/// How long until an order that waits for its restaurant's staff runs out
/// of time (`None`: it does not wait).
fn confirmation_left(
    order: &Order,
    status: &OrderStatus,
    ctx: &Context,
    now: Timestamp,
) -> Option<Duration> {
    let waiting = find(&status.conditions, condition::RESTAURANT_CONFIRMED)
        .filter(|c| c.status == "Unknown" && order.spec.confirmation.is_none())?;
    let waited =
        Duration::try_from(now.duration_since(waiting.last_transition_time.0)).unwrap_or_default();
    // Condition times are whole seconds: a moment past the window, not before it.
    Some(
        confirmation_window(order, ctx)
            .saturating_sub(waited)
            .max(Duration::from_millis(200))
            + Duration::from_millis(100),
    )
}

/// How long staff have when the Restaurant is gone from the watch.
const DEFAULT_CONFIRMATION: Duration = Duration::from_secs(300);

/// Why to cancel an accepted order now, if at all.
fn cancellation(
    order: &Order,
    status: &OrderStatus,
    facts: &Facts,
) -> Option<(&'static str, String)> {
    if let Some(request) = &order.spec.cancellation {
        return Some((reason::CUSTOMER_REQUESTED, request.reason.clone()));
    }
    if facts.payment == Some(PaymentState::Failed) {
        let why = status
            .payment
            .as_ref()
            .and_then(|p| p.failure_reason.clone())
            .unwrap_or_else(|| "the payment failed".into());
        return Some((reason::PAYMENT_FAILED, why));
    }
    if facts.kitchen == Some(KitchenState::Dropped) {
        return Some((
            reason::KITCHEN_FAILED,
            "the kitchen could not prepare the order".into(),
        ));
    }
    None
}

/// An accepted (or rejected) order: follow what the workers report.
async fn progress(order: &Order, status: &OrderStatus, ctx: &Context) -> Result<Action> {
    let now = Timestamp::now();
    let t = Time(now);
    let generation = order.metadata.generation;
    let uid = order.uid().unwrap_or_default();
    let namespace = order.namespace().unwrap_or_default();
    let restaurant = order.spec.restaurant_ref.name.clone();
    let facts = Facts::of(Some(status));
    let current = status.phase.unwrap_or_else(|| phase_of(&facts));
    let mut owned = Owned::of(status);
    owned.observed_generation = generation;
    let mut notes: Vec<(K8sEventType, &str, String)> = Vec::new();
    let mut to_publish: Vec<EventType> = Vec::new();

    // Cancel if asked, if a stage failed, or if the order stalled for good.
    if !facts.cancelled && facts.accepted == Some(true) {
        let stalled = deadline::awaiting(current, status).and_then(|aw| {
            let passed = deadline::deadlines_passed(aw.since, now, ctx.config.stage_deadline);
            (aw.cancel_when_exhausted && passed > ctx.config.max_republishes).then(|| {
                (
                    reason::DEADLINE_EXCEEDED,
                    format!(
                        "no progress in phase {current} after {} re-published {} events",
                        ctx.config.max_republishes, aw.event
                    ),
                )
            })
        });
        // Judge by where the order really is: the stage facts may already
        // say picked up while the recorded phase still says Ready.
        let reached = match advance(current, phase_of(&facts)) {
            Advance::Move(next) => next,
            Advance::Stay | Advance::Illegal { .. } => current,
        };
        let (confirmed, unconfirmed) = restaurant_decision(order, status, ctx, now);
        let called_off = cancellation(order, status, &facts).is_some();
        if let Some(c) = confirmed.as_ref().filter(|_| !called_off) {
            owned.set(
                condition::RESTAURANT_CONFIRMED,
                true,
                reason::CONFIRMED,
                &format!("confirmed by {}", c.by),
                generation,
                &t,
            );
            to_publish.push(EventType::OrderAccepted);
        }
        if let Some((why, message)) = &unconfirmed {
            owned.set(
                condition::RESTAURANT_CONFIRMED,
                false,
                why,
                message,
                generation,
                &t,
            );
        }
        match cancellation(order, status, &facts)
            .or(unconfirmed)
            .or(stalled)
        {
            Some((why, message)) if cancellable(reached) => {
                owned.set(condition::CANCELLED, true, why, &message, generation, &t);
                to_publish.push(EventType::OrderCancelled);
            }
            Some((reason::CUSTOMER_REQUESTED, _)) => {
                if !owned.is(condition::CANCELLED, "False") {
                    notes.push((
                        K8sEventType::Warning,
                        reason::TOO_LATE,
                        "cancellation refused: the order was already picked up".into(),
                    ));
                }
                owned.set(
                    condition::CANCELLED,
                    false,
                    reason::TOO_LATE,
                    "the courier already picked the order up",
                    generation,
                    &t,
                );
            }
            _ => {}
        }
    }

    let mut facts_now = facts;
    facts_now.cancelled = owned.is(condition::CANCELLED, "True");
    let phase = match advance(current, phase_of(&facts_now)) {
        Advance::Move(next) => next,
        Advance::Stay => current,
        Advance::Illegal { from, to } => {
            tracing::warn!(order = %order.name_any(), %from, %to, "ignoring an illegal transition");
            current
        }
    };
    owned.phase = Some(phase);

    // Stock: give it back when cancelled or rejected, mark it used when delivered.
    let give_back = matches!(phase, OrderPhase::Cancelled | OrderPhase::Rejected);
    if (give_back || phase == OrderPhase::Delivered) && owned.is(condition::STOCK_RESERVED, "True")
    {
        ctx.stock
            .update(&namespace, &restaurant, |_, st| {
                if give_back {
                    inventory::release(st, &uid)
                } else {
                    inventory::consume(st, &uid)
                }
            })
            .await?;
        let (why, message) = if give_back {
            (reason::RELEASED, "stock returned to the restaurant")
        } else {
            (reason::CONSUMED, "stock used by the delivered order")
        };
        owned.set(
            condition::STOCK_RESERVED,
            false,
            why,
            message,
            generation,
            &t,
        );
    }

    // A charge that waits for the customer shows where to complete it, until
    // the provider settles it (its webhook) or the payment deadline cancels.
    match status
        .payment
        .as_ref()
        .filter(|p| p.state == PaymentState::RequiresAction)
    {
        Some(p) if phase != OrderPhase::Cancelled => {
            let message = match &p.action_url {
                Some(url) => format!("the customer completes the payment at {url}"),
                None => "the customer completes the payment in the provider's flow".to_string(),
            };
            owned.set(
                condition::PAYMENT_ACTION_REQUIRED,
                true,
                reason::REQUIRES_ACTION,
                &message,
                generation,
                &t,
            );
        }
        _ if owned.is(condition::PAYMENT_ACTION_REQUIRED, "True") => owned.set(
            condition::PAYMENT_ACTION_REQUIRED,
            false,
            reason::PAYMENT_SETTLED,
            "the payment no longer waits for the customer",
            generation,
            &t,
        ),
        _ => {}
    }

    // Events only for what a person may act on: the happy path's steps are
    // in the conditions and stage sections already, each with its time, and
    // an Event per step would be most of an order's API writes.
    if phase != current && phase == OrderPhase::Cancelled {
        notes.push((K8sEventType::Warning, phase.as_str(), cancel_note(&owned)));
    }

    // The order as it will be: is its compensation overdue for good?
    let mut after = status.clone();
    after.conditions = owned.conditions.clone();
    after.phase = Some(phase);
    let compensation = compensation_check(order, &after, ctx, now);
    if let Some((failed, why, message)) = &compensation {
        owned.set(
            condition::COMPENSATION_FAILED,
            *failed,
            why,
            message,
            generation,
            &t,
        );
        if *failed {
            notes.push((
                K8sEventType::Warning,
                condition::COMPENSATION_FAILED,
                message.clone(),
            ));
        }
    }
    after.conditions = owned.conditions.clone();

    // Queued before the write: if the write's outcome is unknown (a timeout),
    // the next reconcile still announces what may have been committed.
    for kind in &to_publish {
        ctx.memory.queue(&uid, *kind);
    }
    if owned != Owned::of(status) {
        // Conditional: the stage writers record the phase too, and a phase
        // computed from a cached copy they have overtaken must not land.
        let written = write_status_if_unchanged(ctx, order, &owned).await;
        if let Err(Error::Conflict(_)) = &written {
            // A conflict wrote nothing: the decision is void, and so are its
            // events (a lost cancellation must not announce order.cancelled).
            for kind in &to_publish {
                ctx.memory.discard(&uid, *kind);
            }
        }
        written?;
    }
    if matches!(compensation, Some((true, ..))) {
        ctx.metrics.compensation_failed.inc();
    }
    for kind in to_publish {
        publish(ctx, order, kind, cancel_note_opt(&owned), false).await?;
        ctx.memory.sent(&uid, kind);
        ctx.memory.published(&uid, kind);
    }
    for (kind, reason, note) in notes {
        record(ctx, order, kind, reason, note).await;
    }

    // The order as it is now: nudge it if it stalled, or expire it if done.
    // Compensation that failed for good, or that a person settled, is not
    // re-published any more.
    let gave_up = find(&after.conditions, condition::COMPENSATION_FAILED)
        .is_some_and(|c| c.status == "True")
        || order
            .annotations()
            .contains_key(annotation::COMPENSATION_RESOLVED);
    if let Some(aw) = deadline::awaiting(phase, &after)
        .filter(|aw| !(gave_up && aw.event == EventType::OrderCancelled))
    {
        return nudge(order, aw, ctx, now).await;
    }
    if phase.is_terminal() {
        return expire(order, phase, &after, ctx, now).await;
    }
    // Waiting for the restaurant's staff: look again when their time is up.
    if let Some(wait) = confirmation_left(order, &after, ctx, now) {
        return Ok(Action::requeue(wait));
    }
    Ok(Action::requeue(RESYNC))
}

fn cancel_note(owned: &Owned) -> String {
    cancel_note_opt(owned).unwrap_or_else(|| "cancelled".into())
}

fn cancel_note_opt(owned: &Owned) -> Option<String> {
    find(&owned.conditions, condition::CANCELLED).map(|c| format!("{}: {}", c.reason, c.message))
}

/// Whether a cancelled order's compensation has failed for good (`true`,
/// after `--max-compensation-attempts` re-publishes) or recovered (`false`,
/// it was marked failed and is now done or resolved by hand), with the
/// condition's reason and message; `None` when nothing changes.
fn compensation_check(
    order: &Order,
    status: &OrderStatus,
    ctx: &Context,
    now: Timestamp,
) -> Option<(bool, &'static str, String)> {
    let marked = find(&status.conditions, condition::COMPENSATION_FAILED)
        .is_some_and(|c| c.status == "True");
    let resolved = order
        .annotations()
        .get(annotation::COMPENSATION_RESOLVED)
        .cloned();
    let overdue = deadline::awaiting(OrderPhase::Cancelled, status)
        .filter(|aw| {
            aw.event == EventType::OrderCancelled && status.phase == Some(OrderPhase::Cancelled)
        })
        .filter(|_| resolved.is_none())
        .map(|aw| deadline::deadlines_passed(aw.since, now, ctx.config.stage_deadline));
    match (marked, overdue) {
        (false, Some(passed)) if passed > ctx.config.max_compensation_attempts => {
            let owed = deadline::money_outstanding(status)
                .unwrap_or("a worker has not undone its stage yet");
            Some((
                true,
                reason::COMPENSATION_EXHAUSTED,
                format!(
                    "{owed} after {} re-published order.cancelled events; settle it by hand, then annotate the order {}=<what was done>",
                    ctx.config.max_compensation_attempts,
                    annotation::COMPENSATION_RESOLVED
                ),
            ))
        }
        (true, None) => Some(match resolved {
            Some(note) => (false, reason::RESOLVED_BY_HAND, note),
            None => (false, reason::COMPENSATED, "compensation completed".into()),
        }),
        _ => None,
    }
}

/// Re-publishes the event a stalled order waits for, once per passed deadline.
async fn nudge(order: &Order, aw: Awaiting, ctx: &Context, now: Timestamp) -> Result<Action> {
    let uid = order.uid().unwrap_or_default();
    let deadline = ctx.config.stage_deadline;
    let passed = deadline::deadlines_passed(aw.since, now, deadline);
    if ctx.memory.should_nudge(&uid, aw.event, passed) {
        let reason = (aw.event == EventType::OrderCancelled).then(|| {
            order
                .status
                .as_ref()
                .and_then(|s| find(&s.conditions, condition::CANCELLED))
                .map(|c| format!("{}: {}", c.reason, c.message))
        });
        publish(ctx, order, aw.event, reason.flatten(), true).await?;
        if passed > 0 {
            record(
                ctx,
                order,
                K8sEventType::Warning,
                "Republished",
                format!(
                    "no progress for {}s: re-published {} (attempt {passed})",
                    deadline.as_secs() * u64::from(passed),
                    aw.event
                ),
            )
            .await;
        }
    }
    Ok(Action::requeue(deadline::until_next(
        aw.since, now, deadline, passed,
    )))
}

/// Deletes a terminal order once its retention has passed.
async fn expire(
    order: &Order,
    phase: OrderPhase,
    status: &OrderStatus,
    ctx: &Context,
    now: Timestamp,
) -> Result<Action> {
    let since = match phase {
        OrderPhase::Delivered => status
            .delivery
            .as_ref()
            .and_then(|d| d.delivered_at.as_ref())
            .map(|t| t.0),
        OrderPhase::Cancelled => {
            find(&status.conditions, condition::CANCELLED).map(|c| c.last_transition_time.0)
        }
        _ => find(&status.conditions, condition::ACCEPTED).map(|c| c.last_transition_time.0),
    }
    .unwrap_or(now);
    let age = Duration::try_from(now.duration_since(since)).unwrap_or_default();
    if age < ctx.config.retention {
        return Ok(Action::requeue((ctx.config.retention - age).min(RESYNC)));
    }
    // History first: the delete waits until the archive has the order.
    archive(order, ctx).await?;
    let api: Api<Order> =
        Api::namespaced(ctx.client.clone(), &order.namespace().unwrap_or_default());
    ctx.metrics.write("orders");
    match api
        .delete(&order.name_any(), &DeleteParams::background())
        .await
    {
        Ok(_) => {
            tracing::info!(order = %order.name_any(), %phase, "deleted after its retention period")
        }
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// The order is being deleted: compensate before letting it go. Stock is
/// returned at once and the workers are told to undo their stages; while
/// the customer's money is outstanding (a charge not refunded, or one whose
/// outcome is not recorded) the finalizer stays, and order.cancelled is
/// re-published once per stage deadline. After `--max-compensation-attempts`
/// the order says CompensationFailed and waits for a person, who settles it
/// by hand and annotates it `dishpatch.dev/compensation-resolved`.
///
/// No charge can start once deletion has begun: the payment service records
/// its intent (`Pending`) with the resourceVersion it decided from, and
/// setting the deletion timestamp changes that version. So the copy this
/// runs on shows every charge that could ever exist for the order.
async fn cleanup(order: &Order, ctx: &Context) -> Result<Action> {
    let uid = order.uid().unwrap_or_default();
    let status = order.status.clone().unwrap_or_default();
    let facts = Facts::of(Some(&status));
    let phase = status.phase.unwrap_or_else(|| phase_of(&facts));
    let namespace = order.namespace().unwrap_or_default();
    let now = Timestamp::now();

    let released = ctx
        .stock
        .update(&namespace, &order.spec.restaurant_ref.name, |_, st| {
            inventory::release(st, &uid)
        })
        .await?
        .unwrap_or(false);
    if released {
        record(
            ctx,
            order,
            K8sEventType::Normal,
            reason::RELEASED,
            "stock returned to the restaurant".into(),
        )
        .await;
    }

    let resolved = order
        .annotations()
        .contains_key(annotation::COMPENSATION_RESOLVED);
    let owed = deadline::money_outstanding(&status).filter(|_| !resolved);
    // A delivered order's charge and courier are as they should be; only an
    // unfinished or cancelled one has anything to undo.
    let undo = !phase.is_terminal()
        || (phase == OrderPhase::Cancelled && deadline::compensation_outstanding(&status));
    let Some(owed) = owed else {
        if undo && ctx.memory.should_compensate(&uid, 0) {
            // Tell the workers to undo what they did (drop the ticket, free the courier).
            publish(
                ctx,
                order,
                EventType::OrderCancelled,
                deleted_reason(),
                false,
            )
            .await?;
        }
        // Whoever deleted it (retention, or a person), the finalizer stays
        // until the history has the order as it ended.
        archive(order, ctx).await?;
        ctx.memory.forget(&uid);
        return Ok(Action::await_change());
    };

    let deadline = ctx.config.stage_deadline;
    let since = order
        .meta()
        .deletion_timestamp
        .as_ref()
        .map_or(now, |t| t.0);
    let passed = deadline::deadlines_passed(since, now, deadline);
    let exhausted = passed > ctx.config.max_compensation_attempts;
    if !exhausted {
        if ctx.memory.should_compensate(&uid, passed) {
            publish(
                ctx,
                order,
                EventType::OrderCancelled,
                deleted_reason(),
                passed > 0,
            )
            .await?;
        }
        return Err(Error::Waiting(
            format!("deleted order {} waits: {owed}", order.name_any()),
            deadline::until_next(since, now, deadline, passed),
        ));
    }
    let failed = find(&status.conditions, condition::COMPENSATION_FAILED)
        .is_some_and(|c| c.status == "True");
    if !failed {
        let message = format!(
            "{owed} after {} re-published order.cancelled events; the order keeps its finalizer until it is settled by hand and annotated {}=<what was done>",
            ctx.config.max_compensation_attempts,
            annotation::COMPENSATION_RESOLVED
        );
        let mut owned = Owned::of(&status);
        owned.set(
            condition::COMPENSATION_FAILED,
            true,
            reason::COMPENSATION_EXHAUSTED,
            &message,
            order.metadata.generation,
            &Time(now),
        );
        write_status_if_unchanged(ctx, order, &owned).await?;
        ctx.metrics.compensation_failed.inc();
        record(
            ctx,
            order,
            K8sEventType::Warning,
            condition::COMPENSATION_FAILED,
            message,
        )
        .await;
    }
    Err(Error::Waiting(
        format!("deleted order {} needs a person: {owed}", order.name_any()),
        RESYNC,
    ))
}

/// Writes the order to the history database, if there is one. A failure is
/// counted, told on the order as a Warning Event, and returned: the caller's
/// delete (or finalizer removal) waits and is retried with backoff.
async fn archive(order: &Order, ctx: &Context) -> Result<()> {
    let Some(archive) = &ctx.archive else {
        return Ok(());
    };
    let result = archive.put(order).await;
    let label = crate::metrics::ResultLabel {
        result: if result.is_ok() { "ok" } else { "error" }.into(),
    };
    ctx.metrics.archived.get_or_create(&label).inc();
    if let Err(e) = &result {
        record(
            ctx,
            order,
            K8sEventType::Warning,
            reason::ARCHIVE_FAILED,
            format!("not deleted yet: the order history database did not take it: {e}"),
        )
        .await;
    }
    Ok(result?)
}

fn deleted_reason() -> Option<String> {
    Some(format!("{}: order deleted", reason::DELETED))
}
