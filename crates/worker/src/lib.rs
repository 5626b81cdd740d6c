//! What every dishpatch worker shares: consuming its durable queue with
//! manual acks, retrying transient failures, dead-lettering poison, writing
//! its own status section by server-side apply, publishing outcomes with the
//! order's trace context, and its metrics.
//!
//! A handler acks only by returning `Ok`, after the Order's status holds the
//! result; a redelivered message must find that result and change nothing.

mod consume;
mod metrics;
mod status;

pub use consume::{HandleError, Handler, run};
pub use metrics::WorkerMetrics;
pub use status::{OrderAccess, Stage};
