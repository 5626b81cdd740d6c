//! A customer in a real browser: headless Chromium, driven by Playwright
//! (`tests/browser/place-order.mjs`), signs in on the web page, places an
//! order and watches it reach Delivered, with the whole platform running as
//! real processes in a namespace and RabbitMQ vhost of the test's own.
//!
//! Needs `node`, `playwright-core` in the cache and `/usr/bin/chromium`:
//! `hack/deps.sh` installs them. The screenshot of the delivered order is kept
//! in `$CARGO_TARGET_DIR/artifacts/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::Facade;
use dishpatch_api::{Courier, Order, OrderPhase};
use kube::api::{Api, ListParams, PostParams};
use tokio::process::{Child, Command};

const CHROMIUM: &str = "/usr/bin/chromium";

fn cache_dir() -> PathBuf {
    match std::env::var_os("DISHPATCH_CACHE") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/dishpatch"),
    }
}

/// `$CARGO_TARGET_DIR/artifacts`, else next to this test's build output.
fn artifacts_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            // target/debug/deps/<test> → target
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).map(Path::to_path_buf).unwrap()
        }
    };
    target.join("artifacts")
}

/// Fails (does not skip) when something the browser test needs is missing.
fn prerequisites() -> PathBuf {
    let node_dir = cache_dir().join("node");
    let missing = |what: &str| -> ! { panic!("{what} is missing: run hack/deps.sh") };
    if !Path::new(CHROMIUM).exists() {
        missing(CHROMIUM);
    }
    if !node_dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        missing(&format!(
            "playwright-core in {}",
            node_dir.join("node_modules").display()
        ));
    }
    if !std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        missing("node");
    }
    node_dir
}

