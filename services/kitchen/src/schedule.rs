//! When a ticket cooks: the rules of a restaurant's ticket rail, pure and
//! unit-tested.
//!
//! A kitchen cooks `capacity` tickets in parallel; beyond that tickets wait
//! first-in, first-out. A ticket's preparation time is the longest of its
//! dishes' `prepTimeSeconds` (a kitchen cooks one order's dishes side by side;
//! quantity does not add time), multiplied by the global time scale.
//!
//! The rail is shared by every kitchen replica (it lives in a ConfigMap, see
//! `rail.rs`), so the rules here are the whole contract between replicas:
//! - a ticket starts only through [`Rail::fill`], which starts the lowest
//!   numbers first and never more than `capacity` at once;
//! - a ticket leaves the rail only after its Order says Ready or Dropped, so
//!   the Orders never show more cooking than the rail holds;
//! - whoever starts a ticket owns it and finishes it; a ticket whose owner
//!   has not finished it well after its end is finished by anyone.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

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

/// One restaurant's tickets, in ticket-number order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rail {
    /// The number the next ticket gets.
    pub next: i64,
    /// The restaurant's `kitchen.capacity` when the last ticket was taken.
    pub capacity: u32,
    pub tickets: Vec<Ticket>,
}

impl Default for Rail {
    fn default() -> Self {
        Self {
            next: 1,
            capacity: 1,
            tickets: Vec::new(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Ticket {
    /// The Order's uid (the rail's namespace is the Order's).
    pub uid: String,
    /// The Order's name.
    pub order: String,
    pub number: i64,
    /// Scaled preparation time in milliseconds.
    pub prep_ms: u64,
    /// The replica that finishes it: who took it, until someone starts it.
    pub owner: String,
    /// When it started cooking; absent while it waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// The span that took the order (W3C `traceparent`): whichever replica
    /// cooks it later puts its spans under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// A manual kitchen's ticket: done when the staff say so, not at its
    /// end (`prep_ms` is then only the estimate).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual: bool,
}

impl Ticket {
    pub fn prep(&self) -> Duration {
        Duration::from_millis(self.prep_ms)
    }

    /// When it is done, if it is cooking.
    pub fn end(&self) -> Option<Timestamp> {
        self.started_at.map(|s| add(s, self.prep()))
    }

    pub fn cooking(&self) -> bool {
        self.started_at.is_some()
    }
}

/// What [`Rail::book`] did with a ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Booked {
    pub number: i64,
    /// Whether the ticket was on the rail already (nothing changed for it).
    pub existed: bool,
}

impl Rail {
    pub fn get(&self, uid: &str) -> Option<&Ticket> {
        self.tickets.iter().find(|t| t.uid == uid)
    }

    pub fn cooking(&self) -> usize {
        self.tickets.iter().filter(|t| t.cooking()).count()
    }

    /// Marks a ticket as one the staff finish by hand.
    pub fn manual(&mut self, uid: &str) {
        if let Some(t) = self.tickets.iter_mut().find(|t| t.uid == uid) {
            t.manual = true;
        }
    }

    /// Records the span that took the ticket, if none is yet.
    pub fn trace(&mut self, uid: &str, traceparent: &str) {
        if let Some(t) = self.tickets.iter_mut().find(|t| t.uid == uid)
            && t.traceparent.is_none()
        {
            t.traceparent = Some(traceparent.to_string());
        }
    }

    /// Puts a ticket at the end of the queue, once per order uid, and starts
    /// whatever fits. Returns its number and the tickets this started.
    pub fn book(
        &mut self,
        uid: &str,
        order: &str,
        prep: Duration,
        capacity: u32,
        me: &str,
        now: Timestamp,
    ) -> (Booked, Vec<Ticket>) {
        if let Some(t) = self.get(uid) {
            let booked = Booked {
                number: t.number,
                existed: true,
            };
            return (booked, Vec::new());
        }
        let number = self.next.max(1);
        self.next = number + 1;
        self.capacity = capacity.max(1);
        self.tickets.push(Ticket {
            uid: uid.to_string(),
            order: order.to_string(),
            number,
            prep_ms: u64::try_from(prep.as_millis()).unwrap_or(u64::MAX),
            owner: me.to_string(),
            started_at: None,
            traceparent: None,
            manual: false,
        });
        let started = self.fill(me, now);
        let booked = Booked {
            number,
            existed: false,
        };
        (booked, started)
    }

    /// Starts waiting tickets, lowest number first, while a station is free;
    /// `me` owns the ones it starts. Returns them.
    pub fn fill(&mut self, me: &str, now: Timestamp) -> Vec<Ticket> {
        let capacity = usize::try_from(self.capacity.max(1)).unwrap_or(usize::MAX);
        let mut free = capacity.saturating_sub(self.cooking());
        let mut started = Vec::new();
        // Tickets are kept in number order, so the first waiting ones are the oldest.
        for t in self.tickets.iter_mut().filter(|t| !t.cooking()) {
            if free == 0 {
                break;
            }
            t.started_at = Some(now);
            t.owner = me.to_string();
            started.push(t.clone());
            free -= 1;
        }
        started
    }

    /// Takes a ticket off (done or dropped) and starts what now fits.
    /// Returns whether it was there, and the tickets this started.
    pub fn remove(&mut self, uid: &str, me: &str, now: Timestamp) -> (bool, Vec<Ticket>) {
        let before = self.tickets.len();
        self.tickets.retain(|t| t.uid != uid);
        let removed = self.tickets.len() != before;
        let started = if removed {
            self.fill(me, now)
        } else {
            Vec::new()
        };
        (removed, started)
    }

    /// When each ticket should be done if every ticket takes its time:
    /// cooking ones end as started, waiting ones take the next free station
    /// in number order. For the Order's `estimatedReadyAt`.
    pub fn estimate(&self, uid: &str, now: Timestamp) -> Option<Window> {
        let capacity = usize::try_from(self.capacity.max(1)).unwrap_or(usize::MAX);
        let mut stations: Vec<Timestamp> = self
            .tickets
            .iter()
            .filter_map(Ticket::end)
            .map(|e| e.max(now))
            .collect();
        stations.sort();
        // More cooking than stations (capacity was lowered): the extra ones
        // must end before anything else starts.
        while stations.len() > capacity {
            stations.remove(0);
        }
        stations.resize(capacity, now);
        let mut last_start = now;
        for t in &self.tickets {
            let window = match (t.started_at, t.end()) {
                (Some(start), Some(end)) => Window { start, end },
                _ => {
                    stations.sort();
                    let start = stations[0].max(last_start);
                    last_start = start;
                    let end = add(start, t.prep());
                    stations[0] = end;
                    Window { start, end }
                }
            };
            if t.uid == uid {
                return Some(window);
            }
        }
        None
    }
}

/// How often a manual kitchen's cooking tickets are looked at.
pub const MANUAL_POLL: Duration = Duration::from_secs(1);

/// What a replica's driver of one rail should do now.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Cooking tickets to finish (write Ready, then take off the rail).
    pub finish: Vec<Ticket>,
    /// Cooking tickets this replica owns (to make sure their Orders say so).
    pub mine: Vec<Ticket>,
    /// Cooking manual tickets: their Orders say whether the staff marked
    /// them ready. Any replica driving the rail looks.
    pub check: Vec<Ticket>,
    /// When to look again; `None` with an empty rail: stop driving it.
    pub wake_in: Option<Duration>,
}

/// The driver's decision for `me` at `now`. Tickets `me` owns are finished at
/// their end; another replica's are finished once `adopt_after` past their
/// end (their owner died or is cut off). While other replicas' tickets wait,
/// look again every `adopt_after`, because whoever starts them may die too.
pub fn plan(rail: &Rail, me: &str, now: Timestamp, adopt_after: Duration) -> Plan {
    let mut out = Plan::default();
    let mut wake: Option<Timestamp> = None;
    let mut soonest = |t: Timestamp| wake = Some(wake.map_or(t, |w: Timestamp| w.min(t)));
    for t in &rail.tickets {
        if t.manual && t.cooking() {
            if t.owner == me {
                out.mine.push(t.clone());
            }
            out.check.push(t.clone());
            soonest(add(now, MANUAL_POLL));
            continue;
        }
        match t.end() {
            Some(end) => {
                let due = if t.owner == me {
                    out.mine.push(t.clone());
                    end
                } else {
                    add(end, adopt_after)
                };
                if due <= now {
                    out.finish.push(t.clone());
                } else {
                    soonest(due);
                }
            }
            // A waiting ticket starts in whichever rail write frees a
            // station, by whoever makes it; look again in case that one dies.
            None => soonest(add(now, adopt_after)),
        }
    }
    out.wake_in = if !out.finish.is_empty() {
        Some(Duration::ZERO)
    } else {
        wake.map(|w| Duration::try_from(w.duration_since(now)).unwrap_or_default())
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    const P: Duration = Duration::from_secs(10);

    #[test]
    fn fills_stations_then_queues_fifo() {
        let mut r = Rail::default();
        let (a, sa) = r.book("a", "oa", P, 2, "x", t(0));
        let (b, sb) = r.book("b", "ob", P, 2, "y", t(0));
        let (c, sc) = r.book("c", "oc", P, 2, "y", t(0));
        assert_eq!((a.number, b.number, c.number), (1, 2, 3));
        assert_eq!((sa.len(), sb.len(), sc.len()), (1, 1, 0), "c waits");
        assert_eq!(r.cooking(), 2);
        let again = r.book("a", "oa", P, 2, "z", t(5));
        assert_eq!(
            again.0,
            Booked {
                number: 1,
                existed: true
            }
        );
        assert!(again.1.is_empty(), "booking twice changes nothing");
        assert_eq!(r.get("a").unwrap().owner, "x");
        // c is estimated to start when the first station frees.
        assert_eq!(
            r.estimate("c", t(1)),
            Some(Window {
                start: t(10),
                end: t(20)
            })
        );
        // Removing a cooking ticket starts the next, owned by whoever removed it.
        let (removed, started) = r.remove("a", "z", t(10));
        assert!(removed);
        assert_eq!(started.len(), 1);
        assert_eq!(
            (started[0].uid.as_str(), started[0].owner.as_str()),
            ("c", "z")
        );
        assert_eq!(r.get("c").unwrap().started_at, Some(t(10)));
        assert_eq!(r.remove("a", "z", t(11)), (false, Vec::new()));
    }

    #[test]
    fn a_short_ticket_never_overtakes() {
        let mut r = Rail::default();
        r.book("long", "o", P, 1, "x", t(0));
        r.book("mid", "o", P, 1, "x", t(0));
        r.book("short", "o", Duration::from_secs(1), 1, "x", t(0));
        let mid = r.estimate("mid", t(0)).unwrap();
        let short = r.estimate("short", t(0)).unwrap();
        assert!(short.start >= mid.start, "{short:?} vs {mid:?}");
        r.remove("long", "x", t(10));
        assert!(r.get("mid").unwrap().cooking());
        assert!(!r.get("short").unwrap().cooking());
    }

    #[test]
    fn a_manual_ticket_is_never_finished_by_time_and_is_checked_by_anyone() {
        let grace = Duration::from_secs(30);
        let mut r = Rail::default();
        r.book("m", "om", P, 1, "x", t(0));
        r.manual("m");
        for (who, at) in [("x", 5), ("x", 1000), ("y", 1000)] {
            let p = plan(&r, who, t(at), grace);
            assert!(
                p.finish.is_empty(),
                "{who} finished a manual ticket at {at}"
            );
            assert_eq!(p.check.len(), 1, "{who} at {at}");
            assert_eq!(p.wake_in, Some(MANUAL_POLL));
            assert_eq!(p.mine.len(), usize::from(who == "x"));
        }
        // Its preparation time is still the estimate others queue behind.
        r.book("next", "on", P, 1, "x", t(0));
        assert_eq!(r.estimate("next", t(0)).map(|w| w.start), Some(t(10)));
    }

    #[test]
    fn owners_finish_at_the_end_others_after_the_grace() {
        let grace = Duration::from_secs(30);
        let mut r = Rail::default();
        r.book("a", "oa", P, 2, "x", t(0));
        r.book("b", "ob", P, 2, "y", t(0));
        let at_x = plan(&r, "x", t(10), grace);
        assert_eq!(
            at_x.finish
                .iter()
                .map(|t| t.uid.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(at_x.mine.len(), 1);
        let early = plan(&r, "x", t(5), grace);
        assert!(early.finish.is_empty());
        assert_eq!(early.wake_in, Some(Duration::from_secs(5)));
        let late = plan(&r, "x", t(41), grace);
        assert_eq!(
            late.finish.len(),
            2,
            "y's ticket is overdue by more than the grace"
        );
        assert_eq!(plan(&Rail::default(), "x", t(0), grace).wake_in, None);
    }

    #[test]
    fn the_rail_reads_back_as_written() {
        let mut r = Rail::default();
        r.book("a", "oa", P, 3, "x", t(0));
        r.book("b", "ob", P, 1, "x", t(0));
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Rail>(&text).unwrap(), r);
    }

    #[test]
    fn prep_is_the_longest_dish_scaled() {
        assert_eq!(prep_time([60, 600, 30], 1.0), Duration::from_secs(600));
        assert_eq!(prep_time([600], 0.01), Duration::from_secs(6));
        assert_eq!(prep_time([600], 0.0), Duration::ZERO);
        assert_eq!(prep_time([], 1.0), Duration::ZERO);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Book { replica: usize, prep: u64 },
        Finish { replica: usize },
        Drop { index: usize, replica: usize },
        Tick(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0_usize..3, 0_u64..20).prop_map(|(replica, prep)| Op::Book { replica, prep }),
            (0_usize..3).prop_map(|replica| Op::Finish { replica }),
            (0_usize..40, 0_usize..3).prop_map(|(index, replica)| Op::Drop { index, replica }),
            (1_u64..10).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Three replicas booking, finishing, dropping in any interleaving:
        /// the rail never cooks more than the capacity, tickets start in
        /// number order, and every ticket started is one a driver finishes.
        #[test]
        fn never_over_capacity_and_fifo(capacity in 1_u32..4, ops in prop::collection::vec(op(), 1..80)) {
            let replicas = ["x", "y", "z"];
            let grace = Duration::from_secs(5);
            let mut r = Rail::default();
            let mut now = 0_i64;
            let mut started_order: Vec<i64> = Vec::new();
            let mut booked = 0;
            for op in ops {
                let started = match op {
                    Op::Book { replica, prep } => {
                        booked += 1;
                        r.book(&format!("u{booked}"), "o", Duration::from_secs(prep), capacity,
                            replicas[replica], t(now)).1
                    }
                    Op::Finish { replica } => {
                        let p = plan(&r, replicas[replica], t(now), grace);
                        let mut started = Vec::new();
                        for f in p.finish {
                            prop_assert!(f.end().unwrap() <= t(now));
                            started.extend(r.remove(&f.uid, replicas[replica], t(now)).1);
                        }
                        started
                    }
                    Op::Drop { index, replica } => match r.tickets.get(index).map(|t| t.uid.clone()) {
                        Some(uid) => r.remove(&uid, replicas[replica], t(now)).1,
                        None => Vec::new(),
                    },
                    Op::Tick(s) => { now += i64::try_from(s).unwrap(); Vec::new() }
                };
                started_order.extend(started.iter().map(|t| t.number));
                prop_assert!(r.cooking() <= capacity as usize);
                // Nothing waits while a station is free.
                let waiting = r.tickets.iter().any(|t| !t.cooking());
                prop_assert!(!waiting || r.cooking() == capacity as usize);
                // Numbers stay in order on the rail.
                prop_assert!(r.tickets.windows(2).all(|w| w[0].number < w[1].number));
            }
            prop_assert!(started_order.windows(2).all(|w| w[0] < w[1]), "{started_order:?}");
            // Drive to the end: everything finishes.
            for _ in 0..200 {
                if r.tickets.is_empty() { break; }
                now += 100;
                let p = plan(&r, "x", t(now), grace);
                for f in p.finish {
                    r.remove(&f.uid, "x", t(now));
                }
            }
            prop_assert!(r.tickets.is_empty());
        }
    }
}
