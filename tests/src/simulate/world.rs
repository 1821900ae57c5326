//! The simulated world around the core: a virtual clock and an event queue; the field tasks
//! (one per endpoint, reading and writing through `field::protocol` against the plant, with
//! timeouts, dropped links and backoff as `field::modbus` has them); the broker (a persistent
//! session: what is sent while it or the controller is down arrives afterwards); the journal
//! on a simulated disk; the utility and the world's faults, driven by the seed; and the
//! invariants, checked as it goes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use controller::decide::core::{Ack, AckStatus, Core, Effect, Input};
use controller::decide::time::{Mono, Now};
use controller::field::protocol::{self, Step};
use controller::msg::{Call, DeviceError, Order, Orders, Reading, Status};
use firmware_sim::plant::Answer;
use jiff::{SignedDuration, Timestamp};
use rand::Rng;
use rand::rngs::SmallRng;
use site_config::{DeviceId, Faults, MeterId, PduId, SignalFormat, Site};
use tokio_modbus::Response;

use super::check::{self, Broken, Hourly, Ledger, Relay, Tally};
use super::disk::Disk;
use super::plant::Plant;
use super::shape::{self, Shape};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

/// A request's round trip on a healthy loopback link.
const ROUND_TRIP: u64 = MS;
/// Group commits: the journal's writer syncs this long after the first unsynced record.
const SYNC_AFTER: u64 = 5 * MS;
/// The site meter is read this many times a poll (as `field::modbus` does).
const SITE_METER_READS: u64 = controller::field::modbus::SITE_METER_READS as u64;

#[derive(Debug, Clone)]
enum Ev {
    Wake,
    Poll(usize),
    Next(usize),
    Deliver(Reading),
    /// A job's answer reaches the core, and the endpoint goes on to its next job.
    Answered(usize, Reading),
    Sync,
    Check,
    Utility,
    World,
    FaultEnd(usize),
    BrokerBack,
    Start,
    Arrive(SignalFormat, Vec<u8>),
}

/// An event on the queue: ordered by time, then by when it was queued. Events of the
/// controller's process carry the epoch of the process; a crash makes them stale.
#[derive(Debug)]
struct Queued {
    t: u64,
    seq: u64,
    epoch: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.t, self.seq) == (other.t, other.seq)
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.t, self.seq).cmp(&(other.t, other.seq))
    }
}

/// One Modbus request in flight on an endpoint, and what it is part of.
#[derive(Debug, Clone)]
enum Job {
    Read { device: usize },
    Write { pdu: usize, order: Arc<Order> },
}

#[derive(Debug)]
struct Endpoint {
    devices: Vec<usize>,
    pdus: Vec<usize>,
    meters: Vec<usize>,
    has_site_meter: bool,
    connected: bool,
    failures: u32,
    next_attempt: u64,
    /// The last order carried out, per PDU of this endpoint (device index → order id).
    done: BTreeMap<usize, u64>,
    /// Jobs to do in order; `busy` while a request is out.
    jobs: VecDeque<Job>,
    busy: bool,
    tick: u64,
    phase: u64,
}

/// The world. Built by [`World::new`], run by [`World::run`].
pub struct World {
    pub seed: u64,
    pub shape: Shape,
    site: Arc<Site>,
    rng: SmallRng,
    t: u64,
    end: u64,
    wall0: Timestamp,
    /// The gateway's clock error (jumps are corrections, or new errors).
    wall_off: SignedDuration,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    /// The controller process's epoch: its events die with it.
    epoch: u64,
    /// Per device: its id and its timeout.
    ids: Vec<DeviceId>,
    /// Per device, the requests that read it (the same at every poll).
    read_steps: Vec<Arc<[Step]>>,
    timeouts: Vec<u64>,
    plant: Plant,
    core: Option<Core>,
    /// Wake-ups queued for the core (one per instant).
    wakes: std::collections::BTreeSet<u64>,
    orders: Orders,
    endpoints: Vec<Endpoint>,
    endpoint_of: Vec<usize>,
    disk: Disk,
    sync_pending: bool,
    broker_up: bool,
    /// Signals waiting in the broker's session while it or the controller is down.
    parked: VecDeque<(SignalFormat, Vec<u8>)>,
    ledger: Ledger,
    acks: check::Acks,
    status: Option<Status>,
    relays: Vec<Relay>,
    hourly: Hourly,
    /// When something last happened that the controller needs time to answer.
    disturbed: u64,
    /// Since when the site has been over a limit by more than the status's shortfall says (the
    /// status is ahead of the relays while a new plan is switching them).
    under_reported: Option<u64>,
    /// Per device: until when the controller may still be waiting out the backoff of a write
    /// that failed while the device was faulted (2 s doubling to 60 s).
    backing_off: Vec<u64>,
    /// When the controller last started.
    started: u64,
    /// What the ledger had in force at the last check: a directive that starts or ends is a
    /// disturbance too.
    last_force: controller::decide::timeline::InForce,
    /// The last check (s) that saw an emergency directive in force: a shed commanded in its
    /// last moments may reach the relay just after it ends.
    last_emergency: Option<f64>,
    /// Since when the site meter has been failing (a fault or a closed port), if it is.
    site_meter_down_since: Option<u64>,
    /// When the unmetered load last stepped.
    load_stepped_at: Option<u64>,
    next_event: u32,
    live_events: Vec<String>,
    maestro_sent: i64,
    pub tally: Tally,
    /// Print every event (`simulate --trace`).
    pub trace: bool,
    settle: u64,
    check_every: u64,
}

