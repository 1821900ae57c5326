//! The control core: a synchronous state machine. Inputs (a signal, a reading, the broker
//! back) and the present time go in; effects (orders for the field tasks, acknowledgements,
//! status, journal records, reports) come out. No tokio, no clock, no channel: the shell
//! (`crate::shell`) owns the timers and the sockets, and a deterministic simulation can drive
//! the very same core on virtual time (`hil::simulate`).
//!
//! ```text
//!            input(now, Signal | Reading | BrokerConnected)      tick(now) when next_wake() is due
//!                 │                                                 │
//!   ┌─────────────▼─────────────────────────────────────────────────▼──────────────┐
//!   │ signals ─▶ timeline ─┐                                                        │
//!   │ readings ─▶ fleet, health, estimator ─┼─▶ planner ─▶ fleet.orders ─▶ Orders   │
//!   │                                      └─▶ events (acks, M&V) ─▶ Ack, Report    │
//!   │ everything that changes the timeline ─▶ Record (journal)    status ─▶ Status  │
//!   └───────────────────────────────────────────────────────────────────────────────┘
//!                 │ take_effects()
//! ```
//!
//! When it plans: at once on a signal that changes the timeline; within 100 ms of a relay
//! moving unbidden or a device faulting or recovering; once a poll interval on new meter
//! readings; and whenever a directive starts or ends, a restore batch or a minimum time is due,
//! a write may be retried, or a written relay is due to be verified.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use site_config::{AsicId, DeviceId, MeterId, PduId, Site, StalePolicy};
use tracing::{debug, info, warn};

use crate::decide::estimate::Estimator;
use crate::decide::fleet::Fleet;
use crate::decide::health::{Change, Health};
use crate::decide::intake::{self, Admitted};
use crate::decide::mv::{self, Measurement, Sample};
use crate::decide::openadr::{self, ReportRequest};
use crate::decide::planner::{Plan, Planner, Snapshot};
use crate::decide::signal::{Action, Directive, Signal};
use crate::decide::state::{End, Record, State};
use crate::decide::time::{Mono, Now};
use crate::decide::timeline::Applied;
use crate::msg::{DeviceError, Fault, Hold, Orders, Outcome, Reading, Status};
use crate::series::round1;

/// What comes in.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A message on a subscribed topic, as it arrived.
    Signal { topic: String, payload: Vec<u8> },
    /// The broker link is (re)established: the broker may have published our last will and
    /// lost acknowledgements meanwhile.
    BrokerConnected,
    /// What a field task read, wrote, or failed to.
    Reading(Reading),
}

/// What goes out, in the order it was decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// The newest order for every PDU.
    Orders(Orders),
    /// An acknowledgement, for the ack topic once the journal holds what came before it.
    Ack(Ack),
    /// An OpenADR 3.1 report, for the report topic once the journal holds what came before it.
    Report(ReportRequest),
    /// The status, for the status page after every plan; with the directives in force. When
    /// `publish`, also for the retained status topic, at once.
    Status {
        status: Status,
        directives: Vec<Directive>,
        publish: bool,
    },
    /// A journal record.
    Record(Record),
    /// A reading of the whole site, for the status page's chart.
    Sample(Sample),
    /// What became of a signal, for the metrics.
    Signal(Outcome),
    /// An event ended, for the metrics.
    Completed(End),
}

/// The acknowledgement of a signal, published on the ack topic.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ack {
    pub id: Option<String>,
    pub status: AckStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: String,
    /// Measured at completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site_kw: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asic_kw: Option<f64>,
    /// At completion: the event's baseline, reduction and compliance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measurement: Option<Measurement>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    /// A new event taken, or a release.
    Accepted,
    /// New content for an event already held.
    Updated,
    /// The very signal already held, sent again: nothing changed, its end included.
    Unchanged,
    Rejected,
    Active,
    Completed,
}

/// The id under which the `curtail` stale-signal policy holds its directive.
pub const STALE_ID: &str = "stale-signal";

/// A change of the wall clock's lead over the monotonic one larger than this is a jump.
const CLOCK_JUMP: SignedDuration = SignedDuration::from_secs(1);

/// How far the wall clock is ahead of the monotonic one.
fn wall_lead(now: Now) -> SignedDuration {
    now.wall.duration_since(Timestamp::UNIX_EPOCH) - SignedDuration::from_nanos(now.mono.as_nanos())
}

/// How soon a plan follows a change of device state (signals plan at once).
const STATE_REPLAN: Duration = Duration::from_millis(100);

/// How long the core keeps site readings: the longest baseline window, and a margin.
const SAMPLES_KEPT: Duration = Duration::from_secs(61 * 60);

/// A GPU meter that reads the very same non-zero value this many times in a row is frozen:
/// a rack under load never does (its meter's last digits move).
const FROZEN_READS: u32 = 30;

/// The site meter reading the very same value while the ASICs and GPU racks it sums moved by
/// more than this (kW), this many times in a row, is frozen. (A meter that freezes while
/// nothing the controller sees moves cannot be told from a steady site; it is caught at the
/// next switch or swing.)
const FROZEN_SITE_KW: f64 = 1.0;
const FROZEN_SITE_READS: u32 = 3;
/// ... counted from the reading two polls after its value stopped changing (the site meter is
/// read four times a poll): by then every outlet has been read since, so readings that were
/// only late to catch up with a switch the meter already showed do not count as movement.
const FROZEN_SITE_BASE: u32 = 8;

/// What is known of one meter.
#[derive(Debug, Clone, Copy, Default)]
struct MeterTrack {
    kw: Option<f64>,
    /// Identical readings in a row.
    repeats: u32,
    /// For the site meter: the ASICs' power when its reading last changed.
    asic_kw_then: Option<f64>,
    /// Found frozen: it stays so until its reading changes (standing still proves nothing).
    frozen: bool,
}

/// An event being measured: from its start (or its arrival, if later) until it completes.
#[derive(Debug, Clone)]
struct Tracked {
    directives: Vec<Directive>,
    /// When the signal was taken (unknown for events resumed from the journal).
    arrived: Option<Timestamp>,
    /// Reports go upstream in OpenADR's shape.
    openadr: bool,
    /// Begun at the first reading after the start.
    meter: Option<mv::Meter>,
}

