//! `dishpatch-delivery`: offers ready orders to couriers in the restaurant's
//! zone, follows each delivery to the door, and frees couriers of cancelled
//! orders.

mod active;
mod couriers;
mod dispatch;
mod handler;
mod timing;

use std::time::Duration;

use clap::{Parser, Subcommand};
use dishpatch_worker::{CommonArgs, Stage, serve};

use crate::timing::{Timing, parse_duration, parse_scale};

#[derive(Parser)]
#[command(
    name = "dishpatch-delivery",
    version,
    about = "Dispatches dishpatch orders to couriers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume kitchen.ready and order.cancelled.
    Run(Box<Args>),
}

#[derive(clap::Args, Debug)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Only Orders and Couriers in this namespace, for start-up recovery and sweeps (default: all).
    #[arg(long, env = "DISHPATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Couriers accept offers at once (couriers answer through the façade later).
    #[arg(
        long,
        env = "DISHPATCH_AUTO_ACCEPT",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    auto_accept: bool,
    /// How long an offer waits for the courier's answer before moving on.
    #[arg(long, env = "DISHPATCH_OFFER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    offer_timeout: Duration,
    /// Simulated time from assignment to pick-up.
    #[arg(long, env = "DISHPATCH_PICKUP_TIME", default_value = "60s", value_parser = parse_duration)]
    pickup_time: Duration,
    /// Simulated time from pick-up to the customer's door.
    #[arg(long, env = "DISHPATCH_TRAVEL_TIME", default_value = "300s", value_parser = parse_duration)]
    travel_time: Duration,
    /// Multiplies every simulated duration (0.01 = a hundred times faster, 0 = instant).
    #[arg(long, env = "DISHPATCH_TIME_SCALE", default_value_t = 1.0, value_parser = parse_scale)]
    time_scale: f64,
}

const STAGE: Stage = Stage {
    service: "delivery",
    manager: "dishpatch-delivery",
    section: "delivery",
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Run(args) = Cli::parse().command;
    let settings = handler::Settings {
        timing: Timing::new(
            args.pickup_time,
            args.travel_time,
            args.offer_timeout,
            args.time_scale,
        ),
        auto_accept: args.auto_accept,
        namespace: args.namespace.clone(),
    };
    serve(STAGE, args.common, |parts| async move {
        let dispatcher = handler::Dispatcher::start(parts.access, settings, parts.shutdown);
        Ok(handler::Delivery(dispatcher))
    })
    .await?;
    Ok(())
}
