//! Housekeeping's work grows with the deliveries under way, not with every
//! Order stored in the cluster: with hundreds of orders and none on the
//! road, the delivery service reads next to nothing from the apiserver.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Bed;
use dishpatch_testkit::{FreezableProxy, apiserver_addr, fixtures, kubeconfig_via};
use futures::StreamExt;
use kube::api::PostParams;

const ORDERS: usize = 200;

#[tokio::test]
async fn idle_housekeeping_does_not_read_every_order() {
    let bed = Bed::new("delivery-scale").await;
    bed.restaurant().await;
    bed.courier("ada", true).await;
    let api = bed.orders();
    futures::stream::iter(0..ORDERS)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &fixtures::order(&format!("o{i}"), common::RESTAURANT, &[("pizza", 1)]),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;

    let proxy = FreezableProxy::start(apiserver_addr().unwrap())
        .await
        .unwrap();
    let kubeconfig = std::env::temp_dir().join(format!("{}-proxy.kubeconfig", bed.ns.name));
    kubeconfig_via(proxy.addr, &kubeconfig).unwrap();
    let _delivery = bed.delivery_via(&["--auto-accept"], &kubeconfig).await;

    // Past start-up (which may read everything once), over three
    // housekeeping rounds (every 5 s): what does it read?
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = proxy.bytes_down();
    tokio::time::sleep(Duration::from_secs(15)).await;
    let read = proxy.bytes_down() - before;
    let _ = std::fs::remove_file(&kubeconfig);
    // One list of these orders is some 300 KB; three would be near a megabyte.
    assert!(
        read < 150_000,
        "idle housekeeping read {read} bytes with {ORDERS} orders stored and none under way"
    );
}
