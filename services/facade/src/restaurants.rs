//! Restaurants and their menus, from the cache.

use axum::Json;
use axum::extract::{Path, State};

use crate::app::AppState;
use crate::problem::{Problem, ProblemDetails};
use crate::views::RestaurantView;

/// Open restaurants with their menus.
#[utoipa::path(get, path = "/api/v1/restaurants", tag = "restaurants",
    responses((status = 200, body = [RestaurantView])))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<RestaurantView>> {
    let mut open: Vec<RestaurantView> = state
        .caches
        .restaurants
        .state()
        .iter()
        .filter(|r| r.spec.open)
        .map(|r| RestaurantView::from(r.as_ref()))
        .collect();
    open.sort_by(|a, b| {
        a.display_name
            .cmp(&b.display_name)
            .then(a.name.cmp(&b.name))
    });
    Json(open)
}

/// One restaurant (open or closed) with its menu.
#[utoipa::path(get, path = "/api/v1/restaurants/{name}", tag = "restaurants",
    params(("name" = String, Path, description = "The restaurant's name")),
    responses((status = 200, body = RestaurantView),
        (status = 404, body = ProblemDetails, content_type = "application/problem+json")))]
pub async fn get_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<RestaurantView>, Problem> {
    state
        .caches
        .restaurant(&name)
        .map(|r| Json(RestaurantView::from(r.as_ref())))
        .ok_or_else(|| Problem::not_found(format!("no restaurant {name}")))
}
