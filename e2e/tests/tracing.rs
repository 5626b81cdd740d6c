//! One trace per order, in Jaeger (issue 12): an order placed through the
//! façade and delivered by every component as a real process, each
//! exporting its spans over OTLP to a real Jaeger (the v2 all-in-one,
//! in-memory). Jaeger's query API then holds one trace for the order with
//! spans from all six services, hung together as the design says (the
//! façade's request → the operator's reconciles → each publish → the
//! consumer's handler), and no span whose parent is missing.
//!
//!   cargo test -p dishpatch-e2e --test tracing -- --nocapture
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod procs;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dishpatch_api::{Courier, Order, OrderPhase, Restaurant};
use dishpatch_messaging::trace;
use dishpatch_testkit::{
    TestNamespace, amqp_vhost, cache_dir, client, ensure_crds, fixtures, workspace_root,
};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use procs::{Spec, free_port, http, http_get};
use serde_json::Value;

const SERVICES: [&str; 6] = [
    "dishpatch-facade",
    "dishpatch-operator",
    "dishpatch-payment",
    "dishpatch-kitchen",
    "dishpatch-delivery",
    "dishpatch-notification",
];

/// Jaeger on ports of its own, with the project's config.
fn start_jaeger(otlp: SocketAddr, query: SocketAddr, health: SocketAddr) -> tokio::process::Child {
    let out = std::process::Command::new(workspace_root().join("hack/tools.sh"))
        .args(["path", "jaeger"])
        .output()
        .unwrap();
    let path = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is not built: run hack/deps.sh (hack/tools.sh jaeger)"
    );
    let config = workspace_root().join("hack/jaeger.yaml");
    tokio::process::Command::new(path)
        .arg("--config")
        .arg(format!("file:{}", config.display()))
        .env("JAEGER_OTLP_ADDR", otlp.to_string())
        .env("JAEGER_QUERY_ADDR", query.to_string())
        .env(
            "JAEGER_QUERY_GRPC_ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("JAEGER_HEALTH_ADDR", health.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

struct Span {
    id: String,
    name: String,
    service: String,
    parent: Option<String>,
    tags: HashMap<String, String>,
}

fn spans_of(trace: &Value) -> Vec<Span> {
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let process = s["processID"].as_str().unwrap();
            let parent = s["references"].as_array().and_then(|refs| {
                refs.iter()
                    .find(|r| r["refType"] == "CHILD_OF")
                    .map(|r| r["spanID"].as_str().unwrap().to_string())
            });
            let tags = s["tags"]
                .as_array()
                .map(|tags| {
                    tags.iter()
                        .map(|t| {
                            let v = match &t["value"] {
                                Value::String(v) => v.clone(),
                                other => other.to_string(),
                            };
                            (t["key"].as_str().unwrap().to_string(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            Span {
                id: s["spanID"].as_str().unwrap().to_string(),
                name: s["operationName"].as_str().unwrap().to_string(),
                service: processes[process]["serviceName"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                parent,
                tags,
            }
        })
        .collect()
}

#[tokio::test]
async fn an_order_is_one_trace_across_all_six_services_in_jaeger() {
    let client = client().await.unwrap();
    ensure_crds(&client).await.unwrap();
    let ns = TestNamespace::create(&client, "tracing").await.unwrap();
    let amqp = amqp_vhost(&ns.name).await.unwrap();
    let work = cache_dir().join("e2e-tracing").join(&ns.name);
    std::fs::create_dir_all(&work).unwrap();
    let ledger = work.join("ledger.jsonl");
    let key_file = work.join("jwt.key");
    std::fs::write(
        &key_file,
        format!("tracing-key-{}-0123456789abcdef", ns.name),
    )
    .unwrap();

    ns.api::<Restaurant>()
        .create(
            &PostParams::default(),
            &fixtures::restaurant("roma", true, None),
        )
        .await
        .unwrap();
    ns.api::<Courier>()
        .create(
            &PostParams::default(),
            &fixtures::courier("c1", "mitte", true),
        )
        .await
        .unwrap();

    let (otlp, query, health) = (
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
        SocketAddr::from(([127, 0, 0, 1], free_port())),
    );
    let _jaeger = start_jaeger(otlp, query, health);
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(health, "/status")
        .await
        .is_none_or(|(code, _)| code != 200)
    {
        assert!(Instant::now() < deadline, "Jaeger never became healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A real SMTP server that accepts and discards every e-mail.
    let (_smtp, smtp_port) = procs::smtp_sink();
    let smtp_port = smtp_port.to_string();

    let spec = Spec {
        namespace: &ns.name,
        amqp_url: &amqp,
        ledger: &ledger,
        log: None,
        rust_log: "warn",
    };
    let endpoint = format!("http://{otlp}");
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (listen_s, key_s) = (listen.to_string(), key_file.to_str().unwrap().to_string());
    let procs = [
        spec.start_with_env("operator", &[], &env),
        spec.start_with_env("payment", &[], &env),
        spec.start_with_env("kitchen", &[], &env),
        spec.start_with_env("delivery", &[], &env),
        spec.start_with_env(
            "notification",
            &["--smtp-host", "127.0.0.1", "--smtp-port", &smtp_port],
            &env,
        ),
        spec.start_with_env(
            "facade",
            &["--listen", &listen_s, "--jwt-key-file", &key_s],
            &env,
        ),
    ];
    for p in &procs {
        p.wait_ready(Duration::from_secs(60)).await;
    }
    let bearer = procs::customer_bearer(&key_file, "cust-1", "1h", &[]);

    let body = serde_json::json!({
        "restaurant": "roma",
        "items": [{"menuItem": "pizza", "quantity": 1}],
        "contact": {"email": "jane@example.com"},
        "deliveryAddress": {"street": "Torstraße 1", "city": "Berlin", "postalCode": "10119", "country": "DE"},
        "payment": {"token": "tok_visa"}
    });
    let (code, answer) = http(
        "POST",
        format!("http://{listen}/api/v1/orders"),
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(code, 201, "{answer}");
    let id = serde_json::from_str::<Value>(&answer).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let orders: Api<Order> = ns.api();
    let deadline = Instant::now() + Duration::from_secs(60);
    let order = loop {
        let o = orders.get(&id).await.unwrap();
        if o.status.as_ref().and_then(|s| s.phase) == Some(OrderPhase::Delivered) {
            break o;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached Delivered: {:?}",
            o.status
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let uid = order.uid().unwrap();
    let root = order
        .annotations()
        .get(trace::TRACEPARENT_ANNOTATION)
        .cloned()
        .expect("the façade annotates the order with its request's span");
    let (trace_id, root_span) = trace::parse(&root).unwrap();

    // Spans are batched for export (every 5 s): wait until every service's
    // have arrived, and no more come.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    let spans = loop {
        let (code, text) = http(
            "GET",
            format!("http://{query}/api/traces/{trace_id}"),
            &[],
            String::new(),
        )
        .await;
        if code == 200 {
            let v: Value = serde_json::from_str(&text).unwrap();
            let spans = spans_of(&v["data"][0]);
            let services: BTreeSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
            if SERVICES.iter().all(|s| services.contains(s)) && spans.len() == last {
                break spans;
            }
            last = spans.len();
        }
        assert!(
            Instant::now() < deadline,
            "the trace never held all six services (last answer {code})"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    };

    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    let mut per_service: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &spans {
        *per_service.entry(s.service.as_str()).or_default() += 1;
    }
    eprintln!(
        "tracing: {} spans in trace {trace_id}: {per_service:?}",
        spans.len()
    );

    // The root: the façade's request, the span the annotation names.
    let request = by_id
        .get(root_span.as_str())
        .expect("the façade's request span is in the trace");
    assert_eq!(request.service, "dishpatch-facade");
    assert_eq!(request.parent, None, "the request began the trace");
    assert_eq!(
        request.tags.get("order.uid").map(String::as_str),
        Some(uid.as_str())
    );
    // No orphans: every other span's parent is in the trace.
    for s in &spans {
        if s.id == root_span {
            continue;
        }
        let parent = s.parent.as_deref().unwrap_or_else(|| {
            panic!(
                "{} {} has no parent in the order's trace",
                s.service, s.name
            )
        });
        assert!(
            by_id.contains_key(parent),
            "{} {} hangs on a span the trace lacks ({parent})",
            s.service,
            s.name
        );
    }
    let parent_of = |s: &Span| by_id[s.parent.as_deref().unwrap()];
    // The structure: reconciles under the request; every handler under a
    // publish; the order's attributes on each.
    let reconciles: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "reconcile order")
        .collect();
    assert!(!reconciles.is_empty(), "no reconcile spans");
    for r in &reconciles {
        assert_eq!(r.service, "dishpatch-operator");
        assert_eq!(
            parent_of(r).id,
            root_span,
            "a reconcile hangs under the façade's request"
        );
        assert_eq!(r.tags.get("order.uid"), Some(&uid));
        assert_eq!(r.tags.get("order.namespace"), Some(&ns.name));
    }
    let handlers: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name.starts_with("handle "))
        .collect();
    for service in &SERVICES[2..] {
        assert!(
            handlers.iter().any(|h| h.service == *service),
            "{service} handled no event of the order"
        );
    }
    for h in &handlers {
        let p = parent_of(h);
        assert!(
            p.name.starts_with("publish "),
            "{} {} hangs under {} {}, not a publish",
            h.service,
            h.name,
            p.service,
            p.name
        );
        assert_eq!(h.tags.get("order.uid"), Some(&uid));
    }
    // Kubernetes API calls are child spans of the work that made them.
    let api_calls: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.tags
                .get("http.url")
                .is_some_and(|u| u.contains("/apis/dishpatch.dev/"))
        })
        .collect();
    for service in [
        "dishpatch-operator",
        "dishpatch-payment",
        "dishpatch-facade",
    ] {
        assert!(
            api_calls.iter().any(|c| c.service == service),
            "no Kubernetes API call of {service} in the trace"
        );
    }
    drop(procs);
}