impl World {
    pub fn new(seed: u64, hours: f64, large_ok: bool) -> World {
        let mut rng = <SmallRng as rand::SeedableRng>::seed_from_u64(seed);
        let shape = shape::generate(&mut rng, large_ok);
        let site = Arc::new(shape.site.clone());
        let plant = Plant::new(site.clone());
        let mut groups: BTreeMap<(String, u16), Vec<usize>> = BTreeMap::new();
        for (i, d) in site.devices().enumerate() {
            let ep = site.device_endpoint(d);
            groups
                .entry((ep.host.clone(), ep.port))
                .or_default()
                .push(i);
        }
        let pdus = site.pdus.len();
        let site_meter = pdus + site.site_meter.0 as usize;
        let poll = site.policy.poll_interval.as_nanos() as u64;
        let mut endpoint_of = vec![0; plant.len()];
        let n = groups.len() as u64;
        let endpoints = groups
            .into_values()
            .enumerate()
            .map(|(k, devices)| {
                for &d in &devices {
                    endpoint_of[d] = k;
                }
                Endpoint {
                    pdus: devices.iter().copied().filter(|d| *d < pdus).collect(),
                    meters: devices.iter().copied().filter(|d| *d >= pdus).collect(),
                    has_site_meter: devices.contains(&site_meter),
                    devices,
                    connected: false,
                    failures: 0,
                    next_attempt: 0,
                    done: BTreeMap::new(),
                    jobs: VecDeque::new(),
                    busy: false,
                    tick: 0,
                    phase: poll * ((k as u64 * 8) / n.max(1)) / 8,
                }
            })
            .collect();
        let timeout = shape::max_timeout(&site).as_nanos() as u64;
        let grace = (poll * 3).max(2 * SEC);
        let sim = &site.sim;
        let relays_s = sim.relay_delay.as_nanos() as u64
            + sim.sequence_step.map_or(0, |s| s.as_nanos() as u64) * 64;
        let settle = (5 * SEC).max(3 * timeout + 2 * poll + grace + relays_s + SEC);
        let check_every = if site.asics.len() > 2000 {
            SEC
        } else {
            250 * MS
        };
        let wall0: Timestamp = "2026-11-22T06:00:00Z".parse().expect("a time");
        let wall0 = wall0 + SignedDuration::from_secs((seed % 86_400) as i64);
        let disk = Disk::new(&site.id, shape.journal_max_bytes as usize);
        let n_devices = site.devices().count();
        let end = (hours * 3600.0 * SEC as f64) as u64;
        World {
            seed,
            relays: check::relays(site.asics.len()),
            shape,
            rng,
            t: 0,
            end,
            wall0,
            wall_off: SignedDuration::ZERO,
            queue: BinaryHeap::new(),
            seq: 0,
            epoch: 1,
            ids: site.devices().collect(),
            read_steps: site
                .devices()
                .map(|d| match d {
                    DeviceId::Pdu(p) => protocol::pdu_read(site.pdu(p)).unwrap_or_default().into(),
                    DeviceId::Meter(m) => vec![protocol::meter_read(site.meter(m))].into(),
                })
                .collect(),
            timeouts: site
                .devices()
                .map(|d| site.device_endpoint(d).timeout.as_nanos() as u64)
                .collect(),
            plant,
            core: None,
            wakes: std::collections::BTreeSet::new(),
            orders: Orders::default(),
            endpoints,
            endpoint_of,
            disk,
            sync_pending: false,
            broker_up: true,
            parked: VecDeque::new(),
            ledger: Ledger::default(),
            acks: check::Acks::default(),
            status: None,
            hourly: Hourly::default(),
            disturbed: 0,
            under_reported: None,
            backing_off: vec![0; n_devices],
            started: 0,
            last_force: Default::default(),
            last_emergency: None,
            site_meter_down_since: None,
            load_stepped_at: None,
            next_event: 0,
            live_events: Vec::new(),
            maestro_sent: 0,
            tally: Tally::default(),
            trace: false,
            settle,
            check_every,
            site,
        }
    }