impl Tracked {
    fn new(directives: &[Directive], arrived: Option<Timestamp>) -> Tracked {
        Tracked {
            directives: directives.to_vec(),
            arrived,
            openadr: directives
                .iter()
                .any(|d| d.format == site_config::SignalFormat::Openadr3),
            meter: None,
        }
    }

    /// Measured from its earliest directive's start, or from its arrival if that is later:
    /// nothing could be done before the signal came.
    fn measure_from(&self) -> Option<Timestamp> {
        let start = self.directives.iter().map(|d| d.start).min()?;
        Some(self.arrived.map_or(start, |a| a.max(start)))
    }

    /// Its last directive's end, if every directive has one.
    fn scheduled_end(&self) -> Option<Timestamp> {
        self.directives
            .iter()
            .map(|d| d.end)
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }
}

/// The newest plan that switched outlets, until they are all seen to follow.
#[derive(Debug, Clone)]
struct Pending {
    generation: u64,
    at: Mono,
    deadline: Mono,
    asics: Vec<AsicId>,
    /// It (or a plan still pending before it) switched ASICs off.
    offs: bool,
}

/// The control core. See the module documentation.
pub struct Core {
    site: Arc<Site>,
    planner: Planner,
    /// The directives in force and what has ended; changed only through [`Core::commit`],
    /// so that the journal replays to the same state.
    state: State,
    fleet: Fleet,
    /// One per device: PDUs, then meters (as [`Site::devices`]).
    health: Vec<Health>,
    meters: Vec<MeterTrack>,
    estimator: Estimator,
    /// Relays may take this long to follow an acknowledged write.
    grace: Duration,

    started: Mono,
    replan_at: Option<Mono>,
    last_plan_at: Option<Mono>,
    plan_wake: Option<Mono>,
    /// Orders must be looked at again (a plan, a device's health changed).
    orders_dirty: bool,
    /// When the orders were last looked at: write retries due by then are taken care of.
    orders_at: Mono,
    meters_due: Option<Mono>,
    last_plan: Option<Plan>,
    /// When a plan last switched ASICs: restore batches are spaced from it.
    last_switch: Option<Mono>,
    generation: u64,
    pending: Option<Pending>,
    /// Until then, site readings are not sampled for the rest of the site: the outlets of the
    /// last switch have been read in their new state, but the site meter may not show it yet.
    settling_until: Option<Mono>,

    /// Events announced as active.
    announced: BTreeSet<String>,
    /// When the last signal was accepted (or the core started).
    last_signal: Mono,
    /// The stale-signal policy has acted since the last signal.
    stale_acted: bool,
    /// Site readings of the last hour: the baselines of events about to start.
    samples: VecDeque<Sample>,
    tracked: BTreeMap<String, Tracked>,
    mv: mv::Settings,
    last_status: Option<Status>,
    last_status_at: Option<Mono>,
    /// Something that status shows may have changed since it was last looked at.
    status_dirty: bool,
    /// Every device was heard (once true, for good).
    all_heard: bool,
    /// Per PDU: readable when last looked at (what the estimate subtracts for its ASICs
    /// changes basis when this flips).
    pdu_readable: Vec<bool>,
    /// When PDUs whose writes failed may be tried again, ascending (kept as health changes).
    retries: Vec<Mono>,
    /// When the first event held ends (kept as the timeline changes).
    first_end: Option<Timestamp>,
    /// The wall clock's lead over the monotonic one, as last seen: a change is a clock jump.
    wall_lead: SignedDuration,
    effects: Vec<Effect>,
}

impl Core {
    /// A core resuming `state` (the journal's; empty without one) at `now`, with the site
    /// readings the journal kept (`samples`, for baselines).
    pub fn new(site: Arc<Site>, mut state: State, samples: Vec<Sample>, now: Now) -> Core {
        let tracked = state
            .timeline
            .events()
            .filter(|(_, d)| !d.is_empty())
            .map(|(id, d)| (id.to_owned(), Tracked::new(d, None)))
            .collect();
        // Only the journal keeps outlet switches up to date; the core needs them once, to know
        // since when an ASIC found off has been off.
        let switched = std::mem::take(&mut state.switched);
        let resumed = site
            .asics
            .iter()
            .map(|a| {
                let s = switched.get(&site.pdu(a.pdu).name)?.get(&a.outlet)?;
                // A switch "in the future" (the clock went back) counts from now.
                Some((s.on, now.mono_of(s.at).min(now.mono)))
            })
            .collect();
        let grace = (site.policy.poll_interval * 3).max(Duration::from_secs(2));
        let devices = site.pdus.len() + site.meters.len();
        Core {
            planner: Planner::new(&site),
            fleet: Fleet::new(&site, grace, resumed),
            health: vec![Health::default(); devices],
            meters: vec![MeterTrack::default(); site.meters.len()],
            estimator: Estimator::new(site.policy.gpu_peak_window, site.policy.poll_interval),
            grace,
            started: now.mono,
            replan_at: Some(now.mono),
            last_plan_at: None,
            plan_wake: None,
            orders_dirty: false,
            orders_at: now.mono,
            meters_due: site.journal.as_ref().map(|j| now.mono + j.meter_interval),
            last_plan: None,
            last_switch: None,
            generation: 0,
            pending: None,
            settling_until: None,
            announced: BTreeSet::new(),
            last_signal: now.mono,
            stale_acted: false,
            samples: samples.into(),
            tracked,
            mv: mv::Settings::for_site(&site),
            last_status: None,
            last_status_at: None,
            status_dirty: true,
            all_heard: false,
            pdu_readable: vec![false; site.pdus.len()],
            retries: Vec::new(),
            first_end: None,
            wall_lead: wall_lead(now),
            effects: Vec::new(),
            state,
            site,
        }
        .with_caches()
    }

    fn with_caches(mut self) -> Core {
        self.first_end = self.state.timeline.first_end();
        self
    }

