//! Bearer JWTs (HS256): who the caller is and what role they have, checked
//! against a key set that can change while the façade runs (see
//! [`Keys::replace`] and `keysource.rs`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::problem::Problem;
/// Shortest signing key accepted; HS256 with less is guessable.
pub const MIN_KEY_BYTES: usize = 16;
/// Most keys a set may hold: a token without `kid` is tried against each.
pub const MAX_KEYS: usize = 16;
/// The entry of a key set that names the signing key's kid; not a key.
pub const CURRENT: &str = "current";
/// How long a key that left the set is still accepted, unless configured.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Courier,
    /// A restaurant's staff: `restaurants` (or `sub`) names where.
    Restaurant,
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
    /// For role `restaurant`: the Restaurants this person works for (absent:
    /// `sub` names the one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restaurants: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("reading Secret {0}")]
    Secret(String),
    #[error("reading the keys: {0}")]
    Task(String),
    #[error("key {kid:?} is shorter than {MIN_KEY_BYTES} bytes")]
    TooShort { kid: String },
    #[error("the key set holds no key")]
    Empty,
    #[error("the key set holds {0} keys; at most {MAX_KEYS} are accepted")]
    TooMany(usize),
    #[error("key id {0:?} is not one of letters, digits, '-', '_' and '.'")]
    BadKid(String),
    #[error("`{CURRENT}` names key {0:?}, which the set does not hold")]
    UnknownCurrent(String),
    #[error("the key set holds several keys and no `{CURRENT}` entry naming the one that signs")]
    NoSigner,
    #[error("no key {0:?} to sign with")]
    NoSuchKid(String),
    #[error("signing: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("encoding the claims: {0}")]
    Claims(serde_json::Error),
}

/// What one read of the key source found, before it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawKeys {
    /// One key, from `--jwt-key-file`: its kid is derived from the key.
    Single(Vec<u8>),
    /// Entries by name (files of a directory, data of a Secret): each is a
    /// key whose kid is its name, except [`CURRENT`].
    Set(BTreeMap<String, Vec<u8>>),
}

/// One HS256 key and its id.
#[derive(Clone)]
struct Key {
    kid: String,
    /// Only compared: a kid whose secret changed is a new key.
    digest: [u8; 32],
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl Key {
    fn new(kid: String, secret: &[u8]) -> Result<Self, KeyError> {
        // A key file written by `echo` or `openssl rand -hex` ends in a newline.
        let secret = secret.trim_ascii();
        if secret.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort { kid });
        }
        Ok(Self {
            kid,
            digest: Sha256::digest(secret).into(),
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        })
    }

    fn same(&self, other: &Key) -> bool {
        self.kid == other.kid && self.digest == other.digest
    }
}

/// A checked key set: the keys that verify, and the one that signs.
#[derive(Clone)]
pub struct KeySet {
    keys: Vec<Key>,
    signer: Option<usize>,
}

impl KeySet {
    /// Checks what the source holds. A set is refused whole (an empty one,
    /// a key too short, a bad name, a `current` naming no key): half a set
    /// could drop the key the issuers sign with.
    pub fn parse(raw: &RawKeys) -> Result<Self, KeyError> {
        match raw {
            RawKeys::Single(secret) => Self::single(secret),
            RawKeys::Set(entries) => Self::from_entries(entries),
        }
    }

    /// One key; its kid is derived from the key (the first 16 hex digits of
    /// its SHA-256), so replacing the file's content is a new kid and the
    /// token minter and the façade agree on it wherever the file lies.
    pub fn single(secret: &[u8]) -> Result<Self, KeyError> {
        let digest = Sha256::digest(secret.trim_ascii());
        let kid: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            keys: vec![Key::new(kid, secret)?],
            signer: Some(0),
        })
    }

    pub fn from_entries(entries: &BTreeMap<String, Vec<u8>>) -> Result<Self, KeyError> {
        let mut keys = Vec::new();
        let mut current = None;
        for (name, value) in entries {
            if name == CURRENT {
                let kid = String::from_utf8_lossy(value.trim_ascii()).into_owned();
                current = Some(kid);
                continue;
            }
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid {
                return Err(KeyError::BadKid(name.clone()));
            }
            keys.push(Key::new(name.clone(), value)?);
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyError::TooMany(keys.len()));
        }
        let signer = match current {
            Some(kid) => Some(
                keys.iter()
                    .position(|k| k.kid == kid)
                    .ok_or(KeyError::UnknownCurrent(kid))?,
            ),
            None if keys.len() == 1 => Some(0),
            // Verifying needs no signer; only minting (`token`,
            // `POST /dev/token`) does, and it says so.
            None => None,
        };
        Ok(Self { keys, signer })
    }

    /// The key ids, in order.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// The kid of the signing key, if the set names one.
    pub fn signer(&self) -> Option<&str> {
        self.signer
            .and_then(|i| self.keys.get(i))
            .map(|k| k.kid.as_str())
    }
}

