//! Dead-letter queues are bounded, and what waits in them can be moved back
//! onto the work queue with its trace context.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_messaging::{Broker, dead_letter_queue, dead_letters, trace};
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

#[tokio::test]
async fn dead_letters_are_bounded_and_replayable() {
    let client = dishpatch_testkit::client().await.unwrap();
    let ns = dishpatch_testkit::TestNamespace::create(&client, "dlq")
        .await
        .unwrap();
    let url = dishpatch_testkit::amqp_vhost(&ns.name).await.unwrap();
    let broker = Broker::connect(&url, "test").await.unwrap();
    let queue = dead_letters::service_queue("payment").unwrap();
    let dlq = dead_letter_queue(queue.queue);

    // Two events as the broker dead-letters them: straight into the DLQ.
    let channel = broker.channel().await.unwrap();
    for i in 0..2 {
        let event = CloudEvent::new(
            EventType::OrderAccepted,
            "test",
            OrderRef {
                namespace: "ns".into(),
                name: format!("o{i}"),
                uid: format!("uid-{i}"),
            },
            None,
            "2026-01-01T00:00:00Z".into(),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(trace::TRACEPARENT_HEADER),
            AMQPValue::LongString(LongString::from(format!(
                "00-{:032x}-{:016x}-01",
                i + 1,
                i + 1
            ))),
        );
        channel
            .basic_publish(
                "".into(),
                dlq.as_str().into(),
                BasicPublishOptions::default(),
                &event.to_json().unwrap(),
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (ready, _) = dishpatch_testkit::eventually(
        std::time::Duration::from_secs(10),
        || dead_letters::count(&broker, queue),
        |n| matches!(n, Ok(2)),
    )
    .await;
    assert!(ready, "two dead letters waiting");

    assert_eq!(dead_letters::replay(&broker, queue, 1).await.unwrap(), 1);
    assert_eq!(dead_letters::replay(&broker, queue, 10).await.unwrap(), 1);
    assert_eq!(dead_letters::count(&broker, queue).await.unwrap(), 0);
    let mut seen = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        let e = CloudEvent::from_json(&m.delivery.data).unwrap();
        let tp = m.delivery.properties.headers().as_ref().and_then(|h| {
            match h.inner().get(trace::TRACEPARENT_HEADER) {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                _ => None,
            }
        });
        seen.push((e.data.order.uid, tp.is_some()));
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(
        seen,
        vec![("uid-0".to_string(), true), ("uid-1".to_string(), true)],
        "oldest first, trace context kept"
    );

    // The bounds are on the real queue.
    // hack/cluster.sh names its node after the AMQP port.
    let port = std::env::var("DISHPATCH_AMQP_PORT").unwrap_or_else(|_| "5672".into());
    let node = format!("dishpatch-{port}@localhost");
    let out = std::process::Command::new("/usr/lib/rabbitmq/bin/rabbitmqctl")
        .args([
            "-q",
            "-n",
            &node,
            "list_queues",
            "-p",
            &ns.name,
            "name",
            "arguments",
        ])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    let line = listing
        .lines()
        .find(|l| l.starts_with(&dlq))
        .unwrap_or_default();
    assert!(
        line.contains("x-max-length") && line.contains("x-message-ttl"),
        "dead-letter queue without bounds: {listing}"
    );
}
