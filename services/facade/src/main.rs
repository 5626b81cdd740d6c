//! `dishpatch-facade`: the customer and courier HTTP API and web page. Writes
//! go through the Kubernetes API; reads come from watch-backed caches.

mod app;
mod auth;
mod cache;
mod courier;
mod events;
mod keysource;
mod metrics;
mod openapi;
mod orders;
mod problem;
mod ratelimit;
mod restaurants;
mod staff;
mod views;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use dishpatch_runtime::Health;
use kube::{Api, Client};
use prometheus_client::registry::Registry;

use crate::auth::{KeySet, Keys, Role};
use crate::keysource::KeySource;

#[derive(Parser)]
#[command(
    name = "dishpatch-facade",
    version,
    about = "The dishpatch customer and courier API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API, the web page and the admin endpoints.
    Run(Box<RunConfig>),
    /// Mint a token for development and tests; prints it on stdout.
    Token(Box<TokenArgs>),
    /// Print the OpenAPI document.
    Openapi,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| e.to_string())
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

#[derive(clap::Args)]
struct RunConfig {
    /// Address of the API and the web page (public).
    #[arg(
        long,
        env = "DISHPATCH_FACADE_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: SocketAddr,
    /// Address of /healthz, /readyz and /metrics: an admin listener kept off
    /// the public port, as every other component has.
    #[arg(long, env = "DISHPATCH_ADMIN_ADDR", default_value = "127.0.0.1:9095")]
    admin_addr: SocketAddr,
    /// Namespace orders are created in and read from (and restaurants and couriers read from).
    #[arg(long, env = "DISHPATCH_NAMESPACE", default_value = "default")]
    namespace: String,
    /// File holding the one HS256 key (at least 16 bytes); its kid is
    /// derived from the key. Re-read every --jwt-key-poll-interval.
    #[arg(long, env = "DISHPATCH_JWT_KEY_FILE", conflicts_with_all = ["jwt_secret", "jwt_key_dir"])]
    jwt_key_file: Option<PathBuf>,
    /// Directory holding the key set: one file per HS256 key, named by its
    /// kid, and a file `current` naming the kid that signs (a Secret
    /// mounted as a volume). Re-read every --jwt-key-poll-interval.
    #[arg(long, env = "DISHPATCH_JWT_KEY_DIR", conflicts_with = "jwt_secret")]
    jwt_key_dir: Option<PathBuf>,
    /// Secret in --namespace holding the key set, one data entry per key
    /// as in --jwt-key-dir (a Secret with only `key` is one key, kid `key`).
    #[arg(long, env = "DISHPATCH_JWT_SECRET")]
    jwt_secret: Option<String>,
    /// How often the key file, directory or Secret is re-read.
    #[arg(long, env = "DISHPATCH_JWT_KEY_POLL_INTERVAL", default_value = "5s",
        value_parser = parse_positive_duration)]
    jwt_key_poll_interval: Duration,
    /// How long a key removed from the set (or replaced) is still accepted.
    #[arg(long, env = "DISHPATCH_JWT_KEY_GRACE", default_value = "5m", value_parser = parse_duration)]
    jwt_key_grace: Duration,
    /// Tokens must carry exactly this `iss` (unchecked when unset).
    #[arg(long, env = "DISHPATCH_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Tokens must carry this `aud` (unchecked when unset).
    #[arg(long, env = "DISHPATCH_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// Expose POST /dev/token, which mints customer tokens for anyone. Local development only.
    #[arg(long, env = "DISHPATCH_DEV_LOGIN")]
    dev_login: bool,
    /// Requests per second each client (token subject, else IP) may make on average.
    #[arg(long, env = "DISHPATCH_RATE_LIMIT", default_value_t = 20.0)]
    rate_limit: f64,
    /// Requests a client may make in a burst.
    #[arg(long, env = "DISHPATCH_RATE_BURST", default_value_t = 40)]
    rate_burst: u32,
    /// Deadline of each Kubernetes API call; past it the request fails with 503.
    #[arg(long, env = "DISHPATCH_API_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    api_timeout: Duration,
    /// Live-tracking streams one caller (token subject) may hold open at once (at least 1).
    #[arg(long, env = "DISHPATCH_MAX_STREAMS_PER_SUBJECT", default_value_t = 8,
        value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_subject: u32,
    /// Deadline of a whole request (not of live-tracking streams).
    #[arg(long, env = "DISHPATCH_REQUEST_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// PostgreSQL URL of the order history the operator writes
    /// (`postgres://user:password@host/db`): orders that left the cluster are
    /// read from it. Read-only use; unset, only live orders are served.
    #[arg(long, env = "DISHPATCH_ARCHIVE_URL", hide_env_values = true)]
    archive_url: Option<String>,
}

