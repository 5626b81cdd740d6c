//! Test helpers for integration tests that run against the real local control
//! plane started by `hack/cluster.sh up` (`make up` / `make test`).
//!
//! Every test gets its own namespace, so tests run in parallel against one
//! apiserver and clean up after themselves, even when they panic.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};
use tokio::io::AsyncWriteExt;

pub mod apiserver;
pub mod facade;
pub mod net;
pub mod postgres;

/// What went wrong while preparing a test.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no control plane: {path} is missing. Start it with `make up` (or run `make test`), or set KUBECONFIG"
    )]
    NoKubeconfig { path: String },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("waiting for {what}: {source}")]
    Wait {
        what: String,
        source: kube::runtime::wait::Error,
    },
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("running kubectl: {0}")]
    Kubectl(#[from] std::io::Error),
    #[error("crd yaml: {0}")]
    Yaml(String),
}

/// The workspace root (where `.dev/` and `crds/` live).
pub fn workspace_root() -> PathBuf {
    // crates/testkit → ../..
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The kubeconfig tests use: `$KUBECONFIG`, else `.dev/kubeconfig`.
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => workspace_root().join(".dev/kubeconfig"),
    }
}

/// A client for the local control plane, as its admin.
pub async fn client() -> Result<Client, Error> {
    let path = kubeconfig_path();
    if !path.exists() {
        return Err(Error::NoKubeconfig {
            path: path.display().to_string(),
        });
    }
    let kubeconfig = Kubeconfig::read_from(&path)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Applies the CRDs generated from the Rust types (server-side apply) and
/// waits until the apiserver serves them. Idempotent.
pub async fn ensure_crds(client: &Client) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply("dishpatch-crds").force();
    for crd in dishpatch_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(&name, &params, &Patch::Apply(&crd)).await?;
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        match tokio::time::timeout(Duration::from_secs(30), established).await {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => {
                return Err(Error::Wait {
                    what: format!("CRD {name}"),
                    source,
                });
            }
            Err(_) => return Err(Error::Timeout(format!("CRD {name} to be established"))),
        }
    }
    Ok(())
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A namespace that exists for one test and is deleted when dropped.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

/// Label on every test namespace, so a sweep can find leftovers.
pub const TEST_LABEL: &str = "dishpatch.dev/test";

impl TestNamespace {
    /// Creates `dp-<prefix>-<unique>`.
    pub async fn create(client: &Client, prefix: &str) -> Result<Self, Error> {
        let unique = format!(
            "{:x}{:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut name = format!("dp-{prefix}-{unique}");
        name.truncate(63);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": { TEST_LABEL: "true" } }
        }))
        .map_err(|e| Error::Yaml(e.to_string()))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        Ok(Self {
            name,
            client: client.clone(),
        })
    }

    /// A typed API in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // Drop can't await; delete from a helper thread with its own runtime so
        // cleanup also happens when the test panicked. The thread needs its own
        // client: ours is served by the test's runtime, which this join blocks.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = client().await else { return };
                let _ = Api::<Namespace>::all(client)
                    .delete(&name, &DeleteParams::background())
                    .await;
            });
        })
        .join();
    }
}

