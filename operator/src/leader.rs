//! Lease-based leader election (`coordination.k8s.io/v1`), so only one
//! operator replica reconciles at a time and a standby takes over when the
//! leader stops renewing.

use std::time::Duration;

use tokio::time::Instant;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaseConfig {
    /// How often the leader renews and a standby retries (client-go's
    /// retry period).
    fn retry_every(&self) -> Duration {
        (self.duration / 5).max(Duration::from_millis(200))
    }

    /// A leader that could not renew within this long since its last
    /// renewal stops leading. Shorter than the lease, so it stops before any
    /// standby may take over (client-go's renew deadline).
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

fn duration_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// The lease record as this replica last saw it, and when it saw it change,
/// by its own monotonic clock. Expiry is measured from that moment, as
/// client-go does, never from the holder's `renewTime`: the two machines'
/// clocks need not agree.
#[derive(Debug, Clone)]
struct Observed {
    record: (Option<String>, Option<MicroTime>, Option<i32>),
    at: Instant,
}

impl Observed {
    /// Records `spec` as seen at `now`; the time moves only when the record changed.
    fn see(observed: &mut Option<Observed>, spec: &LeaseSpec, now: Instant) {
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.clone(),
            spec.lease_transitions,
        );
        if observed.as_ref().is_none_or(|o| o.record != record) {
            *observed = Some(Observed { record, at: now });
        }
    }
}

/// Whether a lease held by someone else has run out: nobody holds it, or
/// its record has not changed for a whole lease duration since we saw it
/// change.
pub fn expired(spec: &LeaseSpec, unchanged_since: Instant, now: Instant) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return true;
    }
    let secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15);
    now.saturating_duration_since(unchanged_since) >= Duration::from_secs(secs)
}

fn claim(existing: Option<&LeaseSpec>, cfg: &LeaseConfig, now: Timestamp) -> LeaseSpec {
    let same_holder = existing
        .and_then(|s| s.holder_identity.as_deref())
        .is_some_and(|h| h == cfg.identity);
    let transitions = existing.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(duration_secs(cfg.duration)),
        acquire_time: if same_holder {
            existing.and_then(|s| s.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if same_holder || existing.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..Default::default()
    }
}

/// Tries once to become or stay the holder. `Ok(true)` if we hold the lease.
async fn try_acquire(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(claim(None, cfg, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let seen_at = Instant::now();
            Observed::see(observed, &spec, seen_at);
            let unchanged_since = observed.as_ref().map_or(seen_at, |o| o.at);
            let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
            if !ours && !expired(&spec, unchanged_since, seen_at) {
                return Ok(false);
            }
            lease.spec = Some(claim(Some(&spec), cfg, now));
            // The resourceVersion in the object makes this a compare-and-swap:
            // of two standbys racing for an expired lease, one gets a 409.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Holds the lease until dropped; `lost` flips to true if it can't be renewed.
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
    api: Api<Lease>,
    cfg: LeaseConfig,
}

/// Waits until this replica holds the lease, or `shutdown` fires (`None`).
pub async fn acquire(
    client: Client,
    cfg: LeaseConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Option<Leadership> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let retry = cfg.retry_every();
    let mut observed = None;
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "waiting for the lease");
    loop {
        // A hung request must not keep a standby from trying again.
        match tokio::time::timeout(cfg.renew_deadline(), try_acquire(&api, &cfg, &mut observed))
            .await
        {
            Ok(Ok(true)) => break,
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "acquiring the lease"),
            Err(_) => tracing::warn!("acquiring the lease timed out"),
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.wait_for(|s| *s) => return None,
        }
    }
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became the leader");
    let (tx, lost) = watch::channel(false);
    let renewer = {
        let api = api.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let mut last_renewed = Instant::now();
            loop {
                tokio::time::sleep(retry).await;
                // Each renewal may take only what is left of the renew
                // deadline: a request that hangs (the apiserver's read
                // timeout is minutes) must not keep this replica leading
                // after a standby may have taken over.
                let left = cfg.renew_deadline().saturating_sub(last_renewed.elapsed());
                match tokio::time::timeout(left, try_acquire(&api, &cfg, &mut observed)).await {
                    Ok(Ok(true)) => last_renewed = Instant::now(),
                    Ok(Ok(false)) => {
                        tracing::error!("the lease was taken over by another replica");
                        let _ = tx.send(true);
                        return;
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "renewing the lease"),
                    Err(_) => tracing::warn!("renewing the lease timed out"),
                }
                if last_renewed.elapsed() >= cfg.renew_deadline() {
                    tracing::error!(
                        deadline = ?cfg.renew_deadline(),
                        "could not renew the lease within the renew deadline; stopping"
                    );
                    let _ = tx.send(true);
                    return;
                }
            }
        })
    };
    Some(Leadership {
        lost,
        renewer,
        api,
        cfg,
    })
}

