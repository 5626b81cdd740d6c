//! Live tracking: server-sent events pushed from the Orders watch.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;

use crate::app::AppState;
use crate::auth::Caller;
use crate::cache::{Following, OrderChange, rv_older};
use crate::metrics::Metrics;
use crate::orders::cached_order;
use crate::problem::{Problem, ProblemDetails};
use crate::views::{OrderEvent, OrderEventKind, OrderView};

/// Counts open streams, in all and per subject; dropped with the stream
/// when the client leaves.
struct ClientGuard {
    metrics: Arc<Metrics>,
    streams: Arc<Streams>,
    subject: String,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.metrics.sse_clients.dec();
        self.streams.leave(&self.subject);
    }
}

/// Open live-tracking streams per token subject, capped: one client can't
/// hold the façade's connections and memory with streams.
pub struct Streams {
    max_per_subject: usize,
    open: Mutex<HashMap<String, usize>>,
}

impl Streams {
    pub fn new(max_per_subject: usize) -> Self {
        Self {
            max_per_subject,
            open: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for `subject`, or says no when it has all its places.
    fn enter(&self, subject: &str) -> bool {
        let mut open = self.lock();
        let n = open.entry(subject.to_string()).or_insert(0);
        if *n >= self.max_per_subject {
            return false;
        }
        *n += 1;
        true
    }

    fn leave(&self, subject: &str) {
        let mut open = self.lock();
        if let Some(n) = open.get_mut(subject) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(subject);
            }
        }
    }
}