/// Output of a `kubectl` run.
#[derive(Debug)]
pub struct KubectlOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the real `kubectl` against the local control plane, with `stdin` piped in.
pub async fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<KubectlOutput, Error> {
    let mut cmd = tokio::process::Command::new("kubectl");
    cmd.env("KUBECONFIG", kubeconfig_path())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await?;
        drop(pipe);
    }
    let out = child.wait_with_output().await?;
    Ok(KubectlOutput {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Creates a RabbitMQ vhost of its own for a test (through `hack/cluster.sh`)
/// and returns its AMQP URL, so tests sharing one broker don't see each
/// other's events.
pub async fn amqp_vhost(name: &str) -> Result<String, Error> {
    let out = tokio::process::Command::new(workspace_root().join("hack/cluster.sh"))
        .args(["vhost", name])
        .output()
        .await?;
    if !out.status.success() {
        return Err(Error::Kubectl(std::io::Error::other(format!(
            "creating vhost {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Polls `get` until `done` holds for what it returns, or `timeout` passes;
/// returns the last value seen either way, so a failing assertion can show it.
pub async fn eventually<T, F, Fut>(
    timeout: Duration,
    mut get: F,
    done: impl Fn(&T) -> bool,
) -> (bool, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let value = get().await;
        if done(&value) {
            return (true, value);
        }
        if tokio::time::Instant::now() >= deadline {
            return (false, value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Object fixtures shared by the integration tests.
pub mod fixtures {
    use dishpatch_api::courier::Courier;
    use dishpatch_api::{Order, Restaurant};

    /// A courier on a bicycle in `zone`.
    pub fn courier(name: &str, zone: &str, on_shift: bool) -> Courier {
        let value = serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1",
            "kind": "Courier",
            "metadata": {"name": name},
            "spec": {"displayName": name, "zone": zone, "onShift": on_shift, "vehicle": "Bicycle"}
        });
        serde_json::from_value(value).unwrap_or_else(|e| panic!("courier fixture: {e}"))
    }

    /// A restaurant with `pizza` (950, stock as given) and unlimited `water` (200).
    pub fn restaurant(name: &str, open: bool, pizza_stock: Option<i64>) -> Restaurant {
        let mut pizza = serde_json::json!({"id": "pizza", "name": "Pizza", "price": 950, "prepTimeSeconds": 60});
        if let Some(stock) = pizza_stock {
            pizza["stock"] = stock.into();
        }
        let value = serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1",
            "kind": "Restaurant",
            "metadata": {"name": name},
            "spec": {
                "displayName": name, "zone": "mitte", "open": open, "currency": "EUR",
                "kitchen": {"capacity": 2},
                "menu": [pizza, {"id": "water", "name": "Water", "price": 200, "prepTimeSeconds": 1}]
            }
        });
        serde_json::from_value(value).unwrap_or_else(|e| panic!("restaurant fixture: {e}"))
    }

    /// An order for `items` (menu item, quantity) at `restaurant`.
    pub fn order(name: &str, restaurant: &str, items: &[(&str, i32)]) -> Order {
        let value = serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1",
            "kind": "Order",
            "metadata": {"name": name},
            "spec": {
                "customer": {"id": "cust-1", "name": "Jane Doe", "contact": {"email": "jane@example.com"}},
                "restaurantRef": {"name": restaurant},
                "items": items.iter().map(|(m, q)| serde_json::json!({"menuItem": m, "quantity": q})).collect::<Vec<_>>(),
                "deliveryAddress": {"street": "Torstraße 1", "city": "Berlin", "postalCode": "10119", "country": "DE"},
                "payment": {"token": "tok_visa"}
            }
        });
        serde_json::from_value(value).unwrap_or_else(|e| panic!("order fixture: {e}"))
    }
}

/// Where hack/deps.sh keeps tools and the Python venv (`DISHPATCH_CACHE`,
/// default `~/.cache/dishpatch`).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("DISHPATCH_CACHE") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default()
            .join(".cache/dishpatch"),
    }
}

/// A binary of this workspace, built next to the running test (so tests in
/// one crate can run another crate's binaries; `cargo test --workspace`
/// builds them all).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/<test> → target/debug/<name>
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .map(PathBuf::from)
        .unwrap_or_default();
    dir.join(name)
}

/// Waits until the object `name` exists and satisfies `done`; panics with
/// what was last seen otherwise (`show` picks the part worth printing).
pub async fn wait_for<K, S: std::fmt::Debug>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&K) -> bool,
    show: impl FnOnce(K) -> S,
) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let (ok, last) = eventually(
        timeout,
        || api.get_opt(name),
        |o| matches!(o, Ok(Some(o)) if done(o)),
    )
    .await;
    match (ok, last) {
        (true, Ok(Some(o))) => o,
        (_, Ok(Some(o))) => panic!(
            "{name}: {what} did not happen within {timeout:?}; last seen: {:#?}",
            show(o)
        ),
        (_, last) => {
            panic!("{name}: {what} did not happen within {timeout:?}; last seen: {last:?}")
        }
    }
}

/// A TCP proxy on loopback that can be frozen: while frozen it keeps every
/// connection open but passes no bytes, so requests through it hang the way
/// they do behind a stalled network or an apiserver that stopped answering.
/// Dropping it stops it.
pub struct FreezableProxy {
    pub addr: std::net::SocketAddr,
    frozen: tokio::sync::watch::Sender<bool>,
    /// Only the client's bytes are held: requests hang while answers and
    /// watch events already under way still arrive.
    upstream_frozen: tokio::sync::watch::Sender<bool>,
    /// Bytes passed from the server to the client so far.
    down: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableProxy {
    /// Listens on an ephemeral loopback port and forwards to `upstream`.
    pub async fn start(upstream: std::net::SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (frozen, watch) = tokio::sync::watch::channel(false);
        let (upstream_frozen, up_watch) = tokio::sync::watch::channel(false);
        let down = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = down.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let watch = watch.clone();
                let up_watch = up_watch.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(
                        pump(ri, wo, watch.clone(), Some(up_watch), None),
                        pump(ro, wi, watch, None, Some(counter))
                    );
                });
            }
        });
        Ok(Self {
            addr,
            frozen,
            upstream_frozen,
            down,
            task,
        })
    }

    /// Bytes the server has sent to clients through the proxy so far: how
    /// much a client reads, whatever TLS hides of what it asked.
    pub fn bytes_down(&self) -> u64 {
        self.down.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops (`true`) or resumes (`false`) the flow of bytes.
    pub fn freeze(&self, frozen: bool) {
        let _ = self.frozen.send(frozen);
    }

    /// Stops (`true`) or resumes (`false`) only what the client sends.
    pub fn freeze_upstream(&self, frozen: bool) {
        let _ = self.upstream_frozen.send(frozen);
    }
}

