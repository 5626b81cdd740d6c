//! Live-tracking streams are bounded: a few per caller, and none outlives
//! the caller's token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Facade, SseReader, order_body};
use hyper::{Method, StatusCode};

async fn open(f: &Facade, id: &str, token: &str) -> hyper::Response<hyper::body::Incoming> {
    f.send(
        Method::GET,
        &format!("/api/v1/orders/{id}/events"),
        Some(token),
        &[],
        None,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn one_caller_holds_only_so_many_streams() {
    let f = Facade::start("fc-streams", &["--max-streams-per-subject", "3"]).await;
    let token = f.token("customer", "cust-greedy").await;
    let placed = f
        .post("/api/v1/orders", &token, order_body(&[("pizza", 1)]))
        .await;
    let id = placed.json["id"].as_str().unwrap().to_string();
    let mut held = Vec::new();
    for _ in 0..3 {
        let r = open(&f, &id, &token).await;
        assert_eq!(r.status(), StatusCode::OK);
        held.push(r);
    }
    let refused = open(&f, &id, &token).await;
    assert_eq!(
        refused.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a fourth stream was opened"
    );
    assert!(refused.headers().contains_key("retry-after"));
    // Another caller is not affected; a closed stream frees its place.
    let other = f.token("customer", "cust-other").await;
    let mine = f
        .post("/api/v1/orders", &other, order_body(&[("water", 1)]))
        .await;
    let other_id = mine.json["id"].as_str().unwrap().to_string();
    assert_eq!(open(&f, &other_id, &other).await.status(), StatusCode::OK);
    drop(held.pop());
    let (freed, _) = dishpatch_testkit::eventually(
        Duration::from_secs(5),
        || async { open(&f, &id, &token).await.status() },
        |s| *s == StatusCode::OK,
    )
    .await;
    assert!(freed, "a closed stream did not free its place");
}

#[tokio::test]
async fn a_stream_ends_when_its_token_expires() {
    let f = Facade::start("fc-expiry", &[]).await;
    let token = f.token_for("customer", "cust-brief", "4s").await;
    let placed = f
        .post("/api/v1/orders", &token, order_body(&[("pizza", 1)]))
        .await;
    let id = placed.json["id"].as_str().unwrap().to_string();
    let r = open(&f, &id, &token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut sse = SseReader::new(r);
    assert!(
        sse.next(Duration::from_secs(5)).await.is_some(),
        "the current state first"
    );
    assert!(
        sse.ends_within(Duration::from_secs(20)).await,
        "the stream outlived its token"
    );
}
