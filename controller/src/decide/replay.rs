//! Replay protection: a signal cannot bring back what has ended.
//!
//! An event the utility ended (native `release`, OpenADR `DELETE`) or that ran its course is
//! remembered for [`REMEMBER`], and a later signal with its id is refused: a captured message
//! replayed, or an old one re-delivered by a broker, must neither curtail nor lift anything
//! again. Maestro has no event ids; its messages carry their send time instead, and one older
//! than the newest taken is refused. Events the controller ended on its own (the stale-signal
//! policy) are not remembered: the utility may rightly re-assert them when it is heard again.
//!
//! ```text
//!   evt-42 accepted        released at 10:30            replayed at 11:00
//!   |======== in force =======|                            x refused: "ended at 10:30"
//!                             |<------------- REMEMBER (38 days) ------------->|
//! ```

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::decide::signal::{MAESTRO_ID, MAX_DURATION, MAX_LEAD, Signal};

/// How long an ended event's id is refused: the longest a signal can stay in force (it may
/// start [`MAX_LEAD`] ahead and last [`MAX_DURATION`]), so that every replay of it is covered.
pub const REMEMBER: SignedDuration =
    SignedDuration::from_secs(MAX_LEAD.as_secs() + MAX_DURATION.as_secs());

/// Ended ids kept at most: the oldest are forgotten first.
const MAX_REMEMBERED: usize = 10_000;

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

    /// Event `id` ended at `at`, by the utility's word or its own end.
    pub fn ended(&mut self, id: &str, at: Timestamp) {
        // Maestro re-uses one id for every curtailment; its ordering is by send time.
        if id == MAESTRO_ID {
            return;
        }
        self.ended.insert(id.to_owned(), at);
        if self.ended.len() > MAX_REMEMBERED
            && let Some(oldest) = self
                .ended
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(id, _)| id.clone())
        {
            self.ended.remove(&oldest);
        }
    }

    /// Forgets ids that ended longer than [`REMEMBER`] before `now`.
    pub fn forget_old(&mut self, now: Timestamp) {
        self.ended
            .retain(|_, at| now.duration_since(*at) <= REMEMBER);
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
    fn ended_ids_are_forgotten_after_the_replay_window_and_beyond_the_cap() {
        let mut r = Replay::default();
        r.ended("old", t("10:00"));
        r.ended("new", t("11:00"));
        r.forget_old(t("10:00") + REMEMBER + SignedDuration::from_secs(1));
        assert_eq!(r.check(&event("old"), None), Ok(()));
        assert!(r.check(&event("new"), None).is_err());

        let mut r = Replay::default();
        for k in 0..=MAX_REMEMBERED {
            r.ended(
                &format!("e{k}"),
                t("10:00") + SignedDuration::from_secs(k as i64),
            );
        }
        assert_eq!(r.ended.len(), MAX_REMEMBERED);
        assert_eq!(r.check(&event("e0"), None), Ok(()), "the oldest went first");
    }
}
