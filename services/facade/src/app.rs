//! The router: API routes, the web pages, and the middleware every request
//! passes (authentication, rate limiting, timeout, problem details, metrics).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use kube::Client;
use serde::de::DeserializeOwned;

use crate::auth::{Authn, Keys, Role};
use crate::cache::Caches;
use crate::metrics::{Metrics, RequestLabels};
use crate::problem::Problem;
use crate::ratelimit::RateLimiter;
use crate::{courier, events, openapi, orders, restaurants, staff};

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub caches: Caches,
    pub client: Client,
    pub keys: Keys,
    pub metrics: Arc<Metrics>,
    pub limiter: Arc<RateLimiter>,
    /// Deadline of each apiserver call.
    pub api_timeout: Duration,
    /// Deadline of a whole (non-streaming) request.
    pub request_timeout: Duration,
    pub dev_login: bool,
    /// Open live-tracking streams per subject, capped.
    pub streams: Arc<crate::events::Streams>,
    /// Order history: orders that have left the cluster. `None` without a database.
    pub archive: Option<Arc<dishpatch_archive::Archive>>,
}

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/restaurants", get(restaurants::list))
        .route("/restaurants/{name}", get(restaurants::get_one))
        .route("/restaurants/{name}/orders", get(staff::orders))
        .route("/restaurants/{name}/events", get(events::restaurant_stream))
        .route(
            "/restaurants/{name}/orders/{id}/confirm",
            post(staff::confirm),
        )
        .route(
            "/restaurants/{name}/orders/{id}/decline",
            post(staff::decline),
        )
        .route("/restaurants/{name}/orders/{id}/ready", post(staff::ready))
        .route("/restaurants/{name}/open", post(staff::open))
        .route("/restaurants/{name}/close", post(staff::close))
        .route(
            "/restaurants/{name}/menu/{item}/sold-out",
            post(staff::sold_out),
        )
        .route(
            "/restaurants/{name}/menu/{item}/restock",
            post(staff::restock),
        )
        .route("/orders", post(orders::place).get(orders::list))
        .route("/orders/{id}", get(orders::get_one))
        .route("/orders/{id}/cancel", post(orders::cancel))
        .route("/orders/{id}/feedback", post(orders::feedback))
        .route("/orders/{id}/events", get(events::stream))
        .route("/courier", get(courier::me))
        .route("/courier/shift", post(courier::shift))
        .route("/courier/offer", get(courier::offer))
        .route("/courier/offer/accept", post(courier::accept))
        .route("/courier/pickup", post(courier::pickup))
        .route("/courier/dropoff", post(courier::dropoff))
        .route("/openapi.json", get(openapi::spec))
        .route("/docs", get(openapi::docs))
        .fallback(|| async { Problem::not_found("no such endpoint") });

    let mut app = Router::new()
        .nest("/api/v1", api)
        .route(
            "/",
            get(|| async { Html(include_str!("../web/index.html")) }),
        )
        .route(
            "/courier",
            get(|| async { Html(include_str!("../web/courier.html")) }),
        )
        .route(
            "/restaurant",
            get(|| async { Html(include_str!("../web/restaurant.html")) }),
        );
    if state.dev_login {
        app = app.route("/dev/token", post(dev_token));
    }
    app.fallback(|| async { Problem::not_found("no such page") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Authenticates, rate-limits, bounds the time of, and counts every request,
/// and finishes problem responses (instance, WWW-Authenticate).
async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let method = crate::metrics::method_label(req.method()).to_string();

    let authn = match crate::auth::bearer(req.headers()) {
        None => Authn::None,
        Some(token) => match state.keys.verify(token) {
            Ok(claims) => Authn::Valid(claims),
            Err(_) => Authn::Invalid,
        },
    };
    let key = match &authn {
        Authn::Valid(c) => format!("sub:{}", c.sub),
        _ => {
            let ip = req
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip().to_string())
                .unwrap_or_default();
            format!("ip:{ip}")
        }
    };
    req.extensions_mut().insert(authn);

    // Every request is throttled per client: probes and scrapes are on the
    // admin listener, not here.
    let response = if let Err(retry_after) = state.limiter.check(&key) {
        state.metrics.rate_limited.inc();
        let mut p = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            format!("too many requests; retry in {retry_after} s"),
        );
        p.retry_after = Some(retry_after);
        p.render()
    } else {
        match tokio::time::timeout(state.request_timeout, next.run(req)).await {
            Ok(r) => r,
            Err(_) => Problem::unavailable("the request took too long").render(),
        }
    };
    let response = finish_problem(response, &path);
    let code = format!("{}xx", response.status().as_u16() / 100);
    if response.status() == StatusCode::SERVICE_UNAVAILABLE {
        state.metrics.api_unavailable.inc();
    }
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels { method, code })
        .inc();
    response
}

