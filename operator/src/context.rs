//! State shared by the reconcilers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dishpatch_api::Order;
use dishpatch_api::events::EventType;
use dishpatch_messaging::Broker;
use kube::Client;
use kube::core::DeserializeGuard;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;

use crate::config::RunConfig;
use crate::metrics::Metrics;
use crate::stock::StockKeeper;

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub broker: Arc<Broker>,
    pub metrics: Arc<Metrics>,
    pub config: RunConfig,
    pub stock: StockKeeper,
    pub memory: Memory,
    /// The Orders watch cache, and whether it has listed everything once.
    pub orders: Store<DeserializeGuard<Order>>,
    pub watches: crate::watches::WatchHealth,
    /// Order history; `None` when no database is configured.
    pub archive: Option<dishpatch_archive::Archive>,
}

/// What this replica remembers between reconciles. Losing it (a restart, a
/// new leader) is safe: it only saves duplicate publishes and speeds retries.
#[derive(Default)]
pub struct Memory {
    /// Consecutive failures per order uid, for per-object backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Events committed to status but not yet confirmed by the broker.
    outbox: Mutex<HashMap<String, HashSet<EventType>>>,
    /// Per order uid: the event it waits for and how many of its deadlines
    /// had passed at the last publish. Absent: this replica has not seen the
    /// order wait yet.
    nudged: Mutex<HashMap<String, (EventType, u32)>>,
    /// Per deleted order uid: how many deadlines had passed at the last
    /// order.cancelled this replica published for it.
    compensating: Mutex<HashMap<String, u32>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Memory {
    /// Backoff after a failure: 1s, 2s, 4s … capped at 5 minutes.
    pub fn backoff(&self, uid: &str) -> Duration {
        let mut failures = lock(&self.failures);
        let n = failures.entry(uid.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let secs = 1_u64 << (*n - 1).min(8);
        Duration::from_secs(secs.min(300))
    }

    pub fn succeeded(&self, uid: &str) {
        lock(&self.failures).remove(uid);
    }

    pub fn queue(&self, uid: &str, event: EventType) {
        lock(&self.outbox)
            .entry(uid.to_string())
            .or_default()
            .insert(event);
    }

    pub fn queued(&self, uid: &str) -> Vec<EventType> {
        lock(&self.outbox)
            .get(uid)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn sent(&self, uid: &str, event: EventType) {
        let mut outbox = lock(&self.outbox);
        if let Some(set) = outbox.get_mut(uid) {
            set.remove(&event);
            if set.is_empty() {
                outbox.remove(uid);
            }
        }
    }

    /// Drops a queued event whose status write was refused, so it is never
    /// published.
    pub fn discard(&self, uid: &str, event: EventType) {
        self.sent(uid, event);
    }

    /// Records that `event` was just published for the order.
    pub fn published(&self, uid: &str, event: EventType) {
        lock(&self.nudged).insert(uid.to_string(), (event, 0));
    }

    /// Whether to (re-)publish `event` for an order waiting on it with
    /// `passed` deadlines behind it: once per passed deadline, and at once
    /// for an order this replica sees waiting for the first time (its
    /// predecessor may have died before publishing).
    pub fn should_nudge(&self, uid: &str, event: EventType, passed: u32) -> bool {
        let mut nudged = lock(&self.nudged);
        let publish = match nudged.get(uid) {
            None => true,
            Some((e, _)) if *e != event => passed > 0,
            Some((_, n)) => passed > *n,
        };
        nudged.insert(uid.to_string(), (event, passed));
        publish
    }

    /// Whether to publish order.cancelled for a deleted order with `passed`
    /// deadlines behind its deletion: at first sight, then once per deadline.
    pub fn should_compensate(&self, uid: &str, passed: u32) -> bool {
        let mut compensating = lock(&self.compensating);
        let publish = compensating.get(uid).is_none_or(|n| passed > *n);
        compensating.insert(uid.to_string(), passed);
        publish
    }

    pub fn forget(&self, uid: &str) {
        lock(&self.failures).remove(uid);
        lock(&self.outbox).remove(uid);
        lock(&self.nudged).remove(uid);
        lock(&self.compensating).remove(uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nudges_once_per_deadline_and_on_first_sight() {
        let m = Memory::default();
        assert!(
            m.should_nudge("u", EventType::OrderAccepted, 0),
            "unseen: resync"
        );
        assert!(!m.should_nudge("u", EventType::OrderAccepted, 0));
        assert!(m.should_nudge("u", EventType::OrderAccepted, 1));
        assert!(!m.should_nudge("u", EventType::OrderAccepted, 1));
        assert!(
            !m.should_nudge("u", EventType::PaymentSucceeded, 0),
            "new stage, on time"
        );
        assert!(m.should_nudge("u", EventType::PaymentSucceeded, 1));
        m.published("v", EventType::OrderAccepted);
        assert!(!m.should_nudge("v", EventType::OrderAccepted, 0));
        assert!(m.should_compensate("w", 0), "first sight");
        assert!(!m.should_compensate("w", 0));
        assert!(m.should_compensate("w", 1), "a deadline passed");
        assert!(!m.should_compensate("w", 1));
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let m = Memory::default();
        assert_eq!(m.backoff("u"), Duration::from_secs(1));
        assert_eq!(m.backoff("u"), Duration::from_secs(2));
        assert_eq!(m.backoff("u"), Duration::from_secs(4));
        m.succeeded("u");
        assert_eq!(m.backoff("u"), Duration::from_secs(1));
    }
}
