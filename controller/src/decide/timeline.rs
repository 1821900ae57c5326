//! The directives in force over time, and what they add up to at any instant.
//!
//! Each event (one id) holds its directives; a new signal for an id replaces them whole, so
//! re-sending a signal is harmless. At `now`, the directives in force are ranked by priority
//! (lower is more important) and only the most important tier counts; within it the most
//! restrictive demand wins.
//!
//! ```text
//!            10:00          11:00          12:00
//!  evt-a p2   |== limit 150 ==|== limit 120 ==|
//!  evt-b p1          |====== shed_all ======|        (more important: wins while it lasts)
//!  in force  |lim150 |     shed_all         |lim120 |
//!                    ^ next_change(10:10) = 10:20
//! ```

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::decide::signal::{Action, Directive, Signal};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timeline {
    events: BTreeMap<String, Vec<Directive>>,
}

/// What applying a signal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// A new event, or new content for a known one.
    Changed,
    /// The same directives as before: nothing changed.
    Unchanged,
    /// These events ended (empty when a release named nothing known).
    Released(Vec<String>),
}

/// The combined demand of the directives that count at one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InForce {
    /// Ids of the events whose directives count now.
    pub events: Vec<String>,
    pub import_limit_kw: Option<f64>,
    pub shed_kw: Option<f64>,
    pub shed_all: bool,
    pub emergency: bool,
}

impl InForce {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

impl Timeline {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn apply(&mut self, signal: &Signal) -> Applied {
        match signal {
            Signal::Event { id, directives } => {
                if self.events.get(id) == Some(directives) {
                    return Applied::Unchanged;
                }
                self.events.insert(id.clone(), directives.clone());
                Applied::Changed
            }
            Signal::Release { id: Some(id) } => Applied::Released(
                self.events
                    .remove(id)
                    .map(|_| vec![id.clone()])
                    .unwrap_or_default(),
            ),
            Signal::Release { id: None } => {
                let ids = self.events.keys().cloned().collect();
                self.events.clear();
                Applied::Released(ids)
            }
        }
    }

    /// Every event and its directives, by id.
    pub fn events(&self) -> impl Iterator<Item = (&str, &[Directive])> {
        self.events
            .iter()
            .map(|(id, d)| (id.as_str(), d.as_slice()))
    }

    /// The directives of event `id`, if it is held.
    pub fn get(&self, id: &str) -> Option<&[Directive]> {
        self.events.get(id).map(Vec::as_slice)
    }

    /// Events held (in force or to come).
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.events.contains_key(id)
    }

    pub fn directives(&self) -> impl Iterator<Item = &Directive> {
        self.events.values().flatten()
    }

    /// What counts at `now`: the most important priority tier, its most restrictive demands.
    pub fn in_force(&self, now: Timestamp) -> InForce {
        let active: Vec<&Directive> = self.directives().filter(|d| d.is_in_force(now)).collect();
        let Some(top) = active.iter().map(|d| d.priority).min() else {
            return InForce::default();
        };
        let mut out = InForce::default();
        for d in active.into_iter().filter(|d| d.priority == top) {
            if !out.events.contains(&d.id) {
                out.events.push(d.id.clone());
            }
            out.emergency |= d.emergency;
            match d.action {
                Action::ImportLimit { kw } => {
                    out.import_limit_kw = Some(out.import_limit_kw.map_or(kw, |l| l.min(kw)))
                }
                Action::Shed { kw } => out.shed_kw = Some(out.shed_kw.map_or(kw, |s| s.max(kw))),
                Action::ShedAll => out.shed_all = true,
            }
        }
        out
    }

    /// The next instant after `now` at which a directive starts or ends.
    pub fn next_change(&self, now: Timestamp) -> Option<Timestamp> {
        self.directives()
            .flat_map(|d| [Some(d.start), d.end])
            .flatten()
            .filter(|t| *t > now)
            .min()
    }