/// One platform component (`operator`, `payment`, `kitchen`, `delivery`) as
/// the e2e tests run it, scoped to `ns` and the vhost at `amqp_url`.
fn start(component: &str, ns: &str, amqp_url: &str, ledger: &Path) -> Child {
    let path = dishpatch_testkit::binary(&format!("dishpatch-{component}"));
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` (make test does)",
        path.display()
    );
    let mut cmd = Command::new(path);
    cmd.arg("run")
        .args(["--amqp-url", amqp_url])
        .args(["--admin-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", dishpatch_testkit::kubeconfig_path())
        .env_remove("DISHPATCH_NAMESPACE")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    match component {
        "operator" => {
            cmd.args(["--namespace", ns, "--identity", "browser-test"]);
        }
        "payment" => {
            cmd.args(["--gateway", "simulated"])
                .args(["--ledger", &ledger.display().to_string()]);
        }
        "kitchen" => {
            cmd.args(["--namespace", ns, "--time-scale", "0"]);
        }
        "delivery" => {
            cmd.args(["--namespace", ns, "--auto-accept", "--time-scale", "0"]);
        }
        other => panic!("unknown component {other}"),
    }
    cmd.spawn().unwrap()
}

#[tokio::test]
async fn customer_orders_in_the_browser_and_sees_it_delivered() {
    let node_dir = prerequisites();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/place-order.mjs");

    // The façade (with dev login) in a fresh namespace with restaurant `trattoria` (zone mitte).
    let f = Facade::start("fc-browser", &["--dev-login"]).await;
    let ns = f.ns.name.clone();
    let couriers: Api<Courier> = f.ns.api();
    for i in 0..2 {
        let c: Courier = serde_json::from_value(serde_json::json!({
            "apiVersion": "dishpatch.dev/v1alpha1", "kind": "Courier",
            "metadata": {"name": format!("courier-{i}")},
            "spec": {"displayName": format!("Courier {i}"), "zone": "mitte", "onShift": true, "vehicle": "Bicycle"}
        }))
        .unwrap();
        couriers.create(&PostParams::default(), &c).await.unwrap();
    }

    // The rest of the platform, in this namespace and a vhost of its own.
    let amqp_url = dishpatch_testkit::amqp_vhost(&ns).await.unwrap();
    let ledger = std::env::temp_dir().join(format!("dishpatch-ledger-{ns}.jsonl"));
    let _ = std::fs::remove_file(&ledger);
    let _platform: Vec<Child> = ["operator", "payment", "kitchen", "delivery"]
        .iter()
        .map(|c| start(c, &ns, &amqp_url, &ledger))
        .collect();

    let artifacts = artifacts_dir();
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("facade-browser-place-order.png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = std::env::temp_dir().join(format!("{ns}-chromium-profile"));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).unwrap();

    let customer = "cust-browser";
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .env("DISHPATCH_NODE", &node_dir)
        .env("FACADE_URL", &f.base)
        .env("SCREENSHOT", &screenshot)
        .env("USER_DATA_DIR", &profile)
        .env("CUSTOMER", customer)
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(150), cmd.output()).await;
    let _ = std::fs::remove_dir_all(&profile);
    let _ = std::fs::remove_file(&ledger);
    let out = run
        .expect("the browser test did not finish within 150 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if screenshot.exists() {
        println!("screenshot: {}", screenshot.display());
    }
    assert!(
        out.status.success(),
        "the browser test failed ({}); screenshot: {}\n{stdout}\n{stderr}",
        out.status,
        screenshot.display()
    );
    assert!(
        screenshot.exists(),
        "no screenshot at {}",
        screenshot.display()
    );

    // What the page showed is what the platform did: one Delivered order of this customer's.
    let orders =
        f.ns.api::<Order>()
            .list(&ListParams::default())
            .await
            .unwrap();
    assert_eq!(orders.items.len(), 1, "{:#?}", orders.items);
    let order = &orders.items[0];
    assert_eq!(order.spec.customer.id, customer);
    assert_eq!(
        order.status.as_ref().and_then(|s| s.phase),
        Some(OrderPhase::Delivered)
    );
    let pizza = order.spec.items.iter().find(|i| i.menu_item == "pizza");
    assert_eq!(pizza.map(|i| i.quantity), Some(2));
}

#[tokio::test]
async fn restaurant_staff_confirm_in_the_browser_and_the_customers_page_moves_on() {
    let node_dir = prerequisites();
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/restaurant-confirms.mjs");
    // `trattoria` confirms its orders by hand.
    let f = Facade::start("fc-staff", &["--dev-login"]).await;
    let ns = f.ns.name.clone();
    let restaurants: Api<dishpatch_api::Restaurant> = f.ns.api();
    restaurants
        .patch(
            "trattoria",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&serde_json::json!({
                "spec": {"confirmation": {"mode": "Manual", "timeout": "5m"}}
            })),
        )
        .await
        .unwrap();
    let amqp_url = dishpatch_testkit::amqp_vhost(&ns).await.unwrap();
    let ledger = std::env::temp_dir().join(format!("dishpatch-ledger-{ns}.jsonl"));
    let _ = std::fs::remove_file(&ledger);
    let _platform: Vec<Child> = ["operator", "payment"]
        .iter()
        .map(|c| start(c, &ns, &amqp_url, &ledger))
        .collect();

    let artifacts = artifacts_dir();
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("facade-browser-restaurant-confirms.png");
    let _ = std::fs::remove_file(&screenshot);
    let customer = "cust-staff-browser";
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .env("DISHPATCH_NODE", &node_dir)
        .env("FACADE_URL", &f.base)
        .env("SCREENSHOT", &screenshot)
        .env("CUSTOMER", customer)
        .env("RESTAURANT", "trattoria")
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(150), cmd.output()).await;
    let _ = std::fs::remove_file(&ledger);
    let out = run
        .expect("the browser test did not finish within 150 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed ({}); screenshot: {}\n{stdout}\n{}",
        out.status,
        screenshot.display(),
        String::from_utf8_lossy(&out.stderr)
    );

    // What the pages showed is what the platform did.
    let orders =
        f.ns.api::<Order>()
            .list(&ListParams::default())
            .await
            .unwrap();
    assert_eq!(orders.items.len(), 1, "{:#?}", orders.items);
    let order = &orders.items[0];
    assert_eq!(order.spec.customer.id, customer);
    let decision = order
        .spec
        .confirmation
        .as_ref()
        .expect("the staff's decision");
    assert_eq!(decision.by, "trattoria");
    assert!(
        order
            .status
            .as_ref()
            .and_then(|s| s.payment.as_ref())
            .is_some()
    );
}
