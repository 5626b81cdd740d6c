//! Command-line and environment configuration of `dishpatch-operator run`.

use std::net::SocketAddr;
use std::time::Duration;

use dishpatch_runtime::time::parse_duration;

#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "DISHPATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// AMQP URL of RabbitMQ.
    #[arg(
        long,
        env = "DISHPATCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "DISHPATCH_ADMIN_ADDR", default_value = "127.0.0.1:9090")]
    pub admin_addr: SocketAddr,

    /// Orders reconciled in parallel.
    #[arg(long, env = "DISHPATCH_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "DISHPATCH_LEASE_NAME",
        default_value = "dishpatch-operator"
    )]
    pub lease_name: String,

    /// Namespace of the Lease (default: --namespace, else `default`).
    #[arg(long, env = "DISHPATCH_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// How long a leader's lease lasts without renewal; a standby takes over after it.
    #[arg(long, env = "DISHPATCH_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// This replica's identity in the Lease (default: hostname-pid).
    #[arg(long, env = "DISHPATCH_IDENTITY")]
    pub identity: Option<String>,

    /// How long an order may wait in a stage before its event is re-published.
    #[arg(long, env = "DISHPATCH_STAGE_DEADLINE", default_value = "60s", value_parser = parse_duration)]
    pub stage_deadline: Duration,

    /// Re-publishes of a stalled order before it is cancelled (DeadlineExceeded).
    #[arg(long, env = "DISHPATCH_MAX_REPUBLISHES", default_value_t = 3)]
    pub max_republishes: u32,

    /// How long a new order waits for its Restaurant to appear before it is rejected.
    #[arg(long, env = "DISHPATCH_RESTAURANT_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub restaurant_grace: Duration,

    /// How long terminal orders are kept before they are deleted.
    #[arg(long, env = "DISHPATCH_RETENTION", default_value = "24h", value_parser = parse_duration)]
    pub retention: Duration,

    /// PostgreSQL URL of the order history (`postgres://user:password@host/db`,
    /// `?sslmode=require` for TLS). When set, every order is written there
    /// before it is deleted, and the delete waits until it is. Unset, deleted
    /// orders are gone.
    #[arg(long, env = "DISHPATCH_ARCHIVE_URL", hide_env_values = true)]
    pub archive_url: Option<String>,

    /// Re-publishes of order.cancelled for an order whose compensation (a
    /// refund, a charge to settle) is still outstanding, one per stage
    /// deadline, before the operator stops and sets CompensationFailed. A
    /// deleted order keeps its finalizer while money is outstanding.
    #[arg(
        long,
        env = "DISHPATCH_MAX_COMPENSATION_ATTEMPTS",
        default_value_t = 10
    )]
    pub max_compensation_attempts: u32,
}

impl RunConfig {
    pub fn lease_namespace(&self) -> String {
        self.lease_namespace
            .clone()
            .or_else(|| self.namespace.clone())
            .unwrap_or_else(|| "default".to_string())
    }

    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "dishpatch".into());
            format!("{host}-{}", std::process::id())
        })
    }
}
