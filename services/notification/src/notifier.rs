//! The handler: for every event, an e-mail to the customer and a signed
//! webhook to the integrator, each sent once across replicas and restarts.
//!
//! Delivery is at least once, so the same event arrives more than once: when
//! the broker redelivers, when the operator re-publishes a stalled order's
//! event, when one channel failed and the event is retried, and on whichever
//! replica the broker picks. Before sending, a replica claims the event's
//! channels in the Order's `status.notifications` (see [`crate::claims`] and
//! [`crate::record`]), and after sending it records them `Sent`: two writes
//! per event, whatever the number of copies. A replica that finds `Sent`
//! sends nothing; one that finds another's live claim waits for it, or, on
//! shutdown, gives the event back to the queue.
//!
//! The guarantee: one e-mail and one webhook per event, unless a replica
//! dies (or can't reach the apiserver for longer than the claim timeout)
//! after a channel went out and before it recorded that; then it goes out
//! again once the claim expires. For an order that is gone there is nowhere
//! to record: its webhook is de-duplicated within one process only (see
//! [`Sent`]). Both channels carry the event id (the e-mail's `Message-ID` is
//! `<event id>@dishpatch.dev`, the webhook body is the CloudEvent with its
//! deterministic `id`), so a rare duplicate is recognisable.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dishpatch_api::Order;
use dishpatch_api::events::{CloudEvent, EventType};
use dishpatch_api::order::{NotificationChannel as Channel, NotificationState};
use dishpatch_worker::{HandleError, Handler, OrderAccess};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::claims::{self, Me, Seen};
use crate::mail::{self, Mailer};
use crate::record::{self, CasError, WriteLabels};
use crate::templates::{self, Values};
use crate::webhook::Webhook;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SentLabels {
    channel: String,
    /// `sent`, `skipped` (no address, order gone), `retryable` or `failed`.
    outcome: String,
}

/// Notifications by channel and outcome, and writes of the record.
pub struct NotificationMetrics {
    notifications: Family<SentLabels, Counter>,
    writes: Family<WriteLabels, Counter>,
}

impl NotificationMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            notifications: Family::default(),
            writes: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("dishpatch_notification");
        r.register(
            "notifications",
            "Notifications by channel (email, webhook) and outcome (sent, skipped, retryable, failed)",
            m.notifications.clone(),
        );
        r.register(
            "record_writes",
            "Writes of status.notifications by outcome (written, changed: lost a race and read again, gone, failed)",
            m.writes.clone(),
        );
        m
    }

    fn count(&self, channel: Channel, outcome: &str) {
        self.notifications
            .get_or_create(&SentLabels {
                channel: channel.as_str().to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

/// The (event id, channel) pairs this process has delivered, bounded,
/// oldest forgotten first. The Order's record is the truth; this covers
/// what it can't: the webhooks of orders that are gone, and a send whose
/// record write failed (the retry records it without sending again).
struct Sent {
    order: VecDeque<(String, Channel)>,
    set: HashSet<(String, Channel)>,
    capacity: usize,
}

impl Sent {
    fn new(capacity: usize) -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity,
        }
    }

    fn contains(&self, id: &str, channel: Channel) -> bool {
        self.set.contains(&(id.to_string(), channel))
    }

    fn insert(&mut self, id: &str, channel: Channel) {
        let key = (id.to_string(), channel);
        if self.set.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

/// Remembered deliveries; about 100 bytes each.
const SENT_CAPACITY: usize = 20_000;

/// How claims are made and judged.
pub struct ClaimConfig {
    /// This process, as claims name it.
    pub me: Me,
    /// How old a claim must be before another replica takes it over. Each
    /// send is cut off at half of it, so a live sender never loses its claim.
    pub timeout: Duration,
}

/// The first re-read of an Order whose notification another holder claimed;
/// it doubles up to 2 s.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

/// Most compare-and-swaps lost in a row before the event is retried later.
const MAX_LOST_RACES: u32 = 10;

pub struct Notifier {
    orders: OrderAccess,
    mailer: Mailer,
    webhook: Option<Webhook>,
    metrics: NotificationMetrics,
    sent: Mutex<Sent>,
    claims: ClaimConfig,
    /// Numbers this process's attempts, for their holder names.
    attempts: AtomicU64,
    /// Holder names of the attempts running now.
    active: Mutex<HashSet<String>>,
    /// Flips on SIGTERM: waits on another holder's claim end then, and the
    /// event goes back to the queue.
    shutdown: watch::Receiver<bool>,
}

/// One attempt's holder name, registered as active until dropped.
struct Attempt<'a> {
    holder: String,
    active: &'a Mutex<HashSet<String>>,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        lock(self.active).remove(&self.holder);
    }
}

/// A poisoned lock only means another handler panicked while holding it;
/// the sets stay usable.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn records(order: &Order) -> &[dishpatch_api::order::NotificationRecord] {
    order
        .status
        .as_ref()
        .map(|s| s.notifications.as_slice())
        .unwrap_or_default()
}