struct Tracker {
    id: String,
    rx: Following,
    /// What the client has: the last view sent (resourceVersion blanked), and its resourceVersion.
    sent: Option<OrderView>,
    sent_rv: Option<String>,
    /// An event to send before waiting for changes (the initial state).
    pending: Option<Event>,
    /// When the caller's token expires: the stream ends then, and the
    /// client reconnects with a fresh token (and `Last-Event-ID`).
    expires: tokio::time::Instant,
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
            let change = tokio::select! {
                changed = self.rx.changed() => match changed {
                    Some(change) => change,
                    None => return None, // the feed is gone: the façade shuts down
                },
                _ = tokio::time::sleep_until(self.expires) => return None,
            };
            match change {
                OrderChange::Applied(o) => {
                    if let Some(e) = self.consider(&o) {
                        return Some(e);
                    }
                }
                OrderChange::Deleted => {
                    self.done = true;
                    return Some(
                        Event::default()
                            .event(OrderEventKind::Deleted.name())
                            .data(format!("{{\"id\":\"{}\"}}", self.id)),
                    );
                }
                OrderChange::Unseen => {}
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
/// A `deleted` event ends the stream when the order is deleted. The stream
/// also ends when the caller's token expires: reconnect with a fresh one and
/// `Last-Event-ID`. A caller holds at most a few streams at once (429).
#[utoipa::path(get, path = "/api/v1/orders/{id}/events", tag = "orders",
    params(("id" = String, Path),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume: the id of the last event received")),
    responses((status = 200, content_type = "text/event-stream", body = OrderEvent,
        description = "Each event: `event: order`, `id: <resourceVersion>`, `data: <order JSON>` (or `event: deleted`)"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 429, body = ProblemDetails, content_type = "application/problem+json",
            description = "Too many streams open for this caller (`--max-streams-per-subject`)")),
    security(("bearer" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    caller.require_customer()?;
    // Subscribe before reading the current state so no change falls between.
    let rx = state.caches.feeds.subscribe(&id);
    let order = cached_order(&state, &caller, &id)?;
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let subject = caller.0.sub.clone();
    if !state.streams.enter(&subject) {
        let mut p = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-streams",
            "too many live-tracking streams open for this caller; close one first",
        );
        p.retry_after = Some(5);
        return Err(p);
    }
    state.metrics.sse_clients.inc();
    let now = jiff::Timestamp::now().as_second().max(0).unsigned_abs();
    let left = Duration::from_secs(caller.0.exp.saturating_sub(now));
    let mut tracker = Tracker {
        id: id.clone(),
        rx,
        sent: None,
        sent_rv: None,
        pending: None,
        expires: tokio::time::Instant::now() + left,
        done: false,
        _guard: ClientGuard {
            metrics: state.metrics.clone(),
            streams: state.streams.clone(),
            subject,
        },
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

/// How often a restaurant's stream looks at the cache for changes.
const STAFF_POLL: Duration = Duration::from_millis(500);

/// A restaurant's orders, live (server-sent events), for its staff.
///
/// First one `order` event per order in the cluster that is not finished,
/// then one for each new order and each change (data: the order, as in
/// `GET /api/v1/orders/{id}`), and `removed` (data `{"id": …}`) when an
/// order leaves the cluster. The stream ends when the token expires.
#[utoipa::path(get, path = "/api/v1/restaurants/{name}/events", tag = "restaurant staff",
    params(("name" = String, Path, description = "The restaurant's name")),
    responses((status = 200, content_type = "text/event-stream", body = OrderEvent,
        description = "`event: order` with the order, or `event: removed`"),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 429, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn restaurant_stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    if !crate::staff::works_for(&caller, &name) {
        return Err(Problem::forbidden(format!(
            "this needs a token of restaurant {name}'s staff"
        )));
    }
    let subject = caller.0.sub.clone();
    if !state.streams.enter(&subject) {
        let mut p = Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-streams",
            "too many live streams open for this caller; close one first",
        );
        p.retry_after = Some(5);
        return Err(p);
    }
    state.metrics.sse_clients.inc();
    let now = jiff::Timestamp::now().as_second().max(0).unsigned_abs();
    let expires =
        tokio::time::Instant::now() + Duration::from_secs(caller.0.exp.saturating_sub(now));
    struct Board {
        state: AppState,
        restaurant: String,
        /// What the client has: per order, the view last sent (resourceVersion blanked).
        sent: HashMap<String, OrderView>,
        queue: std::collections::VecDeque<Event>,
        first: bool,
        expires: tokio::time::Instant,
        _guard: ClientGuard,
    }
    impl Board {
        /// Queues what changed since the last look.
        fn look(&mut self) {
            let mut seen = std::collections::HashSet::new();
            let mut orders: Vec<_> = self
                .state
                .caches
                .orders
                .state()
                .into_iter()
                .filter(|o| o.spec.restaurant_ref.name == self.restaurant)
                .collect();
            orders.sort_by_key(|o| crate::cache::sort_key(o));
            for o in orders {
                let view = OrderView::from(o.as_ref());
                seen.insert(view.id.clone());
                let key = without_rv(&view);
                if self.sent.get(&view.id) == Some(&key) {
                    continue;
                }
                // At first, only what is still going on.
                if self.first && crate::views::phase(&o).is_terminal() {
                    continue;
                }
                self.sent.insert(view.id.clone(), key);
                self.queue.push_back(order_event(&view));
            }
            let gone: Vec<String> = self
                .sent
                .keys()
                .filter(|id| !seen.contains(*id))
                .cloned()
                .collect();
            for id in gone {
                self.sent.remove(&id);
                self.queue.push_back(
                    Event::default()
                        .event("removed")
                        .data(format!("{{\"id\":\"{id}\"}}")),
                );
            }
            self.first = false;
        }

        async fn next(&mut self) -> Option<Event> {
            loop {
                if let Some(e) = self.queue.pop_front() {
                    return Some(e);
                }
                if !self.first {
                    tokio::select! {
                        _ = tokio::time::sleep(STAFF_POLL) => {}
                        _ = tokio::time::sleep_until(self.expires) => return None,
                    }
                }
                self.look();
            }
        }
    }
    let board = Board {
        state: state.clone(),
        restaurant: name,
        sent: HashMap::new(),
        queue: std::collections::VecDeque::new(),
        first: true,
        expires,
        _guard: ClientGuard {
            metrics: state.metrics.clone(),
            streams: state.streams.clone(),
            subject,
        },
    };
    let events =
        futures::stream::unfold(
            board,
            |mut b| async move { b.next().await.map(|e| (Ok(e), b)) },
        );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
