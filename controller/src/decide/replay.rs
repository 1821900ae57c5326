//! Replay protection: a signal cannot bring back what has ended.
//!
//! An event the utility ended (native `release`, OpenADR `DELETE`) or that ran its course is
//! remembered for the site's replay window (`policy.replay_window_h`, a week by default), and a
//! later signal with its id is refused: a captured message replayed, or an old one re-delivered
//! by a broker, must neither curtail nor lift anything again. Maestro has no event ids; its
//! messages carry their send time instead, and one older than the newest taken is refused.
//! Events the controller ended on its own (the stale-signal policy) are not remembered: the
//! utility may rightly re-assert them when it is heard again.
//!
//! Protection is by time, never by volume: an id is forgotten only when its window has passed.
//! Memory stays bounded because new events are refused while [`CAPACITY`] ended ids are
//! within the window (a utility sends a few events a day; ten thousand in a week is an attack
//! or a fault, and refusing is the safe side of it).
//!
//! ```text
//!   evt-42 accepted        released at 10:30            replayed at 11:00
//!   |======== in force =======|                            x refused: "ended at 10:30"
//!                             |<----------- replay window (a week) ----------->|
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::decide::signal::{MAESTRO_ID, Signal};

/// Ended ids remembered at most: beyond, new events are refused until old ids age out.
pub const CAPACITY: usize = 10_000;

/// What has ended, for refusing replays.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Replay {
    /// Ended event ids and when they ended.
    ended: BTreeMap<String, Timestamp>,
    /// The send time of the newest maestro message taken.
    maestro_sent: Option<Timestamp>,
}

impl Replay {
    /// Why `signal`, sent at `sent_at` (when its format says), must be refused, if it must.
    pub fn check(&self, signal: &Signal, sent_at: Option<Timestamp>) -> Result<(), String> {
        if let (Some(sent), Some(newest)) = (sent_at, self.maestro_sent)
            && sent < newest
        {
            return Err(format!(
                "replayed: sent at {sent}, before the newest signal taken (sent at {newest})"
            ));
        }
        if let Signal::Event { id, .. } = signal
            && let Some(at) = self.ended.get(id)
        {
            return Err(format!(
                "replayed: event {id} ended at {at}; a new event needs a new id"
            ));
        }
        Ok(())
    }

    /// A signal sent at `sent_at` was taken.
    pub fn taken(&mut self, sent_at: Option<Timestamp>) {
        if let Some(t) = sent_at {
            self.maestro_sent = Some(self.maestro_sent.map_or(t, |n| n.max(t)));
        }
    }

    /// Event `id` ended at `at`, by the utility's word or its own end. Never forgets another
    /// to make room: the events held when [`CAPACITY`] is reached still end, and are remembered.
    pub fn ended(&mut self, id: &str, at: Timestamp) {
        // Maestro re-uses one id for every curtailment; its ordering is by send time.
        if id == MAESTRO_ID {
            return;
        }
        self.ended.insert(id.to_owned(), at);
    }

    /// Why a new event cannot be taken now, if so: too many ended ids within the window.
    pub fn full(&self, window: Duration) -> Option<String> {
        (self.ended.len() >= CAPACITY).then(|| {
            format!(
                "{} events ended within the replay window ({:.0} h, policy.replay_window_h): new events are refused until the oldest age out",
                self.ended.len(),
                window.as_secs_f64() / 3600.0
            )
        })
    }

    /// Forgets ids that ended longer than `window` before `now`.
    pub fn forget_old(&mut self, now: Timestamp, window: Duration) {
        let window = SignedDuration::try_from(window).unwrap_or(SignedDuration::MAX);
        self.ended.retain(|_, at| now.duration_since(*at) <= window);
    }

