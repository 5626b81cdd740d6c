//! Process plumbing every dishpatch binary shares: structured logs, the
//! `/healthz`, `/readyz` and `/metrics` endpoints, and shutdown on SIGTERM.

pub mod exposition;
pub mod time;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Structured logs: JSON when `LOG_FORMAT=json`, readable text otherwise;
/// levels from `RUST_LOG` (default `info`). When
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans also go to that OTLP/HTTP
/// collector as `service` (`OTEL_SERVICE_NAME` overrides it); without it
/// nothing is exported and no span is recorded for export.
///
/// Keep the returned guard until the process ends: dropping it flushes the
/// spans still batched.
pub fn init_tracing(service: &'static str) -> Telemetry {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let fmt = tracing_subscriber::fmt::layer().with_target(false);
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.compact().boxed()
    };
    let (otel, provider, problem) = match otlp_provider(service) {
        Ok(Some(provider)) => {
            use opentelemetry::trace::TracerProvider as _;
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer(service))
                .with_filter(tracing_subscriber::filter::filter_fn(exported));
            (Some(layer), Some(provider), None)
        }
        Ok(None) => (None, None, None),
        Err(e) => (None, None, Some(e)),
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    if let Some(e) = problem {
        tracing::warn!(error = %e, "not exporting spans: the OTLP exporter did not start");
    }
    Telemetry { provider }
}

/// What goes to the collector: our spans and events at `info` and above,
/// and the Kubernetes client's per-request spans (`debug` in kube), so each
/// API call is a child of the reconcile or handler that made it.
fn exported(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() <= tracing::Level::INFO
        || (meta.is_span() && meta.target().starts_with("kube_client"))
}

fn otlp_provider(
    service: &'static str,
) -> Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>, String> {
    let configured = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()));
    if !configured {
        return Ok(None);
    }
    // The blocking HTTP client must be made off the async runtime: it runs
    // one of its own, which tokio refuses to nest.
    let exporter = std::thread::spawn(|| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "the exporter's set-up panicked".to_string())??;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    Ok(Some(
        opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build(),
    ))
}

/// Flushes and stops span export when dropped.
#[must_use = "spans are flushed when this is dropped: keep it for the process's life"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Liveness and readiness as the process sees them.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    reason: Arc<std::sync::Mutex<String>>,
}

impl Health {
    pub fn set_ready(&self, ready: bool, reason: &str) {
        self.ready.store(ready, Ordering::SeqCst);
        if let Ok(mut r) = self.reason.lock() {
            *r = reason.to_string();
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn reason(&self) -> String {
        self.reason.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Something that refreshes gauges right before a scrape.
pub type BeforeScrape = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone)]
struct AppState {
    health: Health,
    registry: Arc<Registry>,
    before_scrape: Option<BeforeScrape>,
}

/// The admin endpoints: `/healthz`, `/readyz`, `/metrics` (OpenMetrics
/// text when the scraper asks for it, as Prometheus does; else the 0.0.4
/// text format, which `promtool check metrics` reads).
pub fn admin_router(
    health: Health,
    registry: Arc<Registry>,
    before_scrape: Option<BeforeScrape>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            health,
            registry,
            before_scrape,
        })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ok".to_string())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}", state.health.reason()),
        )
    }
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> impl IntoResponse {
    if let Some(refresh) = &state.before_scrape {
        refresh();
    }
    let mut body = String::new();
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) if exposition::wants_openmetrics(accept) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, exposition::OPENMETRICS)],
            body,
        )
            .into_response(),
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, exposition::TEXT)],
            exposition::to_text_format(&body),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Errors starting the HTTP server.
#[derive(Debug, thiserror::Error)]
#[error("binding {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// Serves `router` on `addr` until `shutdown` flips to true.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BindError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })?;
    tracing::info!(%addr, "serving admin endpoints");
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
        .map_err(|source| BindError { addr, source })
}

/// A channel that flips to `true` on SIGTERM or Ctrl-C.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        let _ = tx.send(true);
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}
