//! What the controller writes down and resumes from: the journal's records, and the state a
//! restart needs, built by applying them in order. Pure: the file and its writer are
//! [`crate::journal`]'s.
//!
//! The core changes its timeline and replay memory only by applying a record here, and the
//! journal's recovery applies the same records through the same [`State::apply`]: so what a
//! restart resumes is what was in force.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::decide::mv::{Interval, Measurement, Sample};
use crate::decide::replay::Replay;
use crate::decide::signal::Signal;
use crate::decide::timeline::{Applied, Timeline};

/// How an event ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// The utility released or deleted it.
    Released,
    /// Its last directive ran out.
    Expired,
    /// The controller's stale-signal policy ended it (the utility may re-assert it).
    Stale,
}

/// One line of the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// The state to resume from: begins every run and every rotated file.
    Checkpoint {
        at: Timestamp,
        site: String,
        state: State,
    },
    /// A signal taken: from the utility on `topic`, or the stale-signal policy's (no topic).
    Accepted {
        at: Timestamp,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        /// The sender's own time for the signal, where its format gives one (maestro).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sent_at: Option<Timestamp>,
        signal: Signal,
    },
    /// An event ended, with the site as measured then.
    Completed {
        at: Timestamp,
        id: String,
        end: End,
        site_kw: Option<f64>,
        asic_kw: Option<f64>,
    },
    /// A plan that switched outlets (by PDU name, outlet numbers), and why.
    Plan {
        at: Timestamp,
        generation: u64,
        limit_kw: f64,
        budget_kw: f64,
        shortfall_kw: f64,
        directives: Vec<String>,
        off: BTreeMap<String, Vec<u16>>,
        on: BTreeMap<String, Vec<u16>>,
    },
    /// Every outlet the plan switched was read back in its new state.
    Confirmed {
        at: Timestamp,
        generation: u64,
        after_ms: u64,
    },
    /// These outlets of the plan were not seen to follow it in time.
    Unconfirmed {
        at: Timestamp,
        generation: u64,
        outlets: BTreeMap<String, Vec<u16>>,
    },
    /// A device stopped answering, answered wrongly, or its relays disagree.
    Fault {
        at: Timestamp,
        device: String,
        reason: String,
    },
    /// A faulted device answers properly again.
    Recovered { at: Timestamp, device: String },
    /// The meters, at the journal's meter interval.
    Meters {
        at: Timestamp,
        site_kw: Option<f64>,
        asic_kw: Option<f64>,
        gpu_kw: Option<f64>,
        limit_kw: f64,
        shed_kw: f64,
    },
    /// Records lost because the disk fell behind (the queue was full).
    Gap { at: Timestamp, lost: u64 },
    /// An event as measured, written when it completes: its baseline, reduction and
    /// compliance, and every 1- and 15-minute interval (`gridshed report` prints these).
    Measured {
        at: Timestamp,
        measurement: Measurement,
        intervals: Vec<Interval>,
    },
}

/// The last switch gridshed made on an outlet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    pub on: bool,
    pub at: Timestamp,
}

/// What a restart needs: built by applying records in order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub timeline: Timeline,
    pub replay: Replay,
    /// PDU name → outlet → the last switch gridshed made there.
    #[serde(with = "outlets")]
    pub switched: BTreeMap<String, BTreeMap<u16, Switch>>,
}

impl State {
    /// Applies one record; what it did to the timeline.
    pub fn apply(&mut self, record: &Record) -> Applied {
        match record {
            Record::Checkpoint { state, .. } => {
                *self = state.clone();
                Applied::Unchanged
            }
            Record::Accepted {
                signal, sent_at, ..
            } => {
                self.replay.taken(*sent_at);
                self.timeline.apply(signal)
            }
            Record::Completed { at, id, end, .. } => {
                if *end != End::Stale {
                    self.replay.ended(id, *at);
                }
                self.timeline.apply(&Signal::Release {
                    id: Some(id.clone()),
                })
            }
            Record::Plan { at, off, on, .. } => {
                for (outlets, state) in [(off, false), (on, true)] {
                    for (pdu, numbers) in outlets {
                        let entry = self.switched.entry(pdu.clone()).or_default();
                        for n in numbers {
                            entry.insert(*n, Switch { on: state, at: *at });
                        }
                    }
                }
                Applied::Unchanged
            }
            Record::Confirmed { .. }
            | Record::Unconfirmed { .. }
            | Record::Fault { .. }
            | Record::Recovered { .. }
            | Record::Meters { .. }
            | Record::Gap { .. }
            | Record::Measured { .. } => Applied::Unchanged,
        }
    }
}

impl Record {
    /// The reading a `meters` record holds.
    pub fn sample(&self) -> Option<Sample> {
        match *self {
            Record::Meters {
                at,
                site_kw,
                asic_kw,
                gpu_kw,
                limit_kw,
                ..
            } => Some(Sample {
                at,
                site_kw,
                asic_kw,
                gpu_kw,
                limit_kw,
            }),
            _ => None,
        }
    }
}

/// The last switches by PDU and outlet, written as a list per PDU:
/// `{"pdu-1":[{"outlet":3,"on":false,"at":"…"}]}`.
///
/// Regression (found by the deterministic simulation, seed 0x1, and by hand in issue 13):
/// written as a map keyed by outlet number, a checkpoint could not be read back, because
/// integer map keys inside an internally tagged enum (`Record`) do not round-trip through
/// serde_json; after a rotation the live file began with that checkpoint and a restart forgot
/// every event in force. The map form is still read, so journals written before are recovered.
mod outlets {
    use std::collections::BTreeMap;

