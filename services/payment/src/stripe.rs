//! Stripe's PaymentIntents API. The idempotency key (derived from the order
//! uid) goes in Stripe's `Idempotency-Key` header, so a retried charge is
//! the same charge. Tested against Stripe's own `stripe-mock`.

use std::time::Duration;

use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use dishpatch_api::events::OrderRef;

use crate::gateway::{
    ChargeOutcome, ChargeRequest, GatewayError, GatewayFuture, PaymentGateway, RefundRequest,
};

const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Stripe {
    base: String,
    api_key: String,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

#[derive(Deserialize)]
struct PaymentIntent {
    id: String,
    status: String,
    #[serde(default)]
    last_payment_error: Option<StripeError>,
    #[serde(default)]
    next_action: Option<NextAction>,
    #[serde(default)]
    metadata: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct NextAction {
    #[serde(default)]
    redirect_to_url: Option<RedirectToUrl>,
}

#[derive(Deserialize)]
struct RedirectToUrl {
    #[serde(default)]
    url: Option<String>,
}

impl PaymentIntent {
    /// What the intent's status means for the order.
    fn outcome(self) -> Option<ChargeOutcome> {
        Some(match self.status.as_str() {
            "succeeded" | "processing" | "requires_capture" => ChargeOutcome::Succeeded {
                payment_id: self.id,
            },
            "requires_action" => ChargeOutcome::RequiresAction {
                url: self
                    .next_action
                    .and_then(|a| a.redirect_to_url)
                    .and_then(|r| r.url),
                payment_id: self.id,
            },
            other => ChargeOutcome::Declined {
                reason: self
                    .last_payment_error
                    .and_then(|e| e.message)
                    .unwrap_or_else(|| format!("payment intent {} is {other}", self.id)),
            },
        })
    }
}

/// The order a PaymentIntent was made for (from the metadata the charge
/// sets), to route the provider's webhooks.
pub fn order_of(metadata: &std::collections::HashMap<String, String>) -> Option<OrderRef> {
    Some(OrderRef {
        namespace: metadata.get("order_namespace")?.clone(),
        name: metadata.get("order_name")?.clone(),
        uid: metadata.get("order_uid")?.clone(),
    })
}

#[derive(Deserialize)]
struct PaymentMethod {
    id: String,
}

#[derive(Deserialize)]
struct Refund {
    id: String,
}

#[derive(Deserialize)]
struct StripeError {
    #[serde(default)]
    message: Option<String>,
    #[serde(rename = "type", default)]
    type_: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: StripeError,
}

/// An id as one URL path segment: Stripe ids are `[A-Za-z0-9_]`; anything
/// else is dropped rather than let it address another path.
fn path_segment(id: &str) -> String {
    id.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

/// `application/x-www-form-urlencoded`, as Stripe's API wants.
fn form(fields: &[(&str, &str)]) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

impl Stripe {
    pub fn new(base: &str, api_key: String) -> Result<Self, GatewayError> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| GatewayError::Permanent(format!("loading CA roots: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            api_key,
            client: Client::builder(TokioExecutor::new()).build(https),
        })
    }

    /// A child span of the handler's: Stripe calls show in the order's trace.
    #[tracing::instrument(name = "stripe", skip_all, fields(
        otel.name = %format!("POST {path}"),
        otel.kind = "client",
        http.request.method = "POST",
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
    ))]
    async fn post<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
        key: &str,
        body: String,
    ) -> Result<(StatusCode, Result<T, StripeError>), GatewayError> {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.api_key))
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header("Idempotency-Key", key)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| GatewayError::Permanent(e.to_string()))?;
        self.send(req).await
    }

    #[tracing::instrument(name = "stripe", skip_all, fields(
        otel.name = %format!("GET {path}"),
        otel.kind = "client",
        http.request.method = "GET",
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
    ))]
    async fn get<T: for<'de> Deserialize<'de>>(
        &self,
        path: &str,
    ) -> Result<(StatusCode, Result<T, StripeError>), GatewayError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{path}", self.base))
            .header(header::AUTHORIZATION, format!("Bearer {}", self.api_key))
            .body(Full::new(Bytes::new()))
            .map_err(|e| GatewayError::Permanent(e.to_string()))?;
        self.send(req).await
    }

    /// The order a PaymentIntent belongs to, from its metadata: charge and
    /// dispute webhooks name only the intent.
    pub async fn intent_order(&self, id: &str) -> Result<Option<OrderRef>, GatewayError> {
        match self
            .get::<PaymentIntent>(&format!("/v1/payment_intents/{}", path_segment(id)))
            .await?
        {
            (_, Ok(pi)) => Ok(order_of(&pi.metadata)),
            (StatusCode::NOT_FOUND, Err(_)) => Ok(None),
            (status, Err(e)) => Err(classify(status, e)),
        }
    }

    async fn send<T: for<'de> Deserialize<'de>>(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Result<T, StripeError>), GatewayError> {
        let response = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| GatewayError::Retryable("stripe did not answer in time".into()))?
            .map_err(|e| GatewayError::Retryable(format!("stripe: {e}")))?;
        let status = response.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| GatewayError::Retryable(format!("reading stripe's answer: {e}")))?
            .to_bytes();
        if status.is_success() {
            let parsed = serde_json::from_slice::<T>(&bytes).map_err(|e| {
                GatewayError::Permanent(format!("unexpected answer from stripe: {e}"))
            })?;
            return Ok((status, Ok(parsed)));
        }
        let err = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error)
            .unwrap_or(StripeError {
                message: Some(String::from_utf8_lossy(&bytes).into_owned()),
                type_: None,
            });
        Ok((status, Err(err)))
    }
}

