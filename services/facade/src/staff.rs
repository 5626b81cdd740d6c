//! The restaurant's side: its staff see the restaurant's orders, confirm or
//! decline each new one (at restaurants that confirm by hand), and open or
//! close the restaurant. A staff token has role `restaurant`; its
//! `restaurants` claim lists where the person works (absent: `sub` names
//! the restaurant). The decision is written to the Order's
//! `spec.confirmation`, an intent like a cancellation, which the operator
//! acts on; the façade writes no status.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dishpatch_api::lifecycle::{annotation, condition, find};
use dishpatch_api::order::{ConfirmationDecision, RestaurantDecision};
use dishpatch_api::{Order, Restaurant};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Patch;
use kube::{Api, ResourceExt};
use serde::Deserialize;

use crate::app::{ApiJson, AppState};
use crate::auth::{Caller, Role};
use crate::orders::{is_object_name, patch_params};
use crate::problem::{Problem, ProblemDetails, with_timeout};
use crate::views::{OrderView, RestaurantView};

/// Whether the caller works for `restaurant` (admins work everywhere).
pub fn works_for(caller: &Caller, restaurant: &str) -> bool {
    match caller.0.role {
        Role::Admin => true,
        Role::Restaurant if caller.0.restaurants.is_empty() => caller.0.sub == restaurant,
        Role::Restaurant => caller.0.restaurants.iter().any(|r| r == restaurant),
        Role::Customer | Role::Courier => false,
    }
}

fn require_staff(caller: &Caller, restaurant: &str) -> Result<(), Problem> {
    if works_for(caller, restaurant) {
        return Ok(());
    }
    Err(Problem::forbidden(format!(
        "this needs a token of restaurant {restaurant}'s staff"
    )))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StaffListQuery {
    /// `active` (default): orders not finished yet; `all`: also delivered,
    /// rejected and cancelled ones still in the cluster.
    pub show: Option<String>,
}

/// The restaurant's orders in the cluster, newest first: what waits for a
/// decision, what is cooking, what is on its way.
#[utoipa::path(get, path = "/api/v1/restaurants/{name}/orders", tag = "restaurant staff",
    params(("name" = String, Path, description = "The restaurant's name"), StaffListQuery),
    responses((status = 200, body = [OrderView]),
        (status = 400, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn orders(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    query: Result<Query<StaffListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<OrderView>>, Problem> {
    require_staff(&caller, &name)?;
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let all = match query.show.as_deref() {
        None | Some("active") => false,
        Some("all") => true,
        Some(_) => {
            return Err(
                Problem::bad_request("show must be active or all").field("show", "active or all")
            );
        }
    };
    let mut mine: Vec<std::sync::Arc<Order>> = state
        .caches
        .orders
        .state()
        .into_iter()
        .filter(|o| o.spec.restaurant_ref.name == name)
        .filter(|o| all || !crate::views::phase(o).is_terminal())
        .collect();
    mine.sort_by_key(|o| std::cmp::Reverse(crate::cache::sort_key(o)));
    Ok(Json(
        mine.iter().map(|o| OrderView::from(o.as_ref())).collect(),
    ))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeclineBody {
    /// Why (the customer is told).
    #[schema(min_length = 1, max_length = 500)]
    pub reason: String,
}

/// Confirm a new order: it goes on to payment and the kitchen.
#[utoipa::path(post, path = "/api/v1/restaurants/{name}/orders/{id}/confirm", tag = "restaurant staff",
    params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = OrderView),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "Not waiting for a decision, or already decided")),
    security(("bearer" = [])))]
pub async fn confirm(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    decide(
        &state,
        &caller,
        &name,
        &id,
        ConfirmationDecision::Confirmed,
        None,
    )
    .await
}

