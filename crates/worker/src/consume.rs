//! The consume loop: competing consumers on a service's durable queue.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dishpatch_api::events::CloudEvent;
use dishpatch_messaging::{Broker, ServiceQueue, trace};
use dishpatch_runtime::Health;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use rand::RngExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument as _;

use crate::metrics::{EventLabel, WorkerMetrics};

/// Why a message could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Worth trying again (the apiserver or the broker hiccupped, a conflict).
    #[error("retryable: {0}")]
    Retryable(String),
    /// Trying again won't help; dead-letter the message.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl From<kube::Error> for HandleError {
    fn from(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s)
                if (400..500).contains(&s.code) && s.code != 409 && s.code != 429 =>
            {
                HandleError::Permanent(e.to_string())
            }
            _ => HandleError::Retryable(e.to_string()),
        }
    }
}

impl From<dishpatch_messaging::PublishError> for HandleError {
    fn from(e: dishpatch_messaging::PublishError) -> Self {
        HandleError::Retryable(e.to_string())
    }
}

/// A worker's stage logic.
pub trait Handler: Send + Sync + 'static {
    /// Handles one event. `Ok` acks it: return only once the Order's status
    /// holds the result (or there is nothing to do). A handler that waits
    /// (on another holder, say) should watch the shutdown signal it was
    /// built with and return `Retryable` when shutdown begins: the message
    /// then goes back to the queue at once, without another attempt.
    fn handle(
        &self,
        event: CloudEvent,
        traceparent: String,
    ) -> impl Future<Output = Result<(), HandleError>> + Send;

    /// Checks what this replica itself needs to do any work (its own
    /// storage, say); `Err` says what is broken. While it fails the replica
    /// reports not ready and holds the messages whose handling failed,
    /// unacknowledged, instead of spending their delivery limit: no retry
    /// can succeed until the fault is repaired, and the message is not to
    /// blame.
    fn probe(&self) -> impl Future<Output = Result<(), String>> + Send {
        std::future::ready(Ok(()))
    }
}

/// How often an idle replica probes its own dependencies, and a held
/// message checks whether the fault is repaired.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Readiness from two sources: the broker connection (the consume loop) and
/// the handler's probe. Ready only when consuming and not faulted.
#[derive(Clone)]
struct Readiness {
    health: Health,
    state: Arc<std::sync::Mutex<(Option<&'static str>, Option<String>)>>,
}

impl Readiness {
    fn new(health: Health) -> Self {
        Self {
            health,
            state: Arc::new(std::sync::Mutex::new((Some("starting"), None))),
        }
    }

    /// `None`: consuming; `Some(why)`: not consuming.
    fn set_consuming(&self, not: Option<&'static str>) {
        self.update(|s| s.0 = not);
    }

    fn set_fault(&self, fault: Option<String>) {
        self.update(|s| s.1 = fault);
    }

    fn update(&self, f: impl FnOnce(&mut (Option<&'static str>, Option<String>))) {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut s);
        match (&s.0, &s.1) {
            (Some(why), _) => self.health.set_ready(false, why),
            (None, Some(fault)) => self.health.set_ready(false, fault),
            (None, None) => self.health.set_ready(true, "consuming"),
        }
    }
}

/// In-process attempts before a message goes back to the queue (and, after
/// the queue's delivery limit, to the dead-letter queue).
const ATTEMPTS: u32 = 5;

fn backoff(attempt: u32) -> Duration {
    let base = 100_u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let jitter = rand::rng().random_range(0..=base / 2);
    Duration::from_millis(base + jitter)
}

/// Waits while the handler's probe fails (not ready meanwhile). `false`
/// when shutdown came first.
async fn hold<H: Handler>(
    handler: &H,
    readiness: &Readiness,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        match handler.probe().await {
            Ok(()) => {
                readiness.set_fault(None);
                return true;
            }
            Err(fault) => readiness.set_fault(Some(fault)),
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = shutdown.wait_for(|s| *s) => return false,
        }
    }
}

async fn handle_delivery<H: Handler>(
    delivery: lapin::message::Delivery,
    handler: Arc<H>,
    metrics: Arc<WorkerMetrics>,
    readiness: Readiness,
    mut shutdown: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let event = match CloudEvent::from_json(&delivery.data) {
        Ok(e) => e,
        Err(e) => {
            // Poison: no retry can fix it. Reject without requeue: the broker
            // dead-letters it, and the queue keeps moving.
            tracing::warn!(routing_key = %delivery.routing_key, error = %e, "dead-lettering a malformed message");
            metrics.handled(delivery.routing_key.as_str(), "poison");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: false,
                    ..Default::default()
                })
                .await;
            return;
        }
    };
    let kind = delivery.routing_key.to_string();
    let incoming = delivery.properties.headers().as_ref().and_then(|h| {
        match h.inner().get(trace::TRACEPARENT_HEADER) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            _ => None,
        }
    });
    // Stay on the order's trace: a child of the publisher's span, or of the
    // order's root when the message carries none.
    let order = &event.data.order;
    let parent = incoming
        .filter(|t| trace::parse(t).is_some())
        .unwrap_or_else(|| trace::order_root(&order.uid, None));
    let span = tracing::info_span!(
        "handle",
        otel.name = %format!("handle {kind}"),
        otel.kind = "consumer",
        event = %kind,
        order.name = %order.name,
        order.namespace = %order.namespace,
        order.uid = %order.uid,
    );
    trace::adopt(&span, &parent);
    // What the handler publishes and writes is a child of this span.
    let traceparent = trace::traceparent_of(&span, || {
        let trace_id = trace::parse(&parent).map(|(t, _)| t).unwrap_or_default();
        trace::child_traceparent(&trace_id)
    });

    let mut attempt = 0;
    while attempt < ATTEMPTS {
        match handler
            .handle(event.clone(), traceparent.clone())
            .instrument(span.clone())
            .await
        {
            Ok(()) => {
                let _ = delivery.ack(BasicAckOptions::default()).await;
                metrics.handled(&kind, "ok");
                metrics
                    .latency
                    .get_or_create(&EventLabel {
                        event: kind.clone(),
                    })
                    .observe(started.elapsed().as_secs_f64());
                return;
            }
            Err(HandleError::Permanent(why)) => {
                tracing::warn!(event = %kind, order = %event.subject, %why, "dead-lettering");
                metrics.handled(&kind, "failed");
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await;
                return;
            }
            Err(HandleError::Retryable(why)) => {
                if *shutdown.borrow() {
                    // No more attempts here: another replica or the next
                    // start takes it (a handler that waits gives up on
                    // shutdown for this, see `Handler::handle`).
                    tracing::info!(event = %kind, order = %event.subject, %why, "shutting down: back to the queue");
                    break;
                }
                if let Err(fault) = handler.probe().await {
                    // This replica is broken, not the message: keep it
                    // unacknowledged until the fault is repaired, and don't
                    // count the attempt.
                    tracing::warn!(event = %kind, order = %event.subject, %why, %fault, "holding the message until the fault is repaired");
                    metrics.handled(&kind, "held");
                    readiness.set_fault(Some(fault));
                    if !hold(handler.as_ref(), &readiness, &mut shutdown).await {
                        break; // shutting down: back to the queue
                    }
                    continue;
                }
                tracing::info!(event = %kind, order = %event.subject, %why, attempt, "retrying");
                metrics.handled(&kind, "retried");
                tokio::select! {
                    _ = tokio::time::sleep(backoff(attempt)) => {}
                    _ = shutdown.wait_for(|s| *s) => break, // back to the queue
                }
                attempt += 1;
            }
        }
    }
    // Back to the queue; its delivery limit dead-letters it if this keeps up.
    let _ = delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await;
}

