//! Signed webhooks for integrators: the CloudEvent JSON, POSTed with
//! `Dishpatch-Timestamp: <unix seconds>` and
//! `Dishpatch-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
//!
//! A receiver recomputes the HMAC over the timestamp header, a dot and the
//! raw body with the shared secret, compares in constant time, and refuses
//! old timestamps so a captured request can't be replayed later.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HeaderValue, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use sha2::Sha256;

pub const TIMESTAMP_HEADER: &str = "Dishpatch-Timestamp";
pub const SIGNATURE_HEADER: &str = "Dishpatch-Signature";

/// Why a webhook was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook URL {0} must be http:// or https:// with a host")]
    Url(Uri),
    #[error("no trusted CA certificates for an https webhook: {0}")]
    Roots(std::io::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the webhook secret is empty")]
    EmptySecret,
    #[error("the webhook secret is not a usable HMAC key")]
    Key,
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("sending: {0}")]
    Send(#[from] hyper_util::client::legacy::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the receiver answered {0}")]
    Status(StatusCode),
}

impl WebhookError {
    /// Whether sending again can't help: the receiver refused the request
    /// itself (4xx other than 408 and 429), or answered with a redirect we
    /// don't follow. Timeouts, connection errors and 5xx may pass.
    pub fn is_permanent(&self) -> bool {
        match self {
            WebhookError::Status(s) => {
                s.is_redirection()
                    || (s.is_client_error()
                        && *s != StatusCode::REQUEST_TIMEOUT
                        && *s != StatusCode::TOO_MANY_REQUESTS)
            }
            WebhookError::Request(_) => true,
            _ => false,
        }
    }
}

/// The HMAC keyed with the webhook secret.
pub fn keyed(secret: &[u8]) -> Result<Hmac<Sha256>, WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::EmptySecret);
    }
    <Hmac<Sha256> as KeyInit>::new_from_slice(secret).map_err(|_| WebhookError::Key)
}

/// The signature header value for `body` sent at `timestamp`.
pub fn signature(key: &Hmac<Sha256>, timestamp: i64, body: &[u8]) -> String {
    let mut mac = key.clone();
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Posts events to one integrator URL.
pub struct Webhook {
    url: Uri,
    key: Hmac<Sha256>,
    timeout: Duration,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Webhook {
    pub fn new(url: Uri, secret: &[u8], timeout: Duration) -> Result<Self, WebhookError> {
        let key = keyed(secret)?;
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(WebhookError::Url(url)),
        };
        if url.host().is_none() {
            return Err(WebhookError::Url(url));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = if https {
            HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(provider)
                .map_err(WebhookError::Roots)?
        } else {
            // Plain http needs no CA bundle, so don't demand one.
            HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            )
        };
        let connector = builder.https_or_http().enable_http1().build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            url,
            key,
            timeout,
            client,
        })
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// POSTs `body` (the CloudEvent JSON) signed with the current time, and
    /// succeeds only on a 2xx answer within the timeout. `traceparent` lets
    /// an integrator join the order's trace.
    pub async fn post(&self, body: Vec<u8>, traceparent: &str) -> Result<(), WebhookError> {
        let timestamp = jiff::Timestamp::now().as_second();
        let mut request = Request::post(self.url.clone());
        // Trace context is a courtesy: a value that can't be a header is left out.
        if let Ok(value) = HeaderValue::from_str(traceparent) {
            request = request.header("traceparent", value);
        }
        let request = request
            .header(CONTENT_TYPE, "application/cloudevents+json")
            .header(
                USER_AGENT,
                concat!("dishpatch-notification/", env!("CARGO_PKG_VERSION")),
            )
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature(&self.key, timestamp, &body))
            .body(Full::new(Bytes::from(body)))?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| WebhookError::Timeout(self.timeout))??;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(WebhookError::Status(status))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        // From `printf '%s' '1700000000.{"a":1}' | openssl dgst -sha256 -hmac s3cret`.
        let key = keyed(b"s3cret").unwrap();
        assert_eq!(
            signature(&key, 1_700_000_000, br#"{"a":1}"#),
            "v1=1698a50bc74d1ff1db85c4e0a5297c2ad9fdba245d5737cdb789e4cc6e098940"
        );
        assert_ne!(
            signature(&key, 1_700_000_001, br#"{"a":1}"#),
            signature(&key, 1_700_000_000, br#"{"a":1}"#)
        );
    }

    #[test]
    fn classifies_answers() {
        for (code, permanent) in [
            (400, true),
            (404, true),
            (301, true),
            (408, false),
            (429, false),
            (500, false),
            (503, false),
        ] {
            let e = WebhookError::Status(StatusCode::from_u16(code).unwrap());
            assert_eq!(e.is_permanent(), permanent, "{code}");
        }
        assert!(!WebhookError::Timeout(Duration::from_secs(1)).is_permanent());
    }

    #[test]
    fn refuses_odd_urls_and_empty_secrets() {
        let t = Duration::from_secs(1);
        assert!(matches!(
            Webhook::new("ftp://example.com/x".parse().unwrap(), b"s", t),
            Err(WebhookError::Url(_))
        ));
        assert!(matches!(
            Webhook::new("/relative".parse().unwrap(), b"s", t),
            Err(WebhookError::Url(_))
        ));
        assert!(matches!(
            Webhook::new("http://127.0.0.1:1/x".parse().unwrap(), b"", t),
            Err(WebhookError::EmptySecret)
        ));
        assert!(Webhook::new("http://127.0.0.1:1/x".parse().unwrap(), b"s", t).is_ok());
    }
}
