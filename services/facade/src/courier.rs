//! The courier's endpoints. The Courier resource named like the token's
//! subject is the caller's. The delivery service owns Courier status and the
//! Order's `status.delivery`, so the façade never writes those: it sets
//! request annotations on the Courier that the delivery service acts on.
//!
//! Contract with the delivery service (value = the order's name):
//! - `dishpatch.dev/accept`: the courier accepts the offered order;
//! - `dishpatch.dev/picked-up`: the courier collected the order;
//! - `dishpatch.dev/delivered`: the courier handed the order over.
//!
//! The delivery service removes an annotation once it has acted on it (or
//! refused it, e.g. an expired offer).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use dishpatch_api::courier::Courier;
use kube::Api;
use kube::api::Patch;

use crate::app::{ApiJson, AppState};
use crate::auth::Caller;
use crate::orders::patch_params as params;
use crate::problem::{Problem, ProblemDetails, with_timeout};
use crate::views::{CourierOrderView, CourierView, ShiftBody};

pub const ACCEPT_ANNOTATION: &str = "dishpatch.dev/accept";
pub const PICKED_UP_ANNOTATION: &str = "dishpatch.dev/picked-up";
pub const DELIVERED_ANNOTATION: &str = "dishpatch.dev/delivered";

fn view(state: &AppState, c: &Courier) -> CourierView {
    CourierView::of(c, |order| {
        state.caches.order(order).map(|o| CourierOrderView::of(&o))
    })
}

fn mine(state: &AppState, caller: &Caller) -> Result<std::sync::Arc<Courier>, Problem> {
    caller.require_courier()?;
    state
        .caches
        .courier(&caller.0.sub)
        .ok_or_else(|| Problem::not_found(format!("no courier {}", caller.0.sub)))
}

async fn patch(state: &AppState, name: &str, body: serde_json::Value) -> Result<Courier, Problem> {
    let api: Api<Courier> = Api::namespaced(state.client.clone(), &state.caches.namespace);
    Ok(with_timeout(
        state.api_timeout,
        api.patch(name, &params(), &Patch::Merge(&body)),
    )
    .await?)
}

/// The caller's courier record: shift, offer, current delivery.
#[utoipa::path(get, path = "/api/v1/courier", tag = "courier",
    responses((status = 200, body = CourierView),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn me(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<CourierView>, Problem> {
    let c = mine(&state, &caller)?;
    Ok(Json(view(&state, &c)))
}

/// The offer waiting for the caller, and the delivery in progress.
#[utoipa::path(get, path = "/api/v1/courier/offer", tag = "courier",
    responses((status = 200, body = CourierView),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn offer(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<CourierView>, Problem> {
    me(State(state), caller).await
}

/// Go on or off shift.
#[utoipa::path(post, path = "/api/v1/courier/shift", tag = "courier",
    request_body = ShiftBody,
    responses((status = 200, body = CourierView),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn shift(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<ShiftBody>,
) -> Result<Json<CourierView>, Problem> {
    let c = mine(&state, &caller)?;
    let name = c.metadata.name.clone().unwrap_or_default();
    let patched = patch(
        &state,
        &name,
        serde_json::json!({"spec": {"onShift": body.on_shift}}),
    )
    .await?;
    tracing::info!(courier = %name, on_shift = body.on_shift, "shift changed");
    Ok(Json(view(&state, &patched)))
}

async fn request(
    state: &AppState,
    caller: &Caller,
    annotation: &str,
    order: impl Fn(&Courier) -> Option<String>,
    missing: &str,
) -> Result<Response, Problem> {
    let c = mine(state, caller)?;
    let Some(order) = order(&c) else {
        return Err(Problem::conflict(missing.to_string()));
    };
    let name = c.metadata.name.clone().unwrap_or_default();
    let patched = patch(
        state,
        &name,
        serde_json::json!({"metadata": {"annotations": {annotation: order}}}),
    )
    .await?;
    tracing::info!(courier = %name, %order, request = annotation, "courier request recorded");
    Ok((StatusCode::ACCEPTED, Json(view(state, &patched))).into_response())
}

/// Accept the offered delivery. Recorded as a request for the delivery service.
#[utoipa::path(post, path = "/api/v1/courier/offer/accept", tag = "courier",
    responses((status = 202, body = CourierView, description = "Recorded; the delivery service assigns the order"),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "No offer")),
    security(("bearer" = [])))]
pub async fn accept(State(state): State<AppState>, caller: Caller) -> Result<Response, Problem> {
    request(
        &state,
        &caller,
        ACCEPT_ANNOTATION,
        |c| c.status.as_ref()?.offer.as_ref().map(|o| o.order.clone()),
        "there is no offer to accept",
    )
    .await
}

/// Confirm the pick-up of the current order.
#[utoipa::path(post, path = "/api/v1/courier/pickup", tag = "courier",
    responses((status = 202, body = CourierView),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "No current order")),
    security(("bearer" = [])))]
pub async fn pickup(State(state): State<AppState>, caller: Caller) -> Result<Response, Problem> {
    request(
        &state,
        &caller,
        PICKED_UP_ANNOTATION,
        |c| c.status.as_ref()?.current_order.clone(),
        "there is no current order to pick up",
    )
    .await
}

/// Confirm the drop-off of the current order.
#[utoipa::path(post, path = "/api/v1/courier/dropoff", tag = "courier",
    responses((status = 202, body = CourierView),
        (status = 409, body = ProblemDetails, content_type = "application/problem+json", description = "No current order")),
    security(("bearer" = [])))]
pub async fn dropoff(State(state): State<AppState>, caller: Caller) -> Result<Response, Problem> {
    request(
        &state,
        &caller,
        DELIVERED_ANNOTATION,
        |c| c.status.as_ref()?.current_order.clone(),
        "there is no current order to drop off",
    )
    .await
}
