//! `dishpatch-notification`: tells customers (e-mail) and integrators (signed
//! webhooks) about every event of their orders, once. It reads Orders and
//! writes only `status.notifications`, where replicas claim and record sends.

mod claims;
mod config;
mod mail;
mod notifier;
mod record;
mod templates;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dishpatch_messaging::{Broker, SERVICE_QUEUES};
use dishpatch_runtime::Health;
use dishpatch_worker::{OrderAccess, Stage, WorkerMetrics};
use kube::Client;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::claims::Me;
use crate::config::RunConfig;
use crate::mail::Mailer;
use crate::notifier::{ClaimConfig, NotificationMetrics, Notifier};
use crate::webhook::Webhook;

const SERVICE: &str = "notification";

/// Its identity for the shared worker code. It writes its section
/// (`status.notifications`) itself, by compare-and-swap (`record.rs`), not
/// through the worker's apply, so `section` is unused.
const STAGE: Stage = Stage {
    service: SERVICE,
    manager: record::MANAGER,
    section: "notifications",
};

#[derive(Parser)]
#[command(
    name = "dishpatch-notification",
    version,
    about = "Tells customers and integrators what happened to their orders"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume every order event and send the e-mails and webhooks.
    Run(Box<RunConfig>),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(config) => run(*config).await,
    }
}

async fn wait_shutdown(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn run(config: RunConfig) -> anyhow::Result<()> {
    let _telemetry = dishpatch_runtime::init_tracing("dishpatch-notification");
    let shutdown = dishpatch_runtime::shutdown_signal();
    let queue = SERVICE_QUEUES
        .iter()
        .find(|q| q.service == SERVICE)
        .context("the broker topology has no notification queue")?;
    // Fail at start on a bad webhook configuration, not on the first event.
    let webhook = match &config.webhook_url {
        Some(url) => {
            let secret = config.webhook_secret()?;
            let webhook = Webhook::new(url.clone(), &secret, config.webhook_timeout)
                .context("setting up the webhook")?;
            tracing::info!(url = %url, "webhooks enabled");
            Some(webhook)
        }
        None => {
            tracing::info!("no --webhook-url: e-mail only");
            None
        }
    };
    let mailer = Mailer::new(
        &config.smtp_host,
        config.smtp_port,
        config.smtp_timeout,
        config.mail_from.clone(),
        config.email_events.clone(),
    );
    let client = Client::try_default()
        .await
        .context("connecting to the apiserver")?;
    let identity = config.identity();

    let mut registry = Registry::default();
    let metrics = Arc::new(WorkerMetrics::register(&mut registry, SERVICE));
    let notification_metrics = NotificationMetrics::register(&mut registry);
    let health = Health::default();
    health.set_ready(false, "starting");
    let router = dishpatch_runtime::admin_router(health.clone(), Arc::new(registry), None);
    let mut admin = tokio::spawn(dishpatch_runtime::serve(
        config.admin_addr,
        router,
        shutdown.clone(),
    ));

    let broker = loop {
        match Broker::connect(&config.amqp_url, SERVICE).await {
            Ok(b) => break Arc::new(b),
            Err(e) => {
                tracing::warn!(error = %e, "connecting to the broker; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = wait_shutdown(shutdown.clone()) => return Ok(()),
                }
            }
        }
    };

    let notifier = Arc::new(Notifier::new(
        OrderAccess {
            client,
            broker: broker.clone(),
            stage: STAGE,
            metrics: metrics.clone(),
        },
        mailer,
        webhook,
        notification_metrics,
        ClaimConfig {
            me: Me::new(&identity, jiff::Timestamp::now()),
            timeout: config.claim_timeout,
        },
        shutdown.clone(),
    ));
    tracing::info!(
        smtp = %format!("{}:{}", config.smtp_host, config.smtp_port),
        prefetch = config.prefetch,
        %identity,
        claim_timeout = ?config.claim_timeout,
        "notifying"
    );
    let worker = dishpatch_worker::run(
        broker,
        queue,
        config.prefetch,
        notifier,
        metrics,
        health,
        shutdown,
    );
    tokio::pin!(worker);
    tokio::select! {
        () = &mut worker => {}
        served = &mut admin => {
            // The admin server stops early only when it could not bind; on
            // shutdown it stops too, and the worker finishes its in-flight work.
            if let Ok(Err(e)) = served {
                return Err(e).context("admin endpoints");
            }
            worker.await;
        }
    }
    tracing::info!("stopped");
    Ok(())
}