    /// Everything decided since the last call, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The directives in force and what has ended.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The newest plan.
    pub fn last_plan(&self) -> Option<&Plan> {
        self.last_plan.as_ref()
    }

    /// The health of `device`.
    pub fn health(&self, device: DeviceId) -> &Health {
        &self.health[self.index(device)]
    }

    /// When [`Core::tick`] next has something to do after `now` (it may be called earlier,
    /// harmlessly). After `tick(now)` everything due by `now` is done, so this is later.
    pub fn next_wake(&self, now: Mono) -> Mono {
        let status = self
            .last_status_at
            .map_or(now, |t| t + self.site.mqtt.status_interval);
        let startup = (!self.ready_by_answers()).then(|| self.started + self.startup_grace());
        let planning = if self.ready(now) {
            [self.replan_at, self.plan_wake]
        } else {
            [None, None]
        };
        [
            Some(status),
            startup,
            self.meters_due,
            self.stale_due(),
            self.pending.as_ref().map(|p| p.deadline),
            self.retry_due(self.orders_at.max(now)),
        ]
        .into_iter()
        .chain(planning)
        .flatten()
        .filter(|t| *t > now)
        .min()
        .unwrap_or(now + self.site.mqtt.status_interval)
    }

    /// Takes in one input at `now`.
    pub fn input(&mut self, now: Now, input: Input) {
        self.watch_clock(now);
        match input {
            Input::Signal { topic, payload } => self.on_signal(now, &topic, &payload),
            Input::BrokerConnected => {
                // The broker may have published our last will, and acks sent while it was
                // away are lost: say again what is in force.
                self.last_status = None;
                self.status_dirty = true;
                for id in self.announced.clone() {
                    self.ack(now, Some(id), AckStatus::Active, None);
                }
                self.replan_soon(now.mono);
            }
            Input::Reading(r) => self.on_reading(now, r),
        }
    }

    /// Does what is due at `now`: ends expired events, applies the stale-signal policy,
    /// plans, orders, announces, and publishes status.
    pub fn tick(&mut self, now: Now) {
        self.watch_clock(now);
        self.apply_stale_policy(now);
        if self.first_end.is_some_and(|t| t <= now.wall) {
            for id in self.state.timeline.ended_by(now.wall) {
                self.complete(now, &id, End::Expired);
            }
        }
        if self.meters_due.is_some_and(|t| now.mono >= t) {
            self.record_meters(now);
            self.meters_due = self
                .site
                .journal
                .as_ref()
                .map(|j| now.mono + j.meter_interval);
        }
        let mut planned = false;
        if self.ready(now.mono) {
            let due = |t: Option<Mono>| t.is_some_and(|t| now.mono >= t);
            if due(self.replan_at) || due(self.plan_wake) || self.last_plan.is_none() {
                self.cycle(now);
                planned = true;
            }
            if self.orders_dirty || due(self.retry_due(self.orders_at)) {
                self.issue_orders(now.mono);
            }
            if self.pending.is_some() {
                self.check_confirmed(now);
            }
            if planned {
                for id in self.state.timeline.in_force(now.wall).events {
                    if self.announced.insert(id.clone()) {
                        self.ack(now, Some(id), AckStatus::Active, None);
                    }
                }
            }
        }
        self.publish_status(now, planned);
    }

    /// A wall clock that jumped (NTP) moves when directives start and end: the wake-up planned
    /// for the next start or end was reckoned on the old clock, so plan again now.
    fn watch_clock(&mut self, now: Now) {
        let lead = wall_lead(now);
        let jump = lead - self.wall_lead;
        if jump.abs() > CLOCK_JUMP {
            warn!(jump = ?jump, "the wall clock jumped; directives are read on the new clock");
            self.wall_lead = lead;
            self.replan_at = Some(now.mono);
            self.status_dirty = true;
            self.first_end = self.state.timeline.first_end();
        }
    }

    // -----------------------------------------------------------------------------------------
    // Signals

    fn on_signal(&mut self, now: Now, topic_name: &str, payload: &[u8]) {
        let site = self.site.clone();
        let Some(topic) = site.mqtt.signals.iter().find(|s| s.topic == topic_name) else {
            debug!(topic = ?topic_name, "message on a topic the site file does not name; ignored");
            self.effects.push(Effect::Signal(Outcome::Ignored));
            return;
        };
        let admitted = intake::admit(
            &site,
            &self.state.timeline,
            &self.state.replay,
            topic.format,
            payload,
            now.wall,
        );
        let Admitted {
            signal: sig,
            sent_at,
            kind,
        } = match admitted {
            Ok(a) => a,
            Err(rejection) => {
                warn!(id = ?rejection.id, reason = ?rejection.reason, topic = ?topic_name, "signal rejected");
                self.effects.push(Effect::Signal(Outcome::Rejected));
                self.ack(
                    now,
                    rejection.id,
                    AckStatus::Rejected,
                    Some(rejection.reason),
                );
                return;
            }
        };
        let id = sig.id().map(str::to_owned);
        self.last_signal = now.mono;
        // Any signal taken ends the stale-signal curtailment, a heartbeat re-send included.
        if std::mem::take(&mut self.stale_acted) && self.state.timeline.contains(STALE_ID) {
            info!("a signal arrived: the stale-signal curtailment ends");
            self.complete(now, STALE_ID, End::Stale);
        }
        if kind == intake::Kind::Unchanged {
            info!(id = ?id, format = ?topic.format, "signal unchanged: the same as the one held");
            self.effects.push(Effect::Signal(Outcome::Accepted));
            self.ack(now, id, AckStatus::Unchanged, None);
            return;
        }
        let applied = self.commit(Record::Accepted {
            at: now.wall,
            topic: Some(topic_name.to_owned()),
            sent_at,
            signal: sig.clone(),
        });
        info!(id = ?id, ?applied, format = ?topic.format, "signal accepted");
        self.effects.push(Effect::Signal(Outcome::Accepted));
        let status = match kind {
            intake::Kind::Update => AckStatus::Updated,
            _ => AckStatus::Accepted,
        };
        self.ack(now, id, status, None);
        if let Signal::Event { id, directives } = &sig {
            self.track(now, id, directives);
        }
        if let (Signal::Release { .. }, Applied::Released(ids)) = (&sig, &applied) {
            for id in ids {
                self.complete(now, id, End::Released);
            }
        }
        if applied != Applied::Unchanged {
            self.replan_at = Some(now.mono);
        }
    }