/// Decline a new order, with a reason: it is cancelled, its stock returned,
/// and the customer told why.
#[utoipa::path(post, path = "/api/v1/restaurants/{name}/orders/{id}/decline", tag = "restaurant staff",
    params(("name" = String, Path), ("id" = String, Path)),
    request_body = DeclineBody,
    responses((status = 200, body = OrderView),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "Not waiting for a decision, or already decided"),
        (status = 422, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn decline(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
    ApiJson(body): ApiJson<DeclineBody>,
) -> Result<Response, Problem> {
    let reason = body.reason.trim().to_string();
    if reason.is_empty() || reason.chars().count() > 500 {
        return Err(Problem::invalid("reason", "1 to 500 characters"));
    }
    decide(
        &state,
        &caller,
        &name,
        &id,
        ConfirmationDecision::Declined,
        Some(reason),
    )
    .await
}

async fn decide(
    state: &AppState,
    caller: &Caller,
    restaurant: &str,
    id: &str,
    decision: ConfirmationDecision,
    reason: Option<String>,
) -> Result<Response, Problem> {
    require_staff(caller, restaurant)?;
    if !is_object_name(id) {
        return Err(Problem::not_found(format!("no order {id}")));
    }
    let api: Api<Order> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    let order = match with_timeout(state.api_timeout, api.get_opt(id)).await? {
        Some(o) if o.spec.restaurant_ref.name == restaurant => o,
        _ => return Err(Problem::not_found(format!("no order {id} at {restaurant}"))),
    };
    if let Some(existing) = &order.spec.confirmation {
        if existing.decision == decision && existing.reason == reason {
            return Ok(Json(OrderView::from(&order)).into_response());
        }
        return Err(Problem::conflict("the order was already decided"));
    }
    let waiting = order
        .status
        .as_ref()
        .and_then(|s| find(&s.conditions, condition::RESTAURANT_CONFIRMED))
        .is_some_and(|c| c.status == "Unknown");
    if !waiting {
        return Err(Problem::conflict(
            "the order does not wait for the restaurant's decision",
        ));
    }
    let decided = RestaurantDecision {
        decision,
        reason,
        by: caller.0.sub.clone(),
        at: Time(jiff::Timestamp::now()),
    };
    // On the copy just read: a decision races a cancellation fairly.
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": order.resource_version()},
        "spec": {"confirmation": decided},
    });
    let params = patch_params();
    let patched = with_timeout(
        state.api_timeout,
        api.patch(id, &params, &Patch::Merge(&patch)),
    )
    .await?;
    tracing::info!(order = %id, %restaurant, ?decision, by = %caller.0.sub, "restaurant decided");
    state
        .caches
        .wait_for_order(id, patched.metadata.resource_version.as_deref())
        .await;
    Ok((StatusCode::OK, Json(OrderView::from(&patched))).into_response())
}

