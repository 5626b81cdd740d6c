//! Claims on notifications, as pure functions over the Order's
//! `status.notifications`: who may send which channel of which event.
//!
//! A replica writes a `Claimed` entry (compare-and-swap on the section, see
//! [`crate::record`]) before sending and turns it into `Sent` after. Any
//! replica that finds `Sent` sends nothing; one that finds a live claim
//! waits for it to settle. A claim is free to take over when it is older
//! than the claim timeout (its replica died or lost the apiserver), or when
//! it was left by this replica's name but no handler here holds it (a
//! previous process under the same name, or an attempt that failed to
//! record its outcome).

use std::collections::HashSet;
use std::time::Duration;

use dishpatch_api::order::{NotificationChannel, NotificationRecord, NotificationState};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Who this process is, for claims: `<identity>/<process>-<n>` per attempt.
#[derive(Debug, Clone)]
pub struct Me {
    /// The replica's name, unique among running replicas (the pod name).
    identity: String,
    /// Tells this process from an earlier one under the same name.
    process: String,
}

impl Me {
    pub fn new(identity: &str, started: Timestamp) -> Self {
        Self {
            identity: identity.to_string(),
            process: format!("{:x}", started.as_millisecond()),
        }
    }

    /// The holder name of this process's `n`th attempt.
    pub fn holder(&self, n: u64) -> String {
        format!("{}/{}-{n}", self.identity, self.process)
    }

    /// Whether `holder` is a claim made under this replica's name (by this
    /// process or an earlier one).
    fn is_mine(&self, holder: &str) -> bool {
        holder
            .strip_prefix(self.identity.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
    }
}

/// What the record says about one channel of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// It went out: send nothing.
    Sent,
    /// Someone alive may be sending it: wait, at most until `until`.
    Busy { until: Timestamp },
    /// Nobody holds it: claim it.
    Free,
}

/// The entry for `event` and `channel`, if any.
pub fn find<'a>(
    records: &'a [NotificationRecord],
    event: &str,
    channel: NotificationChannel,
) -> Option<&'a NotificationRecord> {
    records
        .iter()
        .find(|r| r.event == event && r.channel == channel)
}

/// What `me` may do about `channel` of `event`. `active` holds the holder
/// names of this process's handlers now running.
pub fn seen(
    records: &[NotificationRecord],
    event: &str,
    channel: NotificationChannel,
    me: &Me,
    active: &HashSet<String>,
    now: Timestamp,
    timeout: Duration,
) -> Seen {
    let Some(record) = find(records, event, channel) else {
        return Seen::Free;
    };
    match record.state {
        NotificationState::Sent => Seen::Sent,
        NotificationState::Claimed => {
            let until = record.at.0.checked_add(timeout).unwrap_or(Timestamp::MAX);
            if active.contains(&record.holder) {
                // Another handler in this process is on it (a duplicate
                // delivered to the same replica): it will settle it.
                Seen::Busy { until }
            } else if me.is_mine(&record.holder) || now >= until {
                Seen::Free
            } else {
                Seen::Busy { until }
            }
        }
    }
}

/// `records` with `channels` of `event` set to `state` by `holder` at `now`.
pub fn set(
    records: &[NotificationRecord],
    event: &str,
    channels: &[NotificationChannel],
    state: NotificationState,
    holder: &str,
    now: Timestamp,
) -> Vec<NotificationRecord> {
    let mut out: Vec<NotificationRecord> = records
        .iter()
        .filter(|r| !(r.event == event && channels.contains(&r.channel)))
        .cloned()
        .collect();
    for &channel in channels {
        out.push(NotificationRecord {
            event: event.to_string(),
            channel,
            state,
            holder: holder.to_string(),
            at: Time(now),
        });
    }
    out
}