    /// Events every directive of which has ended by `now`: they are over and should be ended
    /// (released) by whoever owns the timeline. Events that ask for normal operation (no
    /// directives) are over at once.
    pub fn ended_by(&self, now: Timestamp) -> Vec<String> {
        self.events
            .iter()
            .filter(|(_, ds)| ds.iter().all(|d| d.end.is_some_and(|e| e <= now)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// When the first event still held will be over (see [`Timeline::ended_by`]): `None` if
    /// every event is open-ended.
    pub fn first_end(&self) -> Option<Timestamp> {
        self.events
            .values()
            .filter_map(|ds| {
                ds.iter()
                    .map(|d| d.end)
                    .collect::<Option<Vec<_>>>()
                    .map(|ends| ends.into_iter().max().unwrap_or(Timestamp::MIN))
            })
            .min()
    }

    /// True if any directive of event `id` is in force at `now`.
    pub fn is_active(&self, id: &str, now: Timestamp) -> bool {
        self.events
            .get(id)
            .is_some_and(|ds| ds.iter().any(|d| d.is_in_force(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use site_config::SignalFormat;

    fn t(s: &str) -> Timestamp {
        format!("2026-11-22T{s}:00Z").parse().unwrap()
    }

    fn d(id: &str, action: Action, start: &str, end: Option<&str>, priority: u32) -> Directive {
        Directive {
            id: id.into(),
            interval: 0,
            action,
            start: t(start),
            end: end.map(t),
            priority,
            emergency: false,
            format: SignalFormat::Native,
        }
    }

    fn event(ds: Vec<Directive>) -> Signal {
        Signal::Event {
            id: ds[0].id.clone(),
            directives: ds,
        }
    }

    #[test]
    fn the_most_important_tier_wins_then_the_most_restrictive() {
        let mut tl = Timeline::new();
        tl.apply(&event(vec![d(
            "a",
            Action::ImportLimit { kw: 150.0 },
            "10:00",
            Some("12:00"),
            2,
        )]));
        tl.apply(&event(vec![d(
            "b",
            Action::ShedAll,
            "10:20",
            Some("11:00"),
            1,
        )]));
        tl.apply(&event(vec![d(
            "c",
            Action::ImportLimit { kw: 140.0 },
            "10:00",
            Some("12:00"),
            2,
        )]));
        // Table over time: (now, events that count, limit, shed_all)
        let table = [
            ("09:59", vec![], None, false),
            ("10:00", vec!["a", "c"], Some(140.0), false),
            ("10:20", vec!["b"], None, true),
            ("10:59", vec!["b"], None, true),
            ("11:00", vec!["a", "c"], Some(140.0), false),
            ("12:00", vec![], None, false),
        ];
        for (now, events, limit, shed_all) in table {
            let f = tl.in_force(t(now));
            assert_eq!(f.events, events, "at {now}");
            assert_eq!(f.import_limit_kw, limit, "at {now}");
            assert_eq!(f.shed_all, shed_all, "at {now}");
        }
    }

    #[test]
    fn next_change_is_the_next_start_or_end() {
        let mut tl = Timeline::new();
        tl.apply(&event(vec![d(
            "a",
            Action::Shed { kw: 5.0 },
            "10:00",
            Some("11:00"),
            1,
        )]));
        tl.apply(&event(vec![d("b", Action::ShedAll, "10:30", None, 1)]));
        assert_eq!(tl.next_change(t("09:00")), Some(t("10:00")));
        assert_eq!(tl.next_change(t("10:00")), Some(t("10:30")));
        assert_eq!(tl.next_change(t("10:30")), Some(t("11:00")));
        assert_eq!(tl.next_change(t("11:00")), None);
    }

    #[test]
    fn resending_a_signal_is_idempotent_and_new_content_replaces_the_old() {
        let mut tl = Timeline::new();
        let s = event(vec![d("a", Action::Shed { kw: 5.0 }, "10:00", None, 1)]);
        assert_eq!(tl.apply(&s), Applied::Changed);
        assert_eq!(tl.apply(&s), Applied::Unchanged);
        let s2 = event(vec![d("a", Action::Shed { kw: 9.0 }, "10:00", None, 1)]);
        assert_eq!(tl.apply(&s2), Applied::Changed);
        assert_eq!(tl.in_force(t("10:01")).shed_kw, Some(9.0));
        assert_eq!(tl.directives().count(), 1);
    }

    #[test]
    fn release_ends_one_event_or_all() {
        let mut tl = Timeline::new();
        tl.apply(&event(vec![d("a", Action::ShedAll, "10:00", None, 1)]));
        tl.apply(&event(vec![d("b", Action::ShedAll, "10:00", None, 1)]));
        assert_eq!(
            tl.apply(&Signal::Release {
                id: Some("a".into())
            }),
            Applied::Released(vec!["a".into()])
        );
        assert_eq!(
            tl.apply(&Signal::Release {
                id: Some("zzz".into())
            }),
            Applied::Released(vec![])
        );
        assert_eq!(
            tl.apply(&Signal::Release { id: None }),
            Applied::Released(vec!["b".into()])
        );
        assert!(tl.in_force(t("10:30")).is_empty());
    }

    #[test]
    fn events_are_over_once_every_directive_has_ended_and_open_ended_ones_never() {
        let mut tl = Timeline::new();
        tl.apply(&event(vec![d(
            "a",
            Action::ShedAll,
            "10:00",
            Some("10:30"),
            1,
        )]));
        tl.apply(&event(vec![d("b", Action::ShedAll, "10:00", None, 1)]));
        assert!(tl.ended_by(t("10:29")).is_empty());
        assert_eq!(tl.ended_by(t("10:30")), vec!["a".to_string()]);
        assert_eq!(tl.ended_by(t("23:59")), vec!["a".to_string()]);
    }
}
