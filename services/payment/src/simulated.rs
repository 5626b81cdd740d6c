//! A simulated gateway with a durable ledger, for local runs and tests.
//!
//! Like Stripe, it stores the first result per idempotency key and replays it
//! for the same key, so a redelivered message never charges twice; the
//! ledger (one JSON line per charge or refund, appended under a file lock so
//! several replicas can share it) lets a test prove it.
//!
//! Test tokens behave like Stripe's: `tok_visa` / `pm_card_visa` (and any
//! other token) succeed; `tok_chargeDeclined`, `…InsufficientFunds` are
//! declined; `…ProcessingError` fails with a retryable error twice per key,
//! then succeeds.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::gateway::{
    ChargeOutcome, ChargeRequest, GatewayError, GatewayFuture, PaymentGateway, RefundRequest,
};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub key: String,
    /// `charge` or `refund`.
    pub kind: String,
    pub order_uid: String,
    pub amount: i64,
    pub currency: String,
    /// `succeeded` or `declined`.
    pub result: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
}

/// Reads a ledger file (for tests and audits).
pub(crate) fn read_ledger(path: &Path) -> std::io::Result<Vec<LedgerEntry>> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(std::io::Error::other)?);
    }
    Ok(out)
}

pub struct Simulated {
    path: PathBuf,
    /// How long each call takes, like a network round trip to a real
    /// provider: widens the window in which a charge is in flight.
    latency: Duration,
    /// Retryable failures handed out so far, per key.
    transient: Mutex<HashMap<String, u32>>,
}

const TRANSIENT_FAILURES: u32 = 2;

impl Simulated {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            latency: Duration::ZERO,
            transient: Mutex::default(),
        }
    }

    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Looks the key up and, if new, records what `decide` says, all under
    /// an exclusive lock on the ledger file.
    fn record(
        &self,
        key: &str,
        decide: impl FnOnce() -> Result<LedgerEntry, GatewayError>,
    ) -> Result<LedgerEntry, GatewayError> {
        let io = |e: std::io::Error| {
            GatewayError::Retryable(format!("ledger {}: {e}", self.path.display()))
        };
        let mut file = self.open_for_append().map_err(io)?;
        file.lock().map_err(io)?;
        let existing = read_ledger(&self.path).map_err(io)?;
        if let Some(found) = existing.into_iter().find(|e| e.key == key) {
            return Ok(found);
        }
        let entry = decide()?;
        let mut line =
            serde_json::to_string(&entry).map_err(|e| GatewayError::Permanent(e.to_string()))?;
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(entry)
    }

    /// Opens the ledger for appending, as [`record`](Self::record) does: it
    /// fails on a read-only or missing mount (for root too, whom file modes
    /// don't stop).
    fn open_for_append(&self) -> std::io::Result<std::fs::File> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
    }

    fn transient_failure(&self, key: &str) -> bool {
        let mut t = self
            .transient
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = t.entry(key.to_string()).or_insert(0);
        if *n < TRANSIENT_FAILURES {
            *n += 1;
            true
        } else {
            false
        }
    }
}

