//! The façade against its own OpenAPI document: schemathesis generates
//! requests from `/api/v1/openapi.json` (valid and invalid ones) and checks
//! that no answer is a 5xx and every documented answer matches its schema.
//!
//! schemathesis comes from the cached venv that `hack/deps.sh` installs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{Facade, order_body};
use hyper::StatusCode;
use tokio::process::Command;

/// The schemathesis release `hack/deps.sh` installs.
const SCHEMATHESIS: &str = "4.32.5";

fn cache_dir() -> PathBuf {
    match std::env::var_os("DISHPATCH_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/dishpatch"),
    }
}

async fn schemathesis() -> PathBuf {
    let st = cache_dir().join("venv/bin/st");
    let version = Command::new(&st).arg("--version").output().await;
    match version {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                text.contains(SCHEMATHESIS),
                "{} is {text:?}, not schemathesis {SCHEMATHESIS}: run hack/deps.sh",
                st.display()
            );
            st
        }
        _ => panic!(
            "schemathesis is not installed at {}: run hack/deps.sh",
            st.display()
        ),
    }
}

#[tokio::test]
async fn openapi_contract_holds_under_schemathesis() {
    let st = schemathesis().await;
    // The limiter would answer 429 to the generated burst; that is tested elsewhere.
    let f = Facade::start(
        "fc-contract",
        &["--rate-limit", "100000", "--rate-burst", "100000"],
    )
    .await;
    let token = f.token("customer", "cust-contract").await;
    // An order of the caller's, so the order endpoints see one that exists.
    let placed = f
        .post("/api/v1/orders", &token, order_body(&[("pizza", 1)]))
        .await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.json);

    let workdir = std::env::temp_dir().join(format!("{}-schemathesis", f.ns.name));
    std::fs::create_dir_all(&workdir).unwrap();
    let mut cmd = Command::new(&st);
    cmd.arg("run")
        .arg(format!("{}/api/v1/openapi.json", f.base))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "not_a_server_error,response_schema_conformance"])
        // Bounded so the run takes about a minute; the seed makes it repeatable.
        .args(["--max-examples", "15", "--seed", "20240601"])
        // Live tracking of an existing order stays open: schemathesis reads
        // its events until this timeout. Everything else answers in milliseconds.
        .args(["--request-timeout", "5", "--workers", "2"])
        .args(["--generation-database", "none", "--no-color"])
        .current_dir(&workdir)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
        .await
        .expect("schemathesis did not finish within 4 minutes")
        .unwrap();
    let _ = std::fs::remove_dir_all(&workdir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "schemathesis found problems ({}):\n{stdout}\n{stderr}",
        out.status
    );
}
