//! Card payments that settle later (issue 13, part 2): the payment service
//! as a real process serving `POST /webhooks/stripe`, the real apiserver and
//! RabbitMQ, and Stripe's own stripe-mock for the API calls it makes. The
//! events are signed as Stripe signs them (by the SDK's test helper), with
//! objects that stripe-mock serves, so they parse as Stripe's would.
//!
//!   cargo test -p dishpatch-e2e --test webhooks -- --nocapture
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod procs;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dishpatch_api::Order;
use dishpatch_api::events::{CloudEvent, EventType, OrderRef};
use dishpatch_api::order::PaymentState;
use dishpatch_messaging::Broker;
use dishpatch_testkit::{TestNamespace, amqp_vhost, client, ensure_crds, fixtures, workspace_root};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use procs::{Proc, Spec, free_port, http, http_get};
use serde_json::{Value, json};
use stripe_webhook::Webhook;

const SECRET: &str = "whsec_dishpatch_test_0123456789";

fn stripe_mock() -> (tokio::process::Child, SocketAddr) {
    let out = std::process::Command::new(workspace_root().join("hack/tools.sh"))
        .args(["path", "stripe-mock"])
        .output()
        .unwrap();
    let bin = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        Path::new(&bin).exists(),
        "{bin} is missing: run hack/deps.sh"
    );
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = tokio::process::Command::new(bin)
        .args(["-http-addr", &http.to_string()])
        .args(["-https-addr", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (child, http)
}

/// An object as Stripe's API serves it (stripe-mock's fixture).
async fn fixture(mock: SocketAddr, path: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = tokio::net::TcpStream::connect(mock).await;
        if got.is_ok() {
            let (code, body) = http(
                "GET",
                format!("http://{mock}{path}"),
                &[("authorization", "Bearer sk_test_123")],
                String::new(),
            )
            .await;
            assert_eq!(code, 200, "stripe-mock on {path}: {body}");
            return serde_json::from_str(&body).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "stripe-mock never served {path}: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn event(id: &str, type_: &str, created: i64, object: &Value) -> String {
    json!({
        "id": id, "object": "event", "api_version": "2025-03-31.basil",
        "created": created, "livemode": false, "pending_webhooks": 1,
        "request": {"id": null, "idempotency_key": null},
        "type": type_, "data": {"object": object},
    })
    .to_string()
}

struct Hook {
    addr: SocketAddr,
}

impl Hook {
    /// Sends `payload` signed with `secret` at `at` (Unix seconds): (status, body).
    async fn send(&self, payload: &str, secret: &str, at: i64) -> (u16, Value) {
        let sig = Webhook::generate_test_header(payload, secret, Some(at));
        self.send_raw(payload, Some(&sig)).await
    }

    async fn send_raw(&self, payload: &str, sig: Option<&str>) -> (u16, Value) {
        let mut s = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mut req = format!(
            "POST /webhooks/stripe HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            self.addr,
            payload.len()
        );
        if let Some(sig) = sig {
            req.push_str(&format!("Stripe-Signature: {sig}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(payload);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let (code, body) =
            dishpatch_testkit::net::parse_response(&String::from_utf8_lossy(&buf)).unwrap();
        (
            code,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

async fn payment_of(
    orders: &Api<Order>,
    name: &str,
) -> (String, dishpatch_api::order::PaymentStatus) {
    let o = orders.get(name).await.unwrap();
    (
        o.resource_version().unwrap(),
        o.status.unwrap().payment.unwrap(),
    )
}

async fn wait_payment(
    orders: &Api<Order>,
    name: &str,
    what: &str,
    ok: impl Fn(&dishpatch_api::order::PaymentStatus) -> bool,
) -> dishpatch_api::order::PaymentStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, p) = payment_of(orders, name).await;
        if ok(&p) {
            return p;
        }
        assert!(Instant::now() < deadline, "{what}: {p:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Bed {
    ns: TestNamespace,
    amqp: String,
    orders: Api<Order>,
    _mock: tokio::process::Child,
    mock: SocketAddr,
    _payment: Proc,
    hook: Hook,
}

async fn bed(prefix: &str) -> Bed {
    let client = client().await.unwrap();
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, prefix).await.unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let (mock_child, mock) = stripe_mock();
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let spec = Spec {
        namespace: &ns.name,
        amqp_url: &amqp,
        ledger: Path::new("/dev/null"),
        log: None,
        rust_log: "warn",
    };
    let payment = spec.start_with_env(
        "payment",
        &[
            "--gateway",
            "stripe",
            "--stripe-url",
            &format!("http://{mock}"),
            "--stripe-webhook-listen",
            &listen.to_string(),
        ],
        &[
            ("STRIPE_API_KEY", "sk_test_123"),
            ("STRIPE_WEBHOOK_SECRET", SECRET),
        ],
    );
    payment.wait_ready(Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the webhook listener never opened"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let orders = ns.api::<Order>();
    Bed {
        orders,
        amqp,
        ns,
        _mock: mock_child,
        mock,
        _payment: payment,
        hook: Hook { addr: listen },
    }
}

impl Bed {
    /// An accepted order whose charge waits for the customer (3-D Secure),
    /// as the payment service records it; its ref.
    async fn waiting_order(&self, name: &str, pi: &str) -> OrderRef {
        let o = self
            .orders
            .create(
                &PostParams::default(),
                &fixtures::order(name, "roma", &[("pizza", 1)]),
            )
            .await
            .unwrap();
        let now = jiff::Timestamp::now().to_string();
        let status = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": {
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                            "message": "priced", "lastTransitionTime": now}],
            "total": {"amount": 950, "currency": "EUR"},
        }});
        self.orders
            .patch_status(
                name,
                &PatchParams::apply("dishpatch-operator").force(),
                &Patch::Apply(&status),
            )
            .await
            .unwrap();
        let payment = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": {"payment": {
            "state": "RequiresAction", "provider": "stripe", "paymentId": pi,
            "amount": {"amount": 950, "currency": "EUR"},
            "actionUrl": format!("https://hooks.stripe.com/3d_secure_2/authenticate/{pi}"),
        }}});
        self.orders
            .patch_status(
                name,
                &PatchParams::apply("dishpatch-payment").force(),
                &Patch::Apply(&payment),
            )
            .await
            .unwrap();
        OrderRef {
            namespace: self.ns.name.clone(),
            name: name.into(),
            uid: o.uid().unwrap(),
        }
    }

    /// stripe-mock's PaymentIntent as this order's, in `status`.
    async fn intent(&self, r: &OrderRef, pi: &str, status: &str) -> Value {
        let mut pi_obj = fixture(self.mock, &format!("/v1/payment_intents/{pi}")).await;
        pi_obj["id"] = json!(pi);
        pi_obj["status"] = json!(status);
        pi_obj["metadata"] =
            json!({"order_uid": r.uid, "order_namespace": r.namespace, "order_name": r.name});
        pi_obj
    }
}

