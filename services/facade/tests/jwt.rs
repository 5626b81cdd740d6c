//! With `--jwt-issuer` and `--jwt-audience`, tokens must name both; the
//! tokens the façade mints itself (`token`, `POST /dev/token`) do. The keys
//! rotate without a restart: a key file or key directory rewritten the way
//! the kubelet updates a mounted Secret is picked up, and a key that left
//! the set is accepted for `--jwt-key-grace` more.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{BIN, Facade};
use hyper::{Method, StatusCode};

const ISSUER: &str = "https://id.dishpatch.test";
const AUDIENCE: &str = "dishpatch-api";

/// A token from the binary's `token` subcommand, with `env` set.
async fn mint(f: &Facade, sub: &str, env: &[(&str, &str)]) -> String {
    let out = tokio::process::Command::new(BIN)
        .args(["token", "--role", "customer", "--sub", sub, "--ttl", "10m"])
        .arg("--key-file")
        .arg(&f.key_file)
        .env_remove("DISHPATCH_JWT_ISSUER")
        .env_remove("DISHPATCH_JWT_AUDIENCE")
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test]
async fn issuer_and_audience_are_required_once_configured() {
    let f = Facade::start(
        "fc-jwt",
        &[
            "--jwt-issuer",
            ISSUER,
            "--jwt-audience",
            AUDIENCE,
            "--dev-login",
        ],
    )
    .await;

    // A token that names neither is refused.
    let bare = mint(&f, "cust-bare", &[]).await;
    let r = f.get("/api/v1/orders", &bare).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);

    // `token` run with the same configuration mints tokens that pass.
    let named = mint(
        &f,
        "cust-named",
        &[
            ("DISHPATCH_JWT_ISSUER", ISSUER),
            ("DISHPATCH_JWT_AUDIENCE", AUDIENCE),
        ],
    )
    .await;
    let r = f.get("/api/v1/orders", &named).await;
    assert_eq!(r.status, StatusCode::OK, "a token naming both: {}", r.json);

    // So does the dev login.
    let dev = f
        .call(
            Method::POST,
            "/dev/token",
            None,
            &[],
            Some(serde_json::json!({"sub": "cust-dev"})),
        )
        .await
        .unwrap();
    assert_eq!(dev.status, StatusCode::OK, "{}", dev.json);
    let token = dev.json["token"].as_str().unwrap();
    let r = f.get("/api/v1/orders", token).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the façade refused its own dev token: {}",
        r.json
    );
}

const KEY_A: &str = "key-a-0123456789abcdef0123456789";
const KEY_B: &str = "key-b-0123456789abcdef0123456789";