    /// Applies a record to the state and journals it.
    fn commit(&mut self, record: Record) -> Applied {
        let applied = self.state.apply(&record);
        self.status_dirty = true;
        self.first_end = self.state.timeline.first_end();
        self.effects.push(Effect::Record(record));
        applied
    }

    fn record(&mut self, record: Record) {
        self.effects.push(Effect::Record(record));
    }

    fn ack(&mut self, now: Now, id: Option<String>, status: AckStatus, reason: Option<String>) {
        self.effects.push(Effect::Ack(Ack {
            id,
            status,
            reason,
            at: now.wall.to_string(),
            site_kw: None,
            asic_kw: None,
            measurement: None,
        }));
    }

    /// Ends event `id`: it leaves the timeline (if a release has not already taken it out),
    /// and its end is journaled and acknowledged with the site as measured now.
    fn complete(&mut self, now: Now, id: &str, end: End) {
        let (site_kw, asic_kw) = (self.site_kw(), self.asic_kw(now.mono));
        self.commit(Record::Completed {
            at: now.wall,
            id: id.to_owned(),
            end,
            site_kw,
            asic_kw,
        });
        self.effects.push(Effect::Completed(end));
        self.announced.remove(id);
        // Ids past the replay window go as others end (and at a restart): memory is bounded by
        // time, not by evicting what may still be replayed.
        let policy = &self.site.policy;
        self.state.replay.forget_old(now.wall, policy.replay_window);
        let measurement = self.measure(now, id);
        info!(id, ?site_kw, "event completed");
        self.effects.push(Effect::Ack(Ack {
            id: Some(id.to_owned()),
            status: AckStatus::Completed,
            reason: None,
            at: now.wall.to_string(),
            site_kw: site_kw.map(round1),
            asic_kw: asic_kw.map(round1),
            measurement,
        }));
        self.replan_soon(now.mono);
    }

    /// Starts measuring event `id` (or follows its new directives), and offers upstream what
    /// the site could shed for it.
    fn track(&mut self, now: Now, id: &str, directives: &[Directive]) {
        if let Some(t) = self.tracked.get_mut(id) {
            t.directives = directives.to_vec();
            if let Some(m) = &mut t.meter {
                m.set_directives(directives);
            }
            return;
        }
        if directives.is_empty() {
            return;
        }
        let t = Tracked::new(directives, Some(now.wall));
        if t.openadr {
            let available = self.status(now).load_shed_delta_available_kw;
            let report = openadr::availability(
                id,
                &self.site.id,
                self.report_resource(),
                directives,
                available,
            );
            self.effects.push(Effect::Report(report));
        }
        self.tracked.insert(id.to_owned(), t);
    }

    /// Ends the measurement of event `id`: journals it, reports it upstream (OpenADR events),
    /// and returns it for the ack. `None` if the event never began.
    fn measure(&mut self, now: Now, id: &str) -> Option<Measurement> {
        let t = self.tracked.remove(id)?;
        let meter = t.meter.as_ref()?;
        let end = t.scheduled_end().map_or(now.wall, |e| e.min(now.wall));
        let (m, intervals) = meter.finish(end);
        info!(
            id,
            baseline_kw = ?m.baseline_kw,
            reduction_kw = ?m.reduction_kw,
            performance_pct = ?m.performance_pct,
            compliant = m.compliant,
            "event measured"
        );
        self.record(Record::Measured {
            at: now.wall,
            measurement: m.clone(),
            intervals,
        });
        if t.openadr {
            let report = openadr::usage(
                id,
                &self.site.id,
                self.report_resource(),
                &meter.event_intervals(end),
            );
            self.effects.push(Effect::Report(report));
        }
        Some(m)
    }

    /// OpenADR reports speak for the site meter.
    fn report_resource(&self) -> &str {
        &self.site.meter(self.site.site_meter).name
    }

    /// The site file's stale-signal policy: after `after` without an accepted signal, `curtail`
    /// sheds every ASIC (until the next signal) and `release` ends every directive.
    fn apply_stale_policy(&mut self, now: Now) {
        let (after, curtail) = match self.site.policy.stale_signal {
            StalePolicy::Hold => return,
            StalePolicy::Curtail { after } => (after, true),
            StalePolicy::Release { after } => (after, false),
        };
        if self.stale_acted || !now.mono.elapsed(self.last_signal, after) {
            return;
        }
        self.stale_acted = true;
        if curtail {
            warn!(silent_for = ?after, "no signal: curtailing every ASIC as the stale-signal policy says");
            let signal = Signal::Event {
                id: STALE_ID.into(),
                directives: vec![Directive {
                    id: STALE_ID.into(),
                    interval: 0,
                    action: Action::ShedAll,
                    start: now.wall,
                    end: None,
                    priority: 0,
                    emergency: false,
                    format: site_config::SignalFormat::Native,
                }],
            };
            self.commit(Record::Accepted {
                at: now.wall,
                topic: None,
                sent_at: None,
                signal,
            });
            self.replan_at = Some(now.mono);
        } else {
            warn!(silent_for = ?after, "no signal: ending every directive as the stale-signal policy says");
            let ids: Vec<String> = self
                .state
                .timeline
                .events()
                .map(|(id, _)| id.to_owned())
                .collect();
            for id in ids {
                self.complete(now, &id, End::Stale);
            }
        }
    }

    /// When the stale-signal policy would act, if it is waiting to.
    fn stale_due(&self) -> Option<Mono> {
        let after = match self.site.policy.stale_signal {
            StalePolicy::Hold => return None,
            StalePolicy::Curtail { after } | StalePolicy::Release { after } => after,
        };
        (!self.stale_acted).then(|| self.last_signal + after)
    }