/// Open the restaurant: it takes new orders.
#[utoipa::path(post, path = "/api/v1/restaurants/{name}/open", tag = "restaurant staff",
    params(("name" = String, Path)),
    responses((status = 200, body = RestaurantView),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn open(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<RestaurantView>, Problem> {
    set_open(&state, &caller, &name, true).await
}

/// Close the restaurant: new orders are rejected (`RestaurantClosed`);
/// those already taken go on.
#[utoipa::path(post, path = "/api/v1/restaurants/{name}/close", tag = "restaurant staff",
    params(("name" = String, Path)),
    responses((status = 200, body = RestaurantView),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn close(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<RestaurantView>, Problem> {
    set_open(&state, &caller, &name, false).await
}

async fn set_open(
    state: &AppState,
    caller: &Caller,
    name: &str,
    open: bool,
) -> Result<Json<RestaurantView>, Problem> {
    require_staff(caller, name)?;
    if !is_object_name(name) || state.caches.restaurant(name).is_none() {
        return Err(Problem::not_found(format!("no restaurant {name}")));
    }
    let api: Api<Restaurant> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    let params = patch_params();
    let patch = serde_json::json!({"spec": {"open": open}});
    let patched = with_timeout(
        state.api_timeout,
        api.patch(name, &params, &Patch::Merge(&patch)),
    )
    .await?;
    tracing::info!(restaurant = %name, open, by = %caller.0.sub, "restaurant opened or closed");
    Ok(Json(RestaurantView::from(&patched)))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestockBody {
    /// The portions now offered, for a stock-limited dish (absent: keep the
    /// stock as it is).
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub stock: Option<i64>,
}

/// Mark a dish sold out: new orders with it are rejected (`OutOfStock`).
#[utoipa::path(post, path = "/api/v1/restaurants/{name}/menu/{item}/sold-out", tag = "restaurant staff",
    params(("name" = String, Path), ("item" = String, Path)),
    responses((status = 200, body = RestaurantView),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn sold_out(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, item)): Path<(String, String)>,
) -> Result<Json<RestaurantView>, Problem> {
    set_menu_item(&state, &caller, &name, &item, true, None).await
}

/// Offer a dish again, optionally with a new stock.
#[utoipa::path(post, path = "/api/v1/restaurants/{name}/menu/{item}/restock", tag = "restaurant staff",
    params(("name" = String, Path), ("item" = String, Path)),
    request_body = RestockBody,
    responses((status = 200, body = RestaurantView),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 422, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn restock(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, item)): Path<(String, String)>,
    ApiJson(body): ApiJson<RestockBody>,
) -> Result<Json<RestaurantView>, Problem> {
    if body.stock.is_some_and(|s| !(0..=1_000_000).contains(&s)) {
        return Err(Problem::invalid("stock", "0 to 1000000"));
    }
    set_menu_item(&state, &caller, &name, &item, false, body.stock).await
}

/// Changes one dish with a JSON patch that first tests the dish is still at
/// the index read (the menu is a list; another writer may reorder it).
async fn set_menu_item(
    state: &AppState,
    caller: &Caller,
    name: &str,
    item: &str,
    sold_out: bool,
    stock: Option<i64>,
) -> Result<Json<RestaurantView>, Problem> {
    require_staff(caller, name)?;
    let api: Api<Restaurant> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    if !is_object_name(name) {
        return Err(Problem::not_found(format!("no restaurant {name}")));
    }
    let Some(restaurant) = with_timeout(state.api_timeout, api.get_opt(name)).await? else {
        return Err(Problem::not_found(format!("no restaurant {name}")));
    };
    let Some(index) = restaurant.spec.menu.iter().position(|m| m.id == item) else {
        return Err(Problem::not_found(format!("no dish {item} at {name}")));
    };
    let at = |field: &str| format!("/spec/menu/{index}/{field}");
    let mut ops = vec![
        serde_json::json!({"op": "test", "path": at("id"), "value": item}),
        serde_json::json!({"op": "add", "path": at("soldOut"), "value": sold_out}),
    ];
    if let Some(stock) = stock {
        ops.push(serde_json::json!({"op": "add", "path": at("stock"), "value": stock}));
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| Problem::internal(e.to_string()))?;
    let params = patch_params();
    let patched = with_timeout(
        state.api_timeout,
        api.patch(name, &params, &Patch::<()>::Json(patch)),
    )
    .await?;
    tracing::info!(restaurant = %name, %item, sold_out, ?stock, by = %caller.0.sub, "menu changed");
    Ok(Json(RestaurantView::from(&patched)))
}

/// Mark an order ready, in a kitchen the staff run by hand (`kitchen.mode:
/// Manual`): the kitchen records it, and a courier picks it up.
#[utoipa::path(post, path = "/api/v1/restaurants/{name}/orders/{id}/ready", tag = "restaurant staff",
    params(("name" = String, Path), ("id" = String, Path)),
    responses((status = 202, body = OrderView, description = "Marked; the kitchen records it shortly"),
        (status = 403, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json"),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "Not a manual kitchen, or the order is not being prepared")),
    security(("bearer" = [])))]
pub async fn ready(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, Problem> {
    require_staff(&caller, &name)?;
    let manual = state
        .caches
        .restaurant(&name)
        .ok_or_else(|| Problem::not_found(format!("no restaurant {name}")))?
        .spec
        .kitchen
        .mode
        == dishpatch_api::restaurant::KitchenMode::Manual;
    if !manual {
        return Err(Problem::conflict(format!(
            "the kitchen of {name} finishes orders by their preparation time"
        )));
    }
    if !is_object_name(&id) {
        return Err(Problem::not_found(format!("no order {id}")));
    }
    let api: Api<Order> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    let order = match with_timeout(state.api_timeout, api.get_opt(&id)).await? {
        Some(o) if o.spec.restaurant_ref.name == name => o,
        _ => return Err(Problem::not_found(format!("no order {id} at {name}"))),
    };
    if order.annotations().contains_key(annotation::KITCHEN_READY) {
        return Ok((StatusCode::ACCEPTED, Json(OrderView::from(&order))).into_response());
    }
    let phase = crate::views::phase(&order);
    if phase != dishpatch_api::OrderPhase::Preparing {
        return Err(Problem::conflict(format!(
            "the order is {phase}, not being prepared"
        )));
    }
    let patch = serde_json::json!({
        "metadata": {"annotations": {annotation::KITCHEN_READY: caller.0.sub}},
    });
    let params = patch_params();
    let patched = with_timeout(
        state.api_timeout,
        api.patch(&id, &params, &Patch::Merge(&patch)),
    )
    .await?;
    tracing::info!(order = %id, restaurant = %name, by = %caller.0.sub, "marked ready");
    Ok((StatusCode::ACCEPTED, Json(OrderView::from(&patched))).into_response())
}
