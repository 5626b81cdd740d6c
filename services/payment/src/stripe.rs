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
        let response = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| GatewayError::Retryable("stripe did not answer in time".into()))?
            .map_err(|e| GatewayError::Retryable(format!("stripe: {e}")))?;
        let status = response.status();
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
            let mut fields = vec![
                ("amount", amount.as_str()),
                ("currency", currency.as_str()),
                ("confirm", "true"),
                ("payment_method_types[]", "card"),
                ("description", req.description.as_str()),
                ("metadata[order_uid]", req.order_uid.as_str()),
            ];
            // `tok_…` card tokens go through payment_method_data; `pm_…` are payment methods.
            if req.token.starts_with("tok_") {
                fields.push(("payment_method_data[type]", "card"));
                fields.push(("payment_method_data[card][token]", req.token.as_str()));
            } else {
                fields.push(("payment_method", req.token.as_str()));
            }
            let (status, answer) = self
                .post::<PaymentIntent>("/v1/payment_intents", &req.idempotency_key, form(&fields))
                .await?;
            match answer {
                Ok(pi) => Ok(match pi.status.as_str() {
                    "succeeded" | "processing" | "requires_capture" => {
                        ChargeOutcome::Succeeded { payment_id: pi.id }
                    }
                    other => ChargeOutcome::Declined {
                        reason: pi
                            .last_payment_error
                            .and_then(|e| e.message)
                            .unwrap_or_else(|| format!("payment intent {} is {other}", pi.id)),
                    },
                }),
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

    #[test]
    fn form_encoding() {
        assert_eq!(
            form(&[("a b", "c&d"), ("metadata[x]", "ü")]),
            "a%20b=c%26d&metadata%5Bx%5D=%C3%BC"
        );
    }
}