/// A key that left the set, accepted until `until`.
struct Retired {
    key: Key,
    until: Instant,
}

struct Ring {
    set: KeySet,
    retired: Vec<Retired>,
}

/// What [`Keys::replace`] changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    pub retired: Vec<String>,
    pub signer: Option<String>,
}

/// The keys tokens are checked against (shared by every request and
/// swapped by the reloader), and what a token must say of its issuer and
/// audience when those are configured.
#[derive(Clone)]
pub struct Keys {
    ring: Arc<RwLock<Ring>>,
    issuer: Option<String>,
    audience: Option<String>,
    grace: Duration,
}

impl Keys {
    pub fn new(set: KeySet) -> Self {
        Self {
            ring: Arc::new(RwLock::new(Ring {
                set,
                retired: Vec::new(),
            })),
            issuer: None,
            audience: None,
            grace: DEFAULT_GRACE,
        }
    }

    /// One key, its kid derived from it.
    #[cfg(test)]
    pub fn from_secret(secret: &[u8]) -> Result<Self, KeyError> {
        Ok(Self::new(KeySet::single(secret)?))
    }

    /// Requires `iss` and/or `aud` to be exactly these.
    pub fn expecting(mut self, issuer: Option<String>, audience: Option<String>) -> Self {
        self.issuer = issuer;
        self.audience = audience;
        self
    }

    /// How long a key that left the set is still accepted.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        // A panic elsewhere while holding the lock left a whole ring (it is
        // replaced in one assignment), so a poisoned lock is still good.
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `set` the key set. A key that left it (or whose secret changed
    /// under the same kid) is accepted for the grace more, so tokens minted
    /// just before a rotation, or by an issuer that saw the new set a little
    /// later, keep working.
    pub fn replace(&self, set: KeySet) -> Change {
        self.replace_at(set, Instant::now())
    }

    pub fn replace_at(&self, set: KeySet, now: Instant) -> Change {
        let mut ring = self.ring.write().unwrap_or_else(|e| e.into_inner());
        let mut change = Change::default();
        let old = std::mem::replace(&mut ring.set, set);
        let Ring { set, retired } = &mut *ring;
        retired.retain(|r| r.until > now && !set.keys.iter().any(|k| k.same(&r.key)));
        for key in old.keys.iter() {
            if !set.keys.iter().any(|k| k.same(key)) {
                change.retired.push(key.kid.clone());
                retired.push(Retired {
                    key: key.clone(),
                    until: now + self.grace,
                });
            }
        }
        for key in set.keys.iter() {
            if !old.keys.iter().any(|k| k.same(key)) {
                change.added.push(key.kid.clone());
            }
        }
        if set.signer() != old.signer() {
            change.signer = set.signer().map(str::to_string);
        }
        change
    }

    /// Keys a token is accepted with at `now`: the set's and those in grace.
    pub fn accepted_at(&self, now: Instant) -> usize {
        let ring = self.read();
        ring.set.keys.len() + ring.retired.iter().filter(|r| r.until > now).count()
    }

    /// Signs `claims` with the set's signing key, naming its kid and the
    /// configured issuer and audience: a token the façade mints itself
    /// (`token`, `POST /dev/token`) must pass its own checks.
    pub fn mint(&self, claims: &Claims) -> Result<String, KeyError> {
        self.mint_with(claims, None)
    }

    /// Like [`mint`](Self::mint), with the key `kid` when given.
    pub fn mint_with(&self, claims: &Claims, kid: Option<&str>) -> Result<String, KeyError> {
        let mut body = serde_json::to_value(claims).map_err(KeyError::Claims)?;
        if let Some(object) = body.as_object_mut() {
            if let Some(iss) = &self.issuer {
                object.insert("iss".into(), iss.clone().into());
            }
            if let Some(aud) = &self.audience {
                object.insert("aud".into(), aud.clone().into());
            }
        }
        let ring = self.read();
        let key = match kid {
            Some(kid) => ring
                .set
                .keys
                .iter()
                .find(|k| k.kid == kid)
                .ok_or_else(|| KeyError::NoSuchKid(kid.to_string()))?,
            None => ring
                .set
                .signer
                .and_then(|i| ring.set.keys.get(i))
                .ok_or(KeyError::NoSigner)?,
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.clone());
        Ok(jsonwebtoken::encode(&header, &body, &key.encoding)?)
    }

    fn validation(&self) -> Validation {
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
        validation
    }

    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        self.verify_at(token, Instant::now())
    }