/// A customer token for `sub` signed with `secret`, carrying `kid` when
/// given: as a login service that shares the key would mint it.
fn sign(secret: &str, kid: Option<&str>, sub: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = kid.map(str::to_string);
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = serde_json::json!({"sub": sub, "role": "customer", "exp": exp});
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A directory the test removes when done.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrites `dir` to hold exactly `entries`, the way the kubelet updates a
/// mounted Secret (its AtomicWriter): the files go into a new hidden
/// timestamped directory, the `..data` symlink is swapped to it by one
/// rename, each visible name is a symlink through `..data`, and names no
/// longer in the Secret are unlinked after the swap.
fn kubelet_write(dir: &Path, entries: &[(&str, &str)]) {
    static SERIAL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let serial = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ts = format!("..2026_12_01_00_00_00.{serial}");
    std::fs::create_dir(dir.join(&ts)).unwrap();
    for (name, content) in entries {
        std::fs::write(dir.join(&ts).join(name), content).unwrap();
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in entries {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link).unwrap();
        }
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && !entries.iter().any(|(n, _)| *n == name) {
            std::fs::remove_file(dir.join(&name)).unwrap();
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
}

/// Polls until `token` gets `want` on an authenticated endpoint, for at most 20 s.
async fn answers(f: &Facade, token: &str, want: StatusCode) -> bool {
    dishpatch_testkit::eventually(
        Duration::from_secs(20),
        || async { f.get("/api/v1/orders", token).await.status },
        |s| *s == want,
    )
    .await
    .0
}

/// The value of the sample `name` (with its labels) on /metrics, 0 if absent.
async fn metric(f: &Facade, name: &str) -> f64 {
    let r = f
        .call(Method::GET, &f.admin_url("/metrics"), None, &[], None)
        .await
        .unwrap();
    let text = r.json.as_str().unwrap_or_default().to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_key_file_rewritten_by_the_kubelet_is_picked_up_without_a_restart() {
    let dir = TempDir::new("fc-jwt-file");
    kubelet_write(&dir.0, &[("key", KEY_A)]);
    let key = dir.0.join("key");
    let f = Facade::start_keyed(
        "fc-jwtfile",
        &["--jwt-key-file", key.to_str().unwrap()],
        // The default poll interval: this test runs unchanged against a
        // façade that predates reloading.
        &[],
    )
    .await;
    let pid = f.pid();
    // Issuers that shared the one key so far send no `kid`.
    let a = sign(KEY_A, None, "cust-a");
    let r = f.get("/api/v1/orders", &a).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);

    kubelet_write(&dir.0, &[("key", KEY_B)]);
    let b = sign(KEY_B, None, "cust-b");
    assert!(
        answers(&f, &b, StatusCode::OK).await,
        "a token signed with the new key was refused without a restart"
    );
    let r = f.get("/api/v1/orders", &a).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a token signed with the replaced key was refused within the grace: {}",
        r.json
    );
    assert_eq!(f.pid(), pid, "the façade restarted");
}

#[tokio::test]
async fn a_key_directory_rotates_with_a_grace_for_removed_keys() {
    const GRACE: Duration = Duration::from_secs(2);
    let dir = TempDir::new("fc-jwt-dir");
    kubelet_write(&dir.0, &[("a", KEY_A)]);
    let f = Facade::start_keyed(
        "fc-jwtdir",
        &["--jwt-key-dir", dir.0.to_str().unwrap()],
        &[
            "--jwt-key-poll-interval",
            "200ms",
            "--jwt-key-grace",
            "2s",
            "--dev-login",
        ],
    )
    .await;
    let pid = f.pid();
    let ok = r#"dishpatch_facade_jwt_key_reloads_total{result="ok"}"#;
    let errors = r#"dishpatch_facade_jwt_key_reloads_total{result="error"}"#;

    let a = sign(KEY_A, Some("a"), "cust-a");
    let a_bare = sign(KEY_A, None, "cust-a");
    for t in [&a, &a_bare] {
        let r = f.get("/api/v1/orders", t).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    }
    // An unknown kid is refused even when its key would verify.
    let r = f
        .get("/api/v1/orders", &sign(KEY_A, Some("zz"), "cust-a"))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);

    // B joins and signs; A stays.
    let written = Instant::now();
    kubelet_write(&dir.0, &[("a", KEY_A), ("b", KEY_B), ("current", "b\n")]);
    let b = sign(KEY_B, Some("b"), "cust-b");
    assert!(
        answers(&f, &b, StatusCode::OK).await,
        "a token signed with the added key was refused without a restart"
    );
    println!(
        "B accepted {:?} after the write (poll 200ms)",
        written.elapsed()
    );
    for t in [&a, &a_bare] {
        let r = f.get("/api/v1/orders", t).await;
        assert_eq!(r.status, StatusCode::OK, "A after B joined: {}", r.json);
    }
    // What the façade and `token` mint now names B.
    let dev = f
        .call(Method::POST, "/dev/token", None, &[], None)
        .await
        .unwrap();
    let minted = dev.json["token"].as_str().unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(minted).unwrap().kid.as_deref(),
        Some("b")
    );
    let out = tokio::process::Command::new(BIN)
        .args(["token", "--role", "customer", "--sub", "cust-cli"])
        .arg("--key-dir")
        .arg(&dir.0)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        jsonwebtoken::decode_header(&cli).unwrap().kid.as_deref(),
        Some("b")
    );
    let r = f.get("/api/v1/orders", &cli).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);

    // A leaves: still accepted for the grace, then refused.
    let reloads = metric(&f, ok).await;
    let removed = Instant::now();
    kubelet_write(&dir.0, &[("b", KEY_B), ("current", "b")]);
    let (seen, _) =
        dishpatch_testkit::eventually(Duration::from_secs(20), || metric(&f, ok), |n| *n > reloads)
            .await;
    assert!(seen, "the façade did not reload the key set");
    let refused = dishpatch_testkit::eventually(
        Duration::from_secs(20),
        || async { f.get("/api/v1/orders", &a).await },
        |r| r.status == StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(
        refused.0,
        "a removed key was still accepted well past its grace"
    );
    let after = removed.elapsed();
    assert!(
        after >= GRACE,
        "a removed key was refused {after:?} after its removal, within the {GRACE:?} grace"
    );
    println!("A refused {after:?} after its removal (grace {GRACE:?}, poll 200ms)");
    let r = refused.1;
    assert_eq!(r.content_type(), "application/problem+json", "{}", r.json);
    assert_eq!(r.json["status"], 401);
    let r = f.get("/api/v1/orders", &a_bare).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.json);
    let r = f.get("/api/v1/orders", &b).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);

    // A broken set (a key too short, then `current` naming no key) keeps
    // the last good keys, counts the error, and the façade stays ready.
    let failed = metric(&f, errors).await;
    kubelet_write(&dir.0, &[("b", KEY_B), ("c", "short"), ("current", "c")]);
    let (counted, _) = dishpatch_testkit::eventually(
        Duration::from_secs(20),
        || metric(&f, errors),
        |n| *n > failed,
    )
    .await;
    assert!(counted, "a broken key set was not counted");
    kubelet_write(&dir.0, &[("b", KEY_B), ("current", "nope")]);
    let (counted, _) = dishpatch_testkit::eventually(
        Duration::from_secs(20),
        || metric(&f, errors),
        |n| *n > failed + 1.0,
    )
    .await;
    assert!(
        counted,
        "a key set whose `current` names no key was not counted"
    );
    let r = f.get("/api/v1/orders", &b).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the last good keys were dropped: {}",
        r.json
    );
    let r = f
        .call(Method::GET, &f.admin_url("/readyz"), None, &[], None)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(f.pid(), pid, "the façade restarted");
}

