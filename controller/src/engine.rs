//! The control loop: sense → plan → actuate, plus acknowledgements and status.
//!
//! The engine owns the timeline and what is known of every device. It takes signals (topic and
//! bytes) from whatever transport delivers them, readings from the Modbus tasks, and publishes
//! a new desired state after every plan; the Modbus tasks make it so. It speaks to the outside
//! through channels only, so tests can drive it without a broker.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use site_config::{DeviceId, Site, StalePolicy};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn};

use crate::decide::mv::{self, Measurement, Sample};
use crate::decide::planner::{AsicState, Plan, Planner, Snapshot};
use crate::decide::signal::{self, Action, Directive, Signal};
use crate::decide::timeline::Applied;
use crate::field::modbus::{Desired, DeviceError, Report};
use crate::journal::{self, End, Record, Switch};
use crate::series::{self, keep_recent, round1};
use crate::show::metrics::{Outcome, Telemetry};

/// What the transport delivers to the engine.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// A message on a subscribed topic, as it arrived.
    Signal { topic: String, payload: Vec<u8> },
    /// The link to the broker is (re)established: status must be published again, since the
    /// broker may have published our last will meanwhile.
    Connected,
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
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
    Accepted,
    Rejected,
    Active,
    Completed,
}

/// The retained status message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub site: String,
    pub online: bool,
    pub at: String,
    pub site_kw: Option<f64>,
    pub asic_kw: Option<f64>,
    pub gpu_kw: Option<f64>,
    pub limit_kw: f64,
    /// Rated kW of ASICs switched off by gridshed.
    pub shed_kw: f64,
    /// Rated kW of ASICs still on that could be switched off.
    pub sheddable_kw: f64,
    /// What switching them off would take off the meter now: their measured kW (OpenADR's
    /// LOAD_SHED_DELTA_AVAILABLE).
    pub load_shed_delta_available_kw: f64,
    pub shortfall_kw: f64,
    /// Why ASICs that are off are not coming back yet (none when nothing is held).
    pub restore_held: Option<crate::decide::planner::Hold>,
    pub asics_on: usize,
    pub asics_off: usize,
    pub directives: Vec<String>,
    pub faulted: Vec<Fault>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Fault {
    pub device: String,
    pub reason: String,
}

/// The status payload published as last will: the controller is gone.
pub fn offline_status(site: &Site) -> Vec<u8> {
    serde_json::json!({ "site": site.id, "online": false })
        .to_string()
        .into_bytes()
}

#[derive(Debug, Clone, Copy, Default)]
struct AsicTrack {
    /// Relay state as last read back.
    seen: Option<bool>,
    /// What the last plan asked for.
    commanded: Option<bool>,
    /// When the relay last changed (commanded or observed).
    since: Option<Timestamp>,
    /// Latest outlet power reading, W.
    power_w: Option<f64>,
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

/// How long the engine keeps readings: the longest baseline window, and a margin.
const SAMPLES_KEPT: SignedDuration = SignedDuration::from_mins(61);

/// The channels the engine works through.
pub struct Io {
    pub inbound: mpsc::Receiver<Inbound>,
    pub outbound: mpsc::Sender<Outbound>,
    pub reports: mpsc::Receiver<Report>,
    pub desired: watch::Sender<Desired>,
}

/// How soon a plan follows a change of device state (signals plan at once).
const READINGS_REPLAN: Duration = Duration::from_millis(100);

/// How soon a report calls for a new plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Urgency {
    None,
    /// New meter readings: the budget moves a little; once a poll interval is enough.
    Readings,
    /// A relay moved unbidden or a device faulted or recovered: soon.
    State,
}

pub struct Engine {
    site: Arc<Site>,
    /// The ASICs of each PDU, by PDU index: readings arrive per PDU.
    asics_by_pdu: Vec<Vec<site_config::AsicId>>,
    planner: Planner,
    /// The directives in force and what has ended; changed only through [`Engine::commit`],
    /// so that the journal replays to the same state.
    state: journal::State,
    journal: Option<journal::Sender>,
    /// Per ASIC, the last switch the journal knew of at start-up: how long an ASIC found off
    /// has been off.
    resumed: Vec<Option<Switch>>,
    /// The newest plan that switched outlets, until they are all seen to follow.
    pending: Option<Pending>,
    /// PDUs whose relays disagreed: how often (never forgotten: a relay that stuck once is
    /// given longer next time), and until when they stay faulted.
    distrust: BTreeMap<DeviceId, (u32, Instant)>,
    asics: Vec<AsicTrack>,
    /// Per device, its fault (if any).
    faults: BTreeMap<DeviceId, DeviceError>,
    /// Per meter, the latest kW.
    meter_kw: Vec<Option<f64>>,
    gpu_history: VecDeque<(Timestamp, f64)>,
    other_history: VecDeque<(Timestamp, f64)>,
    last_switch: Option<Timestamp>,
    /// Until then relays are moving and meter and outlet readings disagree in time: other-load
    /// estimates taken meanwhile would be spikes, so none are taken.
    settling_until: Option<Timestamp>,
    /// Which devices (PDUs, then meters) have reported since the last switch: other-load
    /// estimates need every reading, the site meter's included, to be newer than the last
    /// switch, or they mix the site before and after it.
    reported_since_switch: Vec<bool>,
    reported_count: usize,
    /// The last other-load estimate taken while nothing was switching, for the first plans
    /// after start-up, before a history exists.
    last_other: Option<f64>,
    /// Events announced as active.
    announced: BTreeSet<String>,
    generation: u64,
    last_plan: Option<Plan>,
    last_status: Option<Status>,
    last_status_at: Option<Instant>,
    /// PDUs heard from since start (or faulted): planning waits for all of them.
    heard: BTreeSet<DeviceId>,
    started: Instant,
    /// When the last signal was accepted (or the controller started).
    last_signal: Instant,
    /// The stale-signal policy has acted since the last signal.
    stale_acted: bool,
    /// Site readings of the last hour: the baselines of events about to start.
    samples: VecDeque<Sample>,
    /// Events being measured, by id.
    tracked: BTreeMap<String, Tracked>,
    mv: mv::Settings,
    telemetry: Arc<Telemetry>,
}