#[tokio::test]
async fn signed_webhooks_settle_a_waiting_charge_once_in_any_order() {
    let bed = bed("webhooks").await;
    let r = bed.waiting_order("o1", "pi_3ds1").await;

    // Refused, and nothing changes: no signature, a wrong one, an old one.
    let (rv, before) = payment_of(&bed.orders, "o1").await;
    let succeeded = event(
        "evt_ok",
        "payment_intent.succeeded",
        now(),
        &bed.intent(&r, "pi_3ds1", "succeeded").await,
    );
    let (code, body) = bed.hook.send_raw(&succeeded, None).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = bed.hook.send(&succeeded, "whsec_someone_else", now()).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("signature"),
        "{body}"
    );
    let (code, body) = bed.hook.send(&succeeded, SECRET, now() - 600).await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("tolerance"),
        "{body}"
    );
    let (code, body) = bed
        .hook
        .send_raw(&succeeded, Some("t=1,v1=zz,garbage"))
        .await;
    assert_eq!(code, 400, "{body}");
    let (rv_after, after) = payment_of(&bed.orders, "o1").await;
    assert_eq!((rv_after, after), (rv, before), "a refused webhook wrote");

    // Valid: settled, and told to the platform.
    let (code, body) = bed.hook.send(&succeeded, SECRET, now()).await;
    assert_eq!(code, 200, "{body}");
    let paid = wait_payment(&bed.orders, "o1", "never Succeeded", |p| {
        p.state == PaymentState::Succeeded
    })
    .await;
    assert_eq!(paid.payment_id.as_deref(), Some("pi_3ds1"));
    assert_eq!(paid.action_url, None);
    assert!(paid.webhook_events.contains(&"evt_ok".to_string()));

    // The same event again changes nothing.
    let (rv, _) = payment_of(&bed.orders, "o1").await;
    let (code, body) = bed.hook.send(&succeeded, SECRET, now()).await;
    assert_eq!(
        (code, body["result"].as_str()),
        (200, Some("already applied")),
        "{body}"
    );
    assert_eq!(payment_of(&bed.orders, "o1").await.0, rv, "a replay wrote");

    // An older failure arriving late does not undo the success.
    let mut failed_pi = bed.intent(&r, "pi_3ds1", "requires_payment_method").await;
    failed_pi["last_payment_error"] = Value::Null;
    let failed = event(
        "evt_old",
        "payment_intent.payment_failed",
        now() - 60,
        &failed_pi,
    );
    let (code, body) = bed.hook.send(&failed, SECRET, now()).await;
    assert_eq!(
        (code, body["result"].as_str()),
        (200, Some("nothing to change")),
        "{body}"
    );
    assert_eq!(
        payment_of(&bed.orders, "o1").await.1.state,
        PaymentState::Succeeded
    );

    // A refund made in the dashboard, then a dispute: both recorded.
    let mut charge = fixture(bed.mock, "/v1/charges/ch_w1").await;
    charge["payment_intent"] = json!("pi_3ds1");
    charge["refunded"] = json!(true);
    charge["metadata"] =
        json!({"order_uid": r.uid, "order_namespace": r.namespace, "order_name": r.name});
    if let Some(refunds) = charge.get_mut("refunds").and_then(|l| l.get_mut("data")) {
        *refunds = json!([]);
    }
    let (code, body) = bed
        .hook
        .send(
            &event("evt_refund", "charge.refunded", now(), &charge),
            SECRET,
            now(),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    wait_payment(&bed.orders, "o1", "never Refunded", |p| {
        p.state == PaymentState::Refunded && p.refunded_at.is_some()
    })
    .await;
    let mut dispute = fixture(bed.mock, "/v1/disputes/dp_w1").await;
    dispute["payment_intent"] = json!("pi_3ds1");
    dispute["reason"] = json!("fraudulent");
    dispute["metadata"] =
        json!({"order_uid": r.uid, "order_namespace": r.namespace, "order_name": r.name});
    let (code, body) = bed
        .hook
        .send(
            &event("evt_dispute", "charge.dispute.created", now(), &dispute),
            SECRET,
            now(),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let p = wait_payment(&bed.orders, "o1", "never disputed", |p| {
        p.disputed_at.is_some()
    })
    .await;
    assert_eq!(p.dispute_reason.as_deref(), Some("fraudulent"));
    assert_eq!(p.state, PaymentState::Refunded);

    // An intent that names no dishpatch order is acknowledged and ignored.
    let mut stranger = bed.intent(&r, "pi_stranger", "succeeded").await;
    stranger["metadata"] = json!({});
    let (code, body) = bed
        .hook
        .send(
            &event("evt_x", "payment_intent.succeeded", now(), &stranger),
            SECRET,
            now(),
        )
        .await;
    assert_eq!((code, body["ignored"].is_string()), (200, true), "{body}");
    assert_eq!(
        http_get(bed.hook.addr, "/webhooks/stripe")
            .await
            .map(|(c, _)| c),
        Some(405)
    );
}

#[tokio::test]
async fn a_charge_still_waiting_when_the_order_is_cancelled_is_called_off_at_stripe() {
    let bed = bed("webhooks-cancel").await;
    let r = bed.waiting_order("o2", "pi_3ds2").await;
    // The operator's cancellation (the payment deadline passed), and its event.
    let now_s = jiff::Timestamp::now().to_string();
    let cancel = json!({"apiVersion": "dishpatch.dev/v1alpha1", "kind": "Order", "status": {
    "conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "priced", "lastTransitionTime": now_s},
        {"type": "Cancelled", "status": "True", "reason": "DeadlineExceeded",
         "message": "no payment", "lastTransitionTime": now_s},
    ]}});
    bed.orders
        .patch_status(
            "o2",
            &PatchParams::apply("dishpatch-operator").force(),
            &Patch::Apply(&cancel),
        )
        .await
        .unwrap();
    let broker = Broker::connect(&bed.amqp, "e2e").await.unwrap();
    let event = CloudEvent::new(
        EventType::OrderCancelled,
        "operator",
        r.clone(),
        Some("DeadlineExceeded: no payment".into()),
        jiff::Timestamp::now().to_string(),
    );
    broker
        .publish(
            &event,
            &dishpatch_messaging::trace::child_traceparent(&dishpatch_messaging::trace::trace_id(
                &r.uid, None,
            )),
        )
        .await
        .unwrap();
    // The intent is cancelled at Stripe (stripe-mock checks the call) and
    // the charge recorded as failed: nothing is owed, nothing can complete.
    let p = wait_payment(&bed.orders, "o2", "never called off", |p| {
        p.state == PaymentState::Failed
    })
    .await;
    assert!(
        p.failure_reason
            .as_deref()
            .unwrap_or_default()
            .contains("cancelled"),
        "{p:?}"
    );
    assert_eq!(p.action_url, None);
}
