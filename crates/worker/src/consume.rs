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
    /// holds the result (or there is nothing to do).
    fn handle(
        &self,
        event: CloudEvent,
        traceparent: String,
    ) -> impl Future<Output = Result<(), HandleError>> + Send;
}

/// In-process attempts before a message goes back to the queue (and, after
/// the queue's delivery limit, to the dead-letter queue).
const ATTEMPTS: u32 = 5;

fn backoff(attempt: u32) -> Duration {
    let base = 100_u64.saturating_mul(1 << attempt.min(6)).min(5_000);
    let jitter = rand::rng().random_range(0..=base / 2);
    Duration::from_millis(base + jitter)
}

async fn handle_delivery<H: Handler>(
    delivery: lapin::message::Delivery,
    handler: Arc<H>,
    metrics: Arc<WorkerMetrics>,
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
    // Stay on the order's trace: a child of the incoming span, or a fresh one on the order's trace id.
    let trace_id = incoming
        .as_deref()
        .and_then(trace::parse)
        .map(|(t, _)| t)
        .unwrap_or_else(|| trace::trace_id(&event.data.order.uid, None));
    let traceparent = trace::child_traceparent(&trace_id);
    let span = tracing::info_span!("handle", event = %kind, order = %event.subject, %traceparent);
    let _enter = span.enter();
    drop(_enter);

    for attempt in 0..ATTEMPTS {
        match handler.handle(event.clone(), traceparent.clone()).await {
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
                tracing::info!(event = %kind, order = %event.subject, %why, attempt, "retrying");
                metrics.handled(&kind, "retried");
                tokio::time::sleep(backoff(attempt)).await;
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
/// anything unacked returns to the queue for another replica.
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
    'connect: while !*shutdown.borrow() {
        let channel = match broker.channel().await {
            Ok(c) => c,
            Err(e) => {
                health.set_ready(false, "no broker connection");
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
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        failures = 0;
        health.set_ready(true, "consuming");
        tracing::info!(queue = queue.queue, prefetch, "consuming");
        loop {
            tokio::select! {
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        tasks.spawn(handle_delivery(delivery, handler.clone(), metrics.clone()));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer failed; reconnecting");
                        health.set_ready(false, "reconnecting to the broker");
                        continue 'connect;
                    }
                    None => {
                        health.set_ready(false, "reconnecting to the broker");
                        continue 'connect;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = shutdown.wait_for(|s| *s) => break 'connect,
            }
        }
    }
    health.set_ready(false, "shutting down");
    tracing::info!(in_flight = tasks.len(), "finishing in-flight messages");
    while tasks.join_next().await.is_some() {}
}
