//! Command-line and environment configuration of `dishpatch-notification run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dishpatch_api::events::EventType;
use hyper::Uri;
use lettre::message::Mailbox;

/// Environment variable holding the webhook secret itself, for when a file
/// is awkward (`--webhook-secret-file` wins when both are set). Not a flag,
/// so the secret never shows in a process list.
pub const WEBHOOK_SECRET_ENV: &str = "DISHPATCH_WEBHOOK_SECRET";

/// `10s`, `500ms`, `2m`, or ISO 8601 (`PT10S`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .trim()
        .parse()
        .map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    Duration::try_from(d).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A replica name for claims: non-empty, no `/` (it ends the name in a holder).
fn parse_identity(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 253 || s.contains('/') {
        return Err(format!(
            "invalid identity {s:?}: 1 to 253 characters, no '/'"
        ));
    }
    Ok(s.to_string())
}

/// What `--email-events` is unless set.
pub const DEFAULT_EMAIL_EVENTS: &str = "order.accepted,order.rejected,order.cancelled,payment.failed,payment.refunded,delivery.picked_up,delivery.delivered";

/// A set of event types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSet(pub Vec<EventType>);

impl EventSet {
    pub fn contains(&self, kind: EventType) -> bool {
        self.0.contains(&kind)
    }
}

/// `all`, or routing keys separated by commas; an unknown key is an error
/// that names the known ones.
fn parse_events(s: &str) -> Result<EventSet, String> {
    if s.trim() == "all" {
        return Ok(EventSet(EventType::ALL.to_vec()));
    }
    let mut kinds = Vec::new();
    for key in s.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        let kind: EventType = key.parse().map_err(|_| {
            let known: Vec<_> = EventType::ALL.iter().map(|t| t.routing_key()).collect();
            format!("unknown event {key:?}: one of {}, or all", known.join(", "))
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(EventSet(kinds))
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunConfig {
    /// AMQP URL of RabbitMQ.
    #[arg(
        long,
        env = "DISHPATCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "DISHPATCH_ADMIN_ADDR", default_value = "127.0.0.1:9094")]
    pub admin_addr: SocketAddr,

    /// Messages handled in parallel (the consumer's prefetch).
    #[arg(long, env = "DISHPATCH_PREFETCH", default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,

    /// SMTP server (plain SMTP, no authentication: a local relay).
    #[arg(long, env = "DISHPATCH_SMTP_HOST", default_value = "127.0.0.1")]
    pub smtp_host: String,

    /// SMTP port.
    #[arg(long, env = "DISHPATCH_SMTP_PORT", default_value_t = 2525)]
    pub smtp_port: u16,

    /// How long one SMTP command may take.
    #[arg(long, env = "DISHPATCH_SMTP_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub smtp_timeout: Duration,

    /// Sender of the e-mails, as `Name <address>` or `address`.
    #[arg(
        long,
        env = "DISHPATCH_MAIL_FROM",
        default_value = "dishpatch <orders@dishpatch.dev>"
    )]
    pub mail_from: Mailbox,

    /// The events the customer is e-mailed about, as comma-separated routing
    /// keys (`order.accepted,delivery.delivered`), or `all`. Each e-mail
    /// costs two writes to the Order (a claim, then the record that it went
    /// out), so the default is what a customer acts on or waits for: the
    /// order taken, refused or called off, a failed or refunded payment, on
    /// its way, delivered. Webhooks get every event.
    #[arg(
        long,
        env = "DISHPATCH_EMAIL_EVENTS",
        default_value = DEFAULT_EMAIL_EVENTS,
        value_parser = parse_events
    )]
    pub email_events: EventSet,

    /// Where to POST every event for integrators (http:// or https://). No webhooks without it.
    #[arg(long, env = "DISHPATCH_WEBHOOK_URL")]
    pub webhook_url: Option<Uri>,

    /// File holding the secret that signs webhooks (surrounding whitespace is ignored).
    /// Or set DISHPATCH_WEBHOOK_SECRET.
    #[arg(long, env = "DISHPATCH_WEBHOOK_SECRET_FILE")]
    pub webhook_secret_file: Option<PathBuf>,

    /// How long a webhook receiver may take to answer.
    #[arg(long, env = "DISHPATCH_WEBHOOK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_timeout: Duration,

    /// This replica's name in the claims it writes to `status.notifications`;
    /// unique among running replicas (the pod name). Default: hostname-pid.
    #[arg(long, env = "DISHPATCH_IDENTITY", value_parser = parse_identity)]
    pub identity: Option<String>,

    /// How old another replica's claim on a notification must be before
    /// this one takes it over (the sender died). Each send is cut off at half
    /// of it. Must exceed the clock skew between nodes.
    #[arg(long, env = "DISHPATCH_CLAIM_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub claim_timeout: Duration,
}