#[tokio::test]
async fn a_key_secret_updated_through_the_api_is_picked_up_without_a_restart() {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;

    fn secret(entries: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("facade-jwt".into()),
                ..Default::default()
            },
            data: Some(
                entries
                    .iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }
    let f = Facade::start_keyed_with(
        "fc-jwtsecret",
        &["--jwt-secret", "facade-jwt"],
        &["--jwt-key-poll-interval", "200ms"],
        |client, ns| async move {
            kube::Api::<Secret>::namespaced(client, &ns)
                .create(&Default::default(), &secret(&[("a", KEY_A)]))
                .await
                .unwrap();
        },
    )
    .await;
    let pid = f.pid();
    let a = sign(KEY_A, Some("a"), "cust-a");
    let r = f.get("/api/v1/orders", &a).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);

    let mut next = secret(&[("a", KEY_A), ("b", KEY_B), ("current", "b")]);
    next.metadata.name = None;
    f.ns.api::<Secret>()
        .patch(
            "facade-jwt",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&next),
        )
        .await
        .unwrap();
    let b = sign(KEY_B, Some("b"), "cust-b");
    assert!(
        answers(&f, &b, StatusCode::OK).await,
        "a key added to the Secret was refused without a restart"
    );
    let r = f.get("/api/v1/orders", &a).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    assert_eq!(f.pid(), pid, "the façade restarted");
}
