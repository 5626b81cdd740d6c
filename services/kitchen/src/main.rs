//! `dishpatch-kitchen`: takes tickets for paid orders, cooks them within each
//! restaurant's capacity, and reports them ready.

mod handler;
mod rail;
mod schedule;

use std::time::Duration;

use clap::{Parser, Subcommand};
use dishpatch_worker::{CommonArgs, ServiceError, Stage, serve};

#[derive(Parser)]
#[command(
    name = "dishpatch-kitchen",
    version,
    about = "Runs dishpatch restaurant kitchens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume payment.succeeded and order.cancelled.
    Run(Box<Args>),
}

#[derive(clap::Args, Debug)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Multiplies every simulated duration (0.01 = a hundred times faster, 0 = instant).
    #[arg(long, env = "DISHPATCH_TIME_SCALE", default_value_t = 1.0)]
    time_scale: f64,
    /// Resume only tickets in this namespace at start-up (default: all).
    #[arg(long, env = "DISHPATCH_NAMESPACE")]
    namespace: Option<String>,
    /// This replica's name on the restaurants' ticket rails: the pod name.
    /// Replicas that share one only do some work twice. Default: the hostname.
    #[arg(long, env = "DISHPATCH_IDENTITY", value_parser = parse_identity)]
    identity: Option<String>,
    /// How long past its end another replica's ticket must be before this
    /// one finishes it (its replica died). Must exceed the clock skew
    /// between nodes.
    #[arg(long, env = "DISHPATCH_ADOPT_AFTER", default_value = "10s",
        value_parser = dishpatch_runtime::time::parse_duration)]
    adopt_after: Duration,
}

fn parse_identity(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 253 {
        return Err(format!("invalid identity {s:?}: 1 to 253 characters"));
    }
    Ok(s.to_string())
}

/// The hostname: a restarted process finishes its own tickets at once.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "dishpatch-kitchen".into())
}

const STAGE: Stage = Stage {
    service: "kitchen",
    manager: "dishpatch-kitchen",
    section: "kitchen",
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Run(args) = Cli::parse().command;
    let settings = handler::Settings {
        scale: args.time_scale,
        identity: args.identity.clone().unwrap_or_else(hostname),
        adopt_after: args.adopt_after,
    };
    let namespace = args.namespace.clone();
    serve(STAGE, args.common, |parts| async move {
        tracing::info!(identity = %settings.identity, "kitchen replica");
        let kitchen = handler::Kitchen::new(parts.access, settings);
        let resumed = handler::resume_all(&kitchen, namespace.as_deref())
            .await
            .map_err(|e| ServiceError::Setup(format!("resuming tickets: {e}")))?;
        tracing::info!(resumed, "resumed tickets still cooking");
        Ok(kitchen)
    })
    .await?;
    Ok(())
}