    // -----------------------------------------------------------------------------------------
    // Readings

    fn index(&self, device: DeviceId) -> usize {
        match device {
            DeviceId::Pdu(p) => p.0 as usize,
            DeviceId::Meter(m) => self.site.pdus.len() + m.0 as usize,
        }
    }

    fn pdu_controllable(&self, pdu: PduId, now: Mono) -> bool {
        self.health[pdu.0 as usize].controllable(now)
    }

    fn meter_readable(&self, meter: MeterId) -> bool {
        self.health[self.site.pdus.len() + meter.0 as usize].readable()
    }

    /// Plans within [`STATE_REPLAN`]: device state changed.
    fn replan_soon(&mut self, now: Mono) {
        let at = now + STATE_REPLAN;
        self.replan_at = Some(self.replan_at.map_or(at, |r| r.min(at)));
    }

    /// Plans within a poll interval of the last plan: new meter readings move the budget a
    /// little all the time.
    fn replan_by_poll(&mut self, now: Mono) {
        let at = self
            .last_plan_at
            .map_or(now, |t| t + self.site.policy.poll_interval);
        self.replan_at = Some(self.replan_at.map_or(at, |r| r.min(at)));
    }

    /// A device's shown fault changed: journal it, plan soon, look at the orders again.
    fn health_changed(&mut self, now: Now, device: DeviceId, change: Change) {
        if !self.all_heard {
            self.all_heard = self.health.iter().all(Health::heard);
        }
        if let DeviceId::Pdu(p) = device {
            let readable = self.health[p.0 as usize].readable();
            if let Some(was) = self.pdu_readable.get_mut(p.0 as usize)
                && *was != readable
            {
                *was = readable;
                self.estimator.rebase(now.mono);
                // What is subtracted for the ASICs just jumped from an assumption to a reading
                // (or back) while nothing moved: the site meter's steady reading across that
                // jump says nothing about it being frozen, so its comparison starts again.
                if let Some(track) = self.meters.get_mut(self.site.site_meter.0 as usize) {
                    track.repeats = 0;
                    track.asic_kw_then = None;
                }
            }
        }
        if change == Change::None {
            return;
        }
        self.status_dirty = true;
        let name = self.site.device_name(device).to_owned();
        match change {
            Change::None => return,
            Change::Faulted(error) => {
                warn!(device = %name, error = ?error.to_string(), "device faulted");
                self.record(Record::Fault {
                    at: now.wall,
                    device: name,
                    reason: error.to_string(),
                });
            }
            Change::Recovered => {
                info!(device = %name, "device answers again");
                self.record(Record::Recovered {
                    at: now.wall,
                    device: name,
                });
            }
        }
        self.orders_dirty = true;
        self.replan_soon(now.mono);
    }

    fn on_reading(&mut self, now: Now, reading: Reading) {
        match reading {
            Reading::Pdu {
                pdu,
                relays,
                power_w,
            } => self.on_pdu(now, pdu, &relays, &power_w),
            Reading::Meter { meter, kw } => self.on_meter(now, meter, kw),
            Reading::ReadFailed { device, error } => {
                let i = self.index(device);
                let change = self.health[i].read_failed(error);
                if let DeviceId::Pdu(pdu) = device {
                    self.fleet.release(pdu);
                }
                self.health_changed(now, device, change);
            }
            Reading::Written { pdu, order } => {
                if !self.fleet.written(pdu, order, now.mono) {
                    return;
                }
                let change = self.health[pdu.0 as usize].write_ok();
                self.health_changed(now, DeviceId::Pdu(pdu), change);
            }
            Reading::WriteFailed { pdu, order, error } => {
                if !self.fleet.is_current(pdu, order) {
                    return;
                }
                let change = self.health[pdu.0 as usize].write_failed(error, now.mono);
                self.refresh_retries();
                self.fleet.release(pdu);
                self.health_changed(now, DeviceId::Pdu(pdu), change);
                // Another plan covers for it, even if the fault shown did not change.
                self.replan_soon(now.mono);
            }
        }
    }

    fn on_pdu(&mut self, now: Now, pdu: PduId, relays: &[bool], power_w: &[f64]) {
        let i = pdu.0 as usize;
        let change = self.health[i].read_ok();
        self.health_changed(now, DeviceId::Pdu(pdu), change);
        let out = self.fleet.read(&self.site, pdu, relays, power_w, now.mono);
        if out.moved || out.first_sight {
            self.replan_soon(now.mono);
        }
        if out.reassert {
            self.orders_dirty = true;
        }
        let error = if !out.stuck.is_empty() {
            Some(DeviceError::Disagrees { outlets: out.stuck })
        } else if !out.drawing_while_off.is_empty() {
            Some(DeviceError::ReadsOffButDraws {
                outlets: out.drawing_while_off,
            })
        } else {
            None
        };
        if let Some(error) = error {
            let change = self.health[i].write_failed(error, now.mono);
            self.refresh_retries();
            self.fleet.release(pdu);
            self.health_changed(now, DeviceId::Pdu(pdu), change);
            self.replan_soon(now.mono);
        }
    }

