//! Stock reservation as pure functions over a Restaurant's status.
//!
//! Holds are keyed by order uid, so reserving twice or releasing twice changes
//! nothing: stock is released exactly once however often a reconcile runs.
//! Reservations are all-or-nothing across an order's lines.

use crate::restaurant::{HeldItem, InventoryEntry, RestaurantSpec, RestaurantStatus, StockHold};

/// Why stock could not be reserved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StockError {
    #[error("not enough {item:?} in stock: {requested} requested, {available} available")]
    OutOfStock {
        item: String,
        requested: i64,
        available: i64,
    },
}

/// Brings the inventory in line with the spec: an entry per stock-limited
/// item; a changed `stock` is a restock, which forgets delivered portions and
/// keeps those still held. Returns whether anything changed.
pub fn refresh(spec: &RestaurantSpec, status: &mut RestaurantStatus) -> bool {
    let before = status.inventory.clone();
    let mut next = Vec::new();
    for item in &spec.menu {
        let Some(stock) = item.stock else { continue };
        let held = held_for(status, &item.id);
        let reserved = match before.iter().find(|e| e.menu_item == item.id) {
            Some(e) if e.stock == stock => e.reserved.max(held),
            _ => held,
        };
        next.push(InventoryEntry {
            menu_item: item.id.clone(),
            stock,
            reserved,
            available: (stock - reserved).max(0),
        });
    }
    status.inventory = next;
    status.inventory != before
}

fn held_for(status: &RestaurantStatus, item: &str) -> i64 {
    status
        .holds
        .iter()
        .flat_map(|h| &h.items)
        .filter(|l| l.menu_item == item)
        .map(|l| l.quantity)
        .sum()
}

/// Whether stock is held for this order.
pub fn holds(status: &RestaurantStatus, order_uid: &str) -> bool {
    status.holds.iter().any(|h| h.order_uid == order_uid)
}

/// Reserves every stock-limited line of an order, or nothing. `Ok(true)` if
/// the status changed, `Ok(false)` if nothing needed holding or the hold
/// already exists.
pub fn reserve(
    spec: &RestaurantSpec,
    status: &mut RestaurantStatus,
    order_uid: &str,
    order_name: &str,
    lines: &[(String, i64)],
) -> Result<bool, StockError> {
    let refreshed = refresh(spec, status);
    if holds(status, order_uid) {
        return Ok(refreshed);
    }
    let mut held = Vec::new();
    for (item, quantity) in lines {
        let Some(entry) = status.inventory.iter().find(|e| &e.menu_item == item) else {
            continue; // not stock-limited
        };
        if entry.available < *quantity {
            return Err(StockError::OutOfStock {
                item: item.clone(),
                requested: *quantity,
                available: entry.available,
            });
        }
        held.push(HeldItem {
            menu_item: item.clone(),
            quantity: *quantity,
        });
    }
    if held.is_empty() {
        return Ok(refreshed);
    }
    for line in &held {
        if let Some(e) = status
            .inventory
            .iter_mut()
            .find(|e| e.menu_item == line.menu_item)
        {
            e.reserved += line.quantity;
            e.available = (e.stock - e.reserved).max(0);
        }
    }
    status.holds.push(StockHold {
        order_uid: order_uid.to_string(),
        order: order_name.to_string(),
        items: held,
    });
    Ok(true)
}

/// Gives an order's held stock back (cancelled or rejected). Returns whether
/// anything was held.
pub fn release(status: &mut RestaurantStatus, order_uid: &str) -> bool {
    let Some(pos) = status.holds.iter().position(|h| h.order_uid == order_uid) else {
        return false;
    };
    let hold = status.holds.remove(pos);
    for line in hold.items {
        if let Some(e) = status
            .inventory
            .iter_mut()
            .find(|e| e.menu_item == line.menu_item)
        {
            e.reserved = (e.reserved - line.quantity).max(0);
            e.available = (e.stock - e.reserved).max(0);
        }
    }
    true
}

