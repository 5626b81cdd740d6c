//! A RabbitMQ resource alarm blocks connections that publish. Consumers must
//! still be able to ack, or the queues can't drain and the alarm never
//! clears. Runs its own RabbitMQ node, so the alarm disturbs no other test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_messaging::{Broker, SERVICE_QUEUES};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

struct Node {
    dir: std::path::PathBuf,
    port: u16,
}

impl Node {
    fn cluster_sh(&self, action: &str) {
        let status =
            std::process::Command::new(dishpatch_testkit::workspace_root().join("hack/cluster.sh"))
                .arg(action)
                .env("DISHPATCH_DEV_DIR", &self.dir)
                .env("DISHPATCH_AMQP_PORT", self.port.to_string())
                .status()
                .unwrap();
        assert!(status.success(), "hack/cluster.sh {action}");
    }

    /// `rabbitmqctl` against this node (hack/cluster.sh names it by port).
    fn ctl(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
            .args(["-q", "-n", &format!("dishpatch-{}@localhost", self.port)])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (ready, unacknowledged) messages in `queue`.
    fn depth(&self, queue: &str) -> (u64, u64) {
        let out = self.ctl(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ]);
        out.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&queue)).then(|| (f[1].parse().unwrap(), f[2].parse().unwrap()))
            })
            .unwrap_or_else(|| panic!("no queue {queue} in {out}"))
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.cluster_sh("rabbitmq-down");
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
async fn consumers_ack_while_a_memory_alarm_blocks_publishing() {
    let port = 5500 + (std::process::id() % 190) as u16;
    let node = Node {
        dir: std::env::temp_dir().join(format!("dishpatch-alarm-{port}")),
        port,
    };
    node.cluster_sh("rabbitmq-up");
    let queue = SERVICE_QUEUES
        .iter()
        .find(|q| q.service == "payment")
        .unwrap()
        .queue;

    // One component's broker: it published before and consumes now.
    let broker = Broker::connect(&node.url(), "test").await.unwrap();
    for i in 0..20 {
        broker.publish(&event(i), TRACEPARENT).await.unwrap();
    }
    let channel = broker.channel().await.unwrap();
    channel
        .basic_qos(50, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    while held.len() < 20 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("deliveries")
            .unwrap()
            .unwrap();
        held.push(d);
    }
    // Queue statistics lag a little behind.
    let (all_held, last) = dishpatch_testkit::eventually(
        Duration::from_secs(15),
        || async { node.depth(queue) },
        |d| *d == (0, 20),
    )
    .await;
    assert!(all_held, "(ready, unacked) = {last:?}");

    // The alarm: from now on every connection that publishes is blocked.
    node.ctl(&["set_vm_memory_high_watermark", "0.000001"]);
    let publisher = tokio::spawn(async move {
        let r = broker.publish(&event(99), TRACEPARENT).await;
        (broker, r)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The worker finishes its messages and acks them: the queue must drain.
    for d in held {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), d.ack(BasicAckOptions::default())).await;
    }
    let (drained, last) = dishpatch_testkit::eventually(
        Duration::from_secs(15),
        || async { node.depth(queue) },
        |d| *d == (0, 0),
    )
    .await;
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    assert!(
        drained,
        "acks did not reach the broker during the alarm: (ready, unacked) = {last:?}"
    );
    // Once the alarm clears, the held publish goes through (or reports why).
    let (_, published) = tokio::time::timeout(Duration::from_secs(20), publisher)
        .await
        .expect("the publish returns")
        .unwrap();
    let _ = published;
}