    fn on_meter(&mut self, now: Now, meter: MeterId, kw: f64) {
        let site = self.site.clone();
        let device = DeviceId::Meter(meter);
        // The ASICs' power, once per site reading (what it is compared with and sampled by).
        let asic_kw = (meter == site.site_meter).then(|| self.asic_estimate_kw(now.mono));
        let i = self.index(device);
        let is_gpu = site.gpu_racks.iter().any(|g| g.meter == meter);
        let Some(track) = self.meters.get_mut(meter.0 as usize) else {
            return;
        };
        let repeated = track.kw.is_some_and(|k| k.to_bits() == kw.to_bits()) && kw != 0.0;
        track.repeats = if repeated { track.repeats + 1 } else { 0 };
        track.kw = Some(kw);
        let repeats = track.repeats;
        // A GPU rack under load never reads the very same value for long; the site meter
        // must move when the ASICs it sums do.
        let frozen = if is_gpu {
            repeats + 1 >= FROZEN_READS
        } else if meter == site.site_meter {
            // What the controller sees of what the site meter sums.
            let seen_kw = asic_kw.map(|a| a + self.gpu_allowance_kw());
            let track = &mut self.meters[meter.0 as usize];
            if repeats == 0 {
                track.asic_kw_then = None;
            } else if repeats == FROZEN_SITE_BASE {
                track.asic_kw_then = seen_kw;
            }
            let moved = match (seen_kw, track.asic_kw_then) {
                (Some(a), Some(b)) => (a - b).abs() > FROZEN_SITE_KW,
                _ => false,
            };
            track.frozen = repeats > 0
                && (track.frozen || (repeats >= FROZEN_SITE_BASE + FROZEN_SITE_READS && moved));
            track.frozen
        } else {
            false
        };
        let change = if frozen {
            self.health[i].read_failed(DeviceError::Frozen {
                kw: crate::msg::f64_bits::Kw(kw),
            })
        } else {
            self.health[i].read_ok()
        };
        self.health_changed(now, device, change);
        if let Some(asic_kw) = asic_kw {
            self.sample_rest(now.mono, asic_kw);
            let s = self.reading(now, self.asic_kw_shown(asic_kw));
            self.take_sample(s);
        }
        self.replan_by_poll(now.mono);
    }

    /// The GPU racks as the budget counts them: their readings, or their rating where the
    /// meter cannot be read.
    fn gpu_allowance_kw(&self) -> f64 {
        self.site
            .gpu_racks
            .iter()
            .map(|g| match self.meters[g.meter.0 as usize].kw {
                Some(kw) if self.meter_readable(g.meter) => kw,
                _ => g.rated_kw,
            })
            .sum()
    }

    /// One sample of the rest of the site (site meter − ASICs) from the site reading just
    /// taken. Outlet readings are older than it; what is subtracted for ASICs on their way on
    /// (their rating) makes that skew err low, which the peak over the window ignores.
    fn sample_rest(&mut self, now: Mono, asic_kw: f64) {
        // Not while ASICs go off: an outlet read off before the site meter shows its drop
        // makes the rest of the site look larger by its power, and the peak over the window
        // would keep that spike: a second shed of ASICs that need not go, and restores held for
        // minutes (shed-bench on large.toml: a second shed of 368 ASICs 150 ms after the
        // first). While ASICs come on the skew errs low (see `Fleet::estimate_w`), which a
        // peak ignores, so sampling goes on and the window keeps seeing the crests.
        if self.pending.as_ref().is_some_and(|p| p.offs)
            || self.settling_until.is_some_and(|t| now < t)
        {
            return;
        }
        let Some(site_kw) = self.site_kw() else {
            return;
        };
        // Until every GPU meter has answered or failed once, a rack not yet read would count
        // twice (inside the reading, and at its rating on top): wait for them.
        let gpu_heard = self
            .site
            .gpu_racks
            .iter()
            .all(|g| self.health[self.index(DeviceId::Meter(g.meter))].heard());
        if !gpu_heard {
            return;
        }
        // Each GPU rack at its rating instead of its reading; a rack whose meter has not
        // answered is inside the site reading as it is, and its whole rating goes on top.
        let headroom_kw: f64 = self
            .site
            .gpu_racks
            .iter()
            .map(|g| match self.meters[g.meter.0 as usize].kw {
                Some(kw) if self.meter_readable(g.meter) => (g.rated_kw - kw).max(0.0),
                _ => g.rated_kw,
            })
            .sum();
        let rest = site_kw - asic_kw;
        self.estimator.rest(now, rest, rest + headroom_kw);
    }

