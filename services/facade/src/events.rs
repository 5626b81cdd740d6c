//! Live tracking: server-sent events pushed from the Orders watch.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use kube::ResourceExt;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::app::AppState;
use crate::auth::Caller;
use crate::cache::{OrderChange, rv_older};
use crate::metrics::Metrics;
use crate::orders::cached_order;
use crate::problem::{Problem, ProblemDetails};
use crate::views::{OrderEvent, OrderEventKind, OrderView};

/// Counts open streams; dropped with the stream when the client leaves.
struct ClientGuard(Arc<Metrics>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.sse_clients.dec();
    }
}

struct Tracker {
    id: String,
    rx: broadcast::Receiver<OrderChange>,
    state: AppState,
    /// What the client has: the last view sent (resourceVersion blanked), and its resourceVersion.
    sent: Option<OrderView>,
    sent_rv: Option<String>,
    /// An event to send before reading the broadcast (the initial state).
    pending: Option<Event>,
    done: bool,
    _guard: ClientGuard,
}

fn order_event(view: &OrderView) -> Event {
    let data = serde_json::to_string(view).unwrap_or_else(|_| "{}".to_string());
    Event::default()
        .event(OrderEventKind::Order.name())
        .id(view.resource_version.clone())
        .data(data)
}

fn without_rv(view: &OrderView) -> OrderView {
    let mut v = view.clone();
    v.resource_version.clear();
    v
}

impl Tracker {
    /// The event for `order` if it is newer than what the client has and
    /// differs in something the client sees; a change of only bookkeeping
    /// (managed fields, conditions' heartbeat) sends nothing.
    fn consider(&mut self, order: &dishpatch_api::Order) -> Option<Event> {
        let rv = order.metadata.resource_version.as_deref();
        if self.sent_rv.is_some() && !rv_older(self.sent_rv.as_deref(), rv) {
            return None;
        }
        let view = OrderView::from(order);
        let key = without_rv(&view);
        self.sent_rv = Some(view.resource_version.clone());
        if self.sent.as_ref() == Some(&key) {
            return None;
        }
        self.sent = Some(key);
        Some(order_event(&view))
    }

    async fn next(&mut self) -> Option<Event> {
        if let Some(e) = self.pending.take() {
            return Some(e);
        }
        if self.done {
            return None;
        }
        loop {
            match self.rx.recv().await {
                Ok(OrderChange::Applied(o)) if o.name_any() == self.id => {
                    if let Some(e) = self.consider(&o) {
                        return Some(e);
                    }
                }
                Ok(OrderChange::Deleted(o)) if o.name_any() == self.id => {
                    self.done = true;
                    return Some(
                        Event::default()
                            .event(OrderEventKind::Deleted.name())
                            .data(format!("{{\"id\":\"{}\"}}", self.id)),
                    );
                }
                Ok(_) => {}
                // Missed some changes: the cache has the latest state.
                Err(RecvError::Lagged(_)) => {
                    if let Some(o) = self.state.caches.order(&self.id)
                        && let Some(e) = self.consider(&o)
                    {
                        return Some(e);
                    }
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// Follow an order live (server-sent events).
///
/// Each change of the order's phase or of a stage is one `order` event whose
/// `id` is the order's resourceVersion and whose data is the order (as in
/// `GET /api/v1/orders/{id}`). The current state comes first, unless the
/// `Last-Event-ID` the client reconnects with is already the current one.
/// An `deleted` event ends the stream when the order is deleted.
#[utoipa::path(get, path = "/api/v1/orders/{id}/events", tag = "orders",
    params(("id" = String, Path),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume: the id of the last event received")),
    responses((status = 200, content_type = "text/event-stream", body = OrderEvent,
        description = "Each event: `event: order`, `id: <resourceVersion>`, `data: <order JSON>` (or `event: deleted`)"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    caller.require_customer()?;
    // Subscribe before reading the current state so no change falls between.
    let rx = state.caches.changes.subscribe();
    let order = cached_order(&state, &caller, &id)?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    state.metrics.sse_clients.inc();
    let mut tracker = Tracker {
        id,
        rx,
        state: state.clone(),
        sent: None,
        sent_rv: None,
        pending: None,
        done: false,
        _guard: ClientGuard(state.metrics.clone()),
    };
    let current = OrderView::from(order.as_ref());
    if last_event_id.as_deref() == Some(current.resource_version.as_str()) {
        // The client already has this state.
        tracker.sent = Some(without_rv(&current));
        tracker.sent_rv = Some(current.resource_version);
    } else {
        tracker.pending = tracker.consider(&order);
    }
    let events = futures::stream::unfold(tracker, |mut t| async move {
        t.next().await.map(|e| (Ok(e), t))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
