//! A test bed: a namespace, a RabbitMQ vhost, a real SMTP server (aiosmtpd),
//! a webhook receiver, and the real `dishpatch-notification` binary scoped
//! to them, against the real local control plane.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use dishpatch_api::Order;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_messaging::{Broker, dead_letter_queue};
use dishpatch_testkit::net::free_port;
use dishpatch_testkit::{TestNamespace, amqp_vhost, client, ensure_crds, kubeconfig_path};
use hmac::{Hmac, KeyInit, Mac};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use lapin::options::BasicGetOptions;
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub const NOTIFICATION_QUEUE: &str = "dishpatch.notification";
pub const SECRET: &str = "integration-test-secret";

/// aiosmtpd, pinned; installed into a venv in the cache on first use.
const AIOSMTPD: &str = "aiosmtpd==1.4.6";

fn cache_dir() -> PathBuf {
    match std::env::var_os("DISHPATCH_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/dishpatch"),
    }
}

async fn has_aiosmtpd(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import aiosmtpd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

async fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().await.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The venv's python with aiosmtpd, installing it if missing (`hack/deps.sh`
/// does the same ahead of time). Once per test process.
async fn python() -> PathBuf {
    static PYTHON: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    PYTHON
        .get_or_init(|| async {
            let venv = cache_dir().join("venv");
            let python = venv.join("bin/python");
            if !has_aiosmtpd(&python).await {
                std::fs::create_dir_all(cache_dir()).unwrap();
                run(
                    Command::new("python3").arg("-m").arg("venv").arg(&venv),
                    "creating the python venv",
                )
                .await;
                run(
                    Command::new(&python).args(["-m", "pip", "install", "-q", AIOSMTPD]),
                    "installing aiosmtpd",
                )
                .await;
                assert!(has_aiosmtpd(&python).await, "aiosmtpd still not importable");
            }
            python
        })
        .await
        .clone()
}

async fn wait_listening(port: u16, what: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} is not listening on 127.0.0.1:{port}");
}

/// A real SMTP server writing every accepted message into a directory.
pub struct SmtpSink {
    pub port: u16,
    dir: PathBuf,
    _child: Child,
}

impl SmtpSink {
    pub async fn start(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let child = Command::new(python().await)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "smtp_sink.JsonDir"])
            .arg(&dir)
            .env(
                "PYTHONPATH",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests"),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting aiosmtpd");
        wait_listening(port, "aiosmtpd").await;
        Self {
            port,
            dir,
            _child: child,
        }
    }

    /// Every message accepted so far.
    pub fn messages(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap());
            }
        }
        out
    }

    /// Messages to `address`.
    pub fn to(&self, address: &str) -> Vec<Value> {
        self.messages()
            .into_iter()
            .filter(|m| {
                m["rcpt_tos"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == address)
            })
            .collect()
    }
}

/// One request the webhook receiver got.
#[derive(Debug, Clone)]
pub struct Hook {
    pub timestamp: Option<String>,
    pub signature: Option<String>,
    pub content_type: Option<String>,
    pub traceparent: Option<String>,
    pub body: Bytes,
    /// What the receiver answered.
    pub status: u16,
}

impl Hook {
    pub fn event(&self) -> CloudEvent {
        CloudEvent::from_json(&self.body).unwrap()
    }

    pub fn order_name(&self) -> String {
        self.event().data.order.name
    }

    /// Whether the signature verifies with `secret`, as an integrator checks it.
    pub fn verifies(&self, secret: &str) -> bool {
        let (Some(ts), Some(sig)) = (&self.timestamp, &self.signature) else {
            return false;
        };
        let Some(hex_sig) = sig.strip_prefix("v1=") else {
            return false;
        };
        let Ok(given) = hex::decode(hex_sig) else {
            return false;
        };
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(ts.as_bytes());
        mac.update(b".");
        mac.update(&self.body);
        mac.verify_slice(&given).is_ok()
    }
}

/// An integrator's endpoint that records every request. It answers 500 for
/// orders named `fail-*`, 400 for `reject-*`, and 200 otherwise.
pub struct Receiver {
    pub url: String,
    hooks: Arc<Mutex<Vec<Hook>>>,
}

