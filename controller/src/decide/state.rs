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
