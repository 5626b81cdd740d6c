//! Prometheus metrics of the façade.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// One of the methods HTTP defines, else `OTHER` (see [`method_label`]).
    pub method: String,
    /// Status class (`2xx`, `4xx`, …): bounded, unlike paths with ids.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

impl ReloadLabels {
    pub const OK: Self = Self { result: "ok" };
    pub const ERROR: Self = Self { result: "error" };
}

#[derive(Default)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub orders_created: Counter,
    pub idempotent_replays: Counter,
    pub rate_limited: Counter,
    pub sse_clients: Gauge,
    pub api_unavailable: Counter,
    pub key_reloads: Family<ReloadLabels, Counter>,
    pub jwt_keys: Gauge,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("dishpatch_facade");
        r.register(
            "http_requests",
            "HTTP requests served, by method and status class",
            m.requests.clone(),
        );
        r.register("orders_created", "Orders created", m.orders_created.clone());
        r.register(
            "idempotent_replays",
            "Order placements answered with an existing order (same Idempotency-Key)",
            m.idempotent_replays.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused with 429",
            m.rate_limited.clone(),
        );
        r.register(
            "sse_clients",
            "Open live-tracking streams",
            m.sse_clients.clone(),
        );
        r.register(
            "api_unavailable",
            "Requests answered 503 because the Kubernetes API failed or timed out",
            m.api_unavailable.clone(),
        );
        r.register(
            "jwt_key_reloads",
            "Changed JWT key sets seen: loaded (ok) or refused, keeping the last good keys (error)",
            m.key_reloads.clone(),
        );
        r.register(
            "jwt_keys",
            "JWT keys tokens are accepted with, counting removed keys still in their grace",
            m.jwt_keys.clone(),
        );
        m
    }
}

/// The `method` label for a request. The method comes from the client, and
/// any token is a valid extension method: a label taken as sent would let a
/// caller create series without end.
pub fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn invented_methods_share_one_label() {
        let labels: std::collections::HashSet<&str> = (0..1000)
            .map(|i| {
                method_label(&axum::http::Method::from_bytes(format!("X{i}").as_bytes()).unwrap())
            })
            .collect();
        assert_eq!(labels.into_iter().collect::<Vec<_>>(), vec!["OTHER"]);
        assert_eq!(method_label(&axum::http::Method::POST), "POST");
    }
}
