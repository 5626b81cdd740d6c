//! The OpenAPI 3.1 document, generated from the handlers and types, and a
//! self-contained page that renders it (nothing is fetched from elsewhere).

use axum::Json;
use axum::response::Html;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::auth::Role;
use crate::problem::{FieldError, ProblemDetails};
use crate::views::*;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            let mut http = Http::new(HttpAuthScheme::Bearer);
            http.bearer_format = Some("JWT".to_string());
            components.add_security_scheme("bearer", SecurityScheme::Http(http));
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dishpatch façade",
        description = "Order food and follow it live; deliver it as a courier. Errors are RFC 9457 `application/problem+json` with an `errors[{field, message}]` extension. Authenticate with `Authorization: Bearer <JWT>` (claims `sub`, `role` = customer | courier | admin, `exp`)."
    ),
    paths(
        crate::restaurants::list,
        crate::restaurants::get_one,
        crate::orders::place,
        crate::orders::list,
        crate::orders::get_one,
        crate::orders::cancel,
        crate::orders::feedback,
        crate::events::stream,
        crate::courier::me,
        crate::courier::offer,
        crate::courier::shift,
        crate::courier::accept,
        crate::courier::pickup,
        crate::courier::dropoff,
    ),
    components(schemas(
        ProblemDetails, FieldError, Role, MoneyView, MenuItemView, RestaurantView, OrderLine,
        AddressBody, PaymentBody, ContactBody, PlaceOrder, CancelBody, FeedbackBody,
        ShiftBody, PaymentView, KitchenView, DeliveryView, FeedbackView, OrderView,
        OrderPage, OrderEvent, OrderEventKind, CourierView, OfferView, CourierOrderView
    )),
    modifiers(&Bearer),
    tags(
        (name = "restaurants", description = "Menus"),
        (name = "orders", description = "Place, follow, cancel and rate orders"),
        (name = "courier", description = "Shifts and deliveries"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI document.
pub async fn spec() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The API reference page (renders `/api/v1/openapi.json` in the browser).
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("../web/docs.html"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn spec_is_3_1_and_lists_the_api() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        for path in [
            "/api/v1/orders",
            "/api/v1/orders/{id}/events",
            "/api/v1/courier/offer/accept",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