async fn receive(
    State(hooks): State<Arc<Mutex<Vec<Hook>>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let name = CloudEvent::from_json(&body)
        .map(|e| e.data.order.name)
        .unwrap_or_default();
    let status = if name.starts_with("fail-") {
        StatusCode::INTERNAL_SERVER_ERROR
    } else if name.starts_with("reject-") {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    hooks.lock().unwrap().push(Hook {
        timestamp: header("dishpatch-timestamp"),
        signature: header("dishpatch-signature"),
        content_type: header("content-type"),
        traceparent: header("traceparent"),
        body,
        status: status.as_u16(),
    });
    status
}

impl Receiver {
    pub async fn start() -> Self {
        let hooks = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/hooks/dishpatch", post(receive))
            .with_state(hooks.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url: format!("http://{addr}/hooks/dishpatch"),
            hooks,
        }
    }

    /// Every request so far, in arrival order.
    pub fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().unwrap().clone()
    }

    pub fn for_order(&self, name: &str) -> Vec<Hook> {
        self.hooks()
            .into_iter()
            .filter(|h| h.order_name() == name)
            .collect()
    }
}

pub struct Bed {
    pub client: Client,
    pub ns: TestNamespace,
    pub amqp_url: String,
    pub broker: Broker,
    pub smtp: SmtpSink,
    pub receiver: Receiver,
    /// Replica 0's admin address (the one-replica tests use only it).
    pub admin: SocketAddr,
    dir: PathBuf,
    /// Running replicas by index: their process and admin address.
    replicas: Vec<Option<(Child, SocketAddr)>>,
}

impl Bed {
    pub async fn new(prefix: &str) -> Self {
        let client = client().await.unwrap();
        ensure_crds(&client).await.unwrap();
        let ns = TestNamespace::create(&client, prefix).await.unwrap();
        let amqp_url = amqp_vhost(&ns.name).await.unwrap();
        let broker = Broker::connect(&amqp_url, "test").await.unwrap();
        let dir = std::env::temp_dir().join(format!("dishpatch-notification-{}", ns.name));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let smtp = SmtpSink::start(dir.join("mail")).await;
        let receiver = Receiver::start().await;
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self {
            client,
            ns,
            amqp_url,
            broker,
            smtp,
            receiver,
            admin,
            dir,
            replicas: Vec::new(),
        }
    }

    /// Starts the real `dishpatch-notification run` on this bed's vhost,
    /// SMTP server and webhook receiver: replica 0, on `self.admin`.
    pub async fn start_service(&mut self) {
        self.start_replica(0, &[]).await;
    }

    /// Starts replica `i` (again, after [`kill_replica`](Self::kill_replica))
    /// with `extra` arguments. Every replica consumes the same queue, as the
    /// pods of one Deployment do. A restarted replica gets a fresh admin port,
    /// so its metrics are its own. Its log is appended to `log_path(i)`.
    pub async fn start_replica(&mut self, i: usize, extra: &[&str]) -> SocketAddr {
        let secret_file = self.dir.join("webhook-secret");
        // A trailing newline, as `echo secret > file` leaves one.
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        let admin = if i == 0 && self.replicas.is_empty() {
            self.admin
        } else {
            SocketAddr::from(([127, 0, 0, 1], free_port()))
        };
        if i == 0 {
            self.admin = admin;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path_of(i))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_dishpatch-notification"))
            .arg("run")
            .args(["--amqp-url", &self.amqp_url])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--smtp-host", "127.0.0.1"])
            .args(["--smtp-port", &self.smtp.port.to_string()])
            .args(["--mail-from", "dishpatch <orders@dishpatch.dev>"])
            .args(["--webhook-url", &self.receiver.url])
            .arg("--webhook-secret-file")
            .arg(&secret_file)
            .args(["--webhook-timeout", "2s"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig_path())
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "json")
            .env_remove("DISHPATCH_WEBHOOK_SECRET")
            .stdout(log)
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("starting dishpatch-notification");
        if self.replicas.len() <= i {
            self.replicas.resize_with(i + 1, || None);
        }
        self.replicas[i] = Some((child, admin));
        admin
    }

    /// SIGKILLs replica `i`, as a crash or an evicted pod would end it.
    pub async fn kill_replica(&mut self, i: usize) {
        if let Some((mut child, _)) = self.replicas.get_mut(i).and_then(Option::take) {
            child.kill().await.unwrap();
        }
    }