    /// A reading of the whole site: kept for baselines, shown on the chart, and fed to the
    /// measurement of every event in progress.
    fn take_sample(&mut self, s: Sample) {
        let at = s.at;
        let kept = SignedDuration::try_from(SAMPLES_KEPT).unwrap_or(SignedDuration::MAX);
        while self
            .samples
            .front()
            .is_some_and(|old| at.duration_since(old.at) > kept)
        {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
        self.effects.push(Effect::Sample(s));
        for (id, t) in &mut self.tracked {
            match &mut t.meter {
                Some(m) => m.add(&s),
                None => {
                    // No earlier than the first reading held: an event resumed from the journal
                    // has no arrival time, and maestro's curtailment starts at the epoch (so
                    // that its re-sends are identical).
                    let kept_from = self.samples.front().map_or(at, |s| s.at);
                    let Some(start) = t
                        .measure_from()
                        .map(|start| start.max(kept_from))
                        .filter(|start| at >= *start)
                    else {
                        continue;
                    };
                    let mut m = mv::Meter::begin(id, &t.directives, start, &self.samples, self.mv);
                    // Readings since the start (this one, or the journal's after a restart).
                    for s in self.samples.iter().filter(|s| s.at >= start) {
                        m.add(s);
                    }
                    t.meter = Some(m);
                }
            }
        }
    }

    /// The whole site as last read.
    fn reading(&self, now: Now, asic_kw: Option<f64>) -> Sample {
        Sample {
            at: now.wall,
            site_kw: self.site_kw(),
            asic_kw,
            gpu_kw: self.gpu_kw(),
            limit_kw: self
                .last_plan
                .as_ref()
                .map_or(self.site.import_limit_kw, |p| p.limit_kw),
        }
    }

    fn site_kw(&self) -> Option<f64> {
        let m = self.site.site_meter;
        if !self.meter_readable(m) {
            return None;
        }
        self.meters[m.0 as usize].kw
    }

    /// The ASICs' power: measured where their PDU answers, assumed where it does not.
    fn asic_estimate_kw(&self, now: Mono) -> f64 {
        self.site
            .pdus
            .iter()
            .map(|p| {
                self.fleet
                    .pdu_estimate_w(p.id, self.health[p.id.0 as usize].readable(), now)
            })
            .sum::<f64>()
            / 1000.0
    }

    /// `estimate_kw` as shown: none while no PDU answers (it would be all assumption).
    fn asic_kw_shown(&self, estimate_kw: f64) -> Option<f64> {
        let any_read = self
            .site
            .pdus
            .iter()
            .any(|p| self.health[p.id.0 as usize].readable());
        (any_read || self.site.asics.is_empty()).then_some(estimate_kw)
    }

    /// The ASICs' power as shown (see [`Core::asic_kw_shown`]).
    fn asic_kw(&self, now: Mono) -> Option<f64> {
        self.asic_kw_shown(self.asic_estimate_kw(now))
    }

    /// The GPU racks' power: read, or their rating where the meter cannot be read.
    fn gpu_kw(&self) -> Option<f64> {
        if self.site.gpu_racks.is_empty() {
            return Some(0.0);
        }
        let any_read = self
            .site
            .gpu_racks
            .iter()
            .any(|g| self.meter_readable(g.meter));
        any_read.then(|| self.gpu_allowance_kw())
    }

    // -----------------------------------------------------------------------------------------
    // Planning and orders

    /// Every device answered or failed once, and the site meter, if it answers, has given a
    /// sample of the rest of the site: the outlets' state and the site's load are known.
    fn ready_by_answers(&self) -> bool {
        self.all_heard
            && (self.estimator.knows_rest() || !self.meter_readable(self.site.site_meter))
    }

    fn startup_grace(&self) -> Duration {
        let timeout = self
            .site
            .devices()
            .map(|d| self.site.device_endpoint(d).timeout)
            .max()
            .unwrap_or_default();
        timeout * 3 + self.site.policy.poll_interval
    }

    /// Nothing is planned until the outlets' state is known, or the start-up grace is over.
    fn ready(&self, now: Mono) -> bool {
        self.ready_by_answers() || now.elapsed(self.started, self.startup_grace())
    }

    /// Keeps [`Core::retries`] as the PDUs' write faults change.
    fn refresh_retries(&mut self) {
        self.retries = self
            .health
            .iter()
            .take(self.site.pdus.len())
            .filter_map(Health::retry_time)
            .collect();
        self.retries.sort();
    }

    /// The first time after `after` at which a PDU whose writes failed may be tried again.
    fn retry_due(&self, after: Mono) -> Option<Mono> {
        self.retries.iter().copied().find(|t| *t > after)
    }

    fn snapshot(&self, now: Mono, wall: Timestamp) -> Snapshot {
        let asics = self
            .site
            .asics
            .iter()
            .map(|a| self.fleet.state(a.id, self.pdu_controllable(a.pdu, now)))
            .collect();
        // Before any site reading (a site meter silent since start-up; the core waits for it to
        // answer or fail before it plans): nothing is known of the site's load. Under a
        // utility's import limit the only sure way to honour it is every ASIC off, so the rest
        // of the site is taken to be the limit itself; otherwise (the subscription limit alone,
        // or a shed by kW, which needs no meter) the GPU racks at their rating.
        let force = self.state.timeline.in_force(wall);
        let fallback = match force.import_limit_kw {
            Some(limit) => limit.min(self.site.import_limit_kw),
            None => self.site.gpu_rated_kw(),
        };
        let mut load = self
            .estimator
            .load(now, fallback, force.import_limit_kw.is_some());
        if !self.meter_readable(self.site.site_meter) {
            load.restore_held = Some(Hold::SiteMeterSilent);
        }
        Snapshot {
            asics,
            load,
            last_switch: self.last_switch,
        }
    }

    /// One plan: what the site should look like now, and the commands that make it so.
    fn cycle(&mut self, now: Now) {
        self.replan_at = None;
        self.last_plan_at = Some(now.mono);
        let snap = self.snapshot(now.mono, now.wall);
        let plan = self
            .planner
            .plan(&self.site, &snap, &self.state.timeline, now);
        let changes: Vec<(AsicId, bool)> = plan.changes(&snap).collect();
        if !changes.is_empty() {
            self.generation += 1;
            for &(id, on) in &changes {
                self.fleet.command(id, on, now.mono);
            }
            self.last_switch = Some(now.mono);
            let events = self.state.timeline.in_force(now.wall).events;
            info!(
                generation = self.generation,
                off = plan.switched_off,
                on = plan.restored,
                budget_kw = format!("{:.1}", plan.budget_kw),
                rest_kw = format!("{:.1}", plan.rest_kw),
                limit_kw = plan.limit_kw,
                shortfall_kw = format!("{:.1}", plan.shortfall_kw),
                directives = ?events,
                "plan"
            );
            self.orders_dirty = true;
            self.issue_orders(now.mono);
            let switched = |to: bool| {
                outlets_by_pdu(
                    &self.site,
                    changes
                        .iter()
                        .filter(|(_, on)| *on == to)
                        .map(|(id, _)| *id),
                )
            };
            let (off, on) = (switched(false), switched(true));
            self.record(Record::Plan {
                at: now.wall,
                generation: self.generation,
                limit_kw: plan.limit_kw,
                budget_kw: round1(plan.budget_kw),
                shortfall_kw: round1(plan.shortfall_kw),
                directives: events,
                off,
                on,
            });
            let offs =
                changes.iter().any(|(_, on)| !on) || self.pending.as_ref().is_some_and(|p| p.offs);
            self.pending = Some(Pending {
                generation: self.generation,
                at: now.mono,
                deadline: now.mono + self.grace + self.max_timeout(),
                asics: changes.iter().map(|(id, _)| *id).collect(),
                offs,
            });
        }
        if plan.held.is_some() {
            debug!(held = ?plan.held, budget_kw = plan.budget_kw, on_kw = plan.planned_asic_kw, "restore held");
        }
        self.plan_wake = plan.next_wake;
        self.last_plan = Some(plan);
    }

    fn max_timeout(&self) -> Duration {
        self.site
            .pdus
            .iter()
            .map(|p| p.endpoint.timeout)
            .max()
            .unwrap_or_default()
    }

    fn issue_orders(&mut self, now: Mono) {
        self.orders_dirty = false;
        self.orders_at = now;
        let health = &self.health;
        let orders = self.fleet.orders(
            &self.site,
            now,
            |p| health[p.0 as usize].controllable(now),
            |p| health[p.0 as usize].readable() && health[p.0 as usize].on_trial(now),
        );
        if let Some(orders) = orders {
            self.effects.push(Effect::Orders(orders));
        }
    }

    /// Journals whether the newest plan's outlets followed it: once all of them are read back
    /// in their commanded state, or, at its deadline, which did not (of those on PDUs that
    /// could still be switched; a PDU that faulted meanwhile is in the journal as such).
    fn check_confirmed(&mut self, now: Now) {
        let Some(p) = &self.pending else {
            return;
        };
        let lagging: Vec<AsicId> = p
            .asics
            .iter()
            .copied()
            .filter(|id| {
                let pdu = self.site.asic(*id).pdu;
                self.pdu_controllable(pdu, now.mono) && self.fleet.state(*id, true).unconfirmed
            })
            .collect();
        if lagging.is_empty() {
            self.record(Record::Confirmed {
                at: now.wall,
                generation: p.generation,
                after_ms: now.mono.since(p.at).as_millis() as u64,
            });
        } else if now.mono >= p.deadline {
            let outlets = outlets_by_pdu(&self.site, lagging.into_iter());
            warn!(
                generation = p.generation,
                ?outlets,
                "outlets did not follow the plan"
            );
            self.record(Record::Unconfirmed {
                at: now.wall,
                generation: p.generation,
                outlets,
            });
        } else {
            return;
        }
        if self.pending.take().is_some_and(|p| p.offs) {
            self.settling_until = Some(now.mono + self.site.policy.poll_interval);
        }
    }

    /// Journals the meters (and what is in force) at the journal's pace.
    fn record_meters(&mut self, now: Now) {
        let status = self.status(now);
        self.record(Record::Meters {
            at: now.wall,
            site_kw: status.site_kw,
            asic_kw: status.asic_kw,
            gpu_kw: status.gpu_kw,
            limit_kw: status.limit_kw,
            shed_kw: status.shed_kw,
        });
    }

    // -----------------------------------------------------------------------------------------
    // Status

    /// The status as of `now`.
    pub fn status(&self, now: Now) -> Status {
        let plan = self.last_plan.as_ref();
        let (mut shed_kw, mut sheddable_kw, mut available_kw) = (0.0, 0.0, 0.0);
        let (mut on, mut off) = (0, 0);
        for a in &self.site.asics {
            let controllable = self.pdu_controllable(a.pdu, now.mono);
            let s = self.fleet.state(a.id, controllable);
            let rated = a.rated_w / 1000.0;
            if s.on {
                on += 1;
                if controllable {
                    sheddable_kw += rated;
                    available_kw += self.fleet.power_w(a.id).unwrap_or(a.rated_w) / 1000.0;
                }
            } else {
                off += 1;
                shed_kw += rated;
            }
        }
        let mut faulted = Vec::new();
        let mut estimated = Vec::new();
        for d in self.site.devices() {
            let h = &self.health[self.index(d)];
            if let Some(reason) = h.fault_text() {
                faulted.push(Fault {
                    device: self.site.device_name(d).to_owned(),
                    reason: reason.to_owned(),
                });
            }
            if !h.readable() {
                estimated.push(self.site.device_name(d).to_owned());
            }
        }
        Status {
            site: self.site.id.clone(),
            online: true,
            at: now.wall.to_string(),
            site_kw: self.site_kw().map(round1),
            asic_kw: self.asic_kw(now.mono).map(round1),
            gpu_kw: self.gpu_kw().map(round1),
            limit_kw: plan.map_or(self.site.import_limit_kw, |p| p.limit_kw),
            shed_kw: round1(shed_kw),
            sheddable_kw: round1(sheddable_kw),
            load_shed_delta_available_kw: round1(available_kw),
            shortfall_kw: round1(plan.map_or(0.0, |p| p.shortfall_kw)),
            restore_held: plan.and_then(|p| p.held).filter(|_| off > 0),
            asics_on: on,
            asics_off: off,
            directives: self.state.timeline.in_force(now.wall).events,
            faulted,
            estimated,
        }
    }

    /// Publishes status when something that matters changed, or every status interval; shows
    /// it to the status page after every plan; none before the first plan (until then the
    /// controller does not know the outlets).
    fn publish_status(&mut self, now: Now, planned: bool) {
        if self.last_plan.is_none() {
            return;
        }
        let due = self
            .last_status_at
            .is_none_or(|t| now.mono.elapsed(t, self.site.mqtt.status_interval));
        if !(due || planned || self.status_dirty) {
            return;
        }
        self.status_dirty = false;
        let status = self.status(now);
        let changed = self
            .last_status
            .as_ref()
            .is_none_or(|last| !same_material(last, &status));
        let publish = changed || due;
        if !(publish || planned) {
            return;
        }
        let directives = self
            .state
            .timeline
            .directives()
            .filter(|d| d.is_in_force(now.wall))
            .cloned()
            .collect();
        self.effects.push(Effect::Status {
            status: status.clone(),
            directives,
            publish,
        });
        if publish {
            self.last_status = Some(status);
            self.last_status_at = Some(now.mono);
        }
    }
}

/// Whether two statuses say the same of what an operator acts on (limit, shed, ASICs on,
/// directives, faults, shortfall); readings that merely wobble do not count.
fn same_material(a: &Status, b: &Status) -> bool {
    a.limit_kw.to_bits() == b.limit_kw.to_bits()
        && a.shed_kw.to_bits() == b.shed_kw.to_bits()
        && a.asics_on == b.asics_on
        && a.shortfall_kw.to_bits() == b.shortfall_kw.to_bits()
        && a.directives == b.directives
        && a.faulted == b.faulted
}

/// ASICs as the journal names them: outlet numbers by PDU name.
fn outlets_by_pdu(site: &Site, asics: impl Iterator<Item = AsicId>) -> BTreeMap<String, Vec<u16>> {
    let mut out: BTreeMap<String, Vec<u16>> = BTreeMap::new();
    for id in asics {
        let a = site.asic(id);
        out.entry(site.pdu(a.pdu).name.clone())
            .or_default()
            .push(a.outlet);
    }
    out
}

#[cfg(test)]
mod tests;
