//! W3C trace context (`traceparent`) for events.
//!
//! An order's trace id is its uid (a UUID is 128 bits, exactly a trace id),
//! unless the order carries a `traceparent` annotation from the request that
//! created it; so every component can put its spans on the order's trace
//! without passing state around.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use rand::RngExt;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Annotation on an Order carrying the trace context of the request that created it.
pub const TRACEPARENT_ANNOTATION: &str = "dishpatch.dev/traceparent";
/// The AMQP header carrying it.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The trace id of an order: from its annotation's traceparent if valid, else its uid.
pub fn trace_id(uid: &str, annotation: Option<&str>) -> String {
    if let Some(parent) = annotation.and_then(parse) {
        return parent.0;
    }
    let hex: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() == 32 && hex.chars().any(|c| c != '0') {
        hex
    } else {
        // Not a UUID: hash it into 128 bits so the id is still stable.
        let mut h: u128 = 0xcbf2_9ce4_8422_2325_cbf2_9ce4_8422_2325;
        for b in uid.bytes() {
            h ^= u128::from(b);
            h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
        format!("{h:032x}")
    }
}

/// A `traceparent` on the given trace for what is sent from here: the
/// current span when it is exported and on that trace, else a fresh span
/// id (the trace id still travels).
pub fn child_traceparent(trace_id: &str) -> String {
    let current = traceparent_of(&tracing::Span::current(), String::new);
    if parse(&current).is_some_and(|(t, _)| t == trace_id) {
        return current;
    }
    let span: u64 = rand::rng().random_range(1..=u64::MAX);
    format!("00-{trace_id}-{span:016x}-01")
}

/// [`child_traceparent`] on the trace of `parent`, a `traceparent`.
pub fn child_of(parent: &str) -> String {
    let trace = parse(parent).map_or_else(
        || format!("{:032x}", rand::rng().random_range(1..=u128::MAX)),
        |(t, _)| t,
    );
    child_traceparent(&trace)
}

/// Where an order's spans hang when nothing recorded the span that began
/// it (an Order applied with `kubectl`): a fixed parent on the order's trace
/// id, so every component's spans for the order still share one trace.
pub fn order_root(uid: &str, annotation: Option<&str>) -> String {
    if let Some(parent) = annotation.filter(|a| parse(a).is_some()) {
        return parent.to_string();
    }
    let trace = trace_id(uid, None);
    // The trace id's low half, never zero since the id is not.
    let low = u64::from_str_radix(&trace[16..], 16).unwrap_or(0);
    let span = if low == 0 { 1 } else { low };
    format!("00-{trace}-{span:016x}-01")
}

/// [`order_root`] of an Order: its uid and its annotation.
pub fn order_root_of(order: &dishpatch_api::Order) -> String {
    order_root(
        order.metadata.uid.as_deref().unwrap_or_default(),
        order
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRACEPARENT_ANNOTATION))
            .map(String::as_str),
    )
}

/// Makes `span` a child of the span `traceparent` names. Call it before
/// the span is entered; a no-op when spans are not exported.
pub fn adopt(span: &tracing::Span, traceparent: &str) {
    let Some((trace, parent)) = parse(traceparent) else {
        return;
    };
    let (Ok(trace), Ok(parent)) = (TraceId::from_hex(&trace), SpanId::from_hex(&parent)) else {
        return;
    };
    let remote = SpanContext::new(
        trace,
        parent,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The `traceparent` naming `span`, for what it starts elsewhere (an
/// event, an annotation); `fallback()` when spans are not exported, so the
/// trace id still travels.
pub fn traceparent_of(span: &tracing::Span, fallback: impl FnOnce() -> String) -> String {
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    if sc.is_valid() {
        format!("00-{:032x}-{:016x}-01", sc.trace_id(), sc.span_id())
    } else {
        fallback()
    }
}

/// Parses a `traceparent` into (trace id, parent span id).
pub fn parse(traceparent: &str) -> Option<(String, String)> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.chars().any(|c| c != '0')
        && hex(span, 16)
        && span.chars().any(|c| c != '0')
        && hex(flags, 2)
        && parts.next().is_none();
    valid.then(|| (trace.to_string(), span.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_without_annotation_hangs_on_its_uid() {
        let uid = "0b9e4c1e-7f39-4b56-9d55-1f0c1e2d3a4b";
        let root = order_root(uid, None);
        assert_eq!(
            root,
            "00-0b9e4c1e7f394b569d551f0c1e2d3a4b-9d551f0c1e2d3a4b-01"
        );
        assert_eq!(order_root(uid, Some("garbage")), root);
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(order_root(uid, Some(tp)), tp);
    }

    #[test]
    fn an_orders_root_is_its_annotation_else_its_uid() {
        let mut order = dishpatch_testkit::fixtures::order("o", "roma", &[("pizza", 1)]);
        let uid = "0b9e4c1e-7f39-4b56-9d55-1f0c1e2d3a4b";
        order.metadata.uid = Some(uid.into());
        assert_eq!(order_root_of(&order), order_root(uid, None));
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        order.metadata.annotations =
            Some([(TRACEPARENT_ANNOTATION.to_string(), tp.to_string())].into());
        assert_eq!(order_root_of(&order), tp);
    }

    #[test]
    fn without_export_a_span_names_the_fallback() {
        let span = tracing::info_span!("x");
        adopt(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        assert_eq!(traceparent_of(&span, || "fallback".into()), "fallback");
    }

    #[test]
    fn with_export_a_span_is_a_child_on_the_parents_trace() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt as _;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (own, nested) = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("handle");
            adopt(&span, parent);
            let own = traceparent_of(&span, || "fallback".into());
            let nested = span
                .in_scope(|| traceparent_of(&tracing::info_span!("publish"), || "fallback".into()));
            (own, nested)
        });
        let (trace, span) = parse(&own).unwrap();
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(span, "00f067aa0ba902b7", "the span has an id of its own");
        let (nested_trace, nested_span) = parse(&nested).unwrap();
        assert_eq!(nested_trace, trace, "a span inside it stays on the trace");
        assert_ne!(nested_span, span);
    }

    #[test]
    fn uid_becomes_the_trace_id() {
        let id = trace_id("0b9e4c1e-7f39-4b56-9d55-1f0c1e2d3a4b", None);
        assert_eq!(id, "0b9e4c1e7f394b569d551f0c1e2d3a4b");
        let tp = child_traceparent(&id);
        assert_eq!(parse(&tp).unwrap().0, id);
    }

    #[test]
    fn annotation_wins_when_valid() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id("x", Some(tp)), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(trace_id("x", Some("garbage")).len(), 32);
        assert_ne!(trace_id("x", Some("garbage")), trace_id("y", None));
    }

    #[test]
    fn rejects_invalid_traceparents() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
