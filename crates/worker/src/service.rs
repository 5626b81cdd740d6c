//! The `main` every worker shares: logging, admin endpoints, broker, consume
//! loop, graceful shutdown. A service supplies its stage and its handler.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dishpatch_messaging::{Broker, SERVICE_QUEUES};
use dishpatch_runtime::Health;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::consume::{Handler, run};
use crate::metrics::WorkerMetrics;
use crate::status::{OrderAccess, Stage};

/// Flags every worker takes.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// AMQP URL of RabbitMQ.
    #[arg(
        long,
        env = "DISHPATCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Address of /healthz, /readyz and /metrics (default: the service's own port on loopback).
    #[arg(long, env = "DISHPATCH_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Unacknowledged deliveries this replica works on at once.
    #[arg(long, env = "DISHPATCH_PREFETCH", default_value_t = 100)]
    pub prefetch: u16,
}

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("connecting to the apiserver: {0}")]
    Kube(#[from] kube::Error),
    #[error("no queue is declared for service {0}")]
    NoQueue(&'static str),
    #[error("{0}")]
    Setup(String),
}

fn default_admin_port(service: &str) -> u16 {
    match service {
        "payment" => 9091,
        "kitchen" => 9092,
        "delivery" => 9093,
        "notification" => 9094,
        _ => 9099,
    }
}

/// What a service's handler is built from.
pub struct Parts {
    pub access: OrderAccess,
    pub shutdown: watch::Receiver<bool>,
    pub health: Health,
}

/// Runs a worker until SIGTERM: in-flight messages finish, the rest stay queued.
pub async fn serve<H, F, Fut>(stage: Stage, args: CommonArgs, build: F) -> Result<(), ServiceError>
where
    H: Handler,
    F: FnOnce(Parts) -> Fut,
    Fut: Future<Output = Result<H, ServiceError>>,
{
    let _telemetry = dishpatch_runtime::init_tracing(stage.manager);
    let shutdown = dishpatch_runtime::shutdown_signal();
    let queue = SERVICE_QUEUES
        .iter()
        .find(|q| q.service == stage.service)
        .ok_or(ServiceError::NoQueue(stage.service))?;
    let client = kube::Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = Arc::new(WorkerMetrics::register(&mut registry, stage.service));
    let health = Health::default();
    health.set_ready(false, "starting");
    let addr = args
        .admin_addr
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], default_admin_port(stage.service))));
    let router = dishpatch_runtime::admin_router(health.clone(), Arc::new(registry), None);
    let admin = tokio::spawn(dishpatch_runtime::serve(addr, router, shutdown.clone()));

    let broker = loop {
        match Broker::connect(&args.amqp_url, stage.service).await {
            Ok(b) => break Arc::new(b),
            Err(e) => {
                tracing::warn!(error = %e, "connecting to the broker; retrying");
                let mut stop = shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            }
        }
    };
    let access = OrderAccess {
        client,
        broker: broker.clone(),
        stage,
        metrics: metrics.clone(),
    };
    let handler = build(Parts {
        access,
        shutdown: shutdown.clone(),
        health: health.clone(),
    })
    .await?;
    run(
        broker,
        queue,
        args.prefetch,
        Arc::new(handler),
        metrics,
        health,
        shutdown,
    )
    .await;
    match admin.await {
        Ok(Err(e)) => Err(ServiceError::Setup(e.to_string())),
        _ => Ok(()),
    }
}
