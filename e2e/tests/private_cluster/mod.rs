//! A private control plane and broker for the fault tests (`faults.rs`),
//! so stopping an apiserver, etcd or RabbitMQ never touches the shared one
//! every other test binary runs against.
//!
//! - One private cluster per test process, started by `hack/cluster.sh`
//!   with its own `DISHPATCH_DEV_DIR` and ports, the first time a scenario
//!   needs it; scenarios take turns on it ([`begin`]).
//! - It is stopped when the last scenario that runs leaves (also when it
//!   panicked), and in any case when the test process goes: a watchdog
//!   process in its own session holds the pipe's other end and a lock file,
//!   and tears everything down (by pidfiles) when the pipe closes, even
//!   after a SIGKILL of the test process.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dishpatch_api::{Order, OrderPhase};
use dishpatch_testkit::facade::mint_token;
use dishpatch_testkit::net::free_port;
use dishpatch_testkit::{binary, workspace_root};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::api::{Api, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Ports of the private cluster: beside the shared one's (23790, 23800,
/// 16443, 5672). RabbitMQ's Erlang distribution port is AMQP + 20000.
const ETCD_PORT: u16 = 23890;
const ETCD_PEER_PORT: u16 = 23900;
const APISERVER_PORT: u16 = 16543;
const AMQP_PORT: u16 = 5772;

/// The private cluster's daemons, started and stopped through
/// `hack/cluster.sh` with its own state directory and ports.
pub struct Cluster {
    pub dev: PathBuf,
}

impl Cluster {
    fn script(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(workspace_root().join("hack/cluster.sh"));
        private_env(cmd.as_std_mut(), &self.dev);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// Runs `hack/cluster.sh ARGS` against the private cluster; panics with its output if it fails.
    pub async fn sh(&self, args: &[&str]) -> String {
        let out = self.script().args(args).output().await.unwrap();
        assert!(
            out.status.success(),
            "hack/cluster.sh {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dev.join("kubeconfig")
    }

    pub fn logs(&self) -> PathBuf {
        self.dev.join("logs")
    }

    /// An admin client of the private apiserver (bound to the caller's runtime).
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).unwrap();
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }

    /// Stops one daemon (`etcd`, `kube-apiserver`) by its pidfile: SIGTERM, as a node shutting it down would.
    pub async fn stop(&self, daemon: &str) {
        self.sh(&["stop", daemon]).await;
    }

    /// Starts whatever of the control plane is not running and waits until it serves.
    pub async fn start_control_plane(&self) {
        self.sh(&["control-plane"]).await;
    }

    pub async fn rabbitmq_down(&self) {
        self.sh(&["rabbitmq-down"]).await;
    }

    pub async fn rabbitmq_up(&self) {
        self.sh(&["rabbitmq-up"]).await;
    }

    /// A vhost of its own for one scenario, as an AMQP URL.
    pub async fn vhost(&self, name: &str) -> String {
        self.sh(&["vhost", name]).await
    }

    /// Whether every daemon answers on its port; a scenario that failed
    /// mid-fault may have left one stopped.
    async fn healthy(&self) -> bool {
        for port in [ETCD_PORT, APISERVER_PORT, AMQP_PORT] {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}

/// The environment every `hack/cluster.sh` call and the watchdog get:
/// nothing inherited may point them at the shared cluster.
fn private_env(cmd: &mut std::process::Command, dev: &Path) {
    for var in ["KUBECONFIG", "DISHPATCH_NAMESPACE", "DISHPATCH_TIME_SCALE"] {
        cmd.env_remove(var);
    }
    cmd.env("DISHPATCH_DEV_DIR", dev)
        .env("DISHPATCH_ETCD_PORT", ETCD_PORT.to_string())
        .env("DISHPATCH_ETCD_PEER_PORT", ETCD_PEER_PORT.to_string())
        .env("DISHPATCH_APISERVER_PORT", APISERVER_PORT.to_string())
        .env("DISHPATCH_AMQP_PORT", AMQP_PORT.to_string());
}

/// What the scenarios of this process share.
struct Shared {
    /// Scenarios that have begun and not yet ended (waiting or running).
    users: usize,
    cluster: Option<Arc<Cluster>>,
    /// The watchdog: closing its stdin tears the cluster down.
    watchdog: Option<std::process::Child>,
}

static SHARED: std::sync::Mutex<Shared> = std::sync::Mutex::new(Shared {
    users: 0,
    cluster: None,
    watchdog: None,
});

/// One scenario at a time: they stop and start the same daemons.
static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn shared() -> std::sync::MutexGuard<'static, Shared> {
    SHARED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts a scenario in; the last one out (also by panic) stops the cluster.
struct User;

impl User {
    fn enter() -> Self {
        shared().users += 1;
        User
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let watchdog = {
            let mut s = shared();
            s.users -= 1;
            if s.users > 0 {
                return;
            }
            s.cluster = None;
            s.watchdog.take()
        };
        if let Some(watchdog) = watchdog {
            teardown(watchdog);
        }
    }
}

/// Closes the watchdog's stdin and waits while it stops every daemon.
fn teardown(mut watchdog: std::process::Child) {
    let started = Instant::now();
    drop(watchdog.stdin.take());
    let _ = watchdog.wait();
    eprintln!(
        "faults: private cluster stopped in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A scenario's hold on the private cluster: its turn, and the cluster.
pub struct Scenario {
    pub cluster: Arc<Cluster>,
    _turn: tokio::sync::MutexGuard<'static, ()>,
    _user: User,
}

/// Waits for this scenario's turn and returns the private cluster, started
/// (once) or repaired as needed.
pub async fn begin(name: &str) -> Scenario {
    let user = User::enter();
    let turn = TURN.lock().await;
    let existing = shared().cluster.clone();
    let cluster = match existing {
        Some(c) => {
            if !c.healthy().await {
                eprintln!(
                    "faults: {name}: the private cluster is not whole; starting what is missing"
                );
                c.sh(&["up"]).await;
            }
            c
        }
        None => {
            let started = Instant::now();
            let (cluster, watchdog) = start_cluster().await;
            eprintln!(
                "faults: private cluster (etcd :{ETCD_PORT}, apiserver :{APISERVER_PORT}, amqp :{AMQP_PORT}) up in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            let cluster = Arc::new(cluster);
            let mut s = shared();
            s.cluster = Some(cluster.clone());
            s.watchdog = Some(watchdog);
            cluster
        }
    };
    Scenario {
        cluster,
        _turn: turn,
        _user: user,
    }
}

/// The watchdog's script: take the lock (one private cluster per machine at
/// a time), say so, wait for stdin to close (the test process is done or
/// gone), then kill leftover components and stop the daemons by pidfile.
const WATCHDOG: &str = r#"
exec 9>"$DISHPATCH_FAULTS_LOCK"
flock 9
echo locked
cat >/dev/null
for f in "$DISHPATCH_DEV_DIR"/run/component-*.pid; do
  [ -f "$f" ] || continue
  pid=$(cat "$f")
  case "$(readlink "/proc/$pid/exe" 2>/dev/null)" in */dishpatch-*) kill -KILL "$pid" 2>/dev/null ;; esac
done
"$DISHPATCH_CLUSTER_SH" down >>"$DISHPATCH_DEV_DIR/logs/teardown.log" 2>&1
"#;

async fn start_cluster() -> (Cluster, std::process::Child) {
    let dev = std::env::temp_dir().join("dishpatch-faults");
    let lock = std::env::temp_dir().join("dishpatch-faults.lock");
    let script = workspace_root().join("hack/cluster.sh");
    let mut cmd = std::process::Command::new("setsid");
    cmd.args(["bash", "-c", WATCHDOG])
        .env("DISHPATCH_FAULTS_LOCK", &lock)
        .env("DISHPATCH_CLUSTER_SH", &script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    private_env(&mut cmd, &dev);
    let mut watchdog = cmd.spawn().unwrap();
    // Holding the lock: no other private cluster runs on these ports.
    let stdout = watchdog.stdout.take().unwrap();
    let locked = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    });
    let line = tokio::time::timeout(Duration::from_secs(600), locked)
        .await
        .expect("another fault run holds the private cluster's lock")
        .unwrap()
        .unwrap();
    assert_eq!(line.trim(), "locked");
    let cluster = Cluster { dev: dev.clone() };
    // Leftovers of a run whose watchdog was killed too: stop, then start clean.
    if dev.exists() {
        let _ = cluster.script().arg("down").output().await;
        std::fs::remove_dir_all(&dev).unwrap();
    }
    std::fs::create_dir_all(dev.join("logs")).unwrap();
    std::fs::create_dir_all(dev.join("run")).unwrap();
    for port in [ETCD_PORT, ETCD_PEER_PORT, APISERVER_PORT, AMQP_PORT] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is taken: the private cluster needs it"
        );
    }
    // The broker boots while the control plane does.
    tokio::join!(cluster.sh(&["control-plane"]), cluster.sh(&["rabbitmq-up"]));
    (cluster, watchdog)
}

/// A component process restarted whenever it exits, as a Deployment's
/// pod would be; killed (SIGKILL) when dropped.
pub struct Supervised {
    pub name: String,
    pid: Arc<AtomicU32>,
    restarts: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    /// `build(generation)` makes the command of each incarnation.
    pub fn start(
        dev: &Path,
        name: &str,
        build: impl Fn(u32) -> tokio::process::Command + Send + 'static,
    ) -> Self {
        let pid = Arc::new(AtomicU32::new(0));
        let restarts = Arc::new(AtomicU32::new(0));
        let pidfile = dev.join("run").join(format!("component-{name}.pid"));
        let log = dev.join("logs").join(format!("{name}.log"));
        let task = {
            let (pid, restarts, name) = (pid.clone(), restarts.clone(), name.to_string());
            tokio::spawn(async move {
                for generation in 0.. {
                    let out = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&log)
                        .unwrap();
                    let mut cmd = build(generation);
                    cmd.stdin(Stdio::null())
                        .stdout(out.try_clone().unwrap())
                        .stderr(out)
                        .kill_on_drop(true);
                    let mut child = cmd.spawn().unwrap();
                    let id = child.id().unwrap_or(0);
                    pid.store(id, Ordering::SeqCst);
                    let _ = std::fs::write(&pidfile, id.to_string());
                    let status = child.wait().await;
                    eprintln!("faults: {name} (pid {id}) exited: {status:?}; restarting it");
                    restarts.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            })
        };
        Self {
            name: name.to_string(),
            pid,
            restarts,
            task,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// How often it exited and was started again.
    pub fn restarts(&self) -> u32 {
        self.restarts.load(Ordering::SeqCst)
    }

    /// Sends `signal` (`KILL`, `TERM`) to the current incarnation.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.task.abort();
        // Now, not when the runtime gets round to dropping the task.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// A scenario's platform: a namespace and a vhost of their own on the
/// private cluster, every component as a supervised process, and the façade.
pub struct Bed {
    pub cluster: Arc<Cluster>,
    pub client: Client,
    pub ns: String,
    pub amqp_url: String,
    pub ledger: PathBuf,
    pub time_scale: String,
    pub facade: Facade,
    pub mails: Arc<AtomicU32>,
    smtp_port: u16,
    procs: Vec<Supervised>,
    _smtp: tokio::task::JoinHandle<()>,
    /// Every phase each order had, by resourceVersion, from a watch of the test's own.
    pub truth: History,
    _truth: tokio::task::JoinHandle<()>,
}

/// The phases of a delivered order, in the order they come.
const LIFECYCLE: [&str; 7] = [
    "Pending",
    "Accepted",
    "Paid",
    "Preparing",
    "Ready",
    "OutForDelivery",
    "Delivered",
];

/// Order name → (resourceVersion, phase, when the watch saw it) of every
/// version a watch saw.
pub type History = Arc<std::sync::Mutex<BTreeMap<String, Vec<(u64, String, Instant)>>>>;

/// Records every version of every Order the apiserver sends; the watch
/// resumes (or relists) after a fault like any client's. A restarted
/// apiserver answers a resume from before its start with 410 Gone, so the
/// watch relists and versions written before it did are folded into one:
/// it retries within 2 s, as the façade's watches do, to keep that short.
fn record_history(api: Api<Order>) -> (History, tokio::task::JoinHandle<()>) {
    use futures::StreamExt;
    use kube::runtime::utils::ResetTimerBackoff;
    use kube::runtime::watcher::ExponentialBackoff;
    use kube::runtime::{WatchStreamExt, watcher};
    let history: History = Arc::default();
    let h = history.clone();
    let retry: ExponentialBackoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
        .into();
    let task = tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .backoff(ResetTimerBackoff::new(retry, Duration::from_secs(60)))
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        while let Some(next) = stream.next().await {
            if let Ok(o) = next {
                let rv = o
                    .metadata
                    .resource_version
                    .as_deref()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                h.lock().unwrap().entry(o.name_any()).or_default().push((
                    rv,
                    phase(&o).to_string(),
                    Instant::now(),
                ));
            }
        }
    });
    (history, task)
}

pub const LEASE: Duration = Duration::from_secs(15);

impl Bed {
    /// Namespace `name` with restaurant `roma` (kitchen capacity `capacity`)
    /// and `couriers` couriers; every component running at `time_scale`,
    /// two operator replicas (as the chart runs them), and the façade.
    pub async fn new(s: &Scenario, name: &str, time_scale: &str, couriers: usize) -> Bed {
        let cluster = s.cluster.clone();
        let client = cluster.client().await;
        let ns = format!("faults-{name}");
        let namespace: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap();
        let amqp_url = cluster.vhost(&ns).await;
        let restaurant: dishpatch_api::Restaurant = serde_json::from_value(serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Restaurant",
            "metadata": {"name": "roma"},
            "spec": {"displayName": "Roma", "zone": "mitte", "open": true, "currency": "EUR",
                "kitchen": {"capacity": 8},
                "menu": [{"id": "pizza", "name": "Pizza", "price": 950, "prepTimeSeconds": 60},
                         {"id": "water", "name": "Water", "price": 200, "prepTimeSeconds": 1}]}
        }))
        .unwrap();
        Api::<dishpatch_api::Restaurant>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &restaurant)
            .await
            .unwrap();
        let courier_api: Api<dishpatch_api::Courier> = Api::namespaced(client.clone(), &ns);
        for i in 0..couriers {
            courier_api
                .create(
                    &PostParams::default(),
                    &dishpatch_testkit::fixtures::courier(&format!("courier-{i}"), "mitte", true),
                )
                .await
                .unwrap();
        }
        let (smtp_port, mails, smtp) = smtp_sink().await;
        let ledger = cluster.dev.join(format!("{ns}-ledger.jsonl"));
        let facade = Facade::new(&cluster.dev, &ns);
        let (truth, truth_task) = record_history(Api::namespaced(client.clone(), &ns));
        let mut bed = Bed {
            cluster,
            client,
            ns,
            amqp_url,
            ledger,
            time_scale: time_scale.to_string(),
            facade,
            mails,
            smtp_port,
            procs: Vec::new(),
            _smtp: smtp,
            truth,
            _truth: truth_task,
        };
        for replica in ["a", "b"] {
            bed.start_operator(replica);
        }
        for c in ["payment", "kitchen", "delivery", "notification"] {
            bed.start(c);
        }
        let facade_args = bed.facade.args();
        bed.spawn("facade", "facade", facade_args);
        bed.facade.wait_ready().await;
        bed
    }

    /// Starts `component` as the supervised process `name`; `{generation}`
    /// in an argument becomes the incarnation's number.
    fn spawn(&mut self, name: &str, component: &str, args: Vec<String>) {
        let program = binary(&format!("dishpatch-{component}"));
        assert!(
            program.exists(),
            "{} is not built: run `cargo build --workspace --bins` (make test does)",
            program.display()
        );
        let kubeconfig = self.cluster.kubeconfig();
        let amqp = (component != "facade").then(|| self.amqp_url.clone());
        let proc = Supervised::start(
            &self.cluster.dev,
            &format!("{}-{name}", self.ns),
            move |generation| {
                let mut cmd = tokio::process::Command::new(&program);
                // Nothing from the test's own environment (KUBECONFIG, DISHPATCH_*) leaks in.
                cmd.env_clear()
                    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                    .env("KUBECONFIG", &kubeconfig)
                    .env("RUST_LOG", "info")
                    .arg("run")
                    .args(["--admin-addr", "127.0.0.1:0"]);
                if let Some(url) = &amqp {
                    cmd.args(["--amqp-url", url]);
                }
                for a in &args {
                    cmd.arg(a.replace("{generation}", &generation.to_string()));
                }
                cmd
            },
        );
        self.procs.push(proc);
    }

    /// An operator replica with identity `op-REPLICA-GENERATION`: a restarted
    /// replica is a new candidate, as a new pod would be.
    pub fn start_operator(&mut self, replica: &str) {
        let args = [
            "--namespace",
            &self.ns,
            "--identity",
            &format!("op-{replica}-{{generation}}"),
            "--lease-duration",
            &format!("{}s", LEASE.as_secs()),
        ]
        .map(String::from)
        .to_vec();
        self.spawn(&format!("operator-{replica}"), "operator", args);
    }

    fn start(&mut self, component: &str) {
        let args: Vec<String> = match component {
            "payment" => vec![
                "--gateway".into(),
                "simulated".into(),
                "--ledger".into(),
                self.ledger.display().to_string(),
            ],
            "kitchen" => vec![
                "--namespace".into(),
                self.ns.clone(),
                "--time-scale".into(),
                self.time_scale.clone(),
            ],
            "delivery" => vec![
                "--namespace".into(),
                self.ns.clone(),
                "--auto-accept".into(),
                "--time-scale".into(),
                self.time_scale.clone(),
            ],
            "notification" => vec![
                "--smtp-host".into(),
                "127.0.0.1".into(),
                "--smtp-port".into(),
                self.smtp_port.to_string(),
            ],
            other => panic!("no component {other}"),
        };
        self.spawn(component, component, args);
    }

    /// The supervised process `name` (`operator-a`, `kitchen`, ...).
    pub fn proc(&self, name: &str) -> &Supervised {
        let full = format!("{}-{name}", self.ns);
        self.procs.iter().find(|p| p.name == full).unwrap()
    }

    /// Restarts of every component but the operator replicas, which exit by
    /// design when they lose the lease.
    pub fn worker_restarts(&self) -> BTreeMap<String, u32> {
        self.procs
            .iter()
            .filter(|p| !p.name.contains("operator-") && p.restarts() > 0)
            .map(|p| (p.name.clone(), p.restarts()))
            .collect()
    }

    pub fn orders(&self) -> Api<Order> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Order `o{i}` for customer `cust-{i}` (a pizza and water).
    pub fn order(&self, i: usize) -> Order {
        let mut o = dishpatch_testkit::fixtures::order(
            &format!("o{i}"),
            "roma",
            &[("pizza", 1), ("water", 1)],
        );
        o.spec.customer.id = customer(i);
        o
    }

    /// Creates orders `o{from}..o{to}`, `per_second` of them each second.
    pub async fn place(&self, from: usize, to: usize, per_second: f64) {
        let gap = Duration::from_secs_f64(1.0 / per_second);
        let api = self.orders();
        for i in from..to {
            api.create(&PostParams::default(), &self.order(i))
                .await
                .unwrap();
            tokio::time::sleep(gap).await;
        }
    }

    pub async fn list(&self) -> Vec<Order> {
        self.orders()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
    }

    /// Orders per phase right now.
    pub async fn census(&self) -> BTreeMap<String, usize> {
        census(&self.list().await)
    }

    /// Waits until every order is terminal (the apiserver may still be
    /// coming back: errors are retried); returns how long it took.
    pub async fn drain(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        let api = self.orders();
        let mut last = BTreeMap::new();
        while started.elapsed() < timeout {
            if let Ok(list) = api.list(&ListParams::default()).await {
                if list.items.iter().all(|o| phase(o).is_terminal()) {
                    return started.elapsed();
                }
                last = census(&list.items);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "orders not terminal {timeout:?} after the fault: {last:?}; logs in {}",
            self.cluster.logs().display()
        );
    }

    /// Nothing lost: `expected` orders, every one terminal and (nothing
    /// was called off) delivered; one charge each and no refund, in the
    /// gateway's ledger.
    pub async fn assert_nothing_lost(&self, expected: usize) {
        let orders = self.list().await;
        assert_eq!(orders.len(), expected, "orders: {:?}", census(&orders));
        let ledger = std::fs::read_to_string(&self.ledger).unwrap_or_default();
        let entries: Vec<serde_json::Value> = ledger
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let mut wrong = Vec::new();
        for o in &orders {
            let uid = o.uid().unwrap();
            let count = |kind: &str| {
                entries
                    .iter()
                    .filter(|e| e["orderUid"] == uid.as_str() && e["kind"] == kind)
                    .count()
            };
            let (charges, refunds) = (count("charge"), count("refund"));
            let ok = match phase(o) {
                OrderPhase::Delivered => charges == 1 && refunds == 0,
                // Called off after a charge: refunded exactly once.
                OrderPhase::Cancelled => refunds == charges.min(1) && charges <= 1,
                _ => false,
            };
            // Nothing in these scenarios calls an order off.
            if !ok || phase(o) != OrderPhase::Delivered {
                wrong.push(format!(
                    "{}: {:?}, {charges} charge(s), {refunds} refund(s)",
                    o.name_any(),
                    phase(o)
                ));
            }
        }
        assert!(wrong.is_empty(), "orders lost or paid wrongly: {wrong:#?}");
        let restarted = self.worker_restarts();
        assert!(
            restarted.is_empty(),
            "workers exited during the fault instead of riding it out: {restarted:?}"
        );
    }
}

pub fn customer(i: usize) -> String {
    format!("cust-{i}")
}

pub fn phase(o: &Order) -> OrderPhase {
    o.status
        .as_ref()
        .and_then(|s| s.phase)
        .unwrap_or(OrderPhase::Pending)
}

pub fn census(orders: &[Order]) -> BTreeMap<String, usize> {
    let mut by_phase = BTreeMap::new();
    for o in orders {
        *by_phase.entry(phase(o).to_string()).or_insert(0) += 1;
    }
    by_phase
}

/// A minimal SMTP server that takes every message: the notification
/// service stays connected and healthy; only the count is kept.
async fn smtp_sink() -> (u16, Arc<AtomicU32>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mails = Arc::new(AtomicU32::new(0));
    let count = mails.clone();
    let task = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let (read, mut write) = socket.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                let mut in_data = false;
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply: &[u8] = if in_data {
                        if line != "." {
                            continue;
                        }
                        in_data = false;
                        count.fetch_add(1, Ordering::Relaxed);
                        b"250 queued\r\n"
                    } else {
                        match line.get(..4).map(str::to_ascii_uppercase).as_deref() {
                            Some("DATA") => {
                                in_data = true;
                                b"354 go on\r\n"
                            }
                            Some("QUIT") => {
                                let _ = write.write_all(b"221 bye\r\n").await;
                                return;
                            }
                            _ => b"250 ok\r\n",
                        }
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, mails, task)
}

/// The façade of a [`Bed`], over plain HTTP on loopback.
pub struct Facade {
    pub base: String,
    ns: String,
    key_file: PathBuf,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Facade {
    fn new(dev: &Path, ns: &str) -> Self {
        let key_file = dev.join(format!("{ns}-jwt.key"));
        std::fs::write(&key_file, "faults-signing-key-0123456789abcdef\n").unwrap();
        Self {
            base: format!("http://127.0.0.1:{}", free_port()),
            ns: ns.to_string(),
            key_file,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--listen".into(),
            self.base.trim_start_matches("http://").into(),
            "--namespace".into(),
            self.ns.clone(),
            "--jwt-key-file".into(),
            self.key_file.display().to_string(),
            // A write fails within 2 s when the apiserver hangs (etcd gone).
            "--api-timeout".into(),
            "2s".into(),
        ]
    }

    async fn wait_ready(&self) {
        let token = self.token("cust-0").await;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(r) = self
                .call(Method::GET, "/api/v1/restaurants/roma", &token, &[], None)
                .await
                && r.status == StatusCode::OK
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the façade did not serve restaurant roma within 60 s");
    }

    /// A customer token minted by the façade binary's own `token` subcommand.
    pub async fn token(&self, sub: &str) -> String {
        mint_token(
            binary("dishpatch-facade"),
            &self.key_file,
            "customer",
            sub,
            "30m",
        )
        .await
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {token}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(serde_json::to_vec(&b).unwrap()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| e.to_string())?;
        tokio::time::timeout(Duration::from_secs(20), self.http.request(req))
            .await
            .map_err(|_| "request timed out".to_string())?
            .map_err(|e| e.to_string())
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Result<Reply, String> {
        let response = self.send(method, path, token, headers, body).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = tokio::time::timeout(Duration::from_secs(20), response.into_body().collect())
            .await
            .map_err(|_| "body timed out".to_string())?
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// Places an order through the API, as a customer's app would.
    pub async fn place(&self, token: &str) -> Result<Reply, String> {
        let body = serde_json::json!({
            "restaurant": "roma",
            "items": [{"menuItem": "water", "quantity": 1}],
            "deliveryAddress": {"street": "Torstraße 1", "city": "Berlin", "postalCode": "10119", "country": "DE"},
            "payment": {"token": "tok_visa"}
        });
        self.call(Method::POST, "/api/v1/orders", token, &[], Some(body))
            .await
    }
}

/// Reads server-sent events from a streaming response body.
pub struct SseReader {
    body: hyper::body::Incoming,
    buf: String,
}

pub use dishpatch_testkit::sse::SseEvent;

impl SseReader {
    pub fn new(response: hyper::Response<hyper::body::Incoming>) -> Self {
        Self {
            body: response.into_body(),
            buf: String::new(),
        }
    }

    /// The next event (keep-alives skipped); `None` when the stream ends or errs.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(ev) = dishpatch_testkit::sse::take_event(&mut self.buf) {
                return Some(ev);
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }
}

/// One `order` event a follower received.
#[derive(Clone, Debug)]
struct Seen {
    id: String,
    phase: String,
    /// The phases whose stage record the event's view carries.
    shows: Vec<&'static str>,
}

/// The phases an order view proves it passed: each stage's record stays on
/// the order (payment succeeded, the kitchen's state, the courier's
/// pick-up), so a client that gets a later state still sees each step.
fn stages_shown(view: &serde_json::Value) -> Vec<&'static str> {
    let kitchen = view["kitchen"]["state"].as_str();
    let mut shown = Vec::new();
    if view.get("total").is_some() {
        shown.push("Accepted");
    }
    if matches!(
        view["payment"]["state"].as_str(),
        Some("Succeeded" | "Refunded")
    ) {
        shown.push("Paid");
    }
    if matches!(kitchen, Some("Preparing" | "Ready")) {
        shown.push("Preparing");
    }
    if kitchen == Some("Ready") {
        shown.push("Ready");
    }
    if view["delivery"].get("pickedUpAt").is_some() {
        shown.push("OutForDelivery");
    }
    if view["delivery"].get("deliveredAt").is_some() {
        shown.push("Delivered");
    }
    shown
}

/// A customer following one order live, as the web page does: it reads
/// the façade's server-sent events and, when its connection goes, connects
/// again with `Last-Event-ID`.
pub struct Follower {
    pub order: String,
    /// Every `order` event received.
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    /// Connections made with `Last-Event-ID`, and answers other than 200.
    reconnects: Arc<AtomicU32>,
    refused: Arc<std::sync::Mutex<Vec<String>>>,
    cut: tokio::sync::watch::Sender<u32>,
    task: tokio::task::JoinHandle<()>,
}

impl Follower {
    /// Follows order `o{i}` as its customer.
    pub async fn start(bed: &Bed, i: usize) -> Self {
        let order = format!("o{i}");
        let token = bed.facade.token(&customer(i)).await;
        let seen = Arc::new(std::sync::Mutex::new(Vec::<Seen>::new()));
        let reconnects = Arc::new(AtomicU32::new(0));
        let refused = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut, mut cuts) = tokio::sync::watch::channel(0_u32);
        let facade = Facade {
            base: bed.facade.base.clone(),
            ns: bed.facade.ns.clone(),
            key_file: bed.facade.key_file.clone(),
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
        };
        let task = {
            let (seen, reconnects, refused, order) = (
                seen.clone(),
                reconnects.clone(),
                refused.clone(),
                order.clone(),
            );
            tokio::spawn(async move {
                let path = format!("/api/v1/orders/{order}/events");
                let mut last_id: Option<String> = None;
                loop {
                    let headers: Vec<(&str, &str)> = match &last_id {
                        Some(id) => vec![("last-event-id", id.as_str())],
                        None => vec![],
                    };
                    let response = match facade
                        .send(Method::GET, &path, &token, &headers, None)
                        .await
                    {
                        Ok(r) if r.status() == StatusCode::OK => r,
                        other => {
                            let what = match other {
                                Ok(r) => r.status().to_string(),
                                Err(e) => e,
                            };
                            // Before the first connection the façade's cache may
                            // not hold the order yet (404): retried. A reconnect must work.
                            if last_id.is_some() {
                                refused.lock().unwrap().push(what);
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    };
                    if last_id.is_some() {
                        reconnects.fetch_add(1, Ordering::SeqCst);
                    }
                    let mut sse = SseReader::new(response);
                    loop {
                        tokio::select! {
                            ev = sse.next() => match ev {
                                Some(ev) if ev.event == "order" => {
                                    let data: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
                                    let phase = data["phase"].as_str().unwrap_or_default().to_string();
                                    seen.lock().unwrap().push(Seen {
                                        id: ev.id.clone(),
                                        phase: phase.clone(),
                                        shows: stages_shown(&data),
                                    });
                                    last_id = Some(ev.id);
                                    if phase == "Delivered" || phase == "Cancelled" || phase == "Rejected" {
                                        return;
                                    }
                                }
                                Some(_) => return, // deleted
                                None => break,     // the stream ended: connect again
                            },
                            // The connection goes (a phone between cells): drop it and connect again.
                            _ = cuts.changed() => break,
                        }
                    }
                }
            })
        };
        Self {
            order,
            seen,
            reconnects,
            refused,
            cut,
            task,
        }
    }

    /// Drops the connection; the follower connects again at once with `Last-Event-ID`.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn reconnects(&self) -> u32 {
        self.reconnects.load(Ordering::SeqCst)
    }

    /// After the order was delivered: the follower saw every phase the
    /// order had (as the test's own watch saw them) from its first one to
    /// Delivered, in order, none skipped, none twice across a reconnect,
    /// and nothing that moved backwards.
    ///
    /// `relisted` is when the façade's watch had to list again (after an
    /// apiserver restart Kubernetes replays nothing from before it: a watch
    /// resumed from an older resourceVersion gets 410 Gone). A phase the
    /// order had only then may be folded into the next event, and that
    /// event must show the phase's stage record; outside it none may be.
    pub async fn assert_saw_every_transition(
        self,
        truth: &History,
        relisted: Option<(Instant, Instant)>,
    ) {
        let reconnects = self.reconnects();
        let finished = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        let seen = self.seen.lock().unwrap().clone();
        assert!(
            finished.is_ok(),
            "{}: the stream never reached a terminal phase; saw {seen:?}",
            self.order
        );
        let ids: Vec<u64> = seen.iter().map(|e| e.id.parse().unwrap()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "{}: event ids not increasing (a state sent twice, or one from the past): {seen:?}",
            self.order
        );
        let mut phases: Vec<&str> = seen.iter().map(|e| e.phase.as_str()).collect();
        phases.dedup();
        // The phases the order really had, each with whether the test's
        // watch saw all of it inside the relist window. The operator may
        // skip one (Paid, when the kitchen took the ticket before it looked).
        let mut versions = truth
            .lock()
            .unwrap()
            .get(&self.order)
            .cloned()
            .unwrap_or_default();
        versions.sort_by_key(|v| v.0);
        let mut had: Vec<(String, bool)> = Vec::new();
        for (_, p, at) in versions {
            let inside = relisted.is_some_and(|(from, to)| from <= at && at <= to);
            match had.last_mut() {
                Some((q, all_inside)) if *q == p => *all_inside &= inside,
                _ => had.push((p, inside)),
            }
        }
        let from = had
            .iter()
            .position(|(p, _)| Some(&p.as_str()) == phases.first());
        let expected = from.map_or(&had[..0], |f| &had[f..]);
        // Every phase the test's watch saw, the follower saw too, in order.
        // The follower may have seen more: the test's watch relists as well
        // and may fold a phase the façade's caught.
        let mut next = 0;
        let mut missed = Vec::new();
        for (p, inside) in expected {
            if let Some(at) = seen[next..].iter().position(|e| e.phase == *p) {
                next += at + 1;
            } else if *inside
                && seen[next..]
                    .iter()
                    // Repeats of the phase just matched (the façade resends
                    // an unchanged view after its relist) are not the next event.
                    .find(|e| next == 0 || e.phase != seen[next - 1].phase)
                    .is_some_and(|e| e.shows.contains(&p.as_str()))
            {
                eprintln!(
                    "faults: {}: {p} came and went while the façade relisted; the next event shows its record",
                    self.order
                );
            } else {
                missed.push(p.clone());
            }
        }
        let rank = |p: &str| LIFECYCLE.iter().position(|l| *l == p);
        let forwards = phases
            .windows(2)
            .all(|w| matches!((rank(w[0]), rank(w[1])), (Some(a), Some(b)) if a < b));
        assert!(
            !phases.is_empty()
                && missed.is_empty()
                && forwards
                && phases.last() == Some(&"Delivered"),
            "{}: missed {missed:?} (or saw a transition out of order): saw {phases:?}, the order had {had:?} (phase, only while the façade relisted); events {seen:?}",
            self.order
        );
        assert!(
            reconnects >= 1,
            "{}: never reconnected with Last-Event-ID",
            self.order
        );
        let refused = self.refused.lock().unwrap().clone();
        assert!(
            refused.is_empty(),
            "{}: a reconnect was refused: {refused:?}",
            self.order
        );
    }
}
