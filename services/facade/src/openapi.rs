//! The OpenAPI 3.1 document, generated from the handlers and types, and a
//! self-contained page that renders it (nothing is fetched from elsewhere).

use axum::Json;
use axum::response::Html;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Ref, RefOr, Response};
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

/// Every operation declares the problem+json answers the façade's
/// middleware and extractors can give it (authentication, roles, rate
/// limit, body limits, the apiserver being away), besides those its handler
/// declares: written once here, they cannot drift handler by handler.
struct Problems;

impl Modify for Problems {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                for (code, why) in answers(path, op) {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| problem(why));
                }
            }
        }
    }
}

/// The status codes an operation can answer besides its own, and why.
fn answers(path: &str, op: &Operation) -> Vec<(u16, &'static str)> {
    let mut out = vec![
        (
            400,
            "Malformed request: a query, header or path value that does not parse",
        ),
        (
            429,
            "Too many requests from this caller: retry after Retry-After",
        ),
        (
            503,
            "The Kubernetes API is unavailable: retry after Retry-After",
        ),
    ];
    if op.security.is_some() {
        out.push((401, "Missing, expired or invalid bearer token"));
        out.push((403, "The token's role may not do this"));
    }
    let has_path_param = op
        .parameters
        .iter()
        .flatten()
        .any(|p| p.parameter_in == ParameterIn::Path);
    if has_path_param || path.starts_with("/api/v1/courier") {
        out.push((404, "No such object (or not the caller's)"));
    }
    if op.request_body.is_some() {
        out.push((
            409,
            "The object changed meanwhile, or the request conflicts with an earlier one",
        ));
        out.push((413, "The body is larger than the façade accepts"));
        out.push((415, "The body is not application/json"));
        out.push((422, "Invalid request; `errors` names each field"));
    }
    out
}

fn problem(description: &str) -> RefOr<Response> {
    let content = ContentBuilder::new()
        .schema(Some(Ref::from_schema_name("Problem")))
        .build();
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content("application/problem+json", content)
            .build(),
    )
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
        crate::staff::orders,
        crate::events::restaurant_stream,
        crate::staff::confirm,
        crate::staff::decline,
        crate::staff::ready,
        crate::staff::open,
        crate::staff::close,
        crate::staff::sold_out,
        crate::staff::restock,
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
        ShiftBody, crate::staff::DeclineBody, crate::staff::RestockBody, PaymentView, KitchenView, DeliveryView, FeedbackView, OrderView, TimelineEntry,
        OrderPage, OrderEvent, OrderEventKind, CourierView, OfferView, CourierOrderView
    )),
    modifiers(&Bearer, &Problems),
    tags(
        (name = "restaurants", description = "Menus"),
        (name = "orders", description = "Place, follow, cancel and rate orders"),
        (name = "courier", description = "Shifts and deliveries"),
        (name = "restaurant staff", description = "A restaurant's orders, its confirmations, opening and closing"),
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

    #[test]
    fn every_operation_declares_the_problems_it_can_answer() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let place = &doc["paths"]["/api/v1/orders"]["post"]["responses"];
        for code in [
            "400", "401", "403", "409", "413", "415", "422", "429", "503",
        ] {
            let r = &place[code];
            assert_eq!(
                r["content"]["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "POST /api/v1/orders {code}: {r}"
            );
        }
        let one = &doc["paths"]["/api/v1/orders/{id}"]["get"]["responses"];
        assert!(one["404"].is_object() && one["401"].is_object());
        // a GET has no body: no 413/415
        assert!(one["415"].is_null() && one["413"].is_null(), "{one}");
        // handlers' own answers are kept
        assert_eq!(
            place["409"]["description"],
            "The key was used for a different order"
        );
    }
}
