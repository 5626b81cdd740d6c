//! `dishpatch-payment`: charges accepted orders and refunds cancelled ones.

mod gateway;
mod handler;
mod simulated;
mod stripe;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use dishpatch_worker::{CommonArgs, Stage, serve};

#[derive(Parser)]
#[command(
    name = "dishpatch-payment",
    version,
    about = "Charges and refunds dishpatch orders"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume order.accepted and order.cancelled.
    Run(Box<Args>),
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum GatewayKind {
    Simulated,
    Stripe,
}

#[derive(clap::Args, Debug)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// Which payment gateway to charge through. No default: a forgotten
    /// flag must not mark orders Paid without charging anyone (`make up` and
    /// the tests say `simulated` out loud).
    #[arg(long, env = "DISHPATCH_GATEWAY", value_enum)]
    gateway: GatewayKind,
    /// The simulated gateway's ledger (one JSON line per charge or refund).
    #[arg(
        long,
        env = "DISHPATCH_LEDGER",
        default_value = ".dev/payment-ledger.jsonl"
    )]
    ledger: PathBuf,
    /// How long each simulated gateway call takes (a provider's round trip).
    #[arg(long, env = "DISHPATCH_SIMULATED_LATENCY", default_value = "0s", value_parser = dishpatch_runtime::time::parse_duration)]
    simulated_latency: std::time::Duration,
    /// Base URL of the Stripe API.
    #[arg(
        long,
        env = "STRIPE_API_BASE",
        default_value = "https://api.stripe.com"
    )]
    stripe_url: String,
    /// File holding the Stripe secret key (or set STRIPE_API_KEY).
    #[arg(long, env = "STRIPE_API_KEY_FILE")]
    stripe_key_file: Option<PathBuf>,
}

const STAGE: Stage = Stage {
    service: "payment",
    manager: "dishpatch-payment",
    section: "payment",
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Command::Run(args) = Cli::parse().command;
    let gateway: Arc<dyn gateway::PaymentGateway> = match args.gateway {
        GatewayKind::Simulated => Arc::new(
            simulated::Simulated::new(args.ledger.clone()).with_latency(args.simulated_latency),
        ),
        GatewayKind::Stripe => {
            let key = match &args.stripe_key_file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => std::env::var("STRIPE_API_KEY")
                    .context("set STRIPE_API_KEY or --stripe-key-file")?,
            };
            Arc::new(stripe::Stripe::new(
                &args.stripe_url,
                key.trim().to_string(),
            )?)
        }
    };
    serve(STAGE, args.common, |parts| async move {
        Ok(handler::Payment {
            access: parts.access,
            gateway,
        })
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_gateway_must_be_chosen_out_loud() {
        // Unless the environment chooses (DISHPATCH_GATEWAY), which CI does not set.
        if std::env::var_os("DISHPATCH_GATEWAY").is_none() {
            let refused = Cli::try_parse_from(["dishpatch-payment", "run"]);
            assert!(refused.is_err(), "started without a gateway");
        }
        let chosen = Cli::try_parse_from(["dishpatch-payment", "run", "--gateway", "simulated"]);
        assert!(chosen.is_ok());
    }
}