impl Drop for FreezableProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
    mut this_way: Option<tokio::sync::watch::Receiver<bool>>,
    counter: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Bytes read just before a freeze are held until it thaws.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if let Some(w) = this_way.as_mut()
            && w.wait_for(|f| !*f).await.is_err()
        {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(c) = &counter {
            c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A copy of the test kubeconfig whose server is `addr` (for example a
/// [`FreezableProxy`] in front of the apiserver), written to `path`.
pub fn kubeconfig_via(addr: std::net::SocketAddr, path: &std::path::Path) -> Result<(), Error> {
    let text = std::fs::read_to_string(kubeconfig_path())?;
    let mut done = false;
    let rewritten: Vec<String> = text
        .lines()
        .map(|line| match line.trim_start().strip_prefix("server: ") {
            Some(_) if !done => {
                done = true;
                let indent = &line[..line.len() - line.trim_start().len()];
                format!("{indent}server: https://{addr}")
            }
            _ => line.to_string(),
        })
        .collect();
    std::fs::write(path, rewritten.join("\n") + "\n")?;
    Ok(())
}

/// The apiserver's address from the test kubeconfig.
pub fn apiserver_addr() -> Result<std::net::SocketAddr, Error> {
    let text = std::fs::read_to_string(kubeconfig_path())?;
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix("server: "))
        .and_then(|url| url.trim().strip_prefix("https://"))
        .and_then(|hostport| hostport.trim_end_matches('/').parse().ok())
        .ok_or_else(|| Error::Yaml("no https://IP:PORT server in the kubeconfig".into()))
}

/// Orders through an untyped API: for objects the typed `Order` can't read.
pub fn untyped_orders(client: &Client, namespace: &str) -> Api<kube::core::DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &kube::core::ApiResource::erase::<dishpatch_api::Order>(&()),
    )
}

/// Makes the existing Order `name` one the apiserver stores but the Rust
/// types can't parse, as a broken tool could: `9999-12-31T23:59:59Z` is a
/// valid date-time to the CRD schema, yet past the largest timestamp jiff
/// (and so `Order`) holds. Its kitchen section says `kitchen_state`.
pub async fn break_order(
    client: &Client,
    namespace: &str,
    name: &str,
    kitchen_state: &str,
) -> Result<(), Error> {
    let patch = serde_json::json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order",
        "status": {"kitchen": {"state": kitchen_state, "estimatedReadyAt": "9999-12-31T23:59:59Z"}}});
    untyped_orders(client, namespace)
        .patch_status(
            name,
            &PatchParams::apply("a-broken-tool").force(),
            &Patch::Apply(&patch),
        )
        .await?;
    Ok(())
}

/// Server-sent events as tests read them off a streaming body.
pub mod sse {
    /// One event: its type (`message` unless named), id and data.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SseEvent {
        pub event: String,
        pub id: String,
        pub data: String,
    }

    /// Takes the next complete event off the front of `buf`, skipping blocks
    /// that carry neither `event:` nor `data:` (keep-alives, comments);
    /// `None` until a whole event has arrived.
    pub fn take_event(buf: &mut String) -> Option<SseEvent> {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut ev = SseEvent {
                event: "message".into(),
                id: String::new(),
                data: String::new(),
            };
            let mut any = false;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    ev.event = v.trim().into();
                    any = true;
                } else if let Some(v) = line.strip_prefix("id:") {
                    ev.id = v.trim().into();
                } else if let Some(v) = line.strip_prefix("data:") {
                    ev.data.push_str(v.trim_start());
                    any = true;
                }
            }
            if any {
                return Some(ev);
            }
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn keep_alives_are_skipped_and_partial_events_wait() {
            let mut buf =
                String::from(": keep-alive\n\nevent: phase\nid: 7\ndata: {\"a\":1}\n\nevent: pha");
            let ev = take_event(&mut buf);
            assert_eq!(
                ev,
                Some(SseEvent {
                    event: "phase".into(),
                    id: "7".into(),
                    data: "{\"a\":1}".into()
                })
            );
            assert_eq!(take_event(&mut buf), None, "half an event is not an event");
            buf.push_str("se\ndata: x\n\n");
            assert_eq!(take_event(&mut buf).map(|e| e.event), Some("phase".into()));
        }
    }
}