/// Why the webhook secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("reading the webhook secret from {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--webhook-url needs a secret to sign with: --webhook-secret-file or {WEBHOOK_SECRET_ENV}"
    )]
    Missing,
}

impl RunConfig {
    /// The replica name for claims.
    pub fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "dishpatch".into());
            // A hostname with a '/' can't be one; keep the name usable.
            format!("{}-{}", host.replace('/', "-"), std::process::id())
        })
    }

    /// The webhook secret: the file's contents, else the environment variable.
    pub fn webhook_secret(&self) -> Result<Vec<u8>, SecretError> {
        let secret = match &self.webhook_secret_file {
            Some(path) => std::fs::read_to_string(path).map_err(|source| SecretError::Read {
                path: path.clone(),
                source,
            })?,
            None => std::env::var(WEBHOOK_SECRET_ENV).unwrap_or_default(),
        };
        // A trailing newline from `echo > file` is not part of the secret.
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(SecretError::Missing);
        }
        Ok(secret.as_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn email_events_parse_routing_keys_or_all() {
        let d = parse_events(DEFAULT_EMAIL_EVENTS).unwrap();
        assert_eq!(d.0.len(), 7);
        assert!(d.contains(EventType::DeliveryDelivered));
        assert!(!d.contains(EventType::KitchenReady));
        assert_eq!(parse_events("all").unwrap().0.len(), EventType::ALL.len());
        assert_eq!(
            parse_events("order.accepted, order.accepted,").unwrap(),
            EventSet(vec![EventType::OrderAccepted])
        );
        let err = parse_events("order.acepted").unwrap_err();
        assert!(
            err.contains("unknown event \"order.acepted\": one of order.accepted"),
            "{err}"
        );
        assert!(
            parse_events("").unwrap().0.is_empty(),
            "none: webhooks only"
        );
    }
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunConfig,
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn defaults_and_secret_file() {
        let dir =
            std::env::temp_dir().join(format!("dishpatch-notification-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let cli = Cli::try_parse_from([
            "x",
            "--webhook-url",
            "http://127.0.0.1:8080/hook",
            "--webhook-secret-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        assert_eq!(cli.run.prefetch, 50);
        assert_eq!(cli.run.admin_addr.to_string(), "127.0.0.1:9094");
        assert_eq!(
            (cli.run.smtp_host.as_str(), cli.run.smtp_port),
            ("127.0.0.1", 2525)
        );
        assert_eq!(cli.run.mail_from.email.to_string(), "orders@dishpatch.dev");
        assert_eq!(cli.run.webhook_secret().unwrap(), b"s3cret");
        assert_eq!(cli.run.claim_timeout, Duration::from_secs(120));
        assert!(
            cli.run
                .identity()
                .ends_with(&format!("-{}", std::process::id()))
        );
        std::fs::remove_dir_all(&dir).unwrap();

        assert!(Cli::try_parse_from(["x", "--mail-from", "not an address"]).is_err());
        assert!(Cli::try_parse_from(["x", "--prefetch", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--identity", "a/b"]).is_err());
        assert!(Cli::try_parse_from(["x", "--identity", ""]).is_err());
        let named = Cli::try_parse_from(["x", "--identity", "notification-7d9f-x2"]).unwrap();
        assert_eq!(named.run.identity(), "notification-7d9f-x2");
    }
}