/// `records` after `holder` finished: the channels in `sent` become `Sent`,
/// its other claims on `event` are dropped so anyone may try again. Entries
/// someone else took over in the meantime are left alone.
pub fn settle(
    records: &[NotificationRecord],
    event: &str,
    holder: &str,
    sent: &[NotificationChannel],
    now: Timestamp,
) -> Vec<NotificationRecord> {
    records
        .iter()
        .filter_map(|r| {
            let ours =
                r.event == event && r.holder == holder && r.state == NotificationState::Claimed;
            if !ours {
                Some(r.clone())
            } else if sent.contains(&r.channel) {
                Some(NotificationRecord {
                    state: NotificationState::Sent,
                    at: Time(now),
                    ..r.clone()
                })
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use NotificationChannel::{Email, Webhook};

    const TIMEOUT: Duration = Duration::from_secs(120);

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn me() -> Me {
        Me::new("pod-a", at(0))
    }

    fn claimed(channel: NotificationChannel, holder: &str, secs: i64) -> NotificationRecord {
        NotificationRecord {
            event: "u.order.accepted".into(),
            channel,
            state: NotificationState::Claimed,
            holder: holder.into(),
            at: Time(at(secs)),
        }
    }

    fn look(records: &[NotificationRecord], active: &[String], now: i64) -> Seen {
        let active = active.iter().cloned().collect();
        seen(
            records,
            "u.order.accepted",
            Email,
            &me(),
            &active,
            at(now),
            TIMEOUT,
        )
    }

    #[test]
    fn nothing_recorded_is_free_and_sent_is_final() {
        assert_eq!(look(&[], &[], 0), Seen::Free);
        let sent = set(
            &[],
            "u.order.accepted",
            &[Email],
            NotificationState::Sent,
            "pod-b/1-1",
            at(0),
        );
        assert_eq!(look(&sent, &[], 0), Seen::Sent);
        assert_eq!(look(&sent, &[], 1_000_000), Seen::Sent);
        // Another event's or channel's record says nothing about this one.
        let other = vec![claimed(Webhook, "pod-b/1-1", 0)];
        assert_eq!(look(&other, &[], 0), Seen::Free);
    }

    #[test]
    fn another_replicas_claim_is_busy_until_it_expires() {
        let records = vec![claimed(Email, "pod-b/1-7", 10)];
        let until = at(130);
        assert_eq!(look(&records, &[], 10), Seen::Busy { until });
        assert_eq!(look(&records, &[], 129), Seen::Busy { until });
        assert_eq!(look(&records, &[], 130), Seen::Free);
        // A replica whose name extends ours is another replica.
        let records = vec![claimed(Email, "pod-a-2/1-7", 10)];
        assert_eq!(look(&records, &[], 20), Seen::Busy { until });
    }

    #[test]
    fn own_claims_are_busy_only_while_a_handler_holds_them() {
        let mine = me().holder(3);
        let records = vec![claimed(Email, &mine, 10)];
        assert_eq!(
            look(&records, std::slice::from_ref(&mine), 11),
            Seen::Busy { until: at(130) }
        );
        // Left by a finished attempt of this process, or by an earlier process of this pod.
        assert_eq!(look(&records, &[], 11), Seen::Free);
        let earlier = vec![claimed(Email, "pod-a/abc-3", 10)];
        assert_eq!(look(&earlier, &[], 11), Seen::Free);
    }

    #[test]
    fn settling_keeps_what_others_hold() {
        let mine = me().holder(1);
        let records = vec![
            claimed(Email, &mine, 0),
            claimed(Webhook, &mine, 0),
            NotificationRecord {
                event: "u.kitchen.ready".into(),
                ..claimed(Email, "pod-b/1-1", 0)
            },
        ];
        let after = settle(&records, "u.order.accepted", &mine, &[Webhook], at(5));
        assert_eq!(after.len(), 2, "{after:#?}");
        let webhook = find(&after, "u.order.accepted", Webhook).unwrap();
        assert_eq!(
            (webhook.state, webhook.at.0),
            (NotificationState::Sent, at(5))
        );
        // The failed e-mail's claim is dropped: anyone may try again.
        assert!(find(&after, "u.order.accepted", Email).is_none());
        assert!(after.contains(&records[2]));
        // Taken over meanwhile: not ours to settle.
        let taken = vec![claimed(Email, "pod-b/1-9", 3)];
        assert_eq!(
            settle(&taken, "u.order.accepted", &mine, &[Email], at(5)),
            taken
        );
    }

    #[test]
    fn records_round_trip_exactly() {
        // The compare-and-swap tests the section as read against what is
        // stored, so serializing what was read must give the stored JSON back.
        let stored = serde_json::json!([{
            "event": "u.order.accepted", "channel": "Email", "state": "Claimed",
            "holder": "pod-a/1-1", "at": "2027-01-15T08:00:00Z"
        }]);
        let read: Vec<NotificationRecord> = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!(serde_json::to_value(&read).unwrap(), stored);
    }

    mod model {
        //! The claim rules under every interleaving of replicas handling
        //! copies of one event, with the compare-and-swap as the apiserver
        //! does it (replace only if the section is still what was read).
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone, PartialEq)]
        enum Step {
            /// Read the Order and decide.
            Read,
            /// Claim-swap from what was read.
            Claim(Vec<NotificationRecord>),
            Send,
            /// Settle-swap from the section as written (or last read),
            /// and whether the send went out.
            Settle(Vec<NotificationRecord>, bool),
            Done,
            Crashed,
        }

        struct Replica {
            me: Me,
            holder: String,
            step: Step,
            claimed_at: Timestamp,
        }

        const EVENT: &str = "u.order.accepted";

        struct Outcome {
            sends: usize,
            store: Vec<NotificationRecord>,
            finished: bool,
            /// A replica recorded `Sent` only after its claim had expired:
            /// the one case the guarantee leaves out.
            late_records: usize,
        }

        /// Runs the schedule: each entry picks a replica to step (modulo)
        /// and how far the clock moves first; `crash` stops one replica
        /// just after its claim went in, before it sent.
        fn run(schedule: &[(usize, u8)], replicas: usize, crash: Option<usize>) -> Outcome {
            let mut store: Vec<NotificationRecord> = Vec::new();
            let (mut sends, mut late_records) = (0, 0);
            let mut now = at(0);
            let mut rs: Vec<Replica> = (0..replicas)
                .map(|i| {
                    let me = Me::new(&format!("pod-{i}"), at(0));
                    let holder = me.holder(0);
                    Replica {
                        me,
                        holder,
                        step: Step::Read,
                        claimed_at: at(0),
                    }
                })
                .collect();
            // After the schedule, everyone still running gets turns in
            // order, the clock moving on, until done: liveness.
            let tail = (0..4000).map(|n| (n, 7_u8));
            for (pick, dt) in schedule.iter().copied().chain(tail) {
                if rs
                    .iter()
                    .all(|r| matches!(r.step, Step::Done | Step::Crashed))
                {
                    break;
                }
                now = now
                    .checked_add(Duration::from_secs(u64::from(dt % 8)))
                    .unwrap();
                let i = pick % replicas;
                let r = &mut rs[i];
                r.step = match std::mem::replace(&mut r.step, Step::Done) {
                    Step::Read => {
                        match seen(&store, EVENT, Email, &r.me, &HashSet::new(), now, TIMEOUT) {
                            Seen::Sent => Step::Done,
                            Seen::Busy { .. } => Step::Read,
                            Seen::Free => Step::Claim(store.clone()),
                        }
                    }
                    Step::Claim(read) => {
                        if store == read {
                            store = set(
                                &read,
                                EVENT,
                                &[Email],
                                NotificationState::Claimed,
                                &r.holder,
                                now,
                            );
                            r.claimed_at = now;
                            if crash == Some(i) {
                                Step::Crashed
                            } else {
                                Step::Send
                            }
                        } else {
                            Step::Read
                        }
                    }
                    Step::Send => {
                        // Sends are cut off at half the claim timeout.
                        let sent = now < r.claimed_at.checked_add(TIMEOUT / 2).unwrap();
                        if sent {
                            sends += 1;
                        }
                        Step::Settle(store.clone(), sent)
                    }
                    Step::Settle(read, sent) => {
                        if store == read {
                            let channels: &[NotificationChannel] =
                                if sent { &[Email] } else { &[] };
                            store = settle(&read, EVENT, &r.holder, channels, now);
                            if sent && now >= r.claimed_at.checked_add(TIMEOUT).unwrap() {
                                late_records += 1;
                            }
                            // Cut off: its claim is dropped; the retry reads again.
                            if sent { Step::Done } else { Step::Read }
                        } else {
                            Step::Settle(store.clone(), sent)
                        }
                    }
                    other => other,
                };
            }
            let finished = rs
                .iter()
                .all(|r| matches!(r.step, Step::Done | Step::Crashed));
            Outcome {
                sends,
                store,
                finished,
                late_records,
            }
        }

        proptest! {
            #[test]
            fn one_send_per_event_whatever_the_interleaving(
                replicas in 2_usize..5,
                schedule in proptest::collection::vec((0_usize..8, 0_u8..8), 0..200),
            ) {
                let o = run(&schedule, replicas, None);
                prop_assert!(o.finished);
                prop_assert!(o.sends == 1 || o.late_records > 0, "{} sends", o.sends);
                prop_assert_eq!(o.store.len(), 1);
                prop_assert_eq!(o.store[0].state, NotificationState::Sent);
            }

            #[test]
            fn a_claim_whose_replica_died_before_sending_is_sent_by_another(
                replicas in 2_usize..5,
                crash in 0_usize..5,
                schedule in proptest::collection::vec((0_usize..8, 0_u8..8), 0..200),
            ) {
                let crash = crash % replicas;
                let o = run(&schedule, replicas, Some(crash));
                prop_assert!(o.finished);
                // Whether or not the crashing replica got its claim in, another sent it, once.
                prop_assert!(o.sends == 1 || o.late_records > 0, "{} sends", o.sends);
                prop_assert_eq!(o.store[0].state, NotificationState::Sent);
                prop_assert_ne!(&o.store[0].holder, &Me::new(&format!("pod-{crash}"), at(0)).holder(0));
            }
        }
    }
}
