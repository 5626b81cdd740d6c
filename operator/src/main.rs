//! `dishpatch-operator`: reconcilers that own the Order lifecycle.

mod admission;
mod config;
mod context;
mod deadline;
mod error;
mod leader;
mod metrics;
mod orders;
mod restaurants;
mod stock;
mod unparsed;
mod watches;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use dishpatch_api::{Order, OrderPhase, Restaurant};
use dishpatch_messaging::Broker;
use dishpatch_runtime::Health;
use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, predicates, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::config::RunConfig;
use crate::context::{Context, Memory};
use crate::metrics::{Metrics, PhaseLabels};
use crate::stock::StockKeeper;
use crate::watches::{WatchHealth, Watched};

#[derive(Parser)]
#[command(name = "dishpatch-operator", version, about = "The dishpatch operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the CRDs generated from the Rust types into a directory.
    Crds {
        /// Directory to write `<plural>.dishpatch.dev.yaml` files into.
        #[arg(long, default_value = "crds")]
        out_dir: PathBuf,
        /// Write nothing; fail if the directory differs from the types.
        #[arg(long)]
        check: bool,
    },
    /// Run the reconcilers (after winning the leader election).
    Run(Box<RunConfig>),
    /// Inspect and replay the services' dead-letter queues.
    DeadLetters(DeadLetters),
}

#[derive(clap::Args)]
struct DeadLetters {
    /// AMQP URL of RabbitMQ.
    #[arg(
        long,
        env = "DISHPATCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    amqp_url: String,
    #[command(subcommand)]
    action: DeadLetterAction,
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// How many messages wait in each service's dead-letter queue.
    List,
    /// Move messages back onto a service's work queue, once the cause is fixed.
    Replay {
        /// payment, kitchen, delivery or notification.
        #[arg(long)]
        service: String,
        /// Move at most this many (oldest first).
        #[arg(long, default_value_t = 1000)]
        max: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crds { out_dir, check } => crds(&out_dir, check),
        Command::Run(config) => run(*config).await,
        Command::DeadLetters(args) => dead_letters(args).await,
    }
}

async fn dead_letters(args: DeadLetters) -> anyhow::Result<()> {
    use dishpatch_messaging::dead_letters;
    let broker = Broker::connect(&args.amqp_url, "operator-cli")
        .await
        .context("connecting to the broker")?;
    match args.action {
        DeadLetterAction::List => {
            for queue in dishpatch_messaging::SERVICE_QUEUES {
                let n = dead_letters::count(&broker, queue).await?;
                println!(
                    "{}\t{n}",
                    dishpatch_messaging::dead_letter_queue(queue.queue)
                );
            }
        }
        DeadLetterAction::Replay { service, max } => {
            let Some(queue) = dead_letters::service_queue(&service) else {
                bail!("no service {service:?}: payment, kitchen, delivery or notification");
            };
            let moved = dead_letters::replay(&broker, queue, max).await?;
            println!("moved {moved} message(s) back to {}", queue.queue);
        }
    }
    Ok(())
}