/// Consumes `queue` until `shutdown`, reconnecting when the broker goes away.
/// On shutdown it stops taking deliveries and finishes the ones in hand;
/// one that fails retryably, or is backing off before a retry, is not
/// tried again but returned to the queue (nack, requeue) at once, as is
/// anything else unacked, for another replica.
pub async fn run<H: Handler>(
    broker: Arc<Broker>,
    queue: &ServiceQueue,
    prefetch: u16,
    handler: Arc<H>,
    metrics: Arc<WorkerMetrics>,
    health: Health,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    let mut failures = 0_u32;
    let readiness = Readiness::new(health);
    // Each held message watches for shutdown on its own copy.
    let stop = shutdown.clone();
    // Probe while idle too, so a replica whose storage broke says so before
    // a message finds out.
    let prober = {
        let (handler, readiness, mut stop) = (handler.clone(), readiness.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                readiness.set_fault(handler.probe().await.err());
                tokio::select! {
                    _ = tokio::time::sleep(PROBE_EVERY) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        })
    };
    'connect: while !*shutdown.borrow() {
        let channel = match broker.channel().await {
            Ok(c) => c,
            Err(e) => {
                readiness.set_consuming(Some("no broker connection"));
                tracing::warn!(error = %e, "connecting to the broker");
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(failures)) => continue 'connect,
                    _ = shutdown.wait_for(|s| *s) => break 'connect,
                }
            }
        };
        let consumer = async {
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            channel
                .basic_consume(
                    queue.queue.into(),
                    format!("{}-{}", queue.service, std::process::id()).into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
        .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "starting to consume");
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(backoff(failures)) => continue 'connect,
                    _ = shutdown.wait_for(|s| *s) => break 'connect,
                }
            }
        };
        failures = 0;
        readiness.set_consuming(None);
        tracing::info!(queue = queue.queue, prefetch, "consuming");
        loop {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        tasks.spawn(handle_delivery(
                            delivery,
                            handler.clone(),
                            metrics.clone(),
                            readiness.clone(),
                            stop.clone(),
                        ));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer failed; reconnecting");
                        readiness.set_consuming(Some("reconnecting to the broker"));
                        continue 'connect;
                    }
                    None => {
                        readiness.set_consuming(Some("reconnecting to the broker"));
                        continue 'connect;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.wait_for(|s| *s) => break 'connect,
            }
        }
    }
    readiness.set_consuming(Some("shutting down"));
    prober.abort();
    tracing::info!(in_flight = tasks.len(), "finishing in-flight messages");
    while tasks.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_consuming_and_not_faulted() {
        let health = Health::default();
        let r = Readiness::new(health.clone());
        r.set_consuming(None);
        assert!(health.is_ready());
        r.set_fault(Some("the ledger is read-only".into()));
        assert!(!health.is_ready());
        // Reconnecting to the broker must not hide the fault, nor end it.
        r.set_consuming(Some("reconnecting to the broker"));
        r.set_consuming(None);
        assert!(!health.is_ready());
        r.set_fault(None);
        assert!(health.is_ready());
        r.set_consuming(Some("shutting down"));
        assert!(!health.is_ready());
    }
}
