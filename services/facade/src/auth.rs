//! Bearer JWTs (HS256): who the caller is and what role they have.

use std::path::Path;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::problem::Problem;

/// Shortest signing key accepted; HS256 with less is guessable.
const MIN_KEY_BYTES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Courier,
    Admin,
}

/// The claims of a dishpatch token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// Customer id, or the Courier resource's name for couriers.
    pub sub: String,
    pub role: Role,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Display name, used as the order's customer name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the signing key must be at least {MIN_KEY_BYTES} bytes")]
    TooShort,
    #[error("signing: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("encoding the claims: {0}")]
    Claims(serde_json::Error),
}

/// The HS256 key, ready to sign and verify, and what a token must say of
/// its issuer and audience when those are configured.
#[derive(Clone)]
pub struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Keys {
    pub fn from_secret(secret: &[u8]) -> Result<Self, KeyError> {
        // A key file written by `echo` or `openssl rand -hex` ends in a newline.
        let secret = secret.trim_ascii();
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort);
        }
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            issuer: None,
            audience: None,
        })
    }

    /// Requires `iss` and/or `aud` to be exactly these.
    pub fn expecting(mut self, issuer: Option<String>, audience: Option<String>) -> Self {
        self.issuer = issuer;
        self.audience = audience;
        self
    }

    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_secret(&bytes)
    }

    /// Signs `claims`, naming the configured issuer and audience: a token
    /// the façade mints itself (`token`, `POST /dev/token`) must pass its
    /// own checks.
    pub fn mint(&self, claims: &Claims) -> Result<String, KeyError> {
        let mut body = serde_json::to_value(claims).map_err(KeyError::Claims)?;
        if let Some(object) = body.as_object_mut() {
            if let Some(iss) = &self.issuer {
                object.insert("iss".into(), iss.clone().into());
            }
            if let Some(aud) = &self.audience {
                object.insert("aud".into(), aud.clone().into());
            }
        }
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &body,
            &self.encoding,
        )?)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        // A token that is not valid yet is refused, whoever configured what.
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)?.claims)
    }
}

/// Claims for a token of `role` for `sub`, valid for `ttl` from now.
pub fn claims(sub: &str, role: Role, ttl: Duration) -> Claims {
    let now = jiff::Timestamp::now().as_second().max(0).unsigned_abs();
    Claims {
        sub: sub.to_string(),
        role,
        exp: now.saturating_add(ttl.as_secs()),
        name: None,
        email: None,
        phone: None,
    }
}

/// The bearer token of a request, if it carries one.
pub fn bearer(parts: &axum::http::HeaderMap) -> Option<&str> {
    let value = parts.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// What the authentication middleware found, stored in request extensions.
#[derive(Clone, Debug)]
pub enum Authn {
    None,
    Invalid,
    Valid(Claims),
}

/// An authenticated caller. Extracting it fails with 401 without a valid token.
#[derive(Clone, Debug)]
pub struct Caller(pub Claims);

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.0.role == Role::Admin
    }
    /// Customers and admins use the customer endpoints.
    pub fn require_customer(&self) -> Result<(), Problem> {
        match self.0.role {
            Role::Customer | Role::Admin => Ok(()),
            Role::Courier => Err(Problem::forbidden("this needs a customer token")),
        }
    }
    pub fn require_courier(&self) -> Result<(), Problem> {
        match self.0.role {
            Role::Courier | Role::Admin => Ok(()),
            Role::Customer => Err(Problem::forbidden("this needs a courier token")),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        match parts.extensions.get::<Authn>() {
            Some(Authn::Valid(claims)) => Ok(Caller(claims.clone())),
            Some(Authn::Invalid) => Err(Problem::unauthorized(
                "the bearer token is invalid or expired",
            )),
            _ => Err(Problem::unauthorized(
                "send a bearer token: Authorization: Bearer <jwt>",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn round_trip_and_reject_other_key() {
        let keys = Keys::from_secret(b"0123456789abcdef0123456789abcdef\n").unwrap();
        let token = keys
            .mint(&claims("cust-42", Role::Customer, Duration::from_secs(60)))
            .unwrap();
        let c = keys.verify(&token).unwrap();
        assert_eq!(c.sub, "cust-42");
        assert_eq!(c.role, Role::Customer);
        let other = Keys::from_secret(b"another-key-another-key-another").unwrap();
        assert!(other.verify(&token).is_err());
    }

    #[test]
    fn expired_is_rejected() {
        let keys = Keys::from_secret(b"0123456789abcdef0123456789abcdef").unwrap();
        let mut c = claims("cust-42", Role::Customer, Duration::from_secs(0));
        c.exp -= 3600;
        let token = keys.mint(&c).unwrap();
        assert!(keys.verify(&token).is_err());
    }

    fn signed(extra: serde_json::Value) -> (Keys, String) {
        let keys = Keys::from_secret(b"0123456789abcdef0123456789abcdef").unwrap();
        let mut c =
            serde_json::to_value(claims("cust-42", Role::Customer, Duration::from_secs(60)))
                .unwrap();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, &keys.encoding).unwrap();
        (keys, token)
    }

    #[test]
    fn not_before_is_checked() {
        let later = jiff::Timestamp::now().as_second() + 600;
        let (keys, token) = signed(serde_json::json!({"nbf": later}));
        assert!(
            keys.verify(&token).is_err(),
            "a token not valid yet was accepted"
        );
        let (keys, token) = signed(serde_json::json!({"nbf": later - 1200}));
        assert!(keys.verify(&token).is_ok());
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let (keys, token) =
            signed(serde_json::json!({"iss": "https://evil.example", "aud": "someone-else"}));
        let strict = keys.clone().expecting(
            Some("https://id.dishpatch.dev".into()),
            Some("dishpatch".into()),
        );
        assert!(
            strict.verify(&token).is_err(),
            "a token from another issuer was accepted"
        );
        let (_, token) =
            signed(serde_json::json!({"iss": "https://id.dishpatch.dev", "aud": "someone-else"}));
        assert!(
            strict.verify(&token).is_err(),
            "a token for another audience was accepted"
        );
        let (_, token) =
            signed(serde_json::json!({"iss": "https://id.dishpatch.dev", "aud": "dishpatch"}));
        assert!(strict.verify(&token).is_ok());
        let (_, token) = signed(serde_json::json!({}));
        assert!(
            strict.verify(&token).is_err(),
            "iss and aud are required once configured"
        );
        // Not configured: neither is required (the dev tokens carry none).
        assert!(keys.verify(&token).is_ok());
    }

    #[test]
    fn minted_tokens_name_the_configured_issuer_and_audience() {
        let keys = Keys::from_secret(b"0123456789abcdef0123456789abcdef")
            .unwrap()
            .expecting(
                Some("https://id.dishpatch.dev".into()),
                Some("dishpatch".into()),
            );
        let token = keys
            .mint(&claims("cust-42", Role::Customer, Duration::from_secs(60)))
            .unwrap();
        assert_eq!(keys.verify(&token).unwrap().sub, "cust-42");
    }

    #[test]
    fn short_keys_are_refused() {
        assert!(matches!(
            Keys::from_secret(b"short"),
            Err(KeyError::TooShort)
        ));
    }

    #[test]
    fn bearer_parsing() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
