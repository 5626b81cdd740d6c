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

/// One schemathesis run against the façade with `token`, every check on.
async fn run_schemathesis(
    st: &std::path::Path,
    f: &Facade,
    role: &str,
    token: &str,
) -> Result<String, String> {
    let workdir = std::env::temp_dir().join(format!("{}-schemathesis-{role}", f.ns.name));
    std::fs::create_dir_all(&workdir).unwrap();
    // Rules a schema can't carry (the restaurant exists, the item is on its
    // menu, each item once, a phase that still allows it; a page cursor the
    // API issued) answer 422 (400) to requests that match the document:
    // positive data may get those answers there. All else is checked as is.
    std::fs::write(
        workdir.join("schemathesis.toml"),
        r#"[[operations]]
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

# `continue` is an opaque cursor: one this API did not hand out is a 400.
[[operations]]
include-path = "/api/v1/orders"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "429"]
"#,
    )
    .unwrap();
    let mut cmd = Command::new(st);
    cmd.arg("run")
        .arg(format!("{}/api/v1/openapi.json", f.base))
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--checks", "all"])
        // Bounded so each run takes about a minute; the seed makes it repeatable.
        .args(["--max-examples", "15", "--seed", "20240601"])
        // Live tracking of an existing order stays open: schemathesis reads
        // its events until this timeout. Everything else answers in milliseconds.
        .args(["--request-timeout", "2"])
        // One worker thread: CPython 3.11 can raise a spurious "AST constructor
        // recursion depth mismatch" SystemError when threads build ASTs at
        // once (cpython#106905), and schemathesis compiles in its workers.
        .args(["--workers", "1"])
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
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("as {role} ({}):\n{stdout}\n{stderr}", out.status))
    }
}

/// Every check schemathesis has (status codes, content types, headers,
/// schemas, negative and positive data, auth, methods), once with each
/// role's token: whatever the façade answers, its document declares.
#[tokio::test]
async fn openapi_contract_holds_under_schemathesis() {
    let st = schemathesis().await;
    // The limiter would answer 429 to the generated burst; that is tested elsewhere.
    let f = Facade::start_with(
        "fc-contract",
        &["--rate-limit", "100000", "--rate-burst", "100000"],
        |client, ns| async move {
            // The courier token's subject has a Courier, so its endpoints see one.
            let courier = dishpatch_testkit::fixtures::courier("courier-contract", "mitte", true);
            kube::Api::<dishpatch_api::courier::Courier>::namespaced(client, &ns)
                .create(&Default::default(), &courier)
                .await
                .unwrap();
        },
    )
    .await;
    let customer = f.token("customer", "cust-contract").await;
    // An order of the caller's, so the order endpoints see one that exists.
    let placed = f
        .post("/api/v1/orders", &customer, order_body(&[("pizza", 1)]))
        .await;
    assert_eq!(placed.status, StatusCode::CREATED, "{}", placed.json);

    let courier = f.token("courier", "courier-contract").await;
    let admin = f.token("admin", "admin-contract").await;
    // The three runs at once: most of each is waiting on live streams.
    let (a, b, c) = tokio::join!(
        run_schemathesis(&st, &f, "customer", &customer),
        run_schemathesis(&st, &f, "courier", &courier),
        run_schemathesis(&st, &f, "admin", &admin),
    );
    let mut failures = Vec::new();
    for (role, outcome) in [("customer", a), ("courier", b), ("admin", c)] {
        match outcome {
            Ok(report) => println!("as {role}:\n{report}"),
            Err(e) => failures.push(e),
        }
    }
    assert!(
        failures.is_empty(),
        "schemathesis found problems:\n{}",
        failures.join("\n")
    );
}