    /// Queues an event of the controller's process.
    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            t,
            seq: self.seq,
            epoch: self.epoch,
            ev,
        }));
    }

    /// Queues an event of the world's (not lost in a crash).
    fn at_world(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            t,
            seq: self.seq,
            epoch: 0,
            ev,
        }));
    }

    fn secs(&self) -> f64 {
        self.t as f64 / SEC as f64
    }

    /// The gateway's clocks now.
    fn now(&self) -> Now {
        Now {
            wall: self.wall0 + SignedDuration::from_nanos(self.t as i64) + self.wall_off,
            mono: Mono::from_nanos(self.t as i64),
        }
    }

    /// Runs until the end, then releases everything and checks what must have happened.
    pub fn run(&mut self) -> Result<(), Broken> {
        self.at_world(0, Ev::Start);
        self.at_world(self.check_every, Ev::Check);
        self.at_world(10 * SEC, Ev::Utility);
        self.at_world(30 * SEC, Ev::World);
        while let Some(Reverse(q)) = self.queue.pop() {
            if q.t > self.end {
                break;
            }
            self.t = q.t;
            if q.epoch != 0 && q.epoch != self.epoch {
                continue;
            }
            if self.trace {
                eprintln!("{:10.3} {:?}", q.t as f64 / SEC as f64, q.ev);
            }
            self.handle(q.ev)?;
        }
        self.finish()
    }

    fn handle(&mut self, ev: Ev) -> Result<(), Broken> {
        match ev {
            Ev::Wake => {
                self.wakes.remove(&self.t);
                self.feed(None)
            }
            Ev::Poll(k) => {
                self.poll(k);
                Ok(())
            }
            Ev::Next(k) => {
                self.next(k);
                Ok(())
            }
            Ev::Deliver(r) => self.feed(Some(Input::Reading(r))),
            Ev::Answered(k, r) => {
                self.feed(Some(Input::Reading(r)))?;
                self.next(k);
                Ok(())
            }
            Ev::Sync => {
                self.sync_pending = false;
                let acks = self.disk.sync();
                self.tally.rotations = self.disk.rotations;
                for a in acks {
                    self.received(a);
                }
                Ok(())
            }
            Ev::Check => {
                self.at_world(self.t + self.check_every, Ev::Check);
                self.check()
            }
            Ev::Utility => {
                self.utility();
                Ok(())
            }
            Ev::World => {
                self.world();
                Ok(())
            }
            Ev::FaultEnd(i) => {
                self.plant.set_faults(i, Faults::default(), self.secs());
                self.plant.closed[i] = false;
                if i == self.site_meter_index() {
                    self.site_meter_down_since = None;
                }
                // A link fault failed the writes of every device behind the same endpoint.
                let until = self.t + 65 * SEC;
                for d in self.endpoints[self.endpoint_of[i]].devices.clone() {
                    self.backing_off[d] = until;
                }
                self.disturb();
                Ok(())
            }
            Ev::BrokerBack => {
                self.broker_up = true;
                self.disturb();
                if self.core.is_some() {
                    self.feed(Some(Input::BrokerConnected))?;
                    self.unpark()?;
                }
                Ok(())
            }
            Ev::Start => self.start(),
            Ev::Arrive(format, payload) => {
                if self.broker_up && self.core.is_some() {
                    self.hand_over(format, payload)
                } else {
                    self.parked.push_back((format, payload));
                    Ok(())
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // The controller

    /// Starts (or restarts) the controller: the journal read back as `journal::open` does, a
    /// new core, new field tasks.
    fn start(&mut self) -> Result<(), Broken> {
        let now = self.now();
        self.ledger.expire(now.wall);
        // Everything acknowledged as accepted and not completed must come back.
        let rec = self.disk.reopen(now.wall, &self.site.policy);
        for id in &self.acks.accepted {
            if !self.acks.completed.contains(id)
                && self.ledger.timeline().contains(id)
                && !rec.state.timeline.contains(id)
            {
                return Err(check::broken(
                    "nothing acknowledged is forgotten",
                    format!(
                        "event {id} was acknowledged as accepted, is still in force, and the restart does not know it"
                    ),
                ));
            }
        }
        self.core = Some(Core::new(self.site.clone(), rec.state, rec.samples, now));
        self.orders = Orders::default();
        for (k, ep) in self.endpoints.iter_mut().enumerate() {
            ep.connected = false;
            ep.failures = 0;
            ep.next_attempt = 0;
            ep.done.clear();
            ep.jobs.clear();
            ep.busy = false;
            ep.tick = 0;
            let first = self.t + ep.phase;
            self.seq += 1;
            self.queue.push(Reverse(Queued {
                t: first,
                seq: self.seq,
                epoch: self.epoch,
                ev: Ev::Poll(k),
            }));
        }
        self.started = self.t;
        self.disturb();
        if self.broker_up {
            self.feed(Some(Input::BrokerConnected))?;
            self.unpark()?;
        } else {
            self.feed(None)?;
        }
        Ok(())
    }

    fn crash(&mut self) {
        self.core = None;
        self.wakes.clear();
        let tear = self.rng.random_bool(0.5);
        self.disk.crash(tear);
        self.sync_pending = false;
        self.tally.restarts += 1;
        // Field tasks die with the process: their requests in flight are lost.
        for ep in &mut self.endpoints {
            ep.jobs.clear();
            ep.busy = false;
            ep.connected = false;
        }
        // Pending events of the dead process die with it.
        self.epoch += 1;
        let down = self.rng.random_range(0..30) * SEC;
        self.at_world(self.t + down, Ev::Start);
    }

    /// Hands the core one input (or none: a wake-up) at now, then ticks it and applies effects.
    fn feed(&mut self, input: Option<Input>) -> Result<(), Broken> {
        let now = self.now();
        let Some(core) = self.core.as_mut() else {
            return Ok(());
        };
        if let Some(i) = input {
            core.input(now, i);
        }
        core.tick(now);
        let effects = core.take_effects();
        let wake = core.next_wake(now.mono);
        let wake = wake.as_nanos().max(self.t as i64 + 1) as u64;
        if self.wakes.insert(wake) {
            self.at(wake, Ev::Wake);
        }
        for e in effects {
            self.effect(e, now)?;
        }
        Ok(())
    }

    fn effect(&mut self, e: Effect, now: Now) -> Result<(), Broken> {
        match e {
            Effect::Orders(o) => {
                self.orders = o;
                for k in 0..self.endpoints.len() {
                    self.queue_orders(k);
                }
            }
            Effect::Record(r) => {
                self.disk.record(&r, now.wall);
                if !self.sync_pending {
                    self.sync_pending = true;
                    self.at(self.t + SYNC_AFTER, Ev::Sync);
                }
            }
            Effect::Ack(a) => {
                self.disk.ack(a);
                if !self.sync_pending {
                    self.sync_pending = true;
                    self.at(self.t + SYNC_AFTER, Ev::Sync);
                }
            }
            Effect::Status {
                status, publish, ..
            } => {
                if self.trace && publish {
                    let plan = self
                        .core
                        .as_ref()
                        .and_then(|c| c.last_plan())
                        .map(|p| (p.rest_kw, p.budget_kw, p.planned_asic_kw));
                    eprintln!(
                        "{:10.3} plan {plan:?} status limit {} shortfall {} site {:?} held {:?} on {} faulted {:?}",
                        self.secs(),
                        status.limit_kw,
                        status.shortfall_kw,
                        status.site_kw,
                        status.restore_held,
                        status.asics_on,
                        status.faulted
                    );
                }
                if publish {
                    self.status = Some(status);
                }
            }
            Effect::Report(_) | Effect::Sample(_) | Effect::Signal(_) | Effect::Completed(_) => {}
        }
        Ok(())
    }

    /// An acknowledgement reaches the utility (the journal has what it says).
    fn received(&mut self, a: Ack) {
        let Some(id) = a.id.clone() else {
            self.acks.rejected += 1;
            return;
        };
        match a.status {
            // A release is taken too; what must reach a completion is an event.
            // An update or a re-send says the event is held, as its first ack did.
            AckStatus::Accepted | AckStatus::Updated | AckStatus::Unchanged
                if self.ledger.events.contains(&id) =>
            {
                self.acks.accepted.insert(id);
            }
            AckStatus::Accepted | AckStatus::Updated | AckStatus::Unchanged => {}
            AckStatus::Completed => {
                self.acks.completed.insert(id);
            }
            AckStatus::Rejected => self.acks.rejected += 1,
            AckStatus::Active => {}
        }
    }

    fn hand_over(&mut self, format: SignalFormat, payload: Vec<u8>) -> Result<(), Broken> {
        let topic = self
            .site
            .mqtt
            .signals
            .iter()
            .find(|s| s.format == format)
            .map(|s| s.topic.clone())
            .unwrap_or_default();
        let now = self.now();
        let before = self.ledger.in_force(now.wall);
        if self
            .ledger
            .deliver(&self.site, format, &payload, now.wall)
            .is_some()
        {
            self.tally.accepted += 1;
            if self.ledger.in_force(now.wall) != before {
                self.disturb();
            }
        } else {
            self.tally.rejected += 1;
        }
        self.feed(Some(Input::Signal { topic, payload }))
    }

    fn unpark(&mut self) -> Result<(), Broken> {
        while let Some((f, p)) = self.parked.pop_front() {
            self.hand_over(f, p)?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Field tasks

    fn timeout_of(&self, i: usize) -> u64 {
        self.timeouts[i]
    }

    fn poll(&mut self, k: usize) {
        if self.core.is_none() {
            return;
        }
        let poll = self.site.policy.poll_interval.as_nanos() as u64;
        let ticks = if self.endpoints[k].has_site_meter {
            SITE_METER_READS
        } else {
            1
        };
        // As `field::modbus::jittered`: the site meter's reads at random instants.
        let next = if ticks > 1 {
            (poll / ticks) as f64 * self.rng.random_range(0.5..1.5)
        } else {
            poll as f64
        };
        self.at(self.t + next as u64, Ev::Poll(k));
        let site_meter = self.site.pdus.len() + self.site.site_meter.0 as usize;
        let ep = &mut self.endpoints[k];
        let full = ep.tick.is_multiple_of(ticks);
        ep.tick += 1;
        if ep.busy || !ep.jobs.is_empty() {
            return;
        }
        if !ep.connected {
            if self.t < ep.next_attempt {
                return;
            }
            if ep.devices.iter().any(|d| self.plant.closed[*d]) {
                let error = DeviceError::Transport {
                    call: Call::CONNECT,
                    reason: "Connection refused (os error 111)".into(),
                };
                self.link_down(k, error, self.t);
                return;
            }
            self.endpoints[k].connected = true;
        }
        let ep = &mut self.endpoints[k];
        if full {
            for &m in &ep.meters {
                ep.jobs.push_back(Job::Read { device: m });
            }
            for &p in &ep.pdus {
                ep.jobs.push_back(Job::Read { device: p });
            }
        } else {
            ep.jobs.push_back(Job::Read { device: site_meter });
        }
        self.enqueue_orders(k);
        if !self.endpoints[k].busy {
            self.endpoints[k].busy = true;
            self.next(k);
        }
    }

    /// New orders for an endpoint's PDUs go before its reads; an idle endpoint starts on them.
    fn queue_orders(&mut self, k: usize) {
        self.enqueue_orders(k);
        let ep = &mut self.endpoints[k];
        if !ep.busy && !ep.jobs.is_empty() {
            ep.busy = true;
            self.at(self.t, Ev::Next(k));
        }
    }

    /// [`World::queue_orders`] without starting the endpoint.
    fn enqueue_orders(&mut self, k: usize) {
        let ep = &mut self.endpoints[k];
        if !ep.connected {
            return;
        }
        for &p in ep.pdus.clone().iter().rev() {
            let Some(order) = self.orders.get(PduId(p as u32)).cloned() else {
                continue;
            };
            let done = ep.done.get(&p).copied().unwrap_or(0);
            let queued = ep.jobs.iter().any(
                |j| matches!(j, Job::Write { pdu, order: o } if *pdu == p && o.id == order.id),
            );
            if order.id > done && !queued {
                ep.jobs
                    .retain(|j| !matches!(j, Job::Write { pdu, .. } if *pdu == p));
                ep.jobs.push_front(Job::Write { pdu: p, order });
            }
        }
    }

    /// Does the endpoint's next job: its requests, one after another on the link.
    fn next(&mut self, k: usize) {
        if self.core.is_none() {
            return;
        }
        let Some(job) = self.endpoints[k].jobs.pop_front() else {
            self.endpoints[k].busy = false;
            return;
        };
        let site = self.site.clone();
        let mut t = self.t;
        let (device, steps) = match &job {
            Job::Read { device } => (*device, self.read_steps[*device].clone()),
            Job::Write { pdu, order } => {
                self.endpoints[k].done.insert(*pdu, order.id);
                let steps = protocol::order_writes(site.pdu(PduId(*pdu as u32)), order);
                (*pdu, Arc::from(steps))
            }
        };
        let timeout = self.timeout_of(device);
        let unit = device;
        let mut answers = Vec::with_capacity(steps.len());
        for step in steps.iter() {
            let faults = &self.plant.faults[unit];
            let latency = ROUND_TRIP + u64::from(faults.latency_ms) * MS;
            if latency >= timeout {
                let error = DeviceError::Timeout {
                    call: step.call,
                    limit: Duration::from_nanos(timeout),
                };
                self.job_failed(k, &job, error.clone(), t + timeout);
                self.link_down(k, error, t + timeout);
                return;
            }
            t += latency;
            match self
                .plant
                .answer(unit, &step.request, t as f64 / SEC as f64)
            {
                Answer::Response(r) => answers.push(r),
                Answer::NoReply => {
                    let at = t - latency + timeout;
                    let error = DeviceError::Timeout {
                        call: step.call,
                        limit: Duration::from_nanos(timeout),
                    };
                    self.job_failed(k, &job, error.clone(), at);
                    self.link_down(k, error, at);
                    return;
                }
                Answer::Disconnect => {
                    let error = DeviceError::Transport {
                        call: step.call,
                        reason: "Connection reset by peer".into(),
                    };
                    self.job_failed(k, &job, error.clone(), t);
                    self.link_down(k, error, t);
                    return;
                }
                Answer::Exception(code) => {
                    self.job_failed(
                        k,
                        &job,
                        DeviceError::Exception {
                            call: step.call,
                            code,
                        },
                        t,
                    );
                    self.at(t, Ev::Next(k));
                    return;
                }
            }
        }
        self.endpoints[k].failures = 0;
        let reading = match &job {
            Job::Read { device } => decode(&site, self.ids[*device], &steps, &answers),
            Job::Write { pdu, order } => {
                let echo = steps
                    .iter()
                    .zip(&answers)
                    .find_map(|(s, a)| protocol::check_written(s, a).err());
                match echo {
                    None => Reading::Written {
                        pdu: PduId(*pdu as u32),
                        order: order.id,
                    },
                    Some(error) => Reading::WriteFailed {
                        pdu: PduId(*pdu as u32),
                        order: order.id,
                        error,
                    },
                }
            }
        };
        self.at(t, Ev::Answered(k, reading));
    }

    fn job_failed(&mut self, _k: usize, job: &Job, error: DeviceError, at: u64) {
        let reading = match job {
            Job::Read { device } => Reading::ReadFailed {
                device: self.ids[*device],
                error,
            },
            Job::Write { pdu, order } => Reading::WriteFailed {
                pdu: PduId(*pdu as u32),
                order: order.id,
                error,
            },
        };
        self.at(at, Ev::Deliver(reading));
    }

    /// The link breaks: every device behind it is reported, and the next connection waits a
    /// backoff (100 ms doubling to 5 s, with up to 25 % jitter), as `field::modbus` does.
    fn link_down(&mut self, k: usize, error: DeviceError, at: u64) {
        let ep = &mut self.endpoints[k];
        ep.connected = false;
        ep.jobs.clear();
        ep.busy = false;
        ep.failures = ep.failures.saturating_add(1);
        let base = (100 * MS)
            .saturating_mul(1 << ep.failures.saturating_sub(1).min(16))
            .min(5 * SEC);
        let jitter = self.rng.random_range(0.0..0.25);
        ep.next_attempt = at + base + (base as f64 * jitter) as u64;
        let devices = ep.devices.clone();
        for d in devices {
            let device = self.ids[d];
            self.at(
                at,
                Ev::Deliver(Reading::ReadFailed {
                    device,
                    error: error.clone(),
                }),
            );
        }
    }

    // -----------------------------------------------------------------------------------------
    // The utility and the world

    fn disturb(&mut self) {
        self.disturbed = self.t;
        self.hourly.disturbances += 1;
    }

    fn send(&mut self, format: SignalFormat, payload: String) {
        self.tally.signals += 1;
        let delay = self.rng.random_range(1..20) * MS;
        self.at_world(self.t + delay, Ev::Arrive(format, payload.into_bytes()));
    }

    fn new_id(&mut self) -> String {
        self.next_event += 1;
        format!("ev-{}", self.next_event)
    }

    /// The utility acts: a new event, an update, a release, maestro, a burst, or a replay.
    fn utility(&mut self) {
        let gap = self.rng.random_range(20..900) * SEC;
        if self.t + gap < self.end {
            self.at_world(self.t + gap, Ev::Utility);
        }
        let full = self.shape.full_kw;
        let asic_kw = self.site.asic_rated_kw();
        let now = self.now().wall;
        match self.rng.random_range(0..100) {
            0..=34 => {
                // An import limit somewhere between "sheds a little" and "sheds it all".
                let id = self.new_id();
                let kw = (full - asic_kw * self.rng.random_range(0.05..1.2))
                    .max(1.0)
                    .round();
                let dur = self.duration();
                let prio = self.rng.random_range(0..5);
                let emergency = self.rng.random_bool(0.1);
                let start = self.start_field(now);
                let p = format!(
                    r#"{{"id":"{id}","kind":"import_limit","kw":{kw}{start}{dur},"priority":{prio},"emergency":{emergency}}}"#
                );
                self.live_events.push(id);
                self.send(SignalFormat::Native, p);
            }
            35..=49 => {
                let id = self.new_id();
                let kw = (asic_kw * self.rng.random_range(0.05..0.8))
                    .max(1.0)
                    .round();
                let dur = self.duration();
                let p = format!(r#"{{"id":"{id}","kind":"shed","kw":{kw}{dur}}}"#);
                self.live_events.push(id);
                self.send(SignalFormat::Native, p);
            }
            50..=54 => {
                let id = self.new_id();
                let dur = self.duration();
                let p = format!(r#"{{"id":"{id}","kind":"shed_all"{dur}}}"#);
                self.live_events.push(id);
                self.send(SignalFormat::Native, p);
            }
            55..=66 => {
                // OpenADR: one or two intervals of import limits.
                let id = self.new_id();
                let a = (full - asic_kw * self.rng.random_range(0.05..1.0))
                    .max(1.0)
                    .round();
                let b = (full - asic_kw * self.rng.random_range(0.05..1.0))
                    .max(1.0)
                    .round();
                let mins = self.rng.random_range(1..30);
                let p = format!(
                    r#"{{"objectType":"EVENT","operation":"CREATE","object":{{"id":"{id}","priority":{},"payloadDescriptors":[{{"payloadType":"IMPORT_CAPACITY_LIMIT","units":"KW"}}],"intervalPeriod":{{"start":"0001-01-01T00:00:00Z","duration":"PT{mins}M"}},"intervals":[{{"id":0,"payloads":[{{"type":"IMPORT_CAPACITY_LIMIT","values":[{a}]}}]}},{{"id":1,"payloads":[{{"type":"IMPORT_CAPACITY_LIMIT","values":[{b}]}}]}}]}}}}"#,
                    self.rng.random_range(0..5)
                );
                self.live_events.push(id);
                self.send(SignalFormat::Openadr3, p);
            }
            67..=72 => {
                // Maestro: curtail or release, its clock near ours.
                let ts = (now.as_second() + self.rng.random_range(-30..5)).max(self.maestro_sent);
                self.maestro_sent = ts;
                let target = if self.rng.random_bool(0.5) { 0 } else { 100 };
                self.send(
                    SignalFormat::Maestro,
                    format!(r#"{{"target":{target},"timestamp":{ts}}}"#),
                );
            }
            73..=87 => {
                // Release one live event (or all).
                if self.live_events.is_empty() || self.rng.random_bool(0.1) {
                    self.send(SignalFormat::Native, r#"{"kind":"release"}"#.into());
                    self.live_events.clear();
                } else {
                    let k = self.rng.random_range(0..self.live_events.len());
                    let id = self.live_events.swap_remove(k);
                    self.send(
                        SignalFormat::Native,
                        format!(r#"{{"id":"{id}","kind":"release"}}"#),
                    );
                }
            }
            88..=93 => {
                // A burst: new short events, re-sends and junk, all at once.
                let n = self.rng.random_range(5..60);
                for _ in 0..n {
                    let p = match self.rng.random_range(0..4) {
                        0 => "{not json".to_owned(),
                        1 => r#"{"id":"x","kind":"import_limit","kw":-3}"#.to_owned(),
                        _ => {
                            let id = self.new_id();
                            let kw = (full - asic_kw * self.rng.random_range(0.0..0.5)).round();
                            format!(
                                r#"{{"id":"{id}","kind":"import_limit","kw":{kw},"duration_s":{}}}"#,
                                self.rng.random_range(5..120)
                            )
                        }
                    };
                    self.send(SignalFormat::Native, p);
                }
            }
            _ => {
                // A replay of an event that has ended: must be refused.
                let k = self.rng.random_range(1..=self.next_event.max(1));
                let id = format!("ev-{k}");
                if !self.live_events.contains(&id) {
                    self.send(
                        SignalFormat::Native,
                        format!(r#"{{"id":"{id}","kind":"import_limit","kw":1}}"#),
                    );
                }
            }
        }
    }

    /// `,"duration_s":N` or nothing (until released).
    fn duration(&mut self) -> String {
        if self.rng.random_bool(0.25) {
            String::new()
        } else {
            format!(r#","duration_s":{}"#, self.rng.random_range(10..3600))
        }
    }

    /// `,"start":"..."` a little ahead, sometimes.
    fn start_field(&mut self, now: Timestamp) -> String {
        if self.rng.random_bool(0.2) {
            let ahead = SignedDuration::from_secs(self.rng.random_range(5..600));
            format!(r#","start":"{}""#, now + ahead)
        } else {
            String::new()
        }
    }

    fn site_meter_index(&self) -> usize {
        self.plant.index(DeviceId::Meter(self.site.site_meter))
    }

    /// The world acts: a device fault, a crash, a broker outage, a clock jump, a load step.
    fn world(&mut self) {
        let gap = self.rng.random_range(60..1800) * SEC;
        if self.t + gap < self.end {
            self.at_world(self.t + gap, Ev::World);
        }
        let n = self.plant.len();
        let what = self.rng.random_range(0..100);
        if self.trace {
            eprintln!("{:10.3} world {what}", self.secs());
        }
        match what {
            0..=49 => {
                let i = self.rng.random_range(0..n);
                let timeout_ms = self.timeout_of(i) / MS;
                let mut f = Faults::default();
                let mut closed = false;
                match self.rng.random_range(0..8) {
                    0 => f.no_reply = true,
                    1 => closed = true,
                    2 if self.plant.is_pdu(i) => f.write_exception = Some(3),
                    3 if self.plant.is_pdu(i) => {
                        let outlets = self.site.pdus[i].outlets;
                        f.stuck_outlets = vec![self.rng.random_range(1..=outlets)];
                    }
                    4 => f.latency_ms = self.rng.random_range(0..timeout_ms as u32 * 2),
                    5 => f.exception = Some(4),
                    6 if !self.plant.is_pdu(i) => f.frozen = true,
                    _ => f.disconnect = true,
                }
                if self.trace {
                    eprintln!(
                        "{:10.3} fault {} {f:?} closed {closed}",
                        self.secs(),
                        self.plant.describe(i)
                    );
                }
                self.plant.set_faults(i, f, self.secs());
                self.plant.closed[i] = closed;
                if i == self.site_meter_index() {
                    self.site_meter_down_since.get_or_insert(self.t);
                }
                self.tally.faults += 1;
                self.disturb();
                let lasts = self.rng.random_range(10..900) * SEC;
                self.at_world(self.t + lasts, Ev::FaultEnd(i));
            }
            50..=64 => {
                if self.core.is_some() {
                    self.crash();
                }
            }
            65..=74 => {
                if self.broker_up {
                    self.broker_up = false;
                    self.tally.outages += 1;
                    let lasts = self.rng.random_range(5..180) * SEC;
                    self.at_world(self.t + lasts, Ev::BrokerBack);
                }
            }
            75..=84 => {
                // NTP: a correction, or a new error, of seconds to hours.
                let jump = if self.wall_off != SignedDuration::ZERO && self.rng.random_bool(0.6) {
                    -self.wall_off
                } else {
                    SignedDuration::from_secs(self.rng.random_range(-7200..7200))
                };
                self.wall_off += jump;
                self.tally.jumps += 1;
                self.disturb();
            }
            _ => {
                // The unmetered load steps (a chiller, a GPU cluster starting a job).
                let base = self.site.sim.base_load_kw;
                self.plant.other_base_kw = base * self.rng.random_range(0.5..1.3);
                self.load_stepped_at = Some(self.t);
                self.disturb();
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Invariants

    fn check(&mut self) -> Result<(), Broken> {
        self.tally.checks += 1;
        let secs = self.secs();
        let site_kw = self.plant.site_kw(secs);
        // Relay history: minimum times, toggles per hour.
        let toggles = std::mem::take(&mut self.plant.toggles);
        let now = self.now();
        self.ledger.expire(now.wall);
        let force = self.ledger.in_force(now.wall);
        if force != self.last_force {
            self.last_force = force.clone();
            self.disturb();
        }
        if force.emergency {
            self.last_emergency = Some(secs);
        }
        let hour = self.t / (3600 * SEC);
        if hour != self.hourly.hour {
            self.hourly = Hourly {
                hour,
                ..Hourly::default()
            };
            for r in &mut self.relays {
                r.this_hour = 0;
            }
        }
        let policy = &self.site.policy;
        let slack = 0.3
            + self.check_every as f64 / SEC as f64
            + self.site.sim.relay_delay.as_secs_f64()
            + self
                .site
                .sim
                .sequence_step
                .map_or(0.0, |s| s.as_secs_f64() * 64.0);
        for tg in &toggles {
            self.tally.toggles += 1;
            let r = &mut self.relays[tg.asic];
            if let Some((at, _)) = r.last {
                let held = tg.at - at;
                let restarted = self.started as f64 / SEC as f64 > at;
                if tg.on && held + slack < policy.min_off.as_secs_f64() {
                    return Err(check::broken(
                        "minimum off-time",
                        format!(
                            "ASIC {} back on after {held:.1} s off (min_off {:?})",
                            tg.asic, policy.min_off
                        ),
                    ));
                }
                let emergency = self.last_emergency.is_some_and(|e| e + slack >= tg.at);
                if !tg.on && !emergency && !restarted && held + slack < policy.min_on.as_secs_f64()
                {
                    return Err(check::broken(
                        "minimum on-time",
                        format!(
                            "ASIC {} off after {held:.1} s on (min_on {:?})",
                            tg.asic, policy.min_on
                        ),
                    ));
                }
            }
            r.last = Some((tg.at, tg.on));
            r.this_hour += 1;
            let bound = Hourly::bound(self.hourly.disturbances);
            if r.this_hour > bound {
                return Err(check::broken(
                    "bounded toggles",
                    format!(
                        "ASIC {} switched {} times this hour with {} disturbances",
                        tg.asic, r.this_hour, self.hourly.disturbances
                    ),
                ));
            }
        }
        if self.plant.protected_writes() > 0 {
            return Err(check::broken(
                "nothing written to GPU racks or meters",
                format!(
                    "{} writes to protected devices or outlets",
                    self.plant.protected_writes()
                ),
            ));
        }
        let restored = toggles.iter().any(|t| t.on);
        if self.core.is_none() {
            return Ok(());
        }
        // The limit, once the controller has had time to answer.
        let limit = force
            .import_limit_kw
            .map_or(self.site.import_limit_kw, |l| {
                l.min(self.site.import_limit_kw)
            });
        let noise = self.site.sim.noise_pct / 100.0;
        let tol = 2.0 * noise * site_kw + 0.01 * limit + 0.5;
        let switchable = self.switchable();
        let sheddable_kw: f64 = switchable
            .iter()
            .enumerate()
            .filter(|(k, ok)| **ok && self.plant.relay_on(*k))
            .map(|(k, _)| self.plant.asic_w(k) / 1000.0)
            .sum();
        let attainable = site_kw - sheddable_kw + policy.margin_kw + tol <= limit;
        // A site meter frozen while nothing the controller sees moves cannot be told from a
        // steady site: the controller is blind, not wrong, until the next switch or swing.
        // Nor can a load that steps while the site meter is down be seen (the controller
        // holds the last window's peak, README "What it assumes of a device it cannot read").
        let blind = self.plant.faults[self.site_meter_index()].frozen
            || self
                .site_meter_down_since
                .is_some_and(|down| self.load_stepped_at.is_some_and(|step| step >= down));
        let settled = self.t >= self.disturbed + self.settle && !blind;
        let over = site_kw - limit;
        if settled && over > tol {
            if attainable {
                self.tally.over_limit_checks += 1;
                return Err(check::broken(
                    "under every limit the healthy devices can meet",
                    format!(
                        "site {site_kw:.1} kW over the limit {limit:.1} kW by {over:.1} kW (tolerance {tol:.1}), {sheddable_kw:.1} kW sheddable; status: {:?}",
                        self.status
                    ),
                ));
            }
            self.tally.shortfall_checks += 1;
            let shortfall = self.status.as_ref().map_or(0.0, |s| s.shortfall_kw);
            // With the site meter unreadable the excess cannot be measured; status says that
            // instead (no site_kw, the meter faulted), which is the honest report.
            let meter_out = self.status.as_ref().is_some_and(|s| s.site_kw.is_none());
            if shortfall + tol < over && !meter_out {
                let since = *self.under_reported.get_or_insert(self.t);
                if self.t >= since + 3 * SEC {
                    return Err(check::broken(
                        "the shortfall is reported",
                        format!(
                            "site {over:.1} kW over {limit:.1} kW for 3 s, status says a shortfall of {shortfall:.1} kW"
                        ),
                    ));
                }
            } else {
                self.under_reported = None;
            }
            self.tally.worst_excess_kw = self.tally.worst_excess_kw.max(over);
        } else {
            self.under_reported = None;
        }
        if restored && over > tol && attainable && self.t >= self.started + self.settle {
            return Err(check::broken(
                "no ASIC restored over a limit",
                format!("an ASIC came back with the site {over:.1} kW over {limit:.1} kW"),
            ));
        }
        // Sheds by kW and shed_all.
        if settled && (force.shed_kw.is_some() || force.shed_all) && force.import_limit_kw.is_none()
        {
            let off_kw: f64 = (0..self.site.asics.len())
                .filter(|k| !self.plant.relay_on(*k))
                .map(|k| self.site.asics[k].rated_w / 1000.0)
                .sum();
            let can: f64 = (0..self.site.asics.len())
                .filter(|k| switchable[*k] || !self.plant.relay_on(*k))
                .map(|k| self.site.asics[k].rated_w / 1000.0)
                .sum();
            let want = if force.shed_all {
                can
            } else {
                force.shed_kw.unwrap_or(0.0).min(can)
            };
            if off_kw + 1e-6 < want - 0.01 * self.site.asic_rated_kw() {
                let core_force = self
                    .core
                    .as_ref()
                    .map(|c| c.state().timeline.in_force(now.wall));
                return Err(check::broken(
                    "a shed keeps its kW off",
                    format!(
                        "{off_kw:.1} kW off for a shed of {want:.1} kW; in force for the utility: {force:?}; for the controller: {core_force:?}"
                    ),
                ));
            }
        }
        // The journal replays to the core's state.
        if self.tally.checks.is_multiple_of(2400) {
            self.journal_matches()?;
        }
        Ok(())
    }

    /// ASICs the controller can switch now: on a PDU whose link is sound and which takes
    /// writes, on an outlet that is not stuck, and not held on by its minimum on-time.
    fn switchable(&self) -> Vec<bool> {
        let link_ok: Vec<bool> = self
            .endpoints
            .iter()
            .map(|ep| {
                ep.devices.iter().all(|d| {
                    let f = &self.plant.faults[*d];
                    let timeout_ms = self.timeout_of(*d) / MS;
                    !self.plant.closed[*d]
                        && !f.no_reply
                        && !f.disconnect
                        && u64::from(f.latency_ms) + 1 < timeout_ms
                })
            })
            .collect();
        let min_on = self.site.policy.min_on.as_secs_f64();
        let secs = self.secs();
        self.site
            .asics
            .iter()
            .enumerate()
            .map(|(k, a)| {
                let d = a.pdu.0 as usize;
                let f = &self.plant.faults[d];
                let young = self.relays[k]
                    .last
                    .is_some_and(|(at, on)| on && secs - at < min_on + 1.0);
                link_ok[self.endpoint_of[d]]
                    && self.t >= self.backing_off[d]
                    && f.exception.is_none()
                    && f.write_exception.is_none()
                    // A PDU whose relays disagreed is not trusted (not switched) as a whole
                    // until its backoff is over (README, "Failure behaviour").
                    && f.stuck_outlets.is_empty()
                    && !young
            })
            .collect()
    }

    fn journal_matches(&self) -> Result<(), Broken> {
        let Some(core) = &self.core else {
            return Ok(());
        };
        // Up to what time forgets: ended ids past the replay window go at a restart, and at
        // the core's next completion.
        let mut back = self.disk.replay();
        let mut state = core.state().clone();
        let (now, policy) = (self.now().wall, &self.site.policy);
        for replay in [&mut back.state.replay, &mut state.replay] {
            replay.forget_old(now, policy.replay_window);
        }
        if back.state.timeline != state.timeline || back.state.replay != state.replay {
            return Err(check::broken(
                "journal replay gives back the same state",
                format!(
                    "journal: {:?} / {} records, {} skipped\ncore: {:?}\nreplay, journal: {:?}\nreplay, core: {:?}",
                    back.state
                        .timeline
                        .events()
                        .map(|(id, _)| id)
                        .collect::<Vec<_>>(),
                    back.records,
                    back.skipped,
                    state
                        .timeline
                        .events()
                        .map(|(id, _)| id)
                        .collect::<Vec<_>>(),
                    back.state.replay,
                    state.replay,
                ),
            ));
        }
        Ok(())
    }

    /// After the day: the utility releases everything; every event it heard accepted must
    /// be heard completed.
    fn finish(&mut self) -> Result<(), Broken> {
        if self.core.is_none() {
            self.t += SEC;
            self.start()?;
        }
        self.broker_up = true;
        self.unpark()?;
        self.hand_over(SignalFormat::Native, br#"{"kind":"release"}"#.to_vec())?;
        let stop = self.t + 120 * SEC;
        while let Some(Reverse(q)) = self.queue.pop() {
            if q.t > stop {
                break;
            }
            self.t = self.t.max(q.t);
            if (q.epoch != 0 && q.epoch != self.epoch)
                || matches!(q.ev, Ev::World | Ev::Utility | Ev::FaultEnd(_))
            {
                continue;
            }
            self.handle(q.ev)?;
        }
        for a in self.disk.sync() {
            self.received(a);
        }
        self.journal_matches()?;
        for id in &self.acks.accepted {
            if !self.acks.completed.contains(id) {
                return Err(check::broken(
                    "every accepted signal reaches a terminal ack",
                    format!("{id} was accepted and never completed"),
                ));
            }
        }
        Ok(())
    }

    pub fn simulated(&self) -> Duration {
        Duration::from_nanos(self.t)
    }
}

/// What a read's answers say, as `field::modbus` reports them.
fn decode(site: &Site, device: DeviceId, steps: &[Step], answers: &[Response]) -> Reading {
    match Some(device) {
        Some(DeviceId::Pdu(p)) => match protocol::decode_pdu(site.pdu(p), steps, answers) {
            Ok((relays, power_w)) => Reading::Pdu {
                pdu: p,
                relays,
                power_w,
            },
            Err(error) => Reading::ReadFailed {
                device: DeviceId::Pdu(p),
                error,
            },
        },
        Some(DeviceId::Meter(m)) => {
            let meter = site.meter(m);
            match (steps.first(), answers.first()) {
                (Some(s), Some(a)) => match protocol::decode_meter(meter, s, a) {
                    Ok(kw) => Reading::Meter { meter: m, kw },
                    Err(error) => Reading::ReadFailed {
                        device: DeviceId::Meter(m),
                        error,
                    },
                },
                _ => Reading::ReadFailed {
                    device: DeviceId::Meter(m),
                    error: DeviceError::Malformed {
                        call: Call::CONNECT,
                        reason: "no answer".into(),
                    },
                },
            }
        }
        None => Reading::ReadFailed {
            device: DeviceId::Meter(MeterId(0)),
            error: DeviceError::Malformed {
                call: Call::CONNECT,
                reason: "no such device".into(),
            },
        },
    }
}