impl Leadership {
    /// Gives the lease up so a standby takes over at once instead of waiting
    /// for it to expire.
    pub async fn release(self) {
        self.renewer.abort();
        let deadline = self.cfg.renew_deadline();
        if tokio::time::timeout(deadline, self.give_up())
            .await
            .is_err()
        {
            tracing::warn!("releasing the lease timed out; it expires on its own");
        }
    }

    async fn give_up(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str())
        {
            spec.holder_identity = None;
            spec.renew_time = None;
            spec.lease_duration_seconds = Some(1);
            match self
                .api
                .replace(&self.cfg.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => tracing::info!("released the lease"),
                Err(e) => tracing::warn!(error = %e, "releasing the lease"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed: i64, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(String::from),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_duration_seconds: Some(secs),
            ..Default::default()
        }
    }

    #[test]
    fn expiry_runs_from_when_the_record_last_changed_here() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        assert!(!expired(&spec(Some("a"), 990, 15), t0, t0 + secs(14)));
        assert!(expired(&spec(Some("a"), 990, 15), t0, t0 + secs(15)));
        assert!(expired(&spec(None, 999, 15), t0, t0));
        assert!(expired(&spec(Some(""), 999, 15), t0, t0));
    }

    #[test]
    fn a_holder_clock_far_behind_or_ahead_changes_nothing() {
        // renewTime says 1970 or the far future: only whether it changes counts.
        let t0 = Instant::now();
        let mut observed = None;
        let stale = spec(Some("a"), 0, 15);
        Observed::see(&mut observed, &stale, t0);
        let since = observed.as_ref().unwrap().at;
        assert!(!expired(&stale, since, t0 + Duration::from_secs(5)));
        // Renewed (renewTime moved, even backwards): the clock restarts.
        let renewed = spec(Some("a"), -5, 15);
        Observed::see(&mut observed, &renewed, t0 + Duration::from_secs(10));
        let since = observed.as_ref().unwrap().at;
        assert!(!expired(&renewed, since, t0 + Duration::from_secs(20)));
        // Seen again unchanged: the clock keeps running from the change.
        Observed::see(&mut observed, &renewed, t0 + Duration::from_secs(24));
        let since = observed.as_ref().unwrap().at;
        assert!(expired(&renewed, since, t0 + Duration::from_secs(25)));
    }

    #[test]
    fn the_leader_stops_before_a_standby_may_take_over() {
        let cfg = LeaseConfig {
            name: "l".into(),
            namespace: "n".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        };
        assert!(cfg.renew_deadline() < cfg.duration);
        assert!(cfg.retry_every() < cfg.renew_deadline());
    }

    #[test]
    fn takeover_counts_transitions() {
        let cfg = LeaseConfig {
            name: "l".into(),
            namespace: "n".into(),
            identity: "b".into(),
            duration: Duration::from_secs(6),
        };
        let now = Timestamp::from_second(2_000).unwrap();
        let mut old = spec(Some("a"), 1_000, 15);
        old.lease_transitions = Some(2);
        let taken = claim(Some(&old), &cfg, now);
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.lease_duration_seconds, Some(6));
        let renewed = claim(Some(&taken), &cfg, now);
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }
}
