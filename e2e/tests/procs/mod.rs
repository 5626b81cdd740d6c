//! Components as processes with a known admin port, what they use of the
//! machine (resident memory from /proc), what their admin endpoints say, and
//! what is left in a vhost's queues. Shared by the fault tests and the soak
//! (`benches/soak.rs` includes this file by path).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use dishpatch_messaging::{SERVICE_QUEUES, dead_letter_queue};
use dishpatch_testkit::net::parse_response;
pub use dishpatch_testkit::net::{free_port, http_get};
use dishpatch_testkit::{binary, kubeconfig_path};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// One running component.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub admin: SocketAddr,
}

/// What a component is started with.
pub struct Spec<'a> {
    pub namespace: &'a str,
    pub amqp_url: &'a str,
    pub ledger: &'a Path,
    /// Where the logs go (`None`: stdout dropped, stderr inherited).
    pub log: Option<&'a Path>,
    pub rust_log: &'a str,
}

impl Spec<'_> {
    /// Starts `dishpatch-<component> run` with the same defaults as the e2e
    /// `Platform` (time scale 0, simulated gateway, auto-accepting couriers)
    /// and an admin listener on a port of its own; `extra` comes last.
    pub fn start(&self, component: &str, extra: &[&str]) -> Proc {
        self.start_with_env(component, extra, &[])
    }

    /// [`Spec::start`] with these environment variables set as well.
    pub fn start_with_env(&self, component: &str, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let path = binary(&format!("dishpatch-{component}"));
        assert!(
            path.exists(),
            "{} is not built: run `cargo build --workspace --bins`",
            path.display()
        );
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(path);
        cmd.arg("run")
            .args(["--admin-addr", &admin.to_string()])
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", self.rust_log)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        match self.log {
            Some(log) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .unwrap();
                // The components log to stdout.
                cmd.stdout(f.try_clone().unwrap()).stderr(f);
            }
            None => {
                cmd.stderr(Stdio::inherit());
            }
        }
        if component != "facade" {
            cmd.args(["--amqp-url", self.amqp_url]);
        }
        let scale: &[&str] = if extra.contains(&"--time-scale") {
            &[]
        } else {
            &["--time-scale", "0"]
        };
        match component {
            "operator" => {
                cmd.args(["--namespace", self.namespace, "--identity", "e2e"]);
            }
            // The simulated gateway unless `extra` chooses one.
            "payment" if !extra.contains(&"--gateway") => {
                cmd.args(["--gateway", "simulated", "--ledger"])
                    .arg(self.ledger);
            }
            "kitchen" => {
                cmd.args(["--namespace", self.namespace]).args(scale);
            }
            "delivery" => {
                cmd.args(["--namespace", self.namespace, "--auto-accept"])
                    .args(scale);
            }
            "facade" => {
                cmd.args(["--namespace", self.namespace]);
            }
            _ => {}
        }
        cmd.args(extra);
        Proc {
            name: component.to_string(),
            child: cmd.spawn().unwrap(),
            admin,
        }
    }
}

/// A real SMTP server (aiosmtpd from hack/deps.sh's venv) on a free
/// loopback port that accepts and discards every e-mail: it and its port.
pub fn smtp_sink() -> (Child, u16) {
    let python = dishpatch_testkit::cache_dir().join("venv/bin/python");
    assert!(
        python.exists(),
        "{} missing: run hack/deps.sh (it installs aiosmtpd)",
        python.display()
    );
    let port = free_port();
    let child = Command::new(&python)
        .args(["-m", "aiosmtpd", "-n", "-l"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["-c", "aiosmtpd.handlers.Sink"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, port)
}

/// `Bearer <token>` for a customer, minted by `dishpatch-facade token`
/// with the façade's key file; `extra` adds claims (`--email`, `--name`).
pub fn customer_bearer(key_file: &Path, sub: &str, ttl: &str, extra: &[&str]) -> String {
    bearer(key_file, "customer", sub, ttl, extra)
}

/// `Bearer <token>` for `role` (`customer`, `courier`, `admin`), as [`customer_bearer`].
pub fn bearer(key_file: &Path, role: &str, sub: &str, ttl: &str, extra: &[&str]) -> String {
    let out = std::process::Command::new(binary("dishpatch-facade"))
        .args(["token", "--role", role, "--sub", sub, "--ttl", ttl])
        .args(extra)
        .arg("--key-file")
        .arg(key_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("Bearer {}", String::from_utf8(out.stdout).unwrap().trim())
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is running")
    }

    /// Resident memory in KiB (`VmRSS` in /proc/PID/status).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.child.id()?)
    }

    /// Still running (not exited, not killed)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn readyz(&self) -> Option<(u16, String)> {
        http_get(self.admin, "/readyz").await
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, timeout: std::time::Duration) {
        let (ok, last) = dishpatch_testkit::eventually(
            timeout,
            || self.readyz(),
            |r| matches!(r, Some((200, _))),
        )
        .await;
        assert!(ok, "{} not ready within {timeout:?}: {last:?}", self.name);
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The sum of the samples of one metric family whose labels contain every
/// one of `labels` (`outcome="failed"`), from OpenMetrics text.
pub fn metric_sum(text: &str, family: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .fold(0.0, |a, b| a + b)
}

/// Messages ready in each service queue and its dead-letter queue, with the
/// consumers attached (a passive declare per queue; a queue nobody declared
/// is left out).
pub async fn queue_depths(amqp_url: &str) -> Vec<(String, u32, u32)> {
    let conn = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    for sq in SERVICE_QUEUES {
        for name in [sq.queue.to_string(), dead_letter_queue(sq.queue)] {
            // A passive declare of a missing queue closes the channel: one each.
            let channel = conn.create_channel().await.unwrap();
            if let Ok(q) = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
            {
                out.push((name, q.message_count(), q.consumer_count()));
            }
            let _ = channel.close(200, "done".into()).await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    out
}

/// An HTTP/1.1 request through hyper (any response framing, chunked
/// included): (status, body).
pub async fn http(
    method: &str,
    url: String,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, String) {
    let client: HttpClient<_, Full<Bytes>> = HttpClient::builder(TokioExecutor::new()).build_http();
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = client
        .request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// A bare HTTP/1.1 request with a JSON body on loopback (none for
/// `Value::Null`): (status, body).
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Result<(u16, String), String> {
    let body = if body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(body).map_err(|e| e.to_string())?
    };
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    s.write_all(&body).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    parse_response(&text).ok_or_else(|| format!("not an HTTP response: {text:?}"))
}

/// Takes every message out of `queue` (acking them); their bodies.
pub async fn take_all(amqp_url: &str, queue: &str) -> Vec<Vec<u8>> {
    use lapin::options::BasicGetOptions;
    let conn = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(m)) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
    {
        out.push(m.delivery.data.clone());
    }
    let _ = conn.close(200, "done".into()).await;
    out
}