    /// SIGTERMs replica `i`, as the kubelet does on a rollout or a scale
    /// down, and waits up to `limit` for it to exit: how long it took, and
    /// its exit status. `None` if it outlived `limit` (it is then SIGKILLed,
    /// as the kubelet does after the grace period).
    pub async fn terminate_replica(
        &mut self,
        i: usize,
        limit: Duration,
    ) -> Option<(Duration, std::process::ExitStatus)> {
        let (mut child, _) = self.replicas.get_mut(i).and_then(Option::take)?;
        let pid = child.id().expect("the replica has exited already");
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(sent.success(), "kill -TERM {pid}: {sent}");
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(status) => Some((started.elapsed(), status.unwrap())),
            Err(_) => {
                child.kill().await.unwrap();
                None
            }
        }
    }

    /// Messages ready on the notification queue (not counting those
    /// delivered and not yet acknowledged).
    pub async fn queued(&self) -> u32 {
        let channel = self.broker.channel().await.unwrap();
        let declared = channel
            .queue_declare(
                NOTIFICATION_QUEUE.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = channel.close(200, "done".into()).await;
        declared.message_count()
    }

    /// Replica `i`'s admin address.
    pub fn admin_of(&self, i: usize) -> SocketAddr {
        self.replicas[i].as_ref().expect("replica not running").1
    }

    /// Messages replica `i` handled with `outcome` `ok`, for `event`, by its metrics.
    pub async fn handled(&self, i: usize, event: &str) -> u64 {
        let needle =
            format!(r#"dishpatch_notification_messages_total{{event="{event}",outcome="ok"}} "#);
        self.get_from(self.admin_of(i), "/metrics")
            .await
            .and_then(|(_, body)| {
                body.lines().find_map(|l| {
                    l.strip_prefix(needle.as_str())
                        .and_then(|n| n.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// Waits until replica `i` answers /readyz with 200.
    pub async fn wait_ready(&self, i: usize) {
        let admin = self.admin_of(i);
        let (ok, last) = dishpatch_testkit::eventually(
            Duration::from_secs(30),
            || self.get_from(admin, "/readyz"),
            |r| matches!(r, Some((200, _))),
        )
        .await;
        assert!(ok, "replica {i} is not ready: {last:?}");
    }

    /// Replica 0's log (shown when a test fails).
    pub fn log_path(&self) -> PathBuf {
        self.log_path_of(0)
    }

    /// Replica `i`'s log, across its restarts.
    pub fn log_path_of(&self, i: usize) -> PathBuf {
        if i == 0 {
            self.dir.join("dishpatch-notification.log")
        } else {
            self.dir.join(format!("dishpatch-notification-{i}.log"))
        }
    }

    pub fn orders(&self) -> Api<Order> {
        self.ns.api()
    }

    /// Creates an order and sets its status as the operator would have.
    pub async fn create_order(
        &self,
        mut order: Order,
        email: Option<&str>,
        status: Value,
    ) -> Order {
        let contact = &mut order.spec.customer.contact;
        contact.email = email.map(str::to_string);
        if email.is_none() {
            contact.phone = Some("+4915112345678".into());
        }
        let created = self
            .orders()
            .create(&PostParams::default(), &order)
            .await
            .unwrap();
        self.orders()
            .patch_status(
                &created.name_any(),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .unwrap()
    }

    pub fn order_ref(&self, order: &Order) -> OrderRef {
        OrderRef {
            namespace: self.ns.name.clone(),
            name: order.name_any(),
            uid: order.uid().unwrap(),
        }
    }

    /// Publishes an event about `order` the way the system does.
    pub async fn publish(
        &self,
        order: OrderRef,
        kind: EventType,
        reason: Option<&str>,
    ) -> CloudEvent {
        let event = CloudEvent::new(
            kind,
            "test",
            order,
            reason.map(str::to_string),
            jiff::Timestamp::now().to_string(),
        );
        let traceparent = dishpatch_messaging::trace::child_traceparent(
            &dishpatch_messaging::trace::trace_id(&event.data.order.uid, None),
        );
        self.broker.publish(&event, &traceparent).await.unwrap();
        event
    }

    /// Publishes raw bytes to the exchange, as a broken publisher might.
    pub async fn publish_raw(&self, routing_key: &str, payload: &[u8]) {
        let channel = self.broker.channel().await.unwrap();
        channel
            .basic_publish(
                dishpatch_messaging::EXCHANGE.into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions::default(),
                payload,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        let _ = channel.close(200, "done".into()).await;
    }

    /// Takes everything now in the notification dead-letter queue.
    pub async fn drain_dead_letters(&self) -> Vec<Vec<u8>> {
        let channel = self.broker.channel().await.unwrap();
        let queue = dead_letter_queue(NOTIFICATION_QUEUE);
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(message.delivery.data.clone());
        }
        let _ = channel.close(200, "done".into()).await;
        out
    }

    /// A plain HTTP/1.0 GET on replica 0's admin address: (status, body).
    pub async fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        self.get_from(self.admin, path).await
    }

    /// A plain HTTP/1.0 GET on an admin address: (status, body).
    pub async fn get_from(&self, admin: SocketAddr, path: &str) -> Option<(u16, String)> {
        let mut stream = tokio::net::TcpStream::connect(admin).await.ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 0..self.replicas.len().max(1) {
                let Ok(log) = std::fs::read_to_string(self.log_path_of(i)) else {
                    continue;
                };
                let tail: Vec<&str> = log.lines().rev().take(200).collect();
                eprintln!(
                    "--- dishpatch-notification replica {i} log (last {} lines) ---",
                    tail.len()
                );
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
