//! With `--jwt-issuer` and `--jwt-audience`, tokens must name both; the
//! tokens the façade mints itself (`token`, `POST /dev/token`) do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

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