/// How long an acknowledgement waits for the journal before it goes out anyway: a disk that
/// hangs (a worn-out SD card) must not silence the site towards the utility.
const JOURNAL_WAIT: Duration = Duration::from_secs(2);

/// Sends `msg` once `journal` holds everything recorded before it, so that an acknowledgement
/// or a report never tells the utility what a restart would not know; after [`JOURNAL_WAIT`]
/// if the disk is slower than that; at once without a journal. Acks and reports all go this
/// way, so they keep their order.
fn send_after_journal(
    journal: Option<&journal::Sender>,
    out: &mpsc::Sender<Outbound>,
    msg: Outbound,
    what: &'static str,
) {
    fn send(out: &mpsc::Sender<Outbound>, msg: Outbound, what: &str) {
        if out.try_send(msg).is_err() {
            warn!("outbound queue full; {what} dropped");
        }
    }
    fn take(slot: &std::sync::Mutex<Option<Outbound>>) -> Option<Outbound> {
        slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    let Some(journal) = journal else {
        return send(out, msg, what);
    };
    // Whichever comes first, the journal's sync or the deadline, sends it.
    let slot = Arc::new(std::sync::Mutex::new(Some(msg)));
    journal.then({
        let (slot, out) = (slot.clone(), out.clone());
        move || {
            if let Some(msg) = take(&slot) {
                send(&out, msg, what);
            }
        }
    });
    let out = out.clone();
    tokio::spawn(async move {
        tokio::time::sleep(JOURNAL_WAIT).await;
        if let Some(msg) = take(&slot) {
            warn!(waited = ?JOURNAL_WAIT, "the journal is slow: {what} sent before it is on disk");
            send(&out, msg, what);
        }
    });
}

/// How long a PDU whose relays disagreed stays distrusted: doubling with each disagreement.
const DISTRUST: crate::backoff::Backoff = crate::backoff::Backoff {
    min: Duration::from_secs(2),
    max: Duration::from_secs(60),
};

/// The id under which the `curtail` stale-signal policy holds its directive.
pub const STALE_ID: &str = "stale-signal";

/// A plan whose switching is not yet confirmed by read-back.
#[derive(Debug, Clone, Copy)]
struct Pending {
    generation: u64,
    at: Instant,
    /// Outlets not following by then are recorded as unconfirmed.
    deadline: Instant,
}

impl Engine {
    /// An engine resuming from `resumed` (the journal's state; empty without one), recording
    /// to `journal`.
    pub fn new(
        site: Arc<Site>,
        resumed: journal::Recovered,
        journal: Option<journal::Sender>,
        telemetry: Arc<Telemetry>,
    ) -> Engine {
        let journal::Recovered {
            state: mut resumed,
            samples,
            ..
        } = resumed;
        telemetry.seed(&samples);
        let tracked = resumed
            .timeline
            .events()
            .filter(|(_, d)| !d.is_empty())
            .map(|(id, d)| (id.to_owned(), Tracked::new(d, None)))
            .collect();
        // Only the journal's writer keeps outlet switches up to date; the engine needs them once,
        // per ASIC, below.
        let switched = std::mem::take(&mut resumed.switched);
        let mut asics_by_pdu = vec![Vec::new(); site.pdus.len()];
        for a in &site.asics {
            asics_by_pdu[a.pdu.0 as usize].push(a.id);
        }
        let last_switch = site
            .asics
            .iter()
            .map(|a| {
                let outlets = switched.get(&site.pdu(a.pdu).name)?;
                outlets.get(&a.outlet).copied()
            })
            .collect();
        Engine {
            asics_by_pdu,
            planner: Planner::new(&site),
            state: resumed,
            journal,
            resumed: last_switch,
            pending: None,
            distrust: BTreeMap::new(),
            asics: vec![AsicTrack::default(); site.asics.len()],
            faults: BTreeMap::new(),
            meter_kw: vec![None; site.meters.len()],
            gpu_history: VecDeque::new(),
            other_history: VecDeque::new(),
            last_switch: None,
            settling_until: None,
            reported_since_switch: vec![false; site.pdus.len() + site.meters.len()],
            reported_count: 0,
            last_other: None,
            announced: BTreeSet::new(),
            generation: 0,
            last_plan: None,
            last_status: None,
            last_status_at: None,
            heard: BTreeSet::new(),
            started: Instant::now(),
            last_signal: Instant::now(),
            stale_acted: false,
            samples: samples.into(),
            tracked,
            mv: mv::Settings::for_site(&site),
            telemetry,
            site,
        }
    }

    /// Runs until `cancel`. Field devices are left exactly as they are.
    pub async fn run(mut self, mut io: Io, cancel: CancellationToken) {
        let mut replan_at: Option<Instant> = Some(Instant::now());
        let mut last_cycle = Instant::now();
        let mut wake_at = Instant::now() + self.site.mqtt.status_interval;
        let meter_every = self.site.journal.as_ref().map(|j| j.meter_interval);
        let mut meters_at = meter_every.map(|every| Instant::now() + every);
        loop {
            let next = replan_at.map_or(wake_at, |r| r.min(wake_at));
            let next = meters_at.map_or(next, |m| m.min(next));
            // Cancel-safe: recv() on mpsc and sleep_until lose nothing when another branch wins.
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(msg) = io.inbound.recv() => match msg {
                    Inbound::Signal { topic, payload } => {
                        if self.on_signal(&topic, &payload, &io.outbound).await {
                            replan_at = Some(Instant::now());
                        }
                    }
                    Inbound::Connected => {
                        // The broker may have published our last will, and acks sent while
                        // it was away are lost: say again what is in force.
                        self.last_status = None;
                        for id in self.announced.clone() {
                            self.ack(&io.outbound, Some(id), AckStatus::Active, None).await;
                        }
                        replan_at = Some(Instant::now());
                    }
                },
                Some(report) = io.reports.recv() => {
                    let mut urgency = self.on_report(report);
                    // Drain what is already queued: one plan for a burst of readings.
                    while let Ok(r) = io.reports.try_recv() {
                        urgency = urgency.max(self.on_report(r));
                    }
                    let at = match urgency {
                        Urgency::None => None,
                        // Meter readings move the budget a little all the time: once a poll.
                        Urgency::Readings => Some(last_cycle + self.site.policy.poll_interval),
                        Urgency::State => Some(Instant::now() + READINGS_REPLAN),
                    };
                    if let Some(at) = at {
                        replan_at = Some(replan_at.map_or(at, |r| r.min(at)));
                    }
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = Instant::now();
            if let (Some(at), Some(every)) = (meters_at, meter_every)
                && at <= now
            {
                self.record_meters(Timestamp::now());
                meters_at = Some(now + every);
            }
            if replan_at.is_some_and(|r| r <= now) || wake_at <= now {
                replan_at = None;
                last_cycle = now;
                let wake = self.cycle(&io.outbound, &io.desired).await;
                self.telemetry.cycle.observe(now.elapsed());
                wake_at = now + wake;
            }
        }
        info!("engine stopped; outlets left as they are");
    }

    /// Handles one signal; true if the timeline changed.
    async fn on_signal(
        &mut self,
        topic_name: &str,
        payload: &[u8],
        out: &mpsc::Sender<Outbound>,
    ) -> bool {
        let site = self.site.clone();
        let Some(topic) = site.mqtt.signals.iter().find(|s| s.topic == topic_name) else {
            debug!(topic = %topic_name, "message on a topic the site file does not name; ignored");
            self.telemetry.signal(Outcome::Ignored);
            return false;
        };
        let now = Timestamp::now();
        let cx = signal::Context {
            max_payload_bytes: self.site.mqtt.max_payload_bytes,
            simple_levels: &self.site.policy.simple_levels,
            now,
        };
        match signal::parse(topic.format, payload, &cx) {
            Err(rejection) => {
                warn!(id = ?rejection.id, reason = %rejection.reason, topic = %topic_name, "signal rejected");
                self.telemetry.signal(Outcome::Rejected);
                self.ack(
                    out,
                    rejection.id,
                    AckStatus::Rejected,
                    Some(rejection.reason),
                )
                .await;
                false
            }
            Ok(sig) => {
                let id = sig.id().map(str::to_owned);
                let sent_at = signal::sent_at(topic.format, payload);
                if let Err(reason) = self.state.replay.check(&sig, sent_at) {
                    warn!(id = ?id, %reason, topic = %topic_name, "signal rejected");
                    self.telemetry.signal(Outcome::Rejected);
                    self.ack(out, id, AckStatus::Rejected, Some(reason)).await;
                    return false;
                }
                let span = info_span!("signal", id = id.as_deref().unwrap_or("*"));
                let _enter = span.enter();
                self.last_signal = Instant::now();
                if std::mem::take(&mut self.stale_acted) && self.state.timeline.contains(STALE_ID) {
                    info!("a signal arrived: the stale-signal curtailment ends");
                    self.complete(out, STALE_ID, End::Stale).await;
                }
                let applied = self.commit(Record::Accepted {
                    at: now,
                    topic: Some(topic_name.to_owned()),
                    sent_at,
                    signal: sig.clone(),
                });
                info!(?applied, format = ?topic.format, "signal accepted");
                self.telemetry.signal(Outcome::Accepted);
                self.ack(out, id, AckStatus::Accepted, None).await;
                if let Signal::Event { id, directives } = &sig {
                    self.track(out, id, directives, now);
                }
                if let (Signal::Release { .. }, Applied::Released(ids)) = (&sig, &applied) {
                    for id in ids {
                        self.complete(out, id, End::Released).await;
                    }
                }
                applied != Applied::Unchanged
            }
        }
    }

    /// Applies a record to the state and journals it.
    fn commit(&mut self, record: Record) -> Applied {
        let applied = self.state.apply(&record);
        self.record(record);
        applied
    }

    /// Journals a record (when the site keeps a journal).
    fn record(&self, record: Record) {
        if let Some(j) = &self.journal {
            j.record(record);
        }
    }

    /// Ends event `id`: it leaves the timeline (if a release has not already taken it out),
    /// and its end is journaled and acknowledged with the site as measured now.
    async fn complete(&mut self, out: &mpsc::Sender<Outbound>, id: &str, end: End) {
        let (site_kw, asic_kw) = (self.site_kw(), self.asic_kw());
        let now = Timestamp::now();
        self.commit(Record::Completed {
            at: now,
            id: id.to_owned(),
            end,
            site_kw,
            asic_kw,
        });
        self.telemetry.completed(end);
        self.announced.remove(id);
        let measurement = self.measure(out, id, now);
        let ack = Ack {
            id: Some(id.to_owned()),
            status: AckStatus::Completed,
            reason: None,
            at: now.to_string(),
            site_kw,
            asic_kw,
            measurement,
        };
        info!(id, ?site_kw, "event completed");
        self.publish_ack(out, &ack).await;
    }

    /// Starts measuring event `id` (or follows its new directives), and offers upstream what
    /// the site could shed for it.
    fn track(
        &mut self,
        out: &mpsc::Sender<Outbound>,
        id: &str,
        directives: &[Directive],
        now: Timestamp,
    ) {
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
        let t = Tracked::new(directives, Some(now));
        if t.openadr {
            let available = self.status(now).load_shed_delta_available_kw;
            let report = crate::decide::openadr::availability(
                id,
                &self.site.id,
                self.report_resource(),
                directives,
                available,
            );
            self.publish_report(out, &report);
        }
        self.tracked.insert(id.to_owned(), t);
    }

    /// Ends the measurement of event `id`: journals it, reports it upstream (OpenADR events),
    /// and returns it for the ack. `None` if the event never began.
    fn measure(
        &mut self,
        out: &mpsc::Sender<Outbound>,
        id: &str,
        now: Timestamp,
    ) -> Option<Measurement> {
        let t = self.tracked.remove(id)?;
        let meter = t.meter.as_ref()?;
        let end = t.scheduled_end().map_or(now, |e| e.min(now));
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
            at: now,
            measurement: m.clone(),
            intervals,
        });
        if t.openadr {
            let report = crate::decide::openadr::usage(
                id,
                &self.site.id,
                self.report_resource(),
                &meter.event_intervals(end),
            );
            self.publish_report(out, &report);
        }
        Some(m)
    }

    /// OpenADR reports speak for the site meter.
    fn report_resource(&self) -> &str {
        &self.site.meter(self.site.site_meter).name
    }

    fn publish_report(
        &self,
        out: &mpsc::Sender<Outbound>,
        report: &crate::decide::openadr::ReportRequest,
    ) {
        let Some(topic) = &self.site.reporting.report_topic else {
            return;
        };
        let msg = Outbound {
            topic: topic.clone(),
            payload: serde_json::to_vec(report).unwrap_or_default(),
            retain: false,
        };
        send_after_journal(self.journal.as_ref(), out, msg, "report");
    }

    /// A reading of the whole site: kept for baselines, shown on the chart, and fed to the
    /// measurement of every event in progress.
    fn take_sample(&mut self, s: Sample) {
        let now = s.at;
        keep_recent(&mut self.samples, |s| s.at, now, SAMPLES_KEPT);
        self.samples.push_back(s);
        self.telemetry.push_sample(s);
        for (id, t) in &mut self.tracked {
            match &mut t.meter {
                Some(m) => m.add(&s),
                None => {
                    let Some(start) = t.measure_from().filter(|start| now >= *start) else {
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

    async fn ack(
        &self,
        out: &mpsc::Sender<Outbound>,
        id: Option<String>,
        status: AckStatus,
        reason: Option<String>,
    ) {
        let ack = Ack {
            id,
            status,
            reason,
            at: Timestamp::now().to_string(),
            site_kw: None,
            asic_kw: None,
            measurement: None,
        };
        self.publish_ack(out, &ack).await;
    }

    async fn publish_ack(&self, out: &mpsc::Sender<Outbound>, ack: &Ack) {
        let payload = serde_json::to_vec(ack).unwrap_or_default();
        let msg = Outbound {
            topic: self.site.mqtt.ack_topic.clone(),
            payload,
            retain: false,
        };
        send_after_journal(self.journal.as_ref(), out, msg, "acknowledgement");
    }

    /// Takes in one report; says how soon the plan should be looked at again.
    fn on_report(&mut self, report: Report) -> Urgency {
        match report {
            Report::Pdu {
                pdu,
                relays,
                power_w,
                ..
            } => {
                let device = DeviceId::Pdu(pdu);
                self.heard.insert(device);
                // A PDU whose relays disagreed is trusted again only after its backoff, however
                // well it answers meanwhile: a stuck relay must not flap faulted/fine each poll.
                let distrusted =
                    matches!(self.faults.get(&device), Some(DeviceError::Disagrees(_)))
                        && self
                            .distrust
                            .get(&device)
                            .is_some_and(|(_, until)| Instant::now() < *until);
                let cleared = !distrusted && self.cleared(device);
                let now = Timestamp::now();
                let mut changed = cleared;
                for &id in &self.asics_by_pdu[pdu.0 as usize] {
                    let a = self.site.asic(id);
                    let i = usize::from(a.outlet) - 1;
                    let t = &mut self.asics[a.id.0 as usize];
                    let seen = relays.get(i).copied();
                    if seen.is_some() && seen != t.seen {
                        match (t.seen, self.resumed[a.id.0 as usize]) {
                            (Some(_), _) if seen != t.commanded => t.since = Some(now),
                            (Some(_), _) => {}
                            // First sight after a restart, as the journal last left it: the
                            // minimum off/on time runs from that switch.
                            (None, Some(last)) if Some(last.on) == seen => t.since = Some(last.at),
                            // Found off with no record of why (or changed while we were
                            // away): off from now on, so no restore comes early.
                            (None, _) if seen == Some(false) => t.since = Some(now),
                            (None, _) => {}
                        }
                        t.seen = seen;
                        changed = true;
                    }
                    t.power_w = power_w.get(i).copied();
                }
                if self.other_history.is_empty() {
                    // Start-up: the first estimate as soon as every reading is in.
                    let s = self.reading(now);
                    self.sample_other(&s);
                }
                if changed {
                    Urgency::State
                } else {
                    Urgency::None
                }
            }
            Report::Meter { meter, kw, .. } => {
                self.mark_reported(DeviceId::Meter(meter));
                self.heard.insert(DeviceId::Meter(meter));
                self.cleared(DeviceId::Meter(meter));
                if let Some(slot) = self.meter_kw.get_mut(meter.0 as usize) {
                    *slot = Some(kw);
                }
                let now = Timestamp::now();
                if self.site.gpu_racks.iter().any(|g| g.meter == meter) {
                    self.sample_gpu(now);
                }
                if meter == self.site.site_meter {
                    let s = self.reading(now);
                    self.sample_other(&s);
                    self.take_sample(s);
                }
                Urgency::Readings
            }
            Report::Fault { device, error, .. } => {
                self.mark_reported(device);
                self.heard.insert(device);
                let name = self.site.device_name(device).to_owned();
                if let (DeviceError::Disagrees(outlets), DeviceId::Pdu(pdu)) = (&error, device) {
                    self.disagreed(pdu, outlets);
                }
                let fresh = self.faults.insert(device, error.clone()).as_ref() != Some(&error);
                if fresh {
                    warn!(device = %name, %error, "device faulted");
                    self.record(Record::Fault {
                        at: Timestamp::now(),
                        device: name,
                        reason: error.to_string(),
                    });
                    Urgency::State
                } else {
                    Urgency::None
                }
            }
        }
    }

    /// A device answered properly: its fault, if any, is over. True if it had one.
    fn cleared(&mut self, device: DeviceId) -> bool {
        if self.faults.remove(&device).is_none() {
            return false;
        }
        let name = self.site.device_name(device).to_owned();
        info!(device = %name, "device answers again");
        self.record(Record::Recovered {
            at: Timestamp::now(),
            device: name,
        });
        true
    }

    /// Relays of `pdu` did not follow a write: the controller stops claiming their state (the
    /// plan counts them as they read) and distrusts the PDU for a backoff that grows with each
    /// disagreement, after which it tries them again.
    fn disagreed(&mut self, pdu: site_config::PduId, outlets: &[u16]) {
        for id in &self.asics_by_pdu[pdu.0 as usize] {
            if outlets.contains(&self.site.asic(*id).outlet) {
                self.asics[id.0 as usize].commanded = None;
            }
        }
        let strikes = self
            .distrust
            .get(&DeviceId::Pdu(pdu))
            .map_or(1, |(n, _)| n.saturating_add(1));
        let until = Instant::now() + DISTRUST.delay(strikes);
        self.distrust.insert(DeviceId::Pdu(pdu), (strikes, until));
    }

    fn sample_gpu(&mut self, now: Timestamp) {
        let total: f64 = self
            .site
            .gpu_racks
            .iter()
            .map(|g| {
                match (
                    self.meter_kw[g.meter.0 as usize],
                    self.faults.contains_key(&DeviceId::Meter(g.meter)),
                ) {
                    (Some(kw), false) => kw,
                    // A rack we cannot read may be at full power.
                    _ => g.rated_kw,
                }
            })
            .sum();
        self.gpu_history.push_back((now, total));
        let window = series::window(self.site.policy.gpu_peak_window);
        keep_recent(&mut self.gpu_history, |(t, _)| *t, now, window);
    }

    fn mark_reported(&mut self, device: DeviceId) {
        let i = match device {
            DeviceId::Pdu(p) => p.0 as usize,
            DeviceId::Meter(m) => self.site.pdus.len() + m.0 as usize,
        };
        if let Some(seen) = self.reported_since_switch.get_mut(i)
            && !*seen
        {
            *seen = true;
            self.reported_count += 1;
        }
    }

    /// The whole site as last read.
    fn reading(&self, now: Timestamp) -> Sample {
        Sample {
            at: now,
            site_kw: self.site_kw(),
            asic_kw: self.asic_kw(),
            gpu_kw: self.gpu_kw(),
            limit_kw: self
                .last_plan
                .as_ref()
                .map_or(self.site.import_limit_kw, |p| p.limit_kw),
        }
    }

    /// Records the load that is neither ASIC nor GPU: site meter minus both.
    fn sample_other(&mut self, s: &Sample) {
        let (Some(site), Some(asic), Some(gpu)) = (s.site_kw, s.asic_kw, s.gpu_kw) else {
            return;
        };
        self.other_history.push_back((s.at, site - asic - gpu));
        self.last_other = Some(site - asic - gpu);
        let window = series::window(self.site.policy.gpu_peak_window);
        keep_recent(&mut self.other_history, |(t, _)| *t, s.at, window);
    }

    fn site_kw(&self) -> Option<f64> {
        let m = self.site.site_meter;
        if self.faults.contains_key(&DeviceId::Meter(m)) {
            return None;
        }
        self.meter_kw[m.0 as usize]
    }

    fn asic_kw(&self) -> Option<f64> {
        let mut sum = 0.0;
        for t in &self.asics {
            sum += t.power_w? / 1000.0;
        }
        Some(sum)
    }

    fn gpu_kw(&self) -> Option<f64> {
        self.site
            .gpu_racks
            .iter()
            .map(|g| self.meter_kw[g.meter.0 as usize])
            .sum()
    }

    fn snapshot(&self) -> Snapshot {
        let asics = self
            .site
            .asics
            .iter()
            .map(|a| {
                let t = self.asics[a.id.0 as usize];
                let healthy = !self.faults.contains_key(&DeviceId::Pdu(a.pdu));
                AsicState {
                    // While a PDU is healthy its task enforces what was commanded.
                    on: if healthy {
                        t.commanded.or(t.seen)
                    } else {
                        t.seen.or(t.commanded)
                    }
                    .unwrap_or(true),
                    since: t.since,
                    controllable: healthy,
                }
            })
            .collect();
        Snapshot {
            asics,
            gpu_kw: self.gpu_history.iter().copied().collect(),
            other_kw: if self.other_history.is_empty() {
                self.last_other
                    .map(|kw| vec![(Timestamp::now(), kw)])
                    .unwrap_or_default()
            } else {
                self.other_history.iter().copied().collect()
            },
            last_switch: self.last_switch,
        }
    }

    /// True once every PDU has answered or failed once, or the start-up grace is over: until then
    /// the controller does not know the outlets' state and plans nothing.
    fn ready(&self) -> bool {
        let all = self
            .site
            .pdus
            .iter()
            .all(|p| self.heard.contains(&DeviceId::Pdu(p.id)));
        let grace = self
            .site
            .pdus
            .iter()
            .map(|p| p.endpoint.timeout)
            .max()
            .unwrap_or_default()
            * 3
            + self.site.policy.poll_interval;
        all || self.started.elapsed() > grace
    }

    /// One sense → plan → actuate cycle; returns how long until the next one is due.
    async fn cycle(
        &mut self,
        out: &mpsc::Sender<Outbound>,
        desired: &watch::Sender<Desired>,
    ) -> Duration {
        let now = Timestamp::now();
        self.apply_stale_policy(out, now).await;
        for id in self.state.timeline.ended_by(now) {
            self.complete(out, &id, End::Expired).await;
        }
        let status_every = self.site.mqtt.status_interval;
        if !self.ready() {
            return self.site.policy.poll_interval.min(status_every);
        }
        let snap = self.snapshot();
        let plan = self
            .planner
            .plan(&self.site, &snap, &self.state.timeline, now);
        let changes = plan.changes(&snap).count();
        if changes > 0 {
            self.generation += 1;
            for (id, on) in plan.changes(&snap) {
                let t = &mut self.asics[id.0 as usize];
                t.commanded = Some(on);
                t.since = Some(now);
            }
            self.last_switch = Some(now);
            self.reported_since_switch.fill(false);
            self.reported_count = 0;
            let settle = (self.site.policy.poll_interval * 2).max(Duration::from_secs(1));
            self.settling_until = now
                .checked_add(SignedDuration::try_from(settle).unwrap_or_default())
                .ok();
            let events = self.state.timeline.in_force(now).events;
            info!(
                generation = self.generation,
                off = plan.switched_off,
                on = plan.restored,
                budget_kw = format!("{:.1}", plan.budget_kw),
                gpu_peak_kw = format!("{:.1}", plan.gpu_peak_kw),
                other_kw = format!("{:.1}", plan.other_kw),
                limit_kw = plan.limit_kw,
                shortfall_kw = format!("{:.1}", plan.shortfall_kw),
                directives = ?events,
                "plan"
            );
            desired.send_replace(Desired {
                generation: self.generation,
                asics: Some(Arc::new(plan.desired.clone())),
            });
            // After the devices have their orders: the record can wait, the shed cannot.
            let switched = |to: bool| {
                self.outlets_by_pdu(
                    plan.changes(&snap)
                        .filter(|(_, on)| *on == to)
                        .map(|(id, _)| id),
                )
            };
            let (off, on) = (switched(false), switched(true));
            self.record(Record::Plan {
                at: now,
                generation: self.generation,
                limit_kw: plan.limit_kw,
                budget_kw: round1(plan.budget_kw),
                shortfall_kw: round1(plan.shortfall_kw),
                directives: events,
                off,
                on,
            });
            let started = Instant::now();
            self.pending = Some(Pending {
                generation: self.generation,
                at: started,
                deadline: started + self.confirm_within(),
            });
        } else if desired.borrow().asics.is_none() {
            // First plan: publish the absolute state even if nothing changes.
            self.generation += 1;
            for (i, on) in plan.desired.iter().enumerate() {
                self.asics[i].commanded = Some(*on);
            }
            desired.send_replace(Desired {
                generation: self.generation,
                asics: Some(Arc::new(plan.desired.clone())),
            });
        }
        self.check_confirmed();
        for id in self.state.timeline.in_force(now).events {
            if self.announced.insert(id.clone()) {
                self.ack(out, Some(id), AckStatus::Active, None).await;
            }
        }
        if plan.held.is_some() {
            debug!(held = ?plan.held, budget_kw = plan.budget_kw, on_kw = plan.planned_asic_kw, "restore held");
        }
        let wake = plan
            .next_wake
            .map(|t| t.duration_since(now))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(status_every)
            .min(status_every)
            .min(self.stale_due_in().unwrap_or(Duration::MAX))
            .min(self.pending.map_or(Duration::MAX, |p| {
                p.deadline.saturating_duration_since(Instant::now())
            }))
            .max(Duration::from_millis(10));
        self.last_plan = Some(plan);
        self.publish_status(out, now).await;
        wake
    }

    /// The site file's stale-signal policy: after `after` without an accepted signal, `curtail`
    /// sheds every ASIC (until the next signal) and `release` ends every directive.
    async fn apply_stale_policy(&mut self, out: &mpsc::Sender<Outbound>, now: Timestamp) {
        let (after, curtail) = match self.site.policy.stale_signal {
            StalePolicy::Hold => return,
            StalePolicy::Curtail { after } => (after, true),
            StalePolicy::Release { after } => (after, false),
        };
        if self.stale_acted || self.last_signal.elapsed() < after {
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
                    start: now,
                    end: None,
                    priority: 0,
                    emergency: false,
                    format: site_config::SignalFormat::Native,
                }],
            };
            self.commit(Record::Accepted {
                at: now,
                topic: None,
                sent_at: None,
                signal,
            });
        } else {
            warn!(silent_for = ?after, "no signal: ending every directive as the stale-signal policy says");
            let ids: Vec<String> = self
                .state
                .timeline
                .events()
                .map(|(id, _)| id.to_owned())
                .collect();
            for id in ids {
                self.complete(out, &id, End::Stale).await;
            }
        }
    }

    /// How long after a plan its outlets must be seen to follow: the endpoint tasks' own
    /// verification grace, plus one request's time.
    fn confirm_within(&self) -> Duration {
        let timeout = self
            .site
            .pdus
            .iter()
            .map(|p| p.endpoint.timeout)
            .max()
            .unwrap_or_default();
        crate::field::modbus::Timing::for_site(&self.site).verify_grace + timeout
    }

    /// Journals whether the newest plan's outlets followed it: once all of them are read back
    /// in their commanded state, or, at its deadline, which did not.
    fn check_confirmed(&mut self) {
        let Some(p) = self.pending else {
            return;
        };
        let lagging = || {
            self.asics
                .iter()
                .enumerate()
                .filter(|(_, t)| t.commanded.is_some() && t.seen != t.commanded)
                .map(|(i, _)| site_config::AsicId(i as u32))
        };
        let now = Instant::now();
        if lagging().next().is_none() {
            self.record(Record::Confirmed {
                at: Timestamp::now(),
                generation: p.generation,
                after_ms: now.duration_since(p.at).as_millis() as u64,
            });
        } else if now >= p.deadline {
            let outlets = self.outlets_by_pdu(lagging());
            warn!(
                generation = p.generation,
                ?outlets,
                "outlets did not follow the plan"
            );
            self.record(Record::Unconfirmed {
                at: Timestamp::now(),
                generation: p.generation,
                outlets,
            });
        } else {
            return;
        }
        self.pending = None;
    }

    /// ASICs as the journal names them: outlet numbers by PDU name.
    fn outlets_by_pdu(
        &self,
        asics: impl Iterator<Item = site_config::AsicId>,
    ) -> BTreeMap<String, Vec<u16>> {
        let mut out: BTreeMap<String, Vec<u16>> = BTreeMap::new();
        for id in asics {
            let a = self.site.asic(id);
            let pdu = &self.site.pdu(a.pdu).name;
            match out.get_mut(pdu) {
                Some(outlets) => outlets.push(a.outlet),
                None => {
                    out.insert(pdu.clone(), vec![a.outlet]);
                }
            }
        }
        out
    }

    /// Journals the meters (and what is in force) at the journal's pace.
    fn record_meters(&self, now: Timestamp) {
        let status = self.status(now);
        self.record(Record::Meters {
            at: now,
            site_kw: status.site_kw,
            asic_kw: status.asic_kw,
            gpu_kw: status.gpu_kw,
            limit_kw: status.limit_kw,
            shed_kw: status.shed_kw,
        });
    }

    /// How long until the stale-signal policy would act, if it is waiting to.
    fn stale_due_in(&self) -> Option<Duration> {
        let after = match self.site.policy.stale_signal {
            StalePolicy::Hold => return None,
            StalePolicy::Curtail { after } | StalePolicy::Release { after } => after,
        };
        (!self.stale_acted).then(|| after.saturating_sub(self.last_signal.elapsed()))
    }

    pub fn status(&self, now: Timestamp) -> Status {
        let plan = self.last_plan.as_ref();
        let rated = |i: usize| self.site.asics[i].rated_w / 1000.0;
        let snap_on: Vec<bool> =
            plan.map_or_else(|| vec![true; self.site.asics.len()], |p| p.desired.clone());
        let shed_kw = snap_on
            .iter()
            .enumerate()
            .filter(|(_, on)| !**on)
            .map(|(i, _)| rated(i))
            .sum();
        // Of the ASICs on and answering: their rating, and what they draw (the rating if unread).
        let (mut sheddable_kw, mut available_kw) = (0.0, 0.0);
        for a in &self.site.asics {
            if snap_on[a.id.0 as usize] && !self.faults.contains_key(&DeviceId::Pdu(a.pdu)) {
                sheddable_kw += a.rated_w / 1000.0;
                available_kw += self.asics[a.id.0 as usize].power_w.unwrap_or(a.rated_w) / 1000.0;
            }
        }
        let on = snap_on.iter().filter(|o| **o).count();
        Status {
            site: self.site.id.clone(),
            online: true,
            at: now.to_string(),
            site_kw: self.site_kw().map(round1),
            asic_kw: self.asic_kw().map(round1),
            gpu_kw: self.gpu_kw().map(round1),
            limit_kw: plan.map_or(self.site.import_limit_kw, |p| p.limit_kw),
            shed_kw: round1(shed_kw),
            sheddable_kw: round1(sheddable_kw),
            load_shed_delta_available_kw: round1(available_kw),
            shortfall_kw: round1(plan.map_or(0.0, |p| p.shortfall_kw)),
            restore_held: plan.and_then(|p| p.held),
            asics_on: on,
            asics_off: snap_on.len() - on,
            directives: self.state.timeline.in_force(now).events,
            faulted: self
                .faults
                .iter()
                .map(|(d, e)| Fault {
                    device: self.site.device_name(*d).to_owned(),
                    reason: e.to_string(),
                })
                .collect(),
        }
    }

    /// Publishes status when something that matters changed, or every status interval.
    async fn publish_status(&mut self, out: &mpsc::Sender<Outbound>, now: Timestamp) {
        let status = self.status(now);
        let in_force = self
            .state
            .timeline
            .directives()
            .filter(|d| d.is_in_force(now))
            .cloned()
            .collect();
        self.telemetry.set_status(status.clone(), in_force);
        let material = |s: &Status| {
            (
                s.limit_kw.to_bits(),
                s.shed_kw.to_bits(),
                s.asics_on,
                s.directives.clone(),
                s.faulted.clone(),
                s.shortfall_kw.to_bits(),
            )
        };
        let changed = self
            .last_status
            .as_ref()
            .is_none_or(|l| material(l) != material(&status));
        let due = self
            .last_status_at
            .is_none_or(|t| t.elapsed() >= self.site.mqtt.status_interval);
        if !(changed || due) {
            return;
        }
        let payload = serde_json::to_vec(&status).unwrap_or_default();
        let msg = Outbound {
            topic: self.site.mqtt.status_topic.clone(),
            payload,
            retain: true,
        };
        if out.try_send(msg).is_err() {
            debug!("outbound queue full; status skipped");
        }
        self.last_status = Some(status);
        self.last_status_at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str) -> Outbound {
        Outbound {
            topic: topic.into(),
            payload: Vec::new(),
            retain: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_waits_for_the_journal_but_not_for_ever() {
        let (journal, _stalled) = journal::Sender::stalled();
        let (out, mut sent) = mpsc::channel(8);
        send_after_journal(Some(&journal), &out, msg("ack"), "acknowledgement");
        tokio::time::sleep(JOURNAL_WAIT - Duration::from_millis(1)).await;
        assert!(
            sent.try_recv().is_err(),
            "held while the journal may yet write"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(sent.try_recv().map(|m| m.topic).as_deref(), Ok("ack"));
        assert!(sent.try_recv().is_err(), "sent once");
    }

    #[tokio::test]
    async fn without_a_journal_an_ack_goes_at_once() {
        let (out, mut sent) = mpsc::channel(8);
        send_after_journal(None, &out, msg("ack"), "acknowledgement");
        assert_eq!(sent.try_recv().map(|m| m.topic).as_deref(), Ok("ack"));
    }
}