/// What claiming found.
enum Claim {
    /// The order is gone: nowhere to record.
    Gone,
    /// `send` is claimed by this attempt in `order` as written; `skip`
    /// needs nothing (already sent, no address, no webhook).
    Ready {
        order: Box<Order>,
        send: Vec<Channel>,
        skip: Vec<(Channel, &'static str)>,
    },
}

impl Notifier {
    pub fn new(
        orders: OrderAccess,
        mailer: Mailer,
        webhook: Option<Webhook>,
        metrics: NotificationMetrics,
        claims: ClaimConfig,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            orders,
            mailer,
            webhook,
            metrics,
            sent: Mutex::new(Sent::new(SENT_CAPACITY)),
            claims,
            attempts: AtomicU64::new(0),
            active: Mutex::new(HashSet::new()),
            shutdown,
        }
    }

    fn begin(&self) -> Attempt<'_> {
        let n = self.attempts.fetch_add(1, Ordering::Relaxed);
        let holder = self.claims.me.holder(n);
        lock(&self.active).insert(holder.clone());
        Attempt {
            holder,
            active: &self.active,
        }
    }

    fn already_sent(&self, event: &CloudEvent, channel: Channel) -> bool {
        lock(&self.sent).contains(&event.id, channel)
    }

    fn mark_sent(&self, event: &CloudEvent, channel: Channel) {
        lock(&self.sent).insert(&event.id, channel);
    }

    /// Claims the channels of `event` that are to be sent, waiting while
    /// another attempt holds a live claim on one of them. Shutdown ends the
    /// wait with a retryable error, before this attempt claimed anything,
    /// so the event goes back to the queue for another replica or the next
    /// start: waiting out the claim would hold up the pod's exit by up to
    /// the claim timeout.
    async fn claim(
        &self,
        event: &CloudEvent,
        kind: EventType,
        holder: &str,
    ) -> Result<Claim, HandleError> {
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let mut lost = 0;
        loop {
            let Some(order) = self.orders.order(&event.data.order).await? else {
                return Ok(Claim::Gone);
            };
            let now = jiff::Timestamp::now();
            let active = lock(&self.active).clone();
            let (mut send, mut skip, mut record_only) = (Vec::new(), Vec::new(), Vec::new());
            let mut busy_until = None;
            for channel in [Channel::Email, Channel::Webhook] {
                if channel == Channel::Email && !self.mailer.mails(kind) {
                    skip.push((channel, "not an event the customer is e-mailed about"));
                    continue;
                }
                if channel == Channel::Email && order.spec.customer.contact.email.is_none() {
                    skip.push((channel, "the customer has no e-mail address"));
                    continue;
                }
                if channel == Channel::Webhook && self.webhook.is_none() {
                    skip.push((channel, "no webhook configured"));
                    continue;
                }
                match claims::seen(
                    records(&order),
                    &event.id,
                    channel,
                    &self.claims.me,
                    &active,
                    now,
                    self.claims.timeout,
                ) {
                    Seen::Sent => skip.push((channel, "already sent")),
                    Seen::Busy { until } => busy_until = busy_until.max(Some(until)),
                    // Sent by an attempt here whose record did not get written.
                    Seen::Free if self.already_sent(event, channel) => {
                        record_only.push(channel);
                        skip.push((channel, "already sent"));
                    }
                    Seen::Free => send.push(channel),
                }
            }
            if let Some(until) = busy_until {
                // A live claim settles within half the claim timeout, or
                // expires: waiting longer means the clocks disagree.
                if started.elapsed() > self.claims.timeout * 2 {
                    return Err(HandleError::Retryable(format!(
                        "{} is still claimed by another replica",
                        event.id
                    )));
                }
                let left = Duration::try_from(until - now).unwrap_or_default();
                if pause == FIRST_PAUSE {
                    tracing::info!(order = %event.subject, event = %event.type_, ?left, "waiting for another holder's claim");
                }
                let mut shutdown = self.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(pause.min(left).max(Duration::from_millis(50))) => {}
                    _ = shutdown.wait_for(|stop| *stop) => {
                        return Err(HandleError::Retryable(format!(
                            "shutting down while {} is claimed by another holder",
                            event.id
                        )));
                    }
                }
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
            if send.is_empty() && record_only.is_empty() {
                return Ok(Claim::Ready {
                    order: Box::new(order),
                    send,
                    skip,
                });
            }
            let after = claims::set(
                records(&order),
                &event.id,
                &send,
                NotificationState::Claimed,
                holder,
                now,
            );
            let after = claims::set(
                &after,
                &event.id,
                &record_only,
                NotificationState::Sent,
                holder,
                now,
            );
            match record::swap(&self.orders.client, &order, &after, &self.metrics.writes).await {
                Ok(written) => {
                    // An Order CRD older than this service prunes the
                    // section: sending then would be sending unrecorded.
                    let stored = send.iter().chain(&record_only).all(|&c| {
                        claims::find(records(&written), &event.id, c)
                            .is_some_and(|r| r.holder == holder)
                    });
                    if !stored {
                        return Err(HandleError::Retryable(
                            "the apiserver did not keep status.notifications: \
                             the Order CRD predates it (apply crds/)"
                                .into(),
                        ));
                    }
                    return Ok(Claim::Ready {
                        order: Box::new(written),
                        send,
                        skip,
                    });
                }
                Err(CasError::Changed) if lost + 1 < MAX_LOST_RACES => lost += 1,
                Err(CasError::Gone) => return Ok(Claim::Gone),
                Err(e) => return Err(cas_error(e)),
            }
        }
    }

    /// Records what this attempt sent (`Sent`) and drops its other claims.
    async fn settle(
        &self,
        event: &CloudEvent,
        mut order: Order,
        holder: &str,
        sent: &[Channel],
    ) -> Result<(), HandleError> {
        let mut lost = 0;
        loop {
            let before = records(&order);
            let after = claims::settle(before, &event.id, holder, sent, jiff::Timestamp::now());
            if after == before {
                return Ok(());
            }
            match record::swap(&self.orders.client, &order, &after, &self.metrics.writes).await {
                Ok(_) | Err(CasError::Gone) => return Ok(()),
                Err(CasError::Changed) if lost + 1 < MAX_LOST_RACES => {
                    lost += 1;
                    match self.orders.order(&event.data.order).await? {
                        Some(fresh) => order = fresh,
                        None => return Ok(()),
                    }
                }
                Err(e) => return Err(cas_error(e)),
            }
        }
    }

    /// Runs one channel's `send` unless it already succeeded for this event
    /// in this process, and remembers, counts and logs what happened. For
    /// orders that are gone, where nothing can be recorded.
    async fn once(
        &self,
        event: &CloudEvent,
        traceparent: &str,
        channel: Channel,
        send: impl Future<Output = Result<Outcome, HandleError>>,
    ) -> Result<Outcome, HandleError> {
        if self.already_sent(event, channel) {
            return Ok(Outcome::Skipped("already sent"));
        }
        let result = send.await;
        if matches!(result, Ok(Outcome::Sent)) {
            self.mark_sent(event, channel);
        }
        self.record(event, traceparent, channel, &result);
        result
    }

    /// Sends one claimed channel, cut off at half the claim timeout so the
    /// claim can't expire while it is still being sent.
    async fn send(
        &self,
        event: &CloudEvent,
        traceparent: &str,
        channel: Channel,
        send: impl Future<Output = Result<Outcome, HandleError>>,
    ) -> Result<Outcome, HandleError> {
        let limit = self.claims.timeout / 2;
        let result = match tokio::time::timeout(limit, send).await {
            Ok(result) => result,
            Err(_) => Err(HandleError::Retryable(format!(
                "{}: no answer within {limit:?} (half the claim timeout)",
                channel.as_str()
            ))),
        };
        if matches!(result, Ok(Outcome::Sent)) {
            self.mark_sent(event, channel);
        }
        self.record(event, traceparent, channel, &result);
        result
    }

    /// Counts and logs one channel's outcome.
    fn record(
        &self,
        event: &CloudEvent,
        traceparent: &str,
        channel: Channel,
        result: &Result<Outcome, HandleError>,
    ) {
        let outcome = match result {
            Ok(Outcome::Sent) => {
                tracing::info!(order = %event.subject, event = %event.type_, channel = channel.as_str(), %traceparent, "notified");
                "sent"
            }
            Ok(Outcome::Skipped(why)) => {
                tracing::info!(order = %event.subject, event = %event.type_, channel = channel.as_str(), why, %traceparent, "not notifying");
                "skipped"
            }
            Err(HandleError::Retryable(why)) => {
                tracing::warn!(order = %event.subject, event = %event.type_, channel = channel.as_str(), %why, %traceparent, "notification failed; will retry");
                "retryable"
            }
            Err(HandleError::Permanent(why)) => {
                tracing::warn!(order = %event.subject, event = %event.type_, channel = channel.as_str(), %why, %traceparent, "notification failed for good");
                "failed"
            }
        };
        self.metrics.count(channel, outcome);
    }

    #[tracing::instrument(name = "email", skip_all, fields(otel.name = "smtp send", otel.kind = "client"))]
    async fn email(
        &self,
        event: &CloudEvent,
        kind: EventType,
        order: &Order,
    ) -> Result<Outcome, HandleError> {
        let Some(to) = order.spec.customer.contact.email.as_deref() else {
            return Ok(Outcome::Skipped("the customer has no e-mail address"));
        };
        let rendered = templates::render(kind, &Values::new(event, order))
            .map_err(|e| HandleError::Permanent(e.to_string()))?;
        match self
            .mailer
            .send(to, mail::message_id(&event.id), &rendered)
            .await
        {
            Ok(()) => Ok(Outcome::Sent),
            Err(e) if e.is_permanent() => Err(HandleError::Permanent(format!("e-mail: {e}"))),
            Err(e) => Err(HandleError::Retryable(format!("e-mail: {e}"))),
        }
    }

    #[tracing::instrument(name = "webhook", skip_all, fields(otel.name = "webhook POST", otel.kind = "client"))]
    async fn webhook(
        &self,
        webhook: &Webhook,
        event: &CloudEvent,
        traceparent: &str,
    ) -> Result<Outcome, HandleError> {
        let body = event
            .to_json()
            .map_err(|e| HandleError::Permanent(format!("encoding the event: {e}")))?;
        match webhook.post(body, traceparent).await {
            Ok(()) => Ok(Outcome::Sent),
            Err(e) if e.is_permanent() => Err(HandleError::Permanent(format!(
                "webhook {}: {e}",
                webhook.url()
            ))),
            Err(e) => Err(HandleError::Retryable(format!(
                "webhook {}: {e}",
                webhook.url()
            ))),
        }
    }
}