fn crds(out_dir: &Path, check: bool) -> anyhow::Result<()> {
    let files = dishpatch_api::crd_files().context("rendering CRDs")?;
    let mut stale = Vec::new();
    for file in &files {
        let path = out_dir.join(&file.file_name);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == file.contents {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
        } else {
            std::fs::create_dir_all(out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            std::fs::write(&path, &file.contents)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    if !stale.is_empty() {
        bail!(
            "CRDs differ from the Rust types: {}; run `make crds`",
            stale.join(", ")
        );
    }
    Ok(())
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Restaurants whose spec changed (or that appeared). Status writes, one per
/// stock reservation, must not wake every pending order of the restaurant:
/// under load that herd would serialize on the restaurant's lock.
fn restaurant_changes(
    api: Api<DeserializeGuard<Restaurant>>,
) -> impl futures::Stream<Item = Result<DeserializeGuard<Restaurant>, watcher::Error>> + Send + 'static
{
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default())
}

async fn wait_shutdown(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn run(config: RunConfig) -> anyhow::Result<()> {
    let _telemetry = dishpatch_runtime::init_tracing("dishpatch-operator");
    let shutdown = dishpatch_runtime::shutdown_signal();
    let client = Client::try_default()
        .await
        .context("connecting to the apiserver")?;
    let identity = config.identity();

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let health = Health::default();
    health.set_ready(false, "starting");

    // The orders cache exists from the start so /metrics can count phases.
    let watch_health = WatchHealth::new(health.clone());
    let ns = config.namespace.as_deref();
    let (orders, order_stream) = watches::cached(
        api::<DeserializeGuard<Order>>(&client, ns),
        Watched::Orders,
        watch_health.clone(),
    );
    let (restaurants, restaurant_stream) = watches::cached(
        api::<DeserializeGuard<Restaurant>>(&client, ns),
        Watched::Restaurants,
        watch_health.clone(),
    );

    let before_scrape = {
        let orders = orders.clone();
        let metrics = metrics.clone();
        let stage_deadline = config.stage_deadline;
        Arc::new(move || {
            let now = jiff::Timestamp::now();
            let mut counts = std::collections::BTreeMap::new();
            let mut overdue = std::collections::BTreeMap::new();
            for o in orders.state() {
                if let Ok(order) = &o.0 {
                    let phase = order
                        .status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .unwrap_or(OrderPhase::Pending);
                    *counts.entry(phase).or_insert(0_i64) += 1;
                    // The same arithmetic the reconciler re-publishes by,
                    // so the gauge and the Events agree.
                    if let Some(status) = &order.status
                        && let Some(aw) = deadline::awaiting(phase, status)
                        && deadline::deadlines_passed(aw.since, now, stage_deadline) > 0
                    {
                        *overdue.entry(phase).or_insert(0_i64) += 1;
                    }
                }
            }
            for phase in OrderPhase::ALL {
                let labels = PhaseLabels {
                    phase: phase.to_string(),
                };
                let count = |m: &std::collections::BTreeMap<OrderPhase, i64>| {
                    m.get(&phase).copied().unwrap_or(0)
                };
                metrics.orders.get_or_create(&labels).set(count(&counts));
                metrics.overdue.get_or_create(&labels).set(count(&overdue));
            }
        }) as dishpatch_runtime::BeforeScrape
    };
    let router =
        dishpatch_runtime::admin_router(health.clone(), Arc::new(registry), Some(before_scrape));
    let admin = tokio::spawn(dishpatch_runtime::serve(
        config.admin_addr,
        router,
        shutdown.clone(),
    ));

    let broker = loop {
        match Broker::connect(&config.amqp_url, "operator").await {
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

    // A standby is ready: it can take over. The leader is ready while its watches are healthy.
    health.set_ready(true, "standby");
    let lease = leader::LeaseConfig {
        name: config.lease_name.clone(),
        namespace: config.lease_namespace(),
        identity: identity.clone(),
        duration: config.lease_duration,
    };
    let Some(leadership) = leader::acquire(client.clone(), lease, shutdown.clone()).await else {
        return Ok(());
    };
    metrics.is_leader.set(1);
    health.set_ready(false, "leading; syncing watches");

    // Connections open on first use: a database that is down holds back
    // deletes (they wait for it), nothing else.
    let archive = match config.archive_url.as_deref() {
        Some(url) => {
            let archive = dishpatch_archive::Archive::connect(url)
                .context("--archive-url is not a PostgreSQL URL")?;
            if let Err(e) = archive.migrate().await {
                tracing::warn!(error = %e, "order history database not ready yet; deletes wait for it");
            }
            Some(archive)
        }
        None => {
            tracing::info!(
                "no --archive-url: orders are deleted after their retention without a history"
            );
            None
        }
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "dishpatch-operator".into(),
            instance: Some(identity),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        broker,
        metrics: metrics.clone(),
        stock: StockKeeper::new(client.clone(), metrics.clone(), restaurants.clone()),
        memory: Memory::default(),
        orders: orders.clone(),
        watches: watch_health,
        archive,
        config: config.clone(),
    });

    // A Restaurant that appears or opens wakes the orders waiting for it.
    let pending_for = {
        let orders = orders.clone();
        move |r: DeserializeGuard<Restaurant>| {
            let Some(ns) = r.namespace() else {
                return Vec::new();
            };
            let name = r.name_any();
            orders
                .state()
                .iter()
                .filter_map(|o| o.0.as_ref().ok())
                .filter(|o| {
                    o.namespace().as_deref() == Some(ns.as_str())
                        && o.spec.restaurant_ref.name == name
                })
                .filter(|o| {
                    o.status
                        .as_ref()
                        .and_then(|s| s.phase)
                        .is_none_or(|p| p == OrderPhase::Pending)
                })
                .map(|o| ObjectRef::new(&o.name_any()).within(&ns))
                .collect::<Vec<_>>()
        }
    };
    let order_controller = Controller::for_stream(order_stream, orders)
        .with_config(ControllerConfig::default().concurrency(config.concurrency))
        .watches_stream(
            restaurant_changes(api::<DeserializeGuard<Restaurant>>(&client, ns)),
            pending_for,
        )
        .graceful_shutdown_on(wait_shutdown(shutdown.clone()))
        .run(orders::reconcile, orders::error_policy, ctx.clone())
        .for_each(|_| async {});
    let restaurant_controller = Controller::for_stream(restaurant_stream, restaurants)
        .with_config(ControllerConfig::default().concurrency(4))
        .graceful_shutdown_on(wait_shutdown(shutdown.clone()))
        .run(
            restaurants::reconcile,
            restaurants::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    let mut lost = leadership.lost.clone();
    tokio::select! {
        _ = futures::future::join(order_controller, restaurant_controller) => {
            tracing::info!("controllers stopped; in-flight reconciles finished");
        }
        _ = lost.wait_for(|l| *l) => {
            // Another replica leads now; reconciling on would fight it.
            bail!("lost the leader lease");
        }
    }
    leadership.release().await;
    metrics.is_leader.set(0);
    let _ = admin.await;
    Ok(())
}
