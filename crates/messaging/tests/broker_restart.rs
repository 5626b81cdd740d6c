//! A broker restart loses nothing that was confirmed, and publishing
//! recovers by itself. Runs its own RabbitMQ node (own port and state), so
//! restarting it disturbs no other test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_messaging::{Broker, SERVICE_QUEUES};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::{Connection, ConnectionProperties};

struct Node {
    dir: std::path::PathBuf,
    port: u16,
}

impl Node {
    fn ctl(&self, action: &str) {
        let status =
            std::process::Command::new(dishpatch_testkit::workspace_root().join("hack/cluster.sh"))
                .arg(action)
                .env("DISHPATCH_DEV_DIR", &self.dir)
                .env("DISHPATCH_AMQP_PORT", self.port.to_string())
                .status()
                .unwrap();
        assert!(status.success(), "hack/cluster.sh {action}");
    }
    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.ctl("rabbitmq-down");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn event(i: usize) -> CloudEvent {
    CloudEvent::new(
        EventType::OrderAccepted,
        "test",
        OrderRef {
            namespace: "ns".into(),
            name: format!("o{i}"),
            uid: format!("uid-{i}"),
        },
        None,
        "2026-01-01T00:00:00Z".into(),
    )
}

#[tokio::test]
async fn confirmed_events_survive_a_broker_restart() {
    let port = 5700 + (std::process::id() % 200) as u16;
    let node = Node {
        dir: std::env::temp_dir().join(format!("dishpatch-restart-{port}")),
        port,
    };
    node.ctl("rabbitmq-up");
    let broker = Broker::connect(&node.url(), "test").await.unwrap();
    for i in 0..50 {
        broker
            .publish(
                &event(i),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .await
            .unwrap();
    }

    node.ctl("rabbitmq-down");
    let (noticed, _) = dishpatch_testkit::eventually(
        Duration::from_secs(10),
        || broker.is_connected(),
        |connected| !connected,
    )
    .await;
    assert!(noticed, "the broker noticed the connection is gone");
    node.ctl("rabbitmq-up");

    // The first publishes after the restart may fail; the broker reconnects
    // (and re-declares the topology) on its own.
    let mut published = 50;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while published < 60 {
        match broker
            .publish(
                &event(published),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .await
        {
            Ok(()) => published += 1,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never recovered: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    assert!(broker.is_connected().await);

    // Every confirmed event is in the payment service's durable queue.
    let conn = Connection::connect(&node.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = SERVICE_QUEUES
        .iter()
        .find(|q| q.service == "payment")
        .unwrap()
        .queue;
    let mut ids = std::collections::BTreeSet::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        let e = CloudEvent::from_json(&m.delivery.data).unwrap();
        ids.insert(e.data.order.uid);
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let want: std::collections::BTreeSet<_> = (0..60).map(|i| format!("uid-{i}")).collect();
    assert_eq!(
        ids, want,
        "confirmed events lost or invented across the restart"
    );
}