fn id(prefix: &str) -> String {
    use rand::RngExt;
    let n: u64 = rand::rng().random();
    format!("{prefix}_sim_{n:016x}")
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

impl PaymentGateway for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    fn probe(&self) -> Result<(), String> {
        self.open_for_append()
            .map(drop)
            .map_err(|e| format!("the ledger {} can't be written: {e}", self.path.display()))
    }

    fn charge<'a>(&'a self, req: &'a ChargeRequest) -> GatewayFuture<'a, ChargeOutcome> {
        Box::pin(async move {
            tokio::time::sleep(self.latency).await;
            let entry = self.record(&req.idempotency_key, || {
                let token = req.token.as_str();
                if token.contains("ProcessingError") && self.transient_failure(&req.idempotency_key)
                {
                    return Err(GatewayError::Retryable(
                        "processing error; try again".into(),
                    ));
                }
                let declined = match token {
                    "tok_chargeDeclined" | "pm_card_chargeDeclined" => {
                        Some("Your card was declined.")
                    }
                    "tok_chargeDeclinedInsufficientFunds"
                    | "pm_card_chargeDeclinedInsufficientFunds" => {
                        Some("Your card has insufficient funds.")
                    }
                    _ => None,
                };
                Ok(LedgerEntry {
                    key: req.idempotency_key.clone(),
                    kind: "charge".into(),
                    order_uid: req.order_uid.clone(),
                    amount: req.amount,
                    currency: req.currency.clone(),
                    result: if declined.is_some() {
                        "declined"
                    } else {
                        "succeeded"
                    }
                    .into(),
                    id: id("ch"),
                    reason: declined.map(String::from),
                    at: now(),
                })
            })?;
            Ok(match entry.result.as_str() {
                "succeeded" => ChargeOutcome::Succeeded {
                    payment_id: entry.id,
                },
                _ => ChargeOutcome::Declined {
                    reason: entry.reason.unwrap_or_else(|| "declined".into()),
                },
            })
        })
    }

    fn refund<'a>(&'a self, req: &'a RefundRequest) -> GatewayFuture<'a, String> {
        Box::pin(async move {
            tokio::time::sleep(self.latency).await;
            let entry = self.record(&req.idempotency_key, || {
                Ok(LedgerEntry {
                    key: req.idempotency_key.clone(),
                    kind: "refund".into(),
                    order_uid: req.order_uid.clone(),
                    amount: req.amount,
                    currency: req.currency.clone(),
                    result: "succeeded".into(),
                    id: id("re"),
                    reason: None,
                    at: now(),
                })
            })?;
            Ok(entry.id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(key: &str, token: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            order_uid: "u".into(),
            order: dishpatch_api::events::OrderRef {
                namespace: "ns".into(),
                name: "o".into(),
                uid: "u".into(),
            },
            amount: 100,
            currency: "EUR".into(),
            token: token.into(),
            description: "d".into(),
        }
    }

    #[tokio::test]
    async fn same_key_replays_and_ledger_records_once() {
        let dir = std::env::temp_dir().join(format!("dp-ledger-{}", std::process::id()));
        let path = dir.join("ledger.jsonl");
        let g = Simulated::new(path.clone());
        let a = g.charge(&req("k1", "tok_visa")).await.unwrap();
        let b = g.charge(&req("k1", "tok_visa")).await.unwrap();
        assert_eq!(a, b);
        let declined = g.charge(&req("k2", "tok_chargeDeclined")).await.unwrap();
        assert_eq!(
            declined,
            ChargeOutcome::Declined {
                reason: "Your card was declined.".into()
            }
        );
        assert_eq!(
            g.charge(&req("k2", "tok_visa")).await.unwrap(),
            declined,
            "first result wins"
        );
        for _ in 0..2 {
            assert!(matches!(
                g.charge(&req("k3", "tok_chargeDeclinedProcessingError"))
                    .await,
                Err(GatewayError::Retryable(_))
            ));
        }
        assert!(matches!(
            g.charge(&req("k3", "tok_chargeDeclinedProcessingError"))
                .await,
            Ok(ChargeOutcome::Succeeded { .. })
        ));
        let ledger = read_ledger(&path).unwrap();
        assert_eq!(
            ledger.iter().map(|e| e.key.as_str()).collect::<Vec<_>>(),
            vec!["k1", "k2", "k3"]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_probe_fails_when_the_ledger_cannot_be_opened_for_writing() {
        let dir = std::env::temp_dir().join(format!("dp-ledger-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Simulated::new(dir.join("ledger.jsonl")).probe(), Ok(()));
        // A directory where the file should be: opening it to append fails
        // for root too (unlike a chmod).
        let blocked = dir.join("blocked");
        std::fs::create_dir_all(&blocked).unwrap();
        let err = Simulated::new(blocked.clone()).probe().unwrap_err();
        assert!(err.contains("can't be written"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
