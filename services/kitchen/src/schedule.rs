//! When a ticket cooks: pure scheduling, unit-tested.
//!
//! A kitchen cooks `capacity` tickets in parallel; beyond that tickets wait
//! first-in, first-out. A ticket's preparation time is the longest of its
//! dishes' `prepTimeSeconds` (a kitchen cooks one order's dishes side by side;
//! quantity does not add time), multiplied by the global time scale.

use std::collections::HashMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// One accepted ticket's cooking window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Timestamp,
    pub end: Timestamp,
}

/// Preparation time of an order: the longest dish, scaled.
pub fn prep_time(dish_seconds: impl IntoIterator<Item = i32>, scale: f64) -> Duration {
    let longest = dish_seconds.into_iter().max().unwrap_or(0).max(0);
    scaled(
        Duration::from_secs(u64::try_from(longest).unwrap_or(0)),
        scale,
    )
}

use dishpatch_runtime::time::scale as scaled;

fn add(t: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| t.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

/// Where a new ticket fits: after every earlier ticket has started (FIFO),
/// and when one of the `capacity` stations is free.
pub fn place(capacity: usize, active: &[Window], now: Timestamp, prep: Duration) -> Window {
    let capacity = capacity.max(1);
    let mut ordered: Vec<&Window> = active.iter().filter(|w| w.end > now).collect();
    ordered.sort_by_key(|w| w.start);
    // Replay the earlier tickets onto the stations.
    let mut stations = vec![now; capacity];
    let mut last_start = now;
    for w in ordered {
        if let Some(free) = stations.iter_mut().min() {
            *free = (*free).max(w.end);
        }
        last_start = last_start.max(w.start);
    }
    let earliest_station = stations.into_iter().min().unwrap_or(now);
    let start = now.max(earliest_station).max(last_start);
    Window {
        start,
        end: add(start, prep),
    }
}

/// The kitchens this process runs: active tickets per restaurant.
#[derive(Default)]
pub struct Kitchens {
    tickets: HashMap<String, HashMap<String, Window>>,
}

impl Kitchens {
    /// Books a ticket (idempotent per order uid) and returns its window.
    pub fn book(
        &mut self,
        restaurant: &str,
        uid: &str,
        capacity: usize,
        now: Timestamp,
        prep: Duration,
    ) -> Window {
        let tickets = self.tickets.entry(restaurant.to_string()).or_default();
        if let Some(w) = tickets.get(uid) {
            return *w;
        }
        let active: Vec<Window> = tickets.values().copied().collect();
        let w = place(capacity, &active, now, prep);
        tickets.insert(uid.to_string(), w);
        w
    }

    /// Remembers a ticket found in an Order's status (after a restart).
    pub fn restore(&mut self, restaurant: &str, uid: &str, w: Window) {
        self.tickets
            .entry(restaurant.to_string())
            .or_default()
            .insert(uid.to_string(), w);
    }

    pub fn contains(&self, restaurant: &str, uid: &str) -> bool {
        self.tickets
            .get(restaurant)
            .is_some_and(|t| t.contains_key(uid))
    }

    /// A ticket is done or dropped: its station is free for new tickets.
    pub fn release(&mut self, restaurant: &str, uid: &str) {
        if let Some(t) = self.tickets.get_mut(restaurant) {
            t.remove(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn fills_stations_then_queues_fifo() {
        let mut k = Kitchens::default();
        let p = Duration::from_secs(10);
        let a = k.book("r", "a", 2, t(0), p);
        let b = k.book("r", "b", 2, t(0), p);
        let c = k.book("r", "c", 2, t(0), p);
        assert_eq!((a.start, b.start), (t(0), t(0)));
        assert_eq!((c.start, c.end), (t(10), t(20)), "waits for a free station");
        assert_eq!(
            k.book("r", "a", 2, t(5), p),
            a,
            "booking twice changes nothing"
        );
        // A short ticket may not overtake the queued one.
        let d = k.book("r", "d", 2, t(1), Duration::from_secs(1));
        assert!(d.start >= c.start);
        // Dropping a ticket frees its station for the next one.
        k.release("r", "b");
        k.release("r", "c");
        k.release("r", "d");
        let e = k.book("r", "e", 2, t(1), p);
        assert_eq!(e.start, t(1));
    }

    #[test]
    fn prep_is_the_longest_dish_scaled() {
        assert_eq!(prep_time([60, 600, 30], 1.0), Duration::from_secs(600));
        assert_eq!(prep_time([600], 0.01), Duration::from_secs(6));
        assert_eq!(prep_time([600], 0.0), Duration::ZERO);
        assert_eq!(prep_time([], 1.0), Duration::ZERO);
    }

    proptest! {
        /// At no moment do more tickets cook than there are stations, and
        /// tickets start in the order they were booked.
        #[test]
        fn never_over_capacity(capacity in 1_usize..4, preps in prop::collection::vec(1_u64..20, 1..30)) {
            let mut k = Kitchens::default();
            let windows: Vec<Window> = preps
                .iter()
                .enumerate()
                .map(|(i, p)| k.book("r", &i.to_string(), capacity, t(0), Duration::from_secs(*p)))
                .collect();
            for w in &windows {
                let cooking = windows.iter().filter(|o| o.start <= w.start && w.start < o.end).count();
                prop_assert!(cooking <= capacity);
            }
            for pair in windows.windows(2) {
                prop_assert!(pair[0].start <= pair[1].start);
            }
        }
    }
}
