//! RFC 9457 problem details, and the mapping from every failure the façade
//! meets (bad input, apiserver answers, an unreachable apiserver) to one.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// Media type of every error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// One invalid field of a request.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, ToSchema)]
pub struct FieldError {
    /// Path of the field, e.g. `items[0].quantity` or `spec.items`.
    pub field: String,
    pub message: String,
}

/// An RFC 9457 problem details object.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDetails {
    /// A URI reference naming the problem type.
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The request path this problem occurred on (filled in by a middleware).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// The fields that were invalid, when the problem is about input.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// Seconds to wait before retrying (429 and 503).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

/// A problem, boxed so `Result<_, Problem>` stays small.
#[derive(Debug, Clone)]
pub struct Problem(Box<ProblemDetails>);

impl std::ops::Deref for Problem {
    type Target = ProblemDetails;
    fn deref(&self) -> &ProblemDetails {
        &self.0
    }
}

impl std::ops::DerefMut for Problem {
    fn deref_mut(&mut self) -> &mut ProblemDetails {
        &mut self.0
    }
}

impl Problem {
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Self {
        Self(Box::new(ProblemDetails {
            type_: format!("https://dishpatch.dev/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: Some(detail.into()),
            instance: None,
            errors: Vec::new(),
            retry_after: None,
        }))
    }

    pub fn field(mut self, field: impl Into<String>, message: impl Into<String>) -> Self {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
        self
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("{field}: {message}"),
        )
        .field(field, message)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", detail)
    }
    pub fn unavailable(detail: impl Into<String>) -> Self {
        let mut p = Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail);
        p.retry_after = Some(1);
        p
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", detail)
    }

    pub fn status_code(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Renders the problem (used again by the middleware that adds `instance`).
    pub fn render(&self) -> Response {
        let body = serde_json::to_vec(&*self.0).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (self.status_code(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(self.clone());
        response
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.render()
    }
}

/// A failed call to the apiserver.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("the Kubernetes API did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

impl KubeError {
    /// The apiserver's Status, when it answered with one.
    pub fn status(&self) -> Option<&kube::core::Status> {
        match self {
            KubeError::Kube(kube::Error::Api(s)) => Some(s),
            _ => None,
        }
    }
    pub fn is_already_exists(&self) -> bool {
        self.status().is_some_and(|s| s.is_already_exists())
    }
    pub fn is_conflict(&self) -> bool {
        self.status().is_some_and(|s| s.is_conflict())
    }
}

impl From<KubeError> for Problem {
    fn from(err: KubeError) -> Self {
        let Some(status) = err.status() else {
            // Transport failures and timeouts: the apiserver is unreachable or slow.
            tracing::warn!(error = %err, "kubernetes API unavailable");
            return Problem::unavailable("the order store is unavailable; retry shortly");
        };
        if status.is_invalid() {
            // Schema and CEL rejections: keep the apiserver's words and the field paths.
            let mut p = Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                status.message.clone(),
            );
            for cause in status.details.iter().flat_map(|d| d.causes.iter()) {
                let field = if cause.field.is_empty() {
                    "spec".to_string()
                } else {
                    cause.field.clone()
                };
                p = p.field(field, cause.message.clone());
            }
            return p;
        }
        match status.code {
            404 => Problem::not_found(status.message.clone()),
            409 => Problem::conflict(status.message.clone()),
            429 => {
                let mut p = Problem::unavailable("the Kubernetes API is throttling; retry shortly");
                p.retry_after = Some(
                    status
                        .details
                        .as_ref()
                        .map(|d| u64::from(d.retry_after_seconds.max(1)))
                        .unwrap_or(1),
                );
                p
            }
            // The façade's own identity is not allowed: an operator problem, not the caller's.
            401 | 403 => {
                tracing::error!(message = %status.message, "kubernetes API refused the façade");
                Problem::internal("the façade is not allowed to do this; see its logs")
            }
            500..=599 => Problem::unavailable("the order store is unavailable; retry shortly"),
            _ => {
                tracing::warn!(code = status.code, message = %status.message, "unexpected kubernetes API answer");
                Problem::internal("unexpected answer from the order store")
            }
        }
    }
}

/// Runs one apiserver call with a deadline, so an unreachable apiserver is a
/// 503, never a hung request.
pub async fn with_timeout<T>(
    timeout: std::time::Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, KubeError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map_err(KubeError::from),
        Err(_) => Err(KubeError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use kube::core::{Status, response::StatusCause, response::StatusDetails};

    #[test]
    fn invalid_status_maps_to_422_with_fields() {
        let status = Status::failure(
            "Order.dishpatch.dev \"x\" is invalid: spec.items: Invalid value",
            "Invalid",
        )
        .with_code(422)
        .with_details(StatusDetails {
            name: "x".into(),
            group: "dishpatch.dev".into(),
            kind: "Order".into(),
            uid: String::new(),
            causes: vec![StatusCause {
                reason: "FieldValueInvalid".into(),
                message: "each menu item may appear only once".into(),
                field: "spec.items".into(),
            }],
            retry_after_seconds: 0,
        });
        let p: Problem = KubeError::Kube(kube::Error::Api(status.boxed())).into();
        assert_eq!(p.status, 422);
        assert_eq!(p.errors[0].field, "spec.items");
    }

    #[test]
    fn timeout_maps_to_503() {
        let p: Problem = KubeError::Timeout(std::time::Duration::from_secs(5)).into();
        assert_eq!(p.status, 503);
        assert_eq!(p.retry_after, Some(1));
    }
}