fn finish_problem(response: Response, path: &str) -> Response {
    let status = response.status();
    let problem = match response.extensions().get::<Problem>() {
        Some(p) => p.clone(),
        // axum's own plain-text rejections (405, unmatched routes) become problems too.
        None if (status.is_client_error() || status.is_server_error())
            && !response.headers().contains_key(header::CONTENT_TYPE)
            || response
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"text/plain"))
                && (status.is_client_error() || status.is_server_error()) =>
        {
            Problem::new(
                status,
                "http",
                status.canonical_reason().unwrap_or("error").to_string(),
            )
        }
        None => return response,
    };
    if problem.instance.is_some() {
        return response;
    }
    let mut problem = problem;
    problem.instance = Some(path.to_string());
    let mut fresh = problem.render();
    if problem.status == 401 {
        fresh.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"dishpatch\""),
        );
    }
    fresh
}

/// A JSON request body whose errors are problem details naming the field.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request<Body>, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| {
                let v = v.trim();
                v.eq_ignore_ascii_case("application/json") || v.ends_with("+json")
            })
            .unwrap_or(false);
        if !json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too-large",
                    format!("the body is larger than {BODY_LIMIT} bytes"),
                )
            } else {
                Problem::bad_request(format!("reading the body: {e}"))
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses a body: syntax errors are 400, wrong shapes 422 with the field path.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    match serde_path_to_error::deserialize::<_, T>(de) {
        Ok(v) => Ok(v),
        Err(e) => {
            let field = e.path().to_string();
            let inner = e.into_inner();
            // Only the error's position and kind, never the body's content.
            let message = inner.to_string();
            if inner.is_data() {
                let mut field = if field == "." { String::new() } else { field };
                // serde reports a missing field at its parent; name the field itself.
                if let Some(name) = message
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split('`').next())
                {
                    field = if field.is_empty() {
                        name.to_string()
                    } else {
                        format!("{field}.{name}")
                    };
                }
                let mut p = Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    if field.is_empty() {
                        message.clone()
                    } else {
                        format!("{field}: {message}")
                    },
                );
                p = p.field(
                    if field.is_empty() {
                        "body".into()
                    } else {
                        field
                    },
                    message,
                );
                Err(p)
            } else {
                Err(Problem::bad_request(format!("malformed JSON: {message}"))
                    .field("body", message))
            }
        }
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DevTokenBody {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: Option<Role>,
}

/// `POST /dev/token` (only with `--dev-login`): a 12-hour token for local use.
async fn dev_token(State(state): State<AppState>, body: Bytes) -> Result<Response, Problem> {
    let body: DevTokenBody = if body.is_empty() {
        DevTokenBody::default()
    } else {
        parse_json(&body)?
    };
    let role = body.role.unwrap_or(Role::Customer);
    if role == Role::Admin {
        return Err(Problem::forbidden(
            "dev login mints customer and courier tokens only",
        ));
    }
    let sub = body.sub.unwrap_or_else(|| "dev-customer".to_string());
    let mut claims = crate::auth::claims(&sub, role, Duration::from_secs(12 * 3600));
    claims.name = Some(body.name.unwrap_or_else(|| sub.clone()));
    claims.email = Some(format!("{sub}@example.com"));
    let token = state
        .keys
        .mint(&claims)
        .map_err(|e| Problem::internal(e.to_string()))?;
    Ok(axum::Json(serde_json::json!({"token": token, "sub": sub, "role": role})).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::views::PlaceOrder;

    #[test]
    fn body_errors_name_the_field() {
        let p = parse_json::<PlaceOrder>(br#"{"restaurant":"r","items":[{"menuItem":"x","quantity":"two"}],"deliveryAddress":{"street":"s","city":"c","postalCode":"1","country":"DE"},"payment":{"token":"tok_visa"}}"#).unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(p.errors[0].field, "items[0].quantity");
        let p = parse_json::<PlaceOrder>(b"{not json").unwrap_err();
        assert_eq!(p.status, 400);
        let p = parse_json::<PlaceOrder>(br#"{"restaurant":"r"}"#).unwrap_err();
        assert_eq!(p.status, 422);
        assert_eq!(p.errors[0].field, "items");
    }
}