/// What one channel did with an event.
enum Outcome {
    Sent,
    Skipped(&'static str),
}

/// Both channels' results as one: retry while anything may still succeed
/// (channels already done are not repeated), dead-letter when something
/// failed for good and nothing is left to retry.
fn combine(results: [Result<Outcome, HandleError>; 2]) -> Result<(), HandleError> {
    let mut retryable = Vec::new();
    let mut permanent = Vec::new();
    for result in results {
        match result {
            Ok(_) => {}
            Err(HandleError::Retryable(why)) => retryable.push(why),
            Err(HandleError::Permanent(why)) => permanent.push(why),
        }
    }
    if !retryable.is_empty() {
        retryable.extend(permanent);
        Err(HandleError::Retryable(retryable.join("; ")))
    } else if !permanent.is_empty() {
        Err(HandleError::Permanent(permanent.join("; ")))
    } else {
        Ok(())
    }
}

fn cas_error(e: CasError) -> HandleError {
    match e {
        CasError::Kube(e) => e.into(),
        // Lost every race so far, or could not encode: try again later.
        e => HandleError::Retryable(format!("recording notifications: {e}")),
    }
}

impl Handler for Notifier {
    async fn handle(&self, event: CloudEvent, traceparent: String) -> Result<(), HandleError> {
        let kind = event
            .event_type()
            .map_err(|e| HandleError::Permanent(e.to_string()))?;
        if !self.mailer.mails(kind) && self.webhook.is_none() {
            // Nobody is told: no need to read the order or record anything.
            let email = Ok(Outcome::Skipped(
                "not an event the customer is e-mailed about",
            ));
            let webhook = Ok(Outcome::Skipped("no webhook configured"));
            self.record(&event, &traceparent, Channel::Email, &email);
            self.record(&event, &traceparent, Channel::Webhook, &webhook);
            return combine([email, webhook]);
        }
        let attempt = self.begin();
        let (order, send) = match self.claim(&event, kind, &attempt.holder).await? {
            Claim::Gone => {
                // Nothing to read an address from, nowhere to record: the
                // webhook still goes, de-duplicated in this process.
                let email: Result<Outcome, HandleError> =
                    Ok(Outcome::Skipped("the order no longer exists"));
                self.record(&event, &traceparent, Channel::Email, &email);
                let webhook = self
                    .once(&event, &traceparent, Channel::Webhook, async {
                        match &self.webhook {
                            Some(webhook) => self.webhook(webhook, &event, &traceparent).await,
                            None => Ok(Outcome::Skipped("no webhook configured")),
                        }
                    })
                    .await;
                return combine([email, webhook]);
            }
            Claim::Ready { order, send, skip } => {
                for (channel, why) in skip {
                    self.record(&event, &traceparent, channel, &Ok(Outcome::Skipped(why)));
                }
                (order, send)
            }
        };
        // Both channels at once and each whatever the other does, so a slow
        // or broken SMTP server doesn't hold back webhooks and vice versa.
        let (email, webhook) = tokio::join!(
            async {
                if !send.contains(&Channel::Email) {
                    return Ok(Outcome::Skipped("not claimed"));
                }
                self.send(
                    &event,
                    &traceparent,
                    Channel::Email,
                    self.email(&event, kind, &order),
                )
                .await
            },
            async {
                match (&self.webhook, send.contains(&Channel::Webhook)) {
                    (Some(webhook), true) => {
                        self.send(
                            &event,
                            &traceparent,
                            Channel::Webhook,
                            self.webhook(webhook, &event, &traceparent),
                        )
                        .await
                    }
                    _ => Ok(Outcome::Skipped("not claimed")),
                }
            },
        );
        let sent: Vec<Channel> = [(Channel::Email, &email), (Channel::Webhook, &webhook)]
            .into_iter()
            .filter(|(_, r)| matches!(r, Ok(Outcome::Sent)))
            .map(|(c, _)| c)
            .collect();
        if !send.is_empty() {
            self.settle(&event, *order, &attempt.holder, &sent).await?;
        }
        combine([email, webhook])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_is_bounded_and_forgets_the_oldest() {
        let mut sent = Sent::new(2);
        sent.insert("a", Channel::Email);
        sent.insert("a", Channel::Email);
        sent.insert("b", Channel::Email);
        assert!(sent.contains("a", Channel::Email));
        assert!(!sent.contains("a", Channel::Webhook));
        sent.insert("c", Channel::Webhook);
        assert!(!sent.contains("a", Channel::Email));
        assert!(sent.contains("b", Channel::Email) && sent.contains("c", Channel::Webhook));
        assert_eq!((sent.order.len(), sent.set.len()), (2, 2));
    }

    #[test]
    fn retry_wins_over_dead_letter_while_something_may_succeed() {
        let retry = || Err(HandleError::Retryable("smtp down".into()));
        let fail = || Err(HandleError::Permanent("webhook said 400".into()));
        assert!(combine([Ok(Outcome::Sent), Ok(Outcome::Skipped("x"))]).is_ok());
        assert!(matches!(
            combine([retry(), fail()]),
            Err(HandleError::Retryable(why)) if why.contains("smtp down") && why.contains("400")
        ));
        assert!(matches!(
            combine([Ok(Outcome::Sent), fail()]),
            Err(HandleError::Permanent(_))
        ));
        assert!(matches!(
            combine([retry(), Ok(Outcome::Sent)]),
            Err(HandleError::Retryable(_))
        ));
    }
}