    /// At start-up: [`Replay::forget_old`], and a maestro send time further than `max_skew`
    /// ahead of `now` is forgotten (one taken before that bound existed would otherwise lock
    /// maestro out until the clock caught up, across restarts).
    pub fn settle(&mut self, now: Timestamp, window: Duration, max_skew: Duration) {
        self.forget_old(now, window);
        let skew = SignedDuration::try_from(max_skew).unwrap_or(SignedDuration::MAX);
        if self
            .maestro_sent
            .is_some_and(|sent| sent.duration_since(now) > skew)
        {
            self.maestro_sent = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::signal::{Action, Directive};
    use site_config::SignalFormat;

    fn t(s: &str) -> Timestamp {
        format!("2026-11-22T{s}:00Z").parse().unwrap()
    }

    fn event(id: &str) -> Signal {
        Signal::Event {
            id: id.into(),
            directives: vec![Directive {
                id: id.into(),
                interval: 0,
                action: Action::ShedAll,
                start: t("10:00"),
                end: None,
                priority: 1,
                emergency: false,
                format: SignalFormat::Native,
            }],
        }
    }

    #[test]
    fn an_ended_event_is_refused_and_others_and_releases_are_not() {
        let mut r = Replay::default();
        r.ended("evt-1", t("10:30"));
        let err = r.check(&event("evt-1"), None).unwrap_err();
        assert!(err.contains("evt-1 ended at 2026-11-22T10:30:00Z"), "{err}");
        assert_eq!(r.check(&event("evt-2"), None), Ok(()));
        let release = Signal::Release {
            id: Some("evt-1".into()),
        };
        assert_eq!(
            r.check(&release, None),
            Ok(()),
            "releasing twice is harmless"
        );
    }

    #[test]
    fn maestro_messages_older_than_the_newest_taken_are_refused() {
        let mut r = Replay::default();
        r.taken(Some(t("10:05")));
        r.taken(Some(t("10:01")));
        let curtail = event(MAESTRO_ID);
        assert!(r.check(&curtail, Some(t("10:04"))).is_err());
        assert_eq!(r.check(&curtail, Some(t("10:05"))), Ok(()), "a re-send");
        assert_eq!(r.check(&curtail, Some(t("10:06"))), Ok(()));
        // Maestro's one id never ends for good: the next curtailment must be taken.
        r.ended(MAESTRO_ID, t("10:07"));
        assert_eq!(r.check(&curtail, Some(t("10:08"))), Ok(()));
    }

    #[test]
    fn ended_ids_are_forgotten_by_time_only_and_a_full_memory_refuses_new_events() {
        let week = Duration::from_secs(7 * 24 * 3600);
        let mut r = Replay::default();
        r.ended("old", t("10:00"));
        r.ended("new", t("11:00"));
        r.forget_old(t("10:00") + SignedDuration::from_hours(7 * 24 + 1), week);
        assert_eq!(r.check(&event("old"), None), Ok(()));
        assert!(r.check(&event("new"), None).is_err());

        // Issue 13: after 10,198 ended events a replay of an old id was accepted. Volume no
        // longer evicts: the first id is still refused, and new events wait for room.
        let mut r = Replay::default();
        for k in 0..CAPACITY + 200 {
            r.ended(
                &format!("e{k}"),
                t("10:00") + SignedDuration::from_secs(k as i64),
            );
        }
        assert!(
            r.check(&event("e0"), None).is_err(),
            "the oldest is remembered"
        );
        let why = r.full(week).expect("full");
        assert!(why.contains("replay window (168 h"), "{why}");
        r.forget_old(t("10:00") + SignedDuration::from_hours(7 * 24 + 4), week);
        assert_eq!(r.full(week), None, "room again once the window has passed");
    }

    #[test]
    fn a_maestro_send_time_far_ahead_of_the_clock_is_forgotten() {
        // Issue 13: one message stamped now + 23 h locked maestro out for a day, restarts too.
        let mut r = Replay::default();
        r.taken(Some(t("10:00") + SignedDuration::from_hours(23)));
        let curtail = event(MAESTRO_ID);
        assert!(r.check(&curtail, Some(t("10:01"))).is_err());
        r.settle(
            t("10:00"),
            Duration::from_secs(3600),
            Duration::from_secs(300),
        );
        assert_eq!(r.check(&curtail, Some(t("10:01"))), Ok(()));
    }
}
