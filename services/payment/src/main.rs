//! `dishpatch-payment`: charges accepted orders and refunds cancelled ones.

mod gateway;
mod handler;
mod simulated;
mod stripe;
mod webhook;

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
    /// Print a `Stripe-Signature` header for the event JSON on stdin, signed
    /// now with the endpoint secret (to try a webhook with curl).
    SignWebhook {
        /// File holding the endpoint's signing secret (or set STRIPE_WEBHOOK_SECRET).
        #[arg(long, env = "STRIPE_WEBHOOK_SECRET_FILE")]
        secret_file: Option<PathBuf>,
    },
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
    /// Serve Stripe's webhooks (`POST /webhooks/stripe`) on this address
    /// (with --gateway stripe). Unset: no webhooks; a charge that waits for
    /// the customer is looked up again at each payment deadline.
    #[arg(long, env = "DISHPATCH_STRIPE_WEBHOOK_LISTEN")]
    stripe_webhook_listen: Option<std::net::SocketAddr>,
    /// File holding the webhook endpoint's signing secret (`whsec_…`; or set
    /// STRIPE_WEBHOOK_SECRET).
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET_FILE")]
    stripe_webhook_secret_file: Option<PathBuf>,
}

const STAGE: Stage = Stage {
    service: "payment",
    manager: "dishpatch-payment",
    section: "payment",
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = match Cli::parse().command {
        Command::Run(args) => args,
        Command::SignWebhook { secret_file } => {
            let secret = secret(
                secret_file.as_ref(),
                "STRIPE_WEBHOOK_SECRET",
                "--secret-file",
            )?;
            let payload = std::io::read_to_string(std::io::stdin()).context("reading stdin")?;
            println!(
                "{}",
                stripe_webhook::Webhook::generate_test_header(&payload, &secret, None)
            );
            return Ok(());
        }
    };
    let mut stripe_gateway = None;
    let gateway: Arc<dyn gateway::PaymentGateway> = match args.gateway {
        GatewayKind::Simulated => Arc::new(
            simulated::Simulated::new(args.ledger.clone()).with_latency(args.simulated_latency),
        ),
        GatewayKind::Stripe => {
            let key = secret(
                args.stripe_key_file.as_ref(),
                "STRIPE_API_KEY",
                "--stripe-key-file",
            )?;
            let s = Arc::new(stripe::Stripe::new(&args.stripe_url, key)?);
            stripe_gateway = Some(s.clone());
            s
        }
    };
    let webhooks = match (args.stripe_webhook_listen, stripe_gateway) {
        (None, _) => None,
        (Some(_), None) => anyhow::bail!("--stripe-webhook-listen needs --gateway stripe"),
        (Some(addr), Some(stripe)) => Some((
            addr,
            stripe,
            secret(
                args.stripe_webhook_secret_file.as_ref(),
                "STRIPE_WEBHOOK_SECRET",
                "--stripe-webhook-secret-file",
            )?,
        )),
    };
    serve(STAGE, args.common, |parts| async move {
        if let Some((addr, stripe, secret)) = webhooks {
            let router = webhook::router(Arc::new(webhook::Webhooks {
                access: parts.access.clone(),
                stripe,
                secret,
            }));
            let shutdown = parts.shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = dishpatch_runtime::serve(addr, router, shutdown).await {
                    tracing::error!(error = %e, %addr, "the Stripe webhook listener stopped");
                }
            });
        }
        Ok(handler::Payment {
            access: parts.access,
            gateway,
        })
    })
    .await?;
    Ok(())
}

/// A secret from its file, else from the environment variable.
fn secret(file: Option<&PathBuf>, var: &str, flag: &str) -> anyhow::Result<String> {
    let value = match file {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => std::env::var(var).with_context(|| format!("set {var} or {flag}"))?,
    };
    Ok(value.trim().to_string())
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
