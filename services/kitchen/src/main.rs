//! `dishpatch-kitchen`: takes tickets for paid orders, cooks them within each
//! restaurant's capacity, and reports them ready.

mod handler;
mod schedule;

use std::sync::{Arc, Mutex};

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
}

const STAGE: Stage = Stage {
    service: "kitchen",
    manager: "dishpatch-kitchen",
    section: "kitchen",
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Run(args) = Cli::parse().command;
    let scale = args.time_scale;
    let namespace = args.namespace.clone();
    serve(STAGE, args.common, |parts| async move {
        let kitchen = handler::Kitchen {
            access: parts.access,
            scale,
            kitchens: Arc::new(Mutex::new(schedule::Kitchens::default())),
            cooking: Arc::default(),
        };
        let resumed = handler::resume_all(&kitchen, namespace.as_deref())
            .await
            .map_err(|e| ServiceError::Setup(format!("resuming tickets: {e}")))?;
        tracing::info!(resumed, "resumed tickets still cooking");
        Ok(kitchen)
    })
    .await?;
    Ok(())
}
