//! Lease-based leader election (`coordination.k8s.io/v1`), so only one
//! operator replica reconciles at a time and a standby takes over when the
//! leader stops renewing.

use std::time::Duration;

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
    /// Renew well within the lease so one slow request doesn't lose it.
    fn renew_every(&self) -> Duration {
        self.duration / 3
    }
}

fn duration_secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Whether a lease held by someone else has run out.
pub fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return true;
    }
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    renewed.0.as_second().saturating_add(secs) < now.as_second()
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
async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
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
            let ours = spec.holder_identity.as_deref() == Some(cfg.identity.as_str());
            if !ours && !expired(&spec, now) {
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
    let retry = (cfg.duration / 5).max(Duration::from_millis(200));
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "waiting for the lease");
    loop {
        match try_acquire(&api, &cfg).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "acquiring the lease"),
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
            let mut last_renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(cfg.renew_every()).await;
                match try_acquire(&api, &cfg).await {
                    Ok(true) => last_renewed = tokio::time::Instant::now(),
                    Ok(false) => {
                        tracing::error!("the lease was taken over by another replica");
                        let _ = tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "renewing the lease"),
                }
                if last_renewed.elapsed() >= cfg.duration {
                    tracing::error!("could not renew the lease in time");
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
    fn expiry() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(!expired(&spec(Some("a"), 990, 15), now));
        assert!(expired(&spec(Some("a"), 980, 15), now));
        assert!(expired(&spec(None, 999, 15), now));
        assert!(expired(&spec(Some(""), 999, 15), now));
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