fn classify(status: StatusCode, err: StripeError) -> GatewayError {
    let message = err.message.unwrap_or_else(|| status.to_string());
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::CONFLICT
    {
        GatewayError::Retryable(message)
    } else {
        GatewayError::Permanent(format!(
            "{}: {message}",
            err.type_.unwrap_or_else(|| status.to_string())
        ))
    }
}

impl PaymentGateway for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn charge<'a>(&'a self, req: &'a ChargeRequest) -> GatewayFuture<'a, ChargeOutcome> {
        Box::pin(async move {
            let amount = req.amount.to_string();
            let currency = req.currency.to_ascii_lowercase();
            // A legacy card token (`tok_…`) becomes a PaymentMethod first;
            // `pm_…` already is one.
            let payment_method = if req.token.starts_with("tok_") {
                let body = form(&[("type", "card"), ("card[token]", req.token.as_str())]);
                let key = format!("{}:payment-method", req.idempotency_key);
                match self
                    .post::<PaymentMethod>("/v1/payment_methods", &key, body)
                    .await?
                {
                    (_, Ok(pm)) => pm.id,
                    (status, Err(e)) if status == StatusCode::PAYMENT_REQUIRED => {
                        return Ok(ChargeOutcome::Declined {
                            reason: e
                                .message
                                .unwrap_or_else(|| "Your card was declined.".into()),
                        });
                    }
                    (status, Err(e)) => return Err(classify(status, e)),
                }
            } else {
                req.token.clone()
            };
            let fields = [
                ("amount", amount.as_str()),
                ("currency", currency.as_str()),
                ("confirm", "true"),
                ("payment_method_types[]", "card"),
                ("payment_method", payment_method.as_str()),
                ("description", req.description.as_str()),
                // Webhooks find the order by these.
                ("metadata[order_uid]", req.order_uid.as_str()),
                ("metadata[order_namespace]", req.order.namespace.as_str()),
                ("metadata[order_name]", req.order.name.as_str()),
            ];
            let (status, answer) = self
                .post::<PaymentIntent>("/v1/payment_intents", &req.idempotency_key, form(&fields))
                .await?;
            match answer {
                Ok(pi) => Ok(pi.outcome().unwrap_or(ChargeOutcome::Declined {
                    reason: "unreadable payment intent".into(),
                })),
                // A card error (402) is an answer: the card was declined.
                Err(e) if status == StatusCode::PAYMENT_REQUIRED => Ok(ChargeOutcome::Declined {
                    reason: e
                        .message
                        .unwrap_or_else(|| "Your card was declined.".into()),
                }),
                Err(e) => Err(classify(status, e)),
            }
        })
    }

    fn lookup<'a>(&'a self, payment_id: &'a str) -> GatewayFuture<'a, Option<ChargeOutcome>> {
        Box::pin(async move {
            let path = format!("/v1/payment_intents/{}", path_segment(payment_id));
            match self.get::<PaymentIntent>(&path).await? {
                (_, Ok(pi)) => Ok(pi
                    .outcome()
                    .filter(|o| !matches!(o, ChargeOutcome::RequiresAction { .. }))),
                (status, Err(e)) => Err(classify(status, e)),
            }
        })
    }

    fn cancel<'a>(&'a self, payment_id: &'a str) -> GatewayFuture<'a, ()> {
        Box::pin(async move {
            let path = format!("/v1/payment_intents/{}/cancel", path_segment(payment_id));
            let key = format!("{payment_id}:cancel");
            match self
                .post::<PaymentIntent>(&path, &key, String::new())
                .await?
            {
                (_, Ok(_)) => Ok(()),
                (status, Err(e)) => Err(classify(status, e)),
            }
        })
    }

    fn refund<'a>(&'a self, req: &'a RefundRequest) -> GatewayFuture<'a, String> {
        Box::pin(async move {
            let amount = req.amount.to_string();
            let body = form(&[
                ("payment_intent", req.payment_id.as_str()),
                ("amount", amount.as_str()),
            ]);
            match self
                .post::<Refund>("/v1/refunds", &req.idempotency_key, body)
                .await?
            {
                (_, Ok(refund)) => Ok(refund.id),
                (status, Err(e)) => Err(classify(status, e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dishpatch_testkit::net::free_port;

    /// Stripe's own mock server, built by `hack/tools.sh` (hack/deps.sh).
    struct StripeMock {
        child: std::process::Child,
        url: String,
    }

    impl Drop for StripeMock {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    async fn stripe_mock() -> StripeMock {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = std::process::Command::new(root.join("hack/tools.sh"))
            .args(["path", "stripe-mock"])
            .output()
            .unwrap();
        let bin = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(
            std::path::Path::new(&bin).exists(),
            "{bin} is missing: run hack/deps.sh"
        );
        let (http, https) = (free_port(), free_port());
        let child = std::process::Command::new(&bin)
            .args([
                "-http-addr",
                &format!("127.0.0.1:{http}"),
                "-https-addr",
                &format!("127.0.0.1:{https}"),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", http))
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        StripeMock {
            child,
            url: format!("http://127.0.0.1:{http}"),
        }
    }

    fn charge(key: &str, token: &str, currency: &str) -> ChargeRequest {
        ChargeRequest {
            idempotency_key: key.into(),
            order_uid: "0b9e4c1e-7f39-4b56-9d55-1f0c1e2d3a4b".into(),
            order: OrderRef {
                namespace: "test".into(),
                name: "o1".into(),
                uid: "0b9e4c1e-7f39-4b56-9d55-1f0c1e2d3a4b".into(),
            },
            amount: 2500,
            currency: currency.into(),
            token: token.into(),
            description: "dishpatch order test/o1".into(),
        }
    }

    /// The adapter's requests are valid for Stripe's API (stripe-mock checks
    /// them against Stripe's OpenAPI spec and answers with its fixtures).
    #[tokio::test]
    async fn speaks_the_stripe_api_as_stripe_mock_checks_it() {
        let mock = stripe_mock().await;
        let stripe = Stripe::new(&mock.url, "sk_test_123".into()).unwrap();
        for token in ["pm_card_visa", "tok_visa"] {
            match stripe.charge(&charge("k1", token, "EUR")).await.unwrap() {
                // stripe-mock answers every confirm with the same fixture
                // (`requires_payment_method`); a real account answers `succeeded`.
                ChargeOutcome::Succeeded { payment_id } => assert!(payment_id.starts_with("pi_")),
                ChargeOutcome::Declined { reason } => assert!(reason.contains("pi_"), "{reason}"),
                ChargeOutcome::RequiresAction { payment_id, .. } => {
                    assert!(payment_id.starts_with("pi_"))
                }
            }
        }
        let refund = stripe
            .refund(&RefundRequest {
                idempotency_key: "k1:refund".into(),
                order_uid: "u".into(),
                payment_id: "pi_123".into(),
                amount: 2500,
                currency: "EUR".into(),
            })
            .await
            .unwrap();
        assert!(refund.starts_with("re_"), "{refund}");
        // Nobody listening: retryable.
        let gone = Stripe::new(
            &format!("http://127.0.0.1:{}", free_port()),
            "sk_test_123".into(),
        )
        .unwrap();
        assert!(matches!(
            gone.charge(&charge("k3", "pm_card_visa", "EUR")).await,
            Err(GatewayError::Retryable(_))
        ));
    }

    #[test]
    fn errors_are_retried_only_when_retrying_can_help() {
        let e = |t: &str| StripeError {
            message: Some("m".into()),
            type_: Some(t.into()),
        };
        assert!(
            matches!(classify(StatusCode::BAD_REQUEST, e("invalid_request_error")), GatewayError::Permanent(m) if m.contains("invalid_request_error"))
        );
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, e("authentication_error")),
            GatewayError::Permanent(_)
        ));
        for s in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::CONFLICT,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert!(
                matches!(classify(s, e("api_error")), GatewayError::Retryable(_)),
                "{s}"
            );
        }
    }

    #[test]
    fn form_encoding() {
        assert_eq!(
            form(&[("a b", "c&d"), ("metadata[x]", "ü")]),
            "a%20b=c%26d&metadata%5Bx%5D=%C3%BC"
        );
    }
}
