//! Placing, reading, cancelling and rating orders.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dishpatch_api::order::{
    Address, CancellationRequest, Contact, Customer, OrderItem, PaymentMethod, RestaurantRef,
};
use dishpatch_api::{Order, OrderPhase, OrderSpec};
use dishpatch_messaging::trace;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::Instrument as _;

use crate::app::{ApiJson, AppState};
use crate::auth::Caller;
use crate::cache::{SortKey, sort_key};
use crate::problem::{Problem, ProblemDetails, with_timeout};
use crate::views::{
    CancelBody, FEEDBACK_ANNOTATION, FeedbackBody, OrderPage, OrderView, PlaceOrder,
    RATING_ANNOTATION, phase,
};

/// The field manager of every write the façade makes.
pub const FIELD_MANAGER: &str = "dishpatch-facade";

/// Patches as the façade's field manager, so `--show-managed-fields` says who wrote.
pub fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}
/// Header that makes order placement idempotent.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The Order name for a customer's idempotency key: a retry with the same key
/// maps to the same name, so the apiserver itself refuses the duplicate.
pub fn order_name(customer: &str, key: &str) -> String {
    // The NUL separator keeps ("a", "bc") and ("ab", "c") apart.
    let digest = Sha256::digest(format!("{customer}\0{key}").as_bytes());
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("o-{hex}")
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| {
            Problem::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")
                .field("Idempotency-Key", "1 to 255 visible ASCII characters")
        })?;
    Ok(Some(key.to_string()))
}

/// Whether the caller may see this order. Others' orders are reported as
/// missing (404), so ids cannot be probed.
pub fn visible(caller: &Caller, order: &Order) -> bool {
    caller.is_admin() || order.spec.customer.id == caller.0.sub
}

