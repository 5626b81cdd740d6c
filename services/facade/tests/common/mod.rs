//! Runs the real façade binary against the real local apiserver, in a
//! namespace of its own, and talks to it over plain HTTP on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use dishpatch_testkit::TestNamespace;
use dishpatch_testkit::facade::mint_token;
use dishpatch_testkit::net::free_port;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_dishpatch-facade");

pub struct Facade {
    pub ns: TestNamespace,
    pub base: String,
    /// The admin listener: /healthz, /readyz, /metrics.
    pub admin: String,
    pub key_file: PathBuf,
    /// Everything the façade printed (info and up).
    pub log: PathBuf,
    http: HttpClient<HttpConnector, Full<Bytes>>,
    _child: Child,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub json: serde_json::Value,
}

impl Reply {
    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl Facade {
    /// A namespace with a restaurant `trattoria` (pizza, water) and the
    /// façade serving it.
    pub async fn start(prefix: &str, extra_args: &[&str]) -> Facade {
        Self::start_with(prefix, extra_args, |_, _| async {}).await
    }

    /// Like [`start`](Self::start), running `setup` (client, namespace) in
    /// the namespace before the façade starts.
    pub async fn start_with<F, Fut>(prefix: &str, extra_args: &[&str], setup: F) -> Facade
    where
        F: FnOnce(kube::Client, String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        Self::launch(prefix, None, extra_args, setup).await
    }

    /// Like [`start`](Self::start), with `key_args` (for example
    /// `["--jwt-key-dir", dir]`) instead of `--jwt-key-file <key_file>`.
    pub async fn start_keyed(prefix: &str, key_args: &[&str], extra_args: &[&str]) -> Facade {
        Self::launch(prefix, Some(key_args), extra_args, |_, _| async {}).await
    }

    /// [`start_keyed`](Self::start_keyed) running `setup` first, as [`start_with`](Self::start_with).
    pub async fn start_keyed_with<F, Fut>(
        prefix: &str,
        key_args: &[&str],
        extra_args: &[&str],
        setup: F,
    ) -> Facade
    where
        F: FnOnce(kube::Client, String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        Self::launch(prefix, Some(key_args), extra_args, setup).await
    }

    async fn launch<F, Fut>(
        prefix: &str,
        key_args: Option<&[&str]>,
        extra_args: &[&str],
        setup: F,
    ) -> Facade
    where
        F: FnOnce(kube::Client, String) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let client = dishpatch_testkit::client()
            .await
            .expect("control plane (make up)");
        dishpatch_testkit::ensure_crds(&client).await.unwrap();
        let ns = TestNamespace::create(&client, prefix).await.unwrap();
        let restaurant = dishpatch_testkit::fixtures::restaurant("trattoria", true, None);
        ns.api::<dishpatch_api::Restaurant>()
            .create(&Default::default(), &restaurant)
            .await
            .unwrap();

        setup(client.clone(), ns.name.clone()).await;
        let key_file = std::env::temp_dir().join(format!("{}.jwt-key", ns.name));
        std::fs::write(&key_file, "test-signing-key-0123456789abcdef\n").unwrap();
        let port = free_port();
        let admin_port = free_port();
        let log = std::env::temp_dir().join(format!("{}.facade.log", ns.name));
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--namespace", &ns.name]);
        match key_args {
            Some(args) => command.args(args),
            None => command.arg("--jwt-key-file").arg(&key_file),
        };
        let child = command
            .args(extra_args)
            .env("KUBECONFIG", dishpatch_testkit::kubeconfig_path())
            .env_remove("DISHPATCH_NAMESPACE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let facade = Facade {
            ns,
            base: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
            key_file,
            log,
            http: HttpClient::builder(TokioExecutor::new()).build_http(),
            _child: child,
        };
        let (ready, _) = dishpatch_testkit::eventually(
            Duration::from_secs(30),
            || async {
                facade
                    .call(Method::GET, &facade.admin_url("/readyz"), None, &[], None)
                    .await
                    .map(|r| r.status)
                    .ok()
            },
            |s| *s == Some(StatusCode::OK),
        )
        .await;
        assert!(
            ready,
            "façade did not become ready; log: {}",
            facade.log.display()
        );
        // The restaurant reaches the cache through the watch.
        let (seen, _) = dishpatch_testkit::eventually(
            Duration::from_secs(10),
            || async {
                facade
                    .call(
                        Method::GET,
                        "/api/v1/restaurants/trattoria",
                        None,
                        &[],
                        None,
                    )
                    .await
                    .map(|r| r.status)
                    .ok()
            },
            |s| *s == Some(StatusCode::OK),
        )
        .await;
        assert!(seen, "restaurant not in the façade's cache");
        facade
    }

    /// The façade process's id (to show it was not restarted).
    pub fn pid(&self) -> Option<u32> {
        self._child.id()
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    /// A token minted by the binary's own `token` subcommand.
    pub async fn token(&self, role: &str, sub: &str) -> String {
        self.token_for(role, sub, "10m").await
    }

    /// A token valid for `ttl` (for example `3s`).
    pub async fn token_for(&self, role: &str, sub: &str, ttl: &str) -> String {
        mint_token(BIN, &self.key_file, role, sub, ttl).await
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
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
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into())
            })
        };
        Ok(Reply {
            status,
            headers,
            json,
        })
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<serde_json::Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, String> {
        // A full URL (the admin listener's) or a path on the public one.
        let uri = if path.starts_with("http://") {
            path.to_string()
        } else {
            format!("{}{path}", self.base)
        };
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
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

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, Some(token), &[], None)
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, token: &str, body: serde_json::Value) -> Reply {
        self.call(Method::POST, path, Some(token), &[], Some(body))
            .await
            .unwrap()
    }
}

impl Drop for Facade {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.key_file);
    }
}

/// A valid order body for `trattoria`.
pub fn order_body(items: &[(&str, i32)]) -> serde_json::Value {
    serde_json::json!({
        "restaurant": "trattoria",
        "items": items.iter().map(|(m, q)| serde_json::json!({"menuItem": m, "quantity": q})).collect::<Vec<_>>(),
        "deliveryAddress": {"street": "Torstraße 1", "city": "Berlin", "postalCode": "10119", "country": "DE"},
        "payment": {"token": "tok_visa"}
    })
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

    /// Whether the server ends the stream within `timeout` (events and
    /// keep-alives before the end are read and dropped).
    pub async fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// The next event (comments and keep-alives skipped), or None on timeout/end.
    pub async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = dishpatch_testkit::sse::take_event(&mut self.buf) {
                return Some(ev);
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .ok()??
                .ok()?;
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(&String::from_utf8_lossy(&data));
            }
        }
    }
}