    use jiff::Timestamp;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Switch;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outlet {
        outlet: u16,
        on: bool,
        at: Timestamp,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<Outlet>),
        Map(BTreeMap<String, Switch>),
    }

    pub fn serialize<S: Serializer>(
        v: &BTreeMap<String, BTreeMap<u16, Switch>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let lists: BTreeMap<&String, Vec<Outlet>> = v
            .iter()
            .map(|(pdu, outlets)| {
                let list = outlets
                    .iter()
                    .map(|(n, sw)| Outlet {
                        outlet: *n,
                        on: sw.on,
                        at: sw.at,
                    })
                    .collect();
                (pdu, list)
            })
            .collect();
        lists.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, BTreeMap<u16, Switch>>, D::Error> {
        let forms = BTreeMap::<String, Form>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (pdu, form) in forms {
            let outlets = match form {
                Form::List(list) => list
                    .into_iter()
                    .map(|o| (o.outlet, Switch { on: o.on, at: o.at }))
                    .collect(),
                Form::Map(map) => map
                    .into_iter()
                    .map(|(k, sw)| {
                        k.parse::<u16>()
                            .map(|n| (n, sw))
                            .map_err(|_| D::Error::custom(format!("outlet {k:?} is not a number")))
                    })
                    .collect::<Result<_, _>>()?,
            };
            out.insert(pdu, outlets);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::signal::{Action, Directive, Signal};
    use proptest::prelude::*;
    use site_config::SignalFormat;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_795_000_000 + secs).unwrap()
    }

    fn checkpoint(state: &State) -> Record {
        Record::Checkpoint {
            at: t(0),
            site: "demo".into(),
            state: state.clone(),
        }
    }

    fn reread(r: &Record) -> Record {
        let line = serde_json::to_string(r).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    #[test]
    fn a_checkpoint_with_switched_outlets_reads_back_regression_seed_0x1() {
        let mut state = State::default();
        state.apply(&Record::Plan {
            at: t(5),
            generation: 1,
            limit_kw: 100.0,
            budget_kw: 50.0,
            shortfall_kw: 0.0,
            directives: vec![],
            off: BTreeMap::from([("pdu-1".to_owned(), vec![1, 3])]),
            on: BTreeMap::new(),
        });
        let cp = checkpoint(&state);
        assert_eq!(reread(&cp), cp);
    }

    #[test]
    fn a_checkpoint_written_in_the_old_map_form_is_still_read() {
        let old = r#"{"record":"checkpoint","at":"2026-11-22T10:00:00Z","site":"demo","state":{"timeline":{},"replay":{"ended":{},"maestro_sent":null},"switched":{"pdu-1":{"3":{"on":false,"at":"2026-11-22T09:59:00Z"}}}}}"#;
        let Record::Checkpoint { state, .. } = serde_json::from_str::<Record>(old).unwrap() else {
            panic!("a checkpoint");
        };
        assert!(!state.switched["pdu-1"][&3].on);
    }

    fn directive(id: &str, kw: f64, start: i64, len: Option<i64>, priority: u32) -> Directive {
        Directive {
            id: id.into(),
            interval: 0,
            action: Action::ImportLimit { kw },
            start: t(start),
            end: len.map(|l| t(start + l)),
            priority,
            emergency: priority == 0,
            format: SignalFormat::Native,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any state the records can build comes back whole from a checkpoint.
        #[test]
        fn any_state_comes_back_whole_from_its_checkpoint(
            events in proptest::collection::vec(
                ("[a-z0-9-]{1,12}", 1.0f64..1e5, 0i64..1000, proptest::option::of(1i64..5000), 0u32..1001),
                0..12,
            ),
            ended in proptest::collection::vec(("[a-z]{1,8}", 0i64..1000), 0..8),
            switches in proptest::collection::vec(("pdu-[0-9]{1,3}", 1u16..=64, any::<bool>(), 0i64..1000), 0..40),
            maestro in proptest::option::of(0i64..1000),
        ) {
            let mut state = State::default();
            for (id, kw, start, len, prio) in &events {
                let signal = Signal::Event { id: id.clone(), directives: vec![directive(id, *kw, *start, *len, *prio)] };
                state.apply(&Record::Accepted { at: t(*start), topic: None, sent_at: maestro.map(t), signal });
            }
            for (id, at) in &ended {
                state.apply(&Record::Completed { at: t(*at), id: id.clone(), end: End::Released, site_kw: None, asic_kw: None });
            }
            for (pdu, outlet, on, at) in &switches {
                let map = BTreeMap::from([(pdu.clone(), vec![*outlet])]);
                let (off, on_) = if *on { (BTreeMap::new(), map) } else { (map, BTreeMap::new()) };
                state.apply(&Record::Plan { at: t(*at), generation: 1, limit_kw: 1.0, budget_kw: 1.0, shortfall_kw: 0.0, directives: vec![], off, on: on_ });
            }
            let cp = checkpoint(&state);
            let back = reread(&cp);
            let Record::Checkpoint { state: again, .. } = back else { panic!("a checkpoint") };
            prop_assert_eq!(again, state);
        }
    }
}