/// The order was delivered: its portions are gone for good. The hold is
/// dropped but the portions stay reserved until the next restock.
pub fn consume(status: &mut RestaurantStatus, order_uid: &str) -> bool {
    let before = status.holds.len();
    status.holds.retain(|h| h.order_uid != order_uid);
    status.holds.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::restaurant::{KitchenSpec, MenuItem};
    use proptest::prelude::*;

    fn spec(stock: Option<i64>) -> RestaurantSpec {
        RestaurantSpec {
            display_name: "R".into(),
            zone: "z".into(),
            open: true,
            currency: "EUR".into(),
            kitchen: KitchenSpec {
                capacity: 1,
                mode: Default::default(),
            },
            confirmation: None,
            menu: vec![
                MenuItem {
                    id: "a".into(),
                    name: "A".into(),
                    description: None,
                    price: 100,
                    prep_time_seconds: 1,
                    stock,
                    sold_out: false,
                },
                MenuItem {
                    id: "free".into(),
                    name: "F".into(),
                    description: None,
                    price: 1,
                    prep_time_seconds: 1,
                    stock: None,
                    sold_out: false,
                },
            ],
        }
    }

    #[test]
    fn reserve_is_idempotent_and_release_happens_once() {
        let spec = spec(Some(3));
        let mut st = RestaurantStatus::default();
        let lines = vec![("a".to_string(), 2), ("free".to_string(), 5)];
        assert_eq!(reserve(&spec, &mut st, "u1", "o1", &lines), Ok(true));
        assert_eq!(reserve(&spec, &mut st, "u1", "o1", &lines), Ok(false));
        assert_eq!(st.inventory[0].available, 1);
        assert_eq!(st.holds.len(), 1);
        assert_eq!(st.holds[0].items.len(), 1, "unlimited items are not held");
        assert!(matches!(
            reserve(&spec, &mut st, "u2", "o2", &lines),
            Err(StockError::OutOfStock {
                available: 1,
                requested: 2,
                ..
            })
        ));
        assert!(release(&mut st, "u1"));
        assert!(!release(&mut st, "u1"));
        assert_eq!(st.inventory[0].available, 3);
    }

    #[test]
    fn delivered_portions_stay_gone_until_restock() {
        let mut st = RestaurantStatus::default();
        let lines = vec![("a".to_string(), 2)];
        reserve(&spec(Some(3)), &mut st, "u1", "o1", &lines).unwrap();
        reserve(&spec(Some(3)), &mut st, "u3", "o3", &[("a".to_string(), 1)]).unwrap();
        assert!(consume(&mut st, "u1"));
        assert!(!release(&mut st, "u1"), "consumed stock is not released");
        assert_eq!(st.inventory[0].available, 0);
        // Restock to 10: delivered portions are forgotten, held ones still count.
        assert!(refresh(&spec(Some(10)), &mut st));
        assert_eq!(st.inventory[0].reserved, 1);
        assert_eq!(st.inventory[0].available, 9);
        // Removing the limit drops the entry.
        refresh(&spec(None), &mut st);
        assert!(st.inventory.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(u8, i64),
        Release(u8),
        Consume(u8),
        Restock(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0_u8..12, 1_i64..5).prop_map(|(o, q)| Op::Reserve(o, q)),
            2 => (0_u8..12).prop_map(Op::Release),
            1 => (0_u8..12).prop_map(Op::Consume),
            1 => (0_i64..20).prop_map(Op::Restock),
        ]
    }

    proptest! {
        /// Under any interleaving: a new hold never promises more than is in
        /// stock, the counts cover the ledger, and nothing goes negative.
        #[test]
        fn never_oversells(ops in prop::collection::vec(op(), 1..80), initial in 0_i64..20) {
            let mut stock = initial;
            let mut st = RestaurantStatus::default();
            for op in ops {
                match op {
                    Op::Reserve(o, q) => {
                        let before = st.clone();
                        let uid = format!("u{o}");
                        let already = holds(&st, &uid);
                        match reserve(&spec(Some(stock)), &mut st, &uid, "o", &[("a".into(), q)]) {
                            Ok(_) => {
                                // A new hold never promises more than the stock.
                                if !already {
                                    prop_assert!(st.inventory[0].reserved <= st.inventory[0].stock);
                                }
                            }
                            Err(_) => {
                                prop_assert!(!already);
                                let mut b = before;
                                refresh(&spec(Some(stock)), &mut b);
                                prop_assert!(b.inventory[0].available < q);
                            }
                        }
                    }
                    Op::Release(o) => { release(&mut st, &format!("u{o}")); }
                    Op::Consume(o) => { consume(&mut st, &format!("u{o}")); }
                    Op::Restock(s) => { stock = s; refresh(&spec(Some(stock)), &mut st); }
                }
                if let Some(e) = st.inventory.first() {
                    let held = held_for(&st, "a");
                    prop_assert!(e.reserved >= held);
                    prop_assert!(e.available >= 0);
                    prop_assert_eq!(e.available, (e.stock - e.reserved).max(0));
                }
            }
        }
    }
}
