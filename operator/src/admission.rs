//! Whether a restaurant can take an order, and at what price: pure, so it is
//! tested from plain fixtures.

use dishpatch_api::Money;
use dishpatch_api::lifecycle::reason;
use dishpatch_api::money::{PriceLine, total};
use dishpatch_api::order::OrderSpec;
use dishpatch_api::restaurant::RestaurantSpec;

/// A reason to reject, as it goes into the `Accepted` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub message: String,
}

/// What an acceptable order costs and which lines to reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub total: Money,
    pub lines: Vec<(String, i64)>,
}

/// Checks an order against its restaurant's menu and prices it.
pub fn quote(
    order: &OrderSpec,
    restaurant_name: &str,
    restaurant: &RestaurantSpec,
) -> Result<Quote, Rejection> {
    if !restaurant.open {
        return Err(Rejection {
            reason: reason::RESTAURANT_CLOSED,
            message: format!("restaurant {restaurant_name} is closed"),
        });
    }
    let mut priced = Vec::with_capacity(order.items.len());
    let mut lines = Vec::with_capacity(order.items.len());
    for item in &order.items {
        let Some(menu_item) = restaurant.item(&item.menu_item) else {
            return Err(Rejection {
                reason: reason::UNKNOWN_MENU_ITEM,
                message: format!(
                    "menu item {:?} is not on the menu of restaurant {restaurant_name}",
                    item.menu_item
                ),
            });
        };
        if menu_item.sold_out {
            return Err(Rejection {
                reason: reason::OUT_OF_STOCK,
                message: format!(
                    "menu item {:?} is sold out at restaurant {restaurant_name}",
                    item.menu_item
                ),
            });
        }
        let quantity = i64::from(item.quantity);
        priced.push(PriceLine {
            unit_price: menu_item.price,
            quantity,
        });
        lines.push((item.menu_item.clone(), quantity));
    }
    let amount = total(priced).map_err(|e| Rejection {
        reason: reason::PRICING_FAILED,
        message: e.to_string(),
    })?;
    Ok(Quote {
        total: Money::new(amount, restaurant.currency.clone()),
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(items: &[(&str, i32)]) -> OrderSpec {
        serde_json::from_value(serde_json::json!({
            "customer": {"id": "c", "name": "C", "contact": {"email": "c@example.com"}},
            "restaurantRef": {"name": "r"},
            "items": items.iter().map(|(m, q)| serde_json::json!({"menuItem": m, "quantity": q})).collect::<Vec<_>>(),
            "deliveryAddress": {"street": "s", "city": "c", "postalCode": "1", "country": "DE"},
            "payment": {"token": "tok_visa"}
        }))
        .unwrap()
    }

    fn restaurant(open: bool) -> RestaurantSpec {
        serde_json::from_value(serde_json::json!({
            "displayName": "R", "zone": "z", "open": open, "currency": "EUR",
            "kitchen": {"capacity": 1},
            "menu": [
                {"id": "pizza", "name": "Pizza", "price": 950, "prepTimeSeconds": 60, "stock": 3},
                {"id": "water", "name": "Water", "price": 200, "prepTimeSeconds": 1}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn prices_in_minor_units() {
        let q = quote(
            &order(&[("pizza", 2), ("water", 3)]),
            "r",
            &restaurant(true),
        )
        .unwrap();
        assert_eq!(q.total.amount, 2 * 950 + 3 * 200);
        assert_eq!(q.total.currency, "EUR");
        assert_eq!(q.total.display.as_deref(), Some("25.00 EUR"));
        assert_eq!(q.lines, vec![("pizza".into(), 2), ("water".into(), 3)]);
    }

    #[test]
    fn rejects_a_dish_marked_sold_out() {
        let mut r = restaurant(true);
        r.menu[1].sold_out = true;
        let e = quote(&order(&[("pizza", 1), ("water", 1)]), "roma", &r).unwrap_err();
        assert_eq!(e.reason, reason::OUT_OF_STOCK);
        assert!(e.message.contains("sold out"), "{}", e.message);
        assert!(quote(&order(&[("pizza", 1)]), "roma", &r).is_ok());
    }

    #[test]
    fn rejects_closed_and_unknown() {
        let closed = quote(&order(&[("pizza", 1)]), "r", &restaurant(false)).unwrap_err();
        assert_eq!(closed.reason, "RestaurantClosed");
        let unknown = quote(&order(&[("sushi", 1)]), "r", &restaurant(true)).unwrap_err();
        assert_eq!(unknown.reason, "UnknownMenuItem");
        assert!(unknown.message.contains("\"sushi\""), "{}", unknown.message);
    }
}
