//! W3C trace context (`traceparent`) for events.
//!
//! An order's trace id is its uid (a UUID is 128 bits, exactly a trace id),
//! unless the order carries a `traceparent` annotation from the request that
//! created it; so every component can put its spans on the order's trace
//! without passing state around.

use rand::RngExt;

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

/// A new `traceparent` with a fresh span id on the given trace.
pub fn child_traceparent(trace_id: &str) -> String {
    let span: u64 = rand::rng().random_range(1..=u64::MAX);
    format!("00-{trace_id}-{span:016x}-01")
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
