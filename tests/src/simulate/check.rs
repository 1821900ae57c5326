//! The invariants, checked as the simulation runs, and the utility's ledger they are checked
//! against.
//!
//! The ledger is what the utility asked, kept by the simulation apart from the controller: it
//! takes every signal the controller is handed, with the same parser and the same replay rules
//! (pure functions, tested on their own), but none of the controller's state, journal,
//! restarts or wiring. If the controller forgets an event, the ledger does not.

use std::collections::{BTreeMap, BTreeSet};

use controller::decide::intake;
use controller::decide::replay::Replay;
use controller::decide::signal::Signal;
use controller::decide::timeline::{InForce, Timeline};
use jiff::Timestamp;
use site_config::{SignalFormat, Site};

/// A broken invariant.
#[derive(Debug, Clone)]
pub struct Broken {
    pub invariant: &'static str,
    pub detail: String,
}

pub fn broken(invariant: &'static str, detail: String) -> Broken {
    Broken { invariant, detail }
}

#[derive(Debug, Default)]
pub struct Ledger {
    timeline: Timeline,
    replay: Replay,
    /// Every event (not a release) a correct controller would have taken.
    pub events: BTreeSet<String>,
}

impl Ledger {
    /// The controller is handed `payload` (in `format`) at `now` (its clock): what a correct
    /// controller does with it. Returns the event ids it accepts (none when it rejects).
    pub fn deliver(
        &mut self,
        site: &Site,
        format: SignalFormat,
        payload: &[u8],
        now: Timestamp,
    ) -> Option<Signal> {
        self.expire(now);
        let admitted =
            intake::admit(site, &self.timeline, &self.replay, format, payload, now).ok()?;
        let (sig, sent_at) = (admitted.signal, admitted.sent_at);
        if admitted.kind == intake::Kind::Unchanged {
            return Some(sig);
        }
        self.replay.taken(sent_at);
        if let Signal::Event { id, .. } = &sig {
            self.events.insert(id.clone());
        }
        let applied = self.timeline.apply(&sig);
        if let controller::decide::timeline::Applied::Released(ids) = applied {
            for id in ids {
                self.replay.ended(&id, now);
            }
        }
        Some(sig)
    }

    /// Events that ran their course by `now` end, as the controller ends them.
    pub fn expire(&mut self, now: Timestamp) {
        for id in self.timeline.ended_by(now) {
            self.timeline.apply(&Signal::Release {
                id: Some(id.clone()),
            });
            self.replay.ended(&id, now);
        }
    }

    pub fn in_force(&self, now: Timestamp) -> InForce {
        self.timeline.in_force(now)
    }

    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }
}

/// Acknowledgements as the utility receives them, per event id.
#[derive(Debug, Default)]
pub struct Acks {
    pub accepted: BTreeSet<String>,
    pub completed: BTreeSet<String>,
    pub rejected: u64,
}

/// Relay history per ASIC, for minimum times and flapping.
#[derive(Debug, Clone, Default)]
pub struct Relay {
    /// When the relay last changed, and to what.
    pub last: Option<(f64, bool)>,
    /// Changes in the current hour.
    pub this_hour: u32,
}

/// Toggle counts and disturbances per simulated hour.
#[derive(Debug, Default)]
pub struct Hourly {
    pub hour: u64,
    /// What may rightly move ASICs this hour: signals, faults, restarts, load steps, jumps.
    pub disturbances: u32,
    pub worst: (u32, usize),
}

impl Hourly {
    /// The most toggles an ASIC may make in an hour with `d` disturbances: two per
    /// disturbance (off, and back), and four more (a young estimate's shed and its restore,
    /// and one more cycle of either).
    pub fn bound(d: u32) -> u32 {
        2 * d + 4
    }
}

/// The per-ASIC relay records.
pub fn relays(n: usize) -> Vec<Relay> {
    vec![Relay::default(); n]
}

/// Counts of what happened, for the summary.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub signals: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub faults: u64,
    pub restarts: u64,
    pub outages: u64,
    pub jumps: u64,
    pub toggles: u64,
    pub checks: u64,
    pub over_limit_checks: u64,
    pub shortfall_checks: u64,
    pub rotations: u32,
    pub worst_excess_kw: f64,
}

/// Per-id acknowledgement statuses seen, for the terminal-ack invariant.
pub type AckLog = BTreeMap<String, Vec<&'static str>>;