/// Same rules as the CRD's (pattern, and no card number: 12 or more digits
/// in a row): checked here too so a card number pasted into the token never
/// reaches the apiserver (and its audit log).
fn valid_payment_token(t: &str) -> bool {
    let body = ["tok_", "pm_", "src_"]
        .iter()
        .find_map(|p| t.strip_prefix(p));
    (5..=128).contains(&t.len())
        && body.is_some_and(|b| {
            !b.is_empty() && b.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
        && !carries_card_number(t)
}

/// 12 or more ASCII digits in a row: the shortest card numbers have 12.
fn carries_card_number(t: &str) -> bool {
    t.split(|c: char| !c.is_ascii_digit())
        .any(|run| run.len() >= 12)
}

/// Checks what only the façade can know (the restaurant and its menu, from
/// the cache) and builds the spec. Shapes and bounds are the CRD's to check:
/// its schema and CEL rules are the single source of truth, and their
/// rejections come back as 422 naming the field.
fn build_spec(state: &AppState, caller: &Caller, body: PlaceOrder) -> Result<OrderSpec, Problem> {
    let restaurant = state.caches.restaurant(&body.restaurant).ok_or_else(|| {
        Problem::invalid("restaurant", format!("no restaurant {}", body.restaurant))
    })?;
    if !restaurant.spec.open {
        return Err(Problem::invalid("restaurant", "the restaurant is closed"));
    }
    for (i, line) in body.items.iter().enumerate() {
        if restaurant.spec.item(&line.menu_item).is_none() {
            return Err(Problem::invalid(
                &format!("items[{i}].menuItem"),
                format!("{} is not on the menu", line.menu_item),
            ));
        }
    }
    if !valid_payment_token(&body.payment.token) {
        return Err(Problem::invalid(
            "payment.token",
            "must be a payment provider token (tok_…, pm_… or src_…) with no card number in it (12 or more digits in a row); never send card data",
        ));
    }
    let claims = &caller.0;
    let contact = body.contact.unwrap_or_default();
    let contact = Contact {
        email: contact.email.or_else(|| claims.email.clone()),
        phone: contact.phone.or_else(|| claims.phone.clone()),
    };
    if contact.email.is_none() && contact.phone.is_none() {
        return Err(Problem::invalid(
            "contact",
            "the order needs an email or a phone: send contact, or use a token with an email claim",
        ));
    }
    Ok(OrderSpec {
        customer: Customer {
            id: claims.sub.clone(),
            name: body
                .customer_name
                .or_else(|| claims.name.clone())
                .unwrap_or_else(|| claims.sub.clone()),
            contact,
        },
        restaurant_ref: RestaurantRef {
            name: body.restaurant,
        },
        items: body
            .items
            .into_iter()
            .map(|l| OrderItem {
                menu_item: l.menu_item,
                quantity: l.quantity,
                notes: l.notes,
            })
            .collect(),
        delivery_address: Address {
            street: body.delivery_address.street,
            city: body.delivery_address.city,
            postal_code: body.delivery_address.postal_code,
            country: body.delivery_address.country,
            instructions: body.delivery_address.instructions,
        },
        payment: PaymentMethod {
            token: Some(body.payment.token),
            secret_ref: None,
        },
        cancellation: None,
        confirmation: None,
    })
}

/// Whether a retry asks for the same order (a later cancellation or the
/// restaurant's decision aside).
fn same_request(existing: &OrderSpec, wanted: &OrderSpec) -> bool {
    let mut existing = existing.clone();
    existing.cancellation = None;
    existing.confirmation = None;
    &existing == wanted
}

/// A random, valid W3C trace id (128 bits, not all zero).
fn new_trace_id() -> String {
    use rand::RngExt;
    let id: u128 = rand::rng().random_range(1..=u128::MAX);
    format!("{id:032x}")
}

fn created(view: OrderView) -> Response {
    let location = format!("/api/v1/orders/{}", view.id);
    let mut response = (StatusCode::CREATED, Json(view)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// Place an order.
///
/// With an `Idempotency-Key` header, a retry returns the order the first
/// request created (200) instead of placing a second one; the same key with a
/// different body is a 409.
#[utoipa::path(post, path = "/api/v1/orders", tag = "orders",
    request_body = PlaceOrder,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$", description = "Makes retries safe: the same key returns the same order (1 to 255 visible ASCII characters)")),
    responses(
        (status = 201, body = OrderView, description = "Placed", headers(("Location" = String))),
        (status = 200, body = OrderView, description = "A retry: the order placed earlier with this key"),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "The key was used for a different order"),
        (status = 422, body = ProblemDetails, content_type = "application/problem+json", description = "Invalid order; `errors` names the field"),
        (status = 503, body = ProblemDetails, content_type = "application/problem+json"),
    ),
    security(("bearer" = [])))]
pub async fn place(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<PlaceOrder>,
) -> Result<Response, Problem> {
    caller.require_customer()?;
    let key = idempotency_key(&headers)?;
    let spec = build_spec(&state, &caller, body)?;
    let (name, generate_name) = match &key {
        Some(k) => (Some(order_name(&caller.0.sub, k)), None),
        None => (None, Some("o-".to_string())),
    };
    // The order joins the caller's trace (W3C `traceparent`) or starts one;
    // every component puts its spans on it through this annotation, which
    // names this request's span: the root of the order's work.
    let incoming = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|t| trace::parse(t).is_some());
    let span = tracing::info_span!(
        "request",
        otel.name = "POST /api/v1/orders",
        otel.kind = "server",
        http.request.method = "POST",
        http.route = "/api/v1/orders",
        order.name = tracing::field::Empty,
        order.namespace = %state.caches.namespace,
        order.uid = tracing::field::Empty,
    );
    let trace_id = match incoming {
        Some(parent) => {
            trace::adopt(&span, parent);
            trace::parse(parent).map_or_else(new_trace_id, |(t, _)| t)
        }
        None => new_trace_id(),
    };
    let root = trace::traceparent_of(&span, || trace::child_traceparent(&trace_id));
    let order = Order {
        metadata: ObjectMeta {
            name: name.clone(),
            generate_name,
            annotations: Some(BTreeMap::from([(
                trace::TRACEPARENT_ANNOTATION.to_string(),
                root,
            )])),
            ..Default::default()
        },
        spec: spec.clone(),
        status: None,
    };
    let api: Api<Order> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    let result = with_timeout(state.api_timeout, api.create(&params, &order))
        .instrument(span.clone())
        .await;
    match result {
        Ok(o) => {
            span.record("order.name", o.name_any());
            span.record("order.uid", o.uid().unwrap_or_default());
            state.metrics.orders_created.inc();
            tracing::info!(order = %o.name_any(), customer = %o.spec.customer.id, "order placed");
            state
                .caches
                .wait_for_order(&o.name_any(), o.metadata.resource_version.as_deref())
                .await;
            Ok(created(OrderView::from(&o)))
        }
        Err(e) if e.is_already_exists() => {
            let name = name.unwrap_or_default();
            let existing = with_timeout(state.api_timeout, api.get(&name)).await?;
            if !same_request(&existing.spec, &spec) {
                return Err(Problem::conflict(
                    "this Idempotency-Key was already used for a different order",
                )
                .field("Idempotency-Key", "already used for a different order"));
            }
            state.metrics.idempotent_replays.inc();
            Ok((StatusCode::OK, Json(OrderView::from(&existing))).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

/// One of the caller's orders.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = String, Path)),
    responses((status = 200, body = OrderView),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 503, description = "The order is not in the cluster and the order history cannot be read", body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, Problem> {
    caller.require_customer()?;
    if let Ok(o) = cached_order(&state, &caller, &id) {
        return Ok(Json(OrderView::from(o.as_ref())));
    }
    // Gone from the cluster: the order history may have it.
    let Some(archive) = &state.archive else {
        return Err(Problem::not_found(format!("no order {id}")));
    };
    match archive.get(&state.caches.namespace, &id).await {
        Ok(Some(o)) if visible(&caller, &o) => Ok(Json(OrderView::archived(&o))),
        Ok(_) => Err(Problem::not_found(format!("no order {id}"))),
        Err(e) => {
            tracing::warn!(error = %e, order = %id, "reading the order history");
            Err(Problem::unavailable(
                "the order history cannot be read right now; try again shortly",
            ))
        }
    }
}

/// The caller's order from the cache, or 404 (also for others' orders).
pub fn cached_order(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<std::sync::Arc<Order>, Problem> {
    state
        .caches
        .order(id)
        .filter(|o| visible(caller, o))
        .ok_or_else(|| Problem::not_found(format!("no order {id}")))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// The `continue` value of the previous page.
    #[serde(rename = "continue")]
    #[param(rename = "continue")]
    pub continue_: Option<String>,
    /// Only this customer's orders (admins; a customer sees only their own anyway).
    pub customer: Option<String>,
    /// Only orders from this restaurant.
    pub restaurant: Option<String>,
    /// Only orders created at or after this time (RFC 3339).
    #[serde(rename = "createdFrom")]
    #[param(rename = "createdFrom")]
    pub created_from: Option<String>,
    /// Only orders created before this time (RFC 3339).
    #[serde(rename = "createdBefore")]
    #[param(rename = "createdBefore")]
    pub created_before: Option<String>,
}

fn timestamp_param(name: &str, v: Option<&str>) -> Result<Option<jiff::Timestamp>, Problem> {
    v.map(|v| {
        v.parse::<jiff::Timestamp>().map_err(|_| {
            Problem::bad_request(format!("{name} must be an RFC 3339 time"))
                .field(name, "RFC 3339, for example 2026-12-01T00:00:00Z")
        })
    })
    .transpose()
}

fn encode_cursor(k: &(i64, i32, String)) -> String {
    format!("{}.{}.{}", k.0, k.1, k.2)
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_cursor(s: &str) -> Option<(i64, i32, String)> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '.');
    Some((
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.to_string(),
    ))
}

/// The caller's orders, newest first (admins see everyone's): those in the
/// cluster, then those in the order history, as one list.
#[utoipa::path(get, path = "/api/v1/orders", tag = "orders",
    params(ListQuery),
    responses((status = 200, body = OrderPage),
        (status = 400, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<OrderPage>, Problem> {
    caller.require_customer()?;
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(Problem::bad_request("limit must be 1 to 100").field("limit", "1 to 100"));
    }
    let after = match query.continue_.as_deref() {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            Problem::bad_request("continue is not a value this API returned")
                .field("continue", "invalid")
        })?),
    };
    if let Some(c) = &query.customer
        && !caller.is_admin()
        && *c != caller.0.sub
    {
        return Err(Problem::forbidden(
            "only admins may list another customer's orders",
        ));
    }
    let filter = dishpatch_archive::Filter {
        // The caller's orders only (an admin's: everyone's, or one customer's).
        customer: if caller.is_admin() {
            query.customer.clone()
        } else {
            Some(caller.0.sub.clone())
        },
        restaurant: query.restaurant.clone(),
        created_from: timestamp_param("createdFrom", query.created_from.as_deref())?,
        created_before: timestamp_param("createdBefore", query.created_before.as_deref())?,
    };
    let n = limit as usize + 1;
    let matches = |o: &Order| {
        filter
            .restaurant
            .as_ref()
            .is_none_or(|r| *r == o.spec.restaurant_ref.name)
            && created_within(o, &filter)
    };
    // From the index, then from the history; both in the same order, so one
    // cursor pages through the two as through one list.
    let mut page: Vec<(SortKey, OrderView)> = state
        .caches
        .index
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .page(filter.customer.as_deref(), after.as_ref(), n, |k| {
            state
                .caches
                .order(&k.2)
                .filter(|o| visible(&caller, o) && matches(o))
        })
        .into_iter()
        .map(|(k, o)| (k, OrderView::from(o.as_ref())))
        .collect();
    let mut incomplete = false;
    if let Some(archive) = &state.archive {
        let cursor = after.as_ref().map(|k| dishpatch_archive::Cursor {
            created: jiff::Timestamp::new(k.0, k.1).unwrap_or_default(),
            name: k.2.clone(),
        });
        match archive
            .page(&state.caches.namespace, &filter, cursor.as_ref(), n)
            .await
        {
            Ok(old) => page.extend(
                old.iter()
                    // Archived and not yet deleted: the live copy is listed.
                    .filter(|o| {
                        state
                            .caches
                            .order(&o.name_any())
                            .is_none_or(|live| live.uid() != o.uid())
                    })
                    .filter(|o| visible(&caller, o))
                    .map(|o| (sort_key(o), OrderView::archived(o))),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "reading the order history for a list");
                incomplete = true;
            }
        }
        page.sort_by(|a, b| b.0.cmp(&a.0));
    }
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let continue_ = if more {
        page.last().map(|(k, _)| encode_cursor(k))
    } else {
        None
    };
    Ok(Json(OrderPage {
        items: page.into_iter().map(|(_, v)| v).collect(),
        incomplete,
        continue_,
    }))
}

fn created_within(o: &Order, f: &dishpatch_archive::Filter) -> bool {
    let Some(t) = o.metadata.creation_timestamp.as_ref().map(|t| t.0) else {
        return f.created_from.is_none() && f.created_before.is_none();
    };
    f.created_from.is_none_or(|from| t >= from) && f.created_before.is_none_or(|b| t < b)
}

/// Whether `id` can be the name of an Order (a DNS-1123 subdomain). Ids
/// from the URL reach the apiserver's URL only when they are: anything else
/// (`..`, `/`, spaces, …) could not be sent, or would address another path.
pub fn is_object_name(id: &str) -> bool {
    let alnum = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = id.as_bytes();
    matches!((bytes.first(), bytes.last()), (Some(&f), Some(&l)) if alnum(f) && alnum(l))
        && bytes.len() <= 253
        && bytes.iter().all(|&c| alnum(c) || c == b'-' || c == b'.')
}

/// The caller's order, read from the apiserver: writes decide on fresh data.
async fn fresh_order(state: &AppState, caller: &Caller, id: &str) -> Result<Order, Problem> {
    if !is_object_name(id) {
        return Err(Problem::not_found(format!("no order {id}")));
    }
    let api: Api<Order> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    match with_timeout(state.api_timeout, api.get_opt(id)).await? {
        Some(o) if visible(caller, &o) => Ok(o),
        _ => Err(Problem::not_found(format!("no order {id}"))),
    }
}

/// Ask to cancel an order. Allowed until the courier picks it up; the
/// operator does the cancelling (refund, stock, courier).
#[utoipa::path(post, path = "/api/v1/orders/{id}/cancel", tag = "orders",
    params(("id" = String, Path)),
    request_body = CancelBody,
    responses((status = 202, body = OrderView, description = "Cancellation requested"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "Too late, or a different cancellation was already requested"),
        (status = 422, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<CancelBody>,
) -> Result<Response, Problem> {
    caller.require_customer()?;
    let order = fresh_order(&state, &caller, &id).await?;
    if let Some(existing) = &order.spec.cancellation {
        if existing.reason == body.reason {
            return Ok((StatusCode::ACCEPTED, Json(OrderView::from(&order))).into_response());
        }
        return Err(Problem::conflict(
            "a cancellation was already requested for this order; it cannot be changed",
        ));
    }
    let current = phase(&order);
    if !dishpatch_api::lifecycle::cancellable(current) {
        return Err(Problem::conflict(format!(
            "the order is {current} and can no longer be cancelled"
        )));
    }
    let patch = serde_json::json!({
        "spec": {"cancellation": CancellationRequest { reason: body.reason }}
    });
    let api: Api<Order> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    let params = patch_params();
    let patched = with_timeout(
        state.api_timeout,
        api.patch(&id, &params, &Patch::Merge(&patch)),
    )
    .await
    .map_err(|e| {
        let mut p = Problem::from(e);
        // The CEL rule says `spec`; the caller sent `reason`.
        for f in &mut p.errors {
            if f.field.starts_with("spec.cancellation") {
                f.field = "reason".into();
            }
        }
        p
    })?;
    tracing::info!(order = %id, "cancellation requested");
    state
        .caches
        .wait_for_order(&id, patched.metadata.resource_version.as_deref())
        .await;
    Ok((StatusCode::ACCEPTED, Json(OrderView::from(&patched))).into_response())
}

/// Longest feedback comment kept (annotations share a 256 KiB budget).
const MAX_COMMENT: usize = 1000;

/// Rate a delivered order, once.
#[utoipa::path(post, path = "/api/v1/orders/{id}/feedback", tag = "orders",
    params(("id" = String, Path)),
    request_body = FeedbackBody,
    responses((status = 200, body = OrderView),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "Not delivered yet, or already rated"),
        (status = 422, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn feedback(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<FeedbackBody>,
) -> Result<Json<OrderView>, Problem> {
    caller.require_customer()?;
    if !(1..=5).contains(&body.rating) {
        return Err(Problem::invalid("rating", "must be 1 to 5"));
    }
    if body
        .comment
        .as_ref()
        .is_some_and(|c| c.chars().count() > MAX_COMMENT)
    {
        return Err(Problem::invalid(
            "comment",
            format!("at most {MAX_COMMENT} characters"),
        ));
    }
    let api: Api<Order> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    let params = patch_params();
    // Optimistic concurrency: the patch carries the resourceVersion it
    // checked, so two racing ratings cannot both land.
    for _ in 0..3 {
        let order = fresh_order(&state, &caller, &id).await?;
        if phase(&order) != OrderPhase::Delivered {
            return Err(Problem::conflict(format!(
                "the order is {} and can be rated once delivered",
                phase(&order)
            )));
        }
        if order.annotations().contains_key(RATING_ANNOTATION) {
            return Err(Problem::conflict("the order was already rated"));
        }
        let mut annotations = BTreeMap::new();
        annotations.insert(RATING_ANNOTATION, Some(body.rating.to_string()));
        annotations.insert(FEEDBACK_ANNOTATION, body.comment.clone());
        let patch = serde_json::json!({
            "metadata": {
                "resourceVersion": order.metadata.resource_version,
                "annotations": annotations,
            }
        });
        match with_timeout(
            state.api_timeout,
            api.patch(&id, &params, &Patch::Merge(&patch)),
        )
        .await
        {
            Ok(patched) => {
                state
                    .caches
                    .wait_for_order(&id, patched.metadata.resource_version.as_deref())
                    .await;
                return Ok(Json(OrderView::from(&patched)));
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Problem::conflict("the order keeps changing; retry"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn order_names_are_stable_and_scoped_to_the_customer() {
        let a = order_name("cust-1", "k1");
        assert_eq!(a, order_name("cust-1", "k1"));
        assert_ne!(a, order_name("cust-2", "k1"));
        assert_ne!(a, order_name("cust-1", "k2"));
        assert_eq!(a.len(), 22);
        assert!(a.starts_with("o-"));
    }

    #[test]
    fn cursor_round_trip() {
        let k = (1_700_000_000, 5, "o-abc".to_string());
        assert_eq!(decode_cursor(&encode_cursor(&k)), Some(k));
        assert_eq!(decode_cursor("zz"), None);
        assert_eq!(decode_cursor("abc"), None);
    }

    #[test]
    fn a_date_range_includes_its_start_and_excludes_its_end() {
        let mut o = dishpatch_testkit::fixtures::order("o-1", "roma", &[("pizza", 1)]);
        let at = |t: &str| t.parse::<jiff::Timestamp>().unwrap_or_default();
        o.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            at("2026-12-01T10:00:00Z"),
        ));
        let range = |from: Option<&str>, before: Option<&str>| dishpatch_archive::Filter {
            created_from: from.map(at),
            created_before: before.map(at),
            ..Default::default()
        };
        assert!(created_within(&o, &range(None, None)));
        assert!(created_within(
            &o,
            &range(Some("2026-12-01T10:00:00Z"), None)
        ));
        assert!(!created_within(
            &o,
            &range(Some("2026-12-01T10:00:01Z"), None)
        ));
        assert!(!created_within(
            &o,
            &range(None, Some("2026-12-01T10:00:00Z"))
        ));
        assert!(created_within(
            &o,
            &range(None, Some("2026-12-01T10:00:01Z"))
        ));
        assert!(timestamp_param("createdFrom", Some("yesterday")).is_err());
        assert_eq!(timestamp_param("createdFrom", None).ok(), Some(None));
    }

    #[test]
    fn only_object_names_reach_the_apiserver() {
        assert!(is_object_name("o-abc12"));
        assert!(is_object_name(&order_name("cust-1", "k1")));
        for bad in [
            "",
            "..",
            "../secrets",
            "a/b",
            "a b",
            "O-ABC",
            "-a",
            "a-",
            "a?b",
        ] {
            assert!(!is_object_name(bad), "{bad:?}");
        }
        assert!(!is_object_name(&"a".repeat(254)));
    }

    #[test]
    fn payment_tokens() {
        assert!(valid_payment_token("tok_visa"));
        assert!(valid_payment_token("pm_card_visa"));
        assert!(!valid_payment_token("4242424242424242"));
        assert!(!valid_payment_token("tok_"));
        assert!(!valid_payment_token("tok_42 42"));
        // a card number behind a provider prefix is still a card number
        assert!(!valid_payment_token("tok_4242424242424242"));
        assert!(!valid_payment_token("pm_x4000056655665556"));
        assert!(!valid_payment_token("tok_424242424242"));
        // shorter digit runs are ordinary token text
        assert!(valid_payment_token("tok_42424242424_2"));
        assert!(valid_payment_token("pm_1Nv0aB2eZvKYlo2C"));
    }
}