    /// Checks `token` with the key its header's `kid` names (in the set, or
    /// left it less than the grace ago); an unknown kid is refused. A token
    /// without `kid` (issuers from before key ids) is tried against every
    /// accepted key: no weaker than kid selection, where the sender picks
    /// the key too, and the set is small ([`MAX_KEYS`]).
    pub fn verify_at(
        &self,
        token: &str,
        now: Instant,
    ) -> Result<Claims, jsonwebtoken::errors::Error> {
        let kid = jsonwebtoken::decode_header(token)?.kid;
        let validation = self.validation();
        let ring = self.read();
        let live = ring
            .retired
            .iter()
            .filter(|r| r.until > now)
            .map(|r| &r.key);
        let mut last = jsonwebtoken::errors::Error::from(ErrorKind::InvalidSignature);
        for key in ring.set.keys.iter().chain(live) {
            if kid.as_deref().is_some_and(|kid| kid != key.kid) {
                continue;
            }
            match jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// Reads a key file for the `token` subcommand.
pub fn read_key_file(path: &Path) -> Result<RawKeys, KeyError> {
    std::fs::read(path)
        .map(RawKeys::Single)
        .map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })
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
        restaurants: Vec::new(),
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
            Role::Courier | Role::Restaurant => {
                Err(Problem::forbidden("this needs a customer token"))
            }
        }
    }
    pub fn require_courier(&self) -> Result<(), Problem> {
        match self.0.role {
            Role::Courier | Role::Admin => Ok(()),
            Role::Customer | Role::Restaurant => {
                Err(Problem::forbidden("this needs a courier token"))
            }
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
        let secret = b"0123456789abcdef0123456789abcdef";
        let keys = Keys::from_secret(secret).unwrap();
        let mut c =
            serde_json::to_value(claims("cust-42", Role::Customer, Duration::from_secs(60)))
                .unwrap();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &c,
            &EncodingKey::from_secret(secret),
        )
        .unwrap();
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
            Err(KeyError::TooShort { .. })
        ));
    }

    const A: &str = "key-a-0123456789abcdef";
    const B: &str = "key-b-0123456789abcdef";

    fn set(entries: &[(&str, &str)]) -> Result<KeySet, KeyError> {
        KeySet::from_entries(
            &entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    /// A token for `sub` signed with `secret`, with `kid` in its header.
    fn token(secret: &str, kid: Option<&str>, sub: &str) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_string);
        jsonwebtoken::encode(
            &header,
            &claims(sub, Role::Customer, Duration::from_secs(60)),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn kid_of(token: &str) -> Option<String> {
        jsonwebtoken::decode_header(token).unwrap().kid
    }

    #[test]
    fn a_key_set_names_its_signer() {
        let one = set(&[("a", A)]).unwrap();
        assert_eq!(one.kids(), ["a"]);
        assert_eq!(one.signer(), Some("a"), "a lone key signs");
        let two = set(&[("a", A), ("b", B), ("current", "b\n")]).unwrap();
        assert_eq!(two.kids(), ["a", "b"], "`current` is not a key");
        assert_eq!(two.signer(), Some("b"));
        let unnamed = set(&[("a", A), ("b", B)]).unwrap();
        assert_eq!(unnamed.signer(), None, "no guessing which of two signs");
        let keys = Keys::new(unnamed);
        let c = claims("cust-42", Role::Customer, Duration::from_secs(60));
        assert!(matches!(keys.mint(&c), Err(KeyError::NoSigner)));
        // It still verifies, and `token --kid` can pick a key.
        assert!(keys.verify(&token(A, Some("a"), "x")).is_ok());
        let t = keys.mint_with(&c, Some("a")).unwrap();
        assert_eq!(kid_of(&t).as_deref(), Some("a"));
        assert!(matches!(
            keys.mint_with(&c, Some("zz")),
            Err(KeyError::NoSuchKid(_))
        ));
    }

    #[test]
    fn a_broken_key_set_is_refused_whole() {
        assert!(matches!(set(&[]), Err(KeyError::Empty)));
        assert!(matches!(set(&[("current", "a")]), Err(KeyError::Empty)));
        assert!(
            matches!(set(&[("a", A), ("b", "short")]), Err(KeyError::TooShort { kid }) if kid == "b")
        );
        assert!(matches!(
            set(&[("a", A), ("current", "b")]),
            Err(KeyError::UnknownCurrent(k)) if k == "b"
        ));
        assert!(matches!(
            set(&[("a", A), ("bad kid", B)]),
            Err(KeyError::BadKid(_))
        ));
        let many: Vec<(String, &str)> = (0..=MAX_KEYS).map(|i| (format!("k{i}"), A)).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert!(matches!(set(&many), Err(KeyError::TooMany(_))));
        assert!(set(&many[..MAX_KEYS]).is_ok());
    }

    #[test]
    fn a_single_key_gets_a_kid_derived_from_it() {
        let a = KeySet::single(A.as_bytes()).unwrap();
        let again = KeySet::single(format!("{A}\n").as_bytes()).unwrap();
        let b = KeySet::single(B.as_bytes()).unwrap();
        assert_eq!(a.kids(), again.kids(), "a trailing newline is not the key");
        assert_ne!(a.kids(), b.kids());
        assert_eq!(a.kids()[0].len(), 16);
        let keys = Keys::new(a);
        let t = keys
            .mint(&claims("cust-42", Role::Customer, Duration::from_secs(60)))
            .unwrap();
        assert_eq!(kid_of(&t).as_deref(), Some(keys.read().set.kids()[0]));
        assert!(keys.verify(&t).is_ok());
    }

    #[test]
    fn the_kid_selects_the_key() {
        let keys = Keys::new(set(&[("a", A), ("b", B), ("current", "b")]).unwrap());
        assert!(keys.verify(&token(A, Some("a"), "x")).is_ok());
        assert!(keys.verify(&token(B, Some("b"), "x")).is_ok());
        assert!(
            keys.verify(&token(A, Some("b"), "x")).is_err(),
            "a token was checked with a key its kid does not name"
        );
        assert!(keys.verify(&token(A, Some("c"), "x")).is_err());
        // Without a kid, any accepted key will do.
        assert!(keys.verify(&token(A, None, "x")).is_ok());
        assert!(keys.verify(&token(B, None, "x")).is_ok());
        assert!(
            keys.verify(&token("key-c-0123456789abcdef", None, "x"))
                .is_err()
        );
        let minted = keys
            .mint(&claims("cust-42", Role::Customer, Duration::from_secs(60)))
            .unwrap();
        assert_eq!(kid_of(&minted).as_deref(), Some("b"));
    }

    #[test]
    fn a_removed_key_is_accepted_for_the_grace_only() {
        let grace = Duration::from_secs(30);
        let t0 = Instant::now();
        let keys =
            Keys::new(set(&[("a", A), ("b", B), ("current", "b")]).unwrap()).with_grace(grace);
        let a = token(A, Some("a"), "x");
        let a_bare = token(A, None, "x");
        let change = keys.replace_at(set(&[("b", B)]).unwrap(), t0);
        assert_eq!(
            change,
            Change {
                added: vec![],
                retired: vec!["a".into()],
                signer: None
            }
        );
        assert_eq!(keys.accepted_at(t0), 2);
        let almost = t0 + grace - Duration::from_millis(1);
        assert!(keys.verify_at(&a, almost).is_ok());
        assert!(keys.verify_at(&a_bare, almost).is_ok());
        assert!(keys.verify_at(&a, t0 + grace).is_err());
        assert!(keys.verify_at(&a_bare, t0 + grace).is_err());
        assert!(
            keys.verify_at(&token(B, Some("b"), "x"), t0 + grace)
                .is_ok()
        );
        assert_eq!(keys.accepted_at(t0 + grace), 1);
    }

    #[test]
    fn a_key_that_comes_back_is_current_again() {
        let grace = Duration::from_secs(30);
        let t0 = Instant::now();
        let keys =
            Keys::new(set(&[("a", A), ("b", B), ("current", "b")]).unwrap()).with_grace(grace);
        keys.replace_at(set(&[("b", B)]).unwrap(), t0);
        let change = keys.replace_at(set(&[("a", A), ("b", B), ("current", "a")]).unwrap(), t0);
        assert_eq!(change.added, ["a"]);
        assert_eq!(change.signer.as_deref(), Some("a"));
        // Not also counted in grace, and not dropped when the grace ends.
        assert_eq!(keys.accepted_at(t0), 2);
        assert!(
            keys.verify_at(&token(A, Some("a"), "x"), t0 + grace * 2)
                .is_ok()
        );
    }

    #[test]
    fn a_key_replaced_under_its_kid_keeps_the_old_secret_in_grace() {
        let grace = Duration::from_secs(30);
        let t0 = Instant::now();
        let keys = Keys::new(set(&[("k", A)]).unwrap()).with_grace(grace);
        let change = keys.replace_at(set(&[("k", B)]).unwrap(), t0);
        assert_eq!(change.added, ["k"]);
        assert_eq!(change.retired, ["k"]);
        let old = token(A, Some("k"), "x");
        assert!(keys.verify_at(&old, t0).is_ok());
        assert!(keys.verify_at(&token(B, Some("k"), "x"), t0).is_ok());
        assert!(keys.verify_at(&old, t0 + grace).is_err());
        // An unchanged set changes nothing.
        let same = keys.replace_at(set(&[("k", B)]).unwrap(), t0);
        assert_eq!(same, Change::default());
    }

    proptest::proptest! {
        /// Any sequence of key sets, each seen some seconds after the last:
        /// a key (kid and secret) is accepted exactly while it is in the
        /// set or less than the grace has passed since the last set that
        /// dropped it, with its kid or without one.
        #[test]
        fn keys_are_accepted_while_present_or_in_grace(
            steps in proptest::collection::vec(
                (proptest::collection::vec(0u8..3, 3), 0u64..50, 0u64..50),
                1..8,
            )
        ) {
            const GRACE: Duration = Duration::from_secs(30);
            // Three kids, two possible secrets each: 0 absent, 1 or 2.
            let secret = |kid: usize, v: u8| format!("secret-{kid}-{v}-0123456789abcdef");
            let universe: Vec<(usize, u8)> =
                (0..3).flat_map(|k| [(k, 1), (k, 2)]).collect();
            let tokens: Vec<(String, String)> = universe
                .iter()
                .map(|&(k, v)| {
                    let kid = format!("k{k}");
                    (token(&secret(k, v), Some(&kid), "x"), token(&secret(k, v), None, "x"))
                })
                .collect();
            let build = |choice: &[u8]| {
                let entries: Vec<(String, String)> = choice
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| **v > 0)
                    .map(|(k, v)| (format!("k{k}"), secret(k, *v)))
                    .collect();
                let entries: Vec<(&str, &str)> =
                    entries.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                set(&entries)
            };
            let t0 = Instant::now();
            let mut now = t0;
            let mut present: Vec<bool> = vec![false; universe.len()];
            let mut removed: Vec<Option<Instant>> = vec![None; universe.len()];
            let mut keys: Option<Keys> = None;
            for (choice, wait, probe) in steps {
                let Ok(next) = build(&choice) else { continue };
                now += Duration::from_secs(wait);
                match &keys {
                    None => keys = Some(Keys::new(next).with_grace(GRACE)),
                    Some(k) => { k.replace_at(next, now); }
                }
                for (i, &(k, v)) in universe.iter().enumerate() {
                    let here = choice[k] == v;
                    if present[i] && !here {
                        removed[i] = Some(now);
                    }
                    present[i] = here;
                }
                let keys = keys.as_ref().unwrap();
                let at = now + Duration::from_secs(probe);
                for (i, (with_kid, bare)) in tokens.iter().enumerate() {
                    let want = present[i] || removed[i].is_some_and(|r| at < r + GRACE);
                    proptest::prop_assert_eq!(keys.verify_at(with_kid, at).is_ok(), want, "key {:?} with kid", universe[i]);
                    proptest::prop_assert_eq!(keys.verify_at(bare, at).is_ok(), want, "key {:?} without kid", universe[i]);
                }
            }
        }
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