#[derive(clap::Args)]
#[command(group = clap::ArgGroup::new("keys").required(true))]
struct TokenArgs {
    #[arg(long, value_enum)]
    role: Role,
    /// Customer id, or the Courier resource's name.
    #[arg(long)]
    sub: String,
    /// File holding the HS256 signing key (as --jwt-key-file).
    #[arg(long, group = "keys")]
    key_file: Option<PathBuf>,
    /// Key directory (as --jwt-key-dir): signs with the key `current` names.
    #[arg(long, group = "keys")]
    key_dir: Option<PathBuf>,
    /// Sign with this key of --key-dir instead.
    #[arg(long, requires = "key_dir")]
    kid: Option<String>,
    /// How long the token is valid.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    ttl: Duration,
    /// Display name claim (the customer name on orders).
    #[arg(long)]
    name: Option<String>,
    /// E-mail claim (the order's contact).
    #[arg(long)]
    email: Option<String>,
    /// Phone claim (E.164).
    #[arg(long)]
    phone: Option<String>,
    /// For --role restaurant: a Restaurant this person works for (repeat it;
    /// none: --sub names the restaurant).
    #[arg(long = "restaurant")]
    restaurants: Vec<String>,
    /// `iss` claim: the `--jwt-issuer` the façade checks (same variable).
    #[arg(long, env = "DISHPATCH_JWT_ISSUER")]
    issuer: Option<String>,
    /// `aud` claim: the `--jwt-audience` the façade checks (same variable).
    #[arg(long, env = "DISHPATCH_JWT_AUDIENCE")]
    audience: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(config) => run(*config).await,
        Command::Token(args) => token(*args),
        Command::Openapi => {
            use utoipa::OpenApi as _;
            println!(
                "{}",
                serde_json::to_string_pretty(&openapi::ApiDoc::openapi())?
            );
            Ok(())
        }
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let raw = match (&args.key_file, &args.key_dir) {
        (Some(file), _) => auth::read_key_file(file)?,
        (None, Some(dir)) => keysource::read_dir(dir)?,
        (None, None) => bail!("set --key-file or --key-dir"),
    };
    let keys = Keys::new(KeySet::parse(&raw)?).expecting(args.issuer, args.audience);
    let mut claims = auth::claims(&args.sub, args.role, args.ttl);
    claims.name = args.name;
    claims.email = args.email;
    claims.phone = args.phone;
    claims.restaurants = args.restaurants;
    println!("{}", keys.mint_with(&claims, args.kid.as_deref())?);
    Ok(())
}

fn key_source(config: &RunConfig, client: &Client) -> anyhow::Result<KeySource> {
    if let Some(path) = &config.jwt_key_file {
        return Ok(KeySource::File(path.clone()));
    }
    if let Some(dir) = &config.jwt_key_dir {
        return Ok(KeySource::Dir(dir.clone()));
    }
    let Some(name) = &config.jwt_secret else {
        bail!(
            "set --jwt-key-file, --jwt-key-dir or --jwt-secret: the façade needs keys to verify tokens"
        );
    };
    Ok(KeySource::Secret {
        api: Box::new(Api::namespaced(client.clone(), &config.namespace)),
        name: name.clone(),
        timeout: config.api_timeout,
    })
}

