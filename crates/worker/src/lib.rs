//! What every dishpatch worker shares: consuming its durable queue with
//! manual acks, retrying transient failures, dead-lettering poison, writing
//! its own status section by server-side apply, publishing outcomes with the
//! order's trace context, and its metrics.
//!
//! A handler acks only by returning `Ok`, after the Order's status holds the
//! result; a redelivered message must find that result and change nothing.

mod consume;
mod metrics;
mod service;
mod status;

pub use consume::{HandleError, Handler, run};
pub use dishpatch_messaging::trace;
pub use metrics::WorkerMetrics;
pub use service::{CommonArgs, Parts, ServiceError, serve};
pub use status::{OrderAccess, Stage};

/// A fresh `traceparent` on an order's trace, for work a worker starts on
/// its own (timers) rather than in answer to a message, when no span of
/// it is exported.
pub fn child_traceparent(order_uid: &str) -> String {
    trace::child_traceparent(&trace::trace_id(order_uid, None))
}
