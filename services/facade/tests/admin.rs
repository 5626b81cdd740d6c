//! The admin listener (`--admin-addr`): probes and metrics live only there,
//! so a façade that can't bind it must say so and stop, not serve the API
//! with nothing to probe or scrape.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::BIN;

#[tokio::test]
async fn an_admin_address_in_use_stops_the_facade() {
    let client = dishpatch_testkit::client()
        .await
        .expect("control plane (make up)");
    dishpatch_testkit::ensure_crds(&client).await.unwrap();
    let ns = dishpatch_testkit::TestNamespace::create(&client, "fc-admin")
        .await
        .unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap();
    let public = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let key_file = std::env::temp_dir().join(format!("{}.jwt-key", ns.name));
    std::fs::write(&key_file, "test-signing-key-0123456789abcdef\n").unwrap();
    let child = tokio::process::Command::new(BIN)
        .arg("run")
        .args(["--listen", &public.to_string()])
        .args(["--admin-addr", &admin.to_string()])
        .args(["--namespace", &ns.name])
        .arg("--jwt-key-file")
        .arg(&key_file)
        .env("KUBECONFIG", dishpatch_testkit::kubeconfig_path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(15), child.wait_with_output()).await;
    let _ = std::fs::remove_file(&key_file);
    let out = out
        .expect("the façade kept serving without its admin listener")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&admin.to_string()), "{stderr}");
    drop(taken);
}