async fn run(config: RunConfig) -> anyhow::Result<()> {
    let _telemetry = dishpatch_runtime::init_tracing("dishpatch-facade");
    let mut shutdown = dishpatch_runtime::shutdown_signal();
    let client = Client::try_default()
        .await
        .context("connecting to the apiserver")?;
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::register(&mut registry));

    let source = key_source(&config, &client)?;
    let (raw, set) = source
        .load()
        .await
        .with_context(|| format!("loading the JWT keys from the {source}"))?;
    tracing::info!(%source, keys = %set.kids().join(","), signer = ?set.signer(), "loaded the JWT keys");
    let keys = Keys::new(set)
        .expecting(config.jwt_issuer.clone(), config.jwt_audience.clone())
        .with_grace(config.jwt_key_grace);
    metrics
        .jwt_keys
        .set(i64::try_from(keys.accepted_at(std::time::Instant::now())).unwrap_or(i64::MAX));
    tokio::spawn(keysource::reload(
        source,
        keys.clone(),
        metrics.clone(),
        config.jwt_key_poll_interval,
        raw,
    ));
    let health = Health::default();
    health.set_ready(false, "starting");
    let caches = cache::Caches::start(&client, &config.namespace, health.clone());

    let state = app::AppState {
        caches,
        client,
        keys,
        metrics,
        limiter: Arc::new(ratelimit::RateLimiter::new(
            config.rate_limit,
            config.rate_burst,
        )),
        api_timeout: config.api_timeout,
        request_timeout: config.request_timeout,
        dev_login: config.dev_login,
        streams: Arc::new(events::Streams::new(
            usize::try_from(config.max_streams_per_subject).unwrap_or(usize::MAX),
        )),
        archive: config
            .archive_url
            .as_deref()
            .map(dishpatch_archive::Archive::connect)
            .transpose()
            .context("--archive-url is not a PostgreSQL URL")?
            .map(Arc::new),
    };
    if config.dev_login {
        tracing::warn!(
            "--dev-login: POST /dev/token mints tokens for anyone; local development only"
        );
    }
    let router = app::router(state);
    let mut admin = tokio::spawn(dishpatch_runtime::serve(
        config.admin_addr,
        dishpatch_runtime::admin_router(health, Arc::new(registry), None),
        shutdown.clone(),
    ));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %config.listen, namespace = %config.namespace, "serving the façade");
    let public = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    })
    .into_future();
    let mut public = std::pin::pin!(public);
    tokio::select! {
        served = &mut public => {
            served.context("serving")?;
            match admin.await {
                Ok(Err(e)) => Err(anyhow::anyhow!("admin listener: {e}")),
                _ => Ok(()),
            }
        }
        // Probes and metrics are only on the admin listener: without it
        // the façade can't be watched or restarted, so it stops instead.
        stopped = &mut admin => match stopped {
            Ok(Err(e)) => Err(anyhow::anyhow!("admin listener: {e}")),
            Err(e) => Err(anyhow::anyhow!("admin listener: {e}")),
            // It stopped for shutdown: the public one finishes its requests.
            Ok(Ok(())) => public.await.context("serving"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parses(args: &[&str]) -> bool {
        let base = ["dishpatch-facade", "run", "--jwt-key-file", "/dev/null"];
        Cli::try_parse_from(base.iter().chain(args)).is_ok()
    }

    #[test]
    fn a_stream_cap_of_zero_is_refused() {
        // Zero would turn every live-tracking request into a 429.
        assert!(parses(&["--max-streams-per-subject", "1"]));
        assert!(
            !parses(&["--max-streams-per-subject", "0"]),
            "--max-streams-per-subject 0 was accepted"
        );
    }

    #[test]
    fn key_sources_exclude_each_other() {
        // A poll interval of zero would spin.
        assert!(!parses(&["--jwt-key-poll-interval", "0s"]));
        assert!(parses(&[
            "--jwt-key-poll-interval",
            "200ms",
            "--jwt-key-grace",
            "0s"
        ]));
        assert!(!parses(&["--jwt-key-dir", "/tmp"]));
        assert!(!parses(&["--jwt-secret", "jwt"]));
        let dir = ["dishpatch-facade", "run", "--jwt-key-dir", "/tmp"];
        assert!(Cli::try_parse_from(dir).is_ok());
        assert!(Cli::try_parse_from(dir.iter().chain(&["--jwt-secret", "jwt"])).is_err());
    }
}
