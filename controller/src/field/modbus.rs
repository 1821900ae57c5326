//! Actuation and sensing over Modbus TCP: one task per endpoint (host:port), owning its
//! connection, for the PDUs and meters behind it.
//!
//! Each task reads its devices every poll interval and whenever the desired state changes
//! writes what differs: one Write Multiple Coils (or Registers) per run of consecutive ASIC
//! outlets where the profile allows it, else one write per outlet; then reads the relays back.
//! Every call runs under the device's timeout (tokio-modbus has none of its own); after a
//! timeout or transport error the connection is dropped (transaction ids may be out of step)
//! and re-opened with backoff. A device's exception answer is a fault of that device, not of
//! the connection. Nothing is written but ASIC outlets: GPU feed outlets, empty outlets and
//! meters are only ever read.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use site_config::profile::{MAX_READ_WORDS, RegisterTable, RelayTable, WriteMode};
use site_config::{AsicId, DeviceId, MeterId, PduId, Site};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_modbus::client::{Context, Reader, Writer, tcp};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::show::metrics::{Histogram, Telemetry};

/// Why a device is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed: {0}")]
    Transport(String),
    #[error("answered with Modbus exception {0:?}")]
    Exception(ExceptionCode),
    #[error("answered with {0}")]
    Malformed(String),
    #[error("relays disagree with what was written on outlets {0:?}")]
    Disagrees(Vec<u16>),
}

/// The desired relay state of every ASIC, published by the engine; `generation` grows with
/// every plan so endpoint tasks can tell a new plan from an old one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub generation: u64,
    /// Indexed by [`AsicId`]; `None` before the first plan (nothing is written then).
    pub asics: Option<Arc<Vec<bool>>>,
}

/// What an endpoint task tells the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Pdu {
        pdu: PduId,
        at: Instant,
        /// Relay state of every outlet (outlet 1 first), read just now.
        relays: Vec<bool>,
        /// Active power of every outlet, W.
        power_w: Vec<f64>,
    },
    Meter {
        meter: MeterId,
        at: Instant,
        kw: f64,
    },
    Fault {
        device: DeviceId,
        at: Instant,
        error: DeviceError,
    },
}

/// A run of consecutive outlets that all carry ASICs: the unit of a batched write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// 1-based number of the first outlet.
    pub first_outlet: u16,
    /// The ASIC on each outlet of the run, in outlet order.
    pub asics: Vec<AsicId>,
}

/// Splits a PDU's ASIC outlets into runs of consecutive outlets. Outlets without an ASIC
/// (GPU feeds, empty) break runs, so no write ever covers them.
pub fn runs(site: &Site, pdu: PduId) -> Vec<Run> {
    let mut by_outlet: BTreeMap<u16, AsicId> = BTreeMap::new();
    for a in site.asics.iter().filter(|a| a.pdu == pdu) {
        by_outlet.insert(a.outlet, a.id);
    }
    let mut out: Vec<Run> = Vec::new();
    for (outlet, id) in by_outlet {
        match out.last_mut() {
            Some(run) if run.first_outlet + run.asics.len() as u16 == outlet => run.asics.push(id),
            _ => out.push(Run {
                first_outlet: outlet,
                asics: vec![id],
            }),
        }
    }
    out
}

/// Into how many groups the endpoints' polls are spread over the poll interval.
const POLL_PHASES: u32 = 8;

/// Timing of the Modbus side.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub poll_interval: Duration,
    /// Between reconnection attempts.
    pub backoff: Backoff,
    /// How long relays may take to follow a write before the device counts as disagreeing.
    pub verify_grace: Duration,
}

impl Timing {
    pub fn for_site(site: &Site) -> Timing {
        let poll = site.policy.poll_interval;
        Timing {
            poll_interval: poll,
            backoff: Backoff {
                min: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            verify_grace: (poll * 3).max(Duration::from_secs(2)),
        }
    }
}

/// Starts one task per endpoint of `site`; they run until `cancel`.
pub fn spawn_endpoints(
    site: &Arc<Site>,
    timing: Timing,
    desired: watch::Receiver<Desired>,
    reports: mpsc::Sender<Report>,
    telemetry: &Arc<Telemetry>,
    cancel: &CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut groups: BTreeMap<(String, u16), Vec<DeviceId>> = BTreeMap::new();
    for id in site.devices() {
        let ep = site.device_endpoint(id);
        groups
            .entry((ep.host.clone(), ep.port))
            .or_default()
            .push(id);
    }
    let mut set = tokio::task::JoinSet::new();
    let n = groups.len().max(1) as u32;
    for (k, ((host, port), devices)) in groups.into_iter().enumerate() {
        // Spread the endpoints' polls over the interval: hundreds of PDUs polled in the same
        // instant would make a burst that a shed arriving then has to queue behind.
        // Eight phases: bursts small enough not to delay a shed, few enough that the wake-ups
        // of a poll round are shared (polling each endpoint at its own instant costs more CPU).
        let phase = timing.poll_interval * ((k as u32 * POLL_PHASES) / n) / POLL_PHASES;
        let task = Endpoint::new(
            site.clone(),
            (host, port),
            devices,
            timing,
            desired.clone(),
            reports.clone(),
            telemetry.clone(),
        );
        set.spawn(task.run(phase, cancel.clone()));
    }
    set
}

struct PduPlan {
    id: PduId,
    runs: Vec<Run>,
    /// Relay state as last read back, by outlet index.
    relays: Option<Vec<bool>>,
    /// Outlets written but not yet seen to follow, with when.
    unverified: BTreeMap<u16, (bool, Instant)>,
}

struct Endpoint {
    site: Arc<Site>,
    host: String,
    port: u16,
    pdus: Vec<PduPlan>,
    meters: Vec<MeterId>,
    timing: Timing,
    desired: watch::Receiver<Desired>,
    reports: mpsc::Sender<Report>,
    ctx: Option<Context>,
    failures: u32,
    next_attempt: Instant,
    /// Devices that answered with an exception or nonsense, with their failure count and when
    /// to ask them again: a faulted device is retried with backoff, not at every poll.
    retry: BTreeMap<DeviceId, (u32, Instant)>,
    telemetry: Arc<Telemetry>,
}

enum CallError {
    /// The device answered with an exception: the connection is fine.
    Device(DeviceError),
    /// Timeout or transport failure: the connection must go.
    Link(DeviceError),
}

/// Runs one Modbus call under a timeout, sorting failures into the device's and the link's.
async fn call<T>(
    limit: Duration,
    latency: &Histogram,
    fut: impl Future<Output = tokio_modbus::Result<T>>,
) -> Result<T, CallError> {
    let sent = Instant::now();
    let result = timeout(limit, fut).await;
    latency.observe(sent.elapsed());
    match result {
        Err(_) => Err(CallError::Link(DeviceError::Timeout(limit))),
        Ok(Err(e)) => Err(CallError::Link(DeviceError::Transport(e.to_string()))),
        Ok(Ok(Err(code))) => Err(CallError::Device(DeviceError::Exception(code))),
        Ok(Ok(Ok(v))) => Ok(v),
    }
}

impl Endpoint {
    fn new(
        site: Arc<Site>,
        (host, port): (String, u16),
        devices: Vec<DeviceId>,
        timing: Timing,
        desired: watch::Receiver<Desired>,
        reports: mpsc::Sender<Report>,
        telemetry: Arc<Telemetry>,
    ) -> Endpoint {
        let mut pdus = Vec::new();
        let mut meters = Vec::new();
        for d in devices {
            match d {
                DeviceId::Pdu(p) => pdus.push(PduPlan {
                    id: p,
                    runs: runs(&site, p),
                    relays: None,
                    unverified: BTreeMap::new(),
                }),
                DeviceId::Meter(m) => meters.push(m),
            }
        }
        Endpoint {
            site,
            host,
            port,
            pdus,
            meters,
            timing,
            desired,
            reports,
            ctx: None,
            failures: 0,
            next_attempt: Instant::now(),
            retry: BTreeMap::new(),
            telemetry,
        }
    }

    async fn run(mut self, phase: Duration, cancel: CancellationToken) {
        let mut poll = tokio::time::interval_at(Instant::now() + phase, self.timing.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Cancel-safe: each branch only wakes us; the work happens after the select.
            let plan_changed = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = poll.tick() => false,
                r = self.desired.changed() => {
                    if r.is_err() {
                        return;
                    }
                    true
                }
            };
            if !self.ensure_connected().await {
                continue;
            }
            if plan_changed {
                self.actuate().await;
            } else {
                self.poll_all().await;
                self.actuate().await;
            }
        }
    }

    async fn ensure_connected(&mut self) -> bool {
        if self.ctx.is_some() {
            return true;
        }
        if Instant::now() < self.next_attempt {
            return false;
        }
        let limit = self.connect_timeout();
        let result = match self.resolve().await {
            Ok(addr) => match timeout(limit, tcp::connect(addr)).await {
                Ok(Ok(ctx)) => Ok(ctx),
                Ok(Err(e)) => Err(DeviceError::Transport(e.to_string())),
                Err(_) => Err(DeviceError::Timeout(limit)),
            },
            Err(e) => Err(e),
        };
        match result {
            Ok(ctx) => {
                self.ctx = Some(ctx);
                self.failures = 0;
                true
            }
            Err(e) => {
                self.link_down(e).await;
                false
            }
        }
    }

    fn connect_timeout(&self) -> Duration {
        let pdus = self
            .pdus
            .iter()
            .map(|p| self.site.pdu(p.id).endpoint.timeout);
        let meters = self
            .meters
            .iter()
            .map(|m| self.site.meter(*m).endpoint.timeout);
        pdus.chain(meters).max().unwrap_or(Duration::from_secs(1))
    }

    async fn resolve(&mut self) -> Result<SocketAddr, DeviceError> {
        if let Ok(ip) = self.host.parse() {
            return Ok(SocketAddr::new(ip, self.port));
        }
        tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| DeviceError::Transport(format!("cannot resolve {}: {e}", self.host)))?
            .next()
            .ok_or_else(|| DeviceError::Transport(format!("{} resolves to no address", self.host)))
    }

    /// Drops the connection, reports every device behind it faulted, and schedules the next
    /// attempt with exponential backoff and jitter.
    async fn link_down(&mut self, error: DeviceError) {
        self.ctx = None;
        self.failures = self.failures.saturating_add(1);
        self.next_attempt = Instant::now() + self.timing.backoff.delay(self.failures);
        if self.failures == 1 || self.failures.is_power_of_two() {
            tracing::warn!(endpoint = %format!("{}:{}", self.host, self.port), failures = self.failures, %error, "modbus endpoint unreachable");
        }
        let at = Instant::now();
        let devices: Vec<DeviceId> = self
            .pdus
            .iter()
            .map(|p| DeviceId::Pdu(p.id))
            .chain(self.meters.iter().map(|m| DeviceId::Meter(*m)))
            .collect();
        for device in devices {
            self.report(Report::Fault {
                device,
                at,
                error: error.clone(),
            })
            .await;
        }
        for p in &mut self.pdus {
            p.relays = None;
        }
    }

    async fn report(&mut self, r: Report) {
        // The engine drains reports continuously; if it is gone we are shutting down.
        let _ = self.reports.send(r).await;
    }

    async fn poll_all(&mut self) {
        for i in 0..self.meters.len() {
            if self.ctx.is_none() {
                return;
            }
            let meter = self.meters[i];
            if self.backing_off(DeviceId::Meter(meter)) {
                continue;
            }
            match self.read_meter(meter).await {
                Ok(kw) => {
                    self.retry.remove(&DeviceId::Meter(meter));
                    self.report(Report::Meter {
                        meter,
                        at: Instant::now(),
                        kw,
                    })
                    .await
                }
                Err(e) => self.device_failed(DeviceId::Meter(meter), e).await,
            }
        }
        for i in 0..self.pdus.len() {
            if self.ctx.is_none() {
                return;
            }
            // A new plan goes before the rest of the poll (behind a gateway with many PDUs).
            if self.desired.has_changed().unwrap_or(false) {
                self.actuate().await;
            }
            let pdu = self.pdus[i].id;
            if self.backing_off(DeviceId::Pdu(pdu)) {
                continue;
            }
            match self.read_pdu(pdu).await {
                Ok((relays, power_w)) => {
                    self.retry.remove(&DeviceId::Pdu(pdu));
                    let at = Instant::now();
                    let stuck = self.verify(i, &relays, at);
                    self.pdus[i].relays = Some(relays.clone());
                    self.report(Report::Pdu {
                        pdu,
                        at,
                        relays,
                        power_w,
                    })
                    .await;
                    // After the reading, so that the fault is what the engine keeps.
                    if !stuck.is_empty() {
                        self.report(Report::Fault {
                            device: DeviceId::Pdu(pdu),
                            at,
                            error: DeviceError::Disagrees(stuck),
                        })
                        .await;
                    }
                }
                Err(e) => self.device_failed(DeviceId::Pdu(pdu), e).await,
            }
        }
    }

    /// Compares a read-back with outstanding writes: outlets that followed are verified; those
    /// still different after the grace period are returned as disagreeing.
    fn verify(&mut self, i: usize, relays: &[bool], at: Instant) -> Vec<u16> {
        let grace = self.timing.verify_grace;
        let pdu = &mut self.pdus[i];
        pdu.unverified
            .retain(|outlet, (want, _)| relays.get(usize::from(*outlet) - 1) != Some(want));
        pdu.unverified
            .iter()
            .filter(|(_, (_, since))| at.duration_since(*since) > grace)
            .map(|(o, _)| *o)
            .collect()
    }

    /// True while `device` waits out its backoff after a failure.
    fn backing_off(&self, device: DeviceId) -> bool {
        self.retry
            .get(&device)
            .is_some_and(|(_, at)| Instant::now() < *at)
    }

    async fn device_failed(&mut self, device: DeviceId, e: CallError) {
        match e {
            CallError::Link(error) => self.link_down(error).await,
            CallError::Device(error) => {
                let failures = self
                    .retry
                    .get(&device)
                    .map_or(1, |(n, _)| n.saturating_add(1));
                let next = Instant::now() + self.timing.backoff.delay(failures);
                self.retry.insert(device, (failures, next));
                self.report(Report::Fault {
                    device,
                    at: Instant::now(),
                    error,
                })
                .await
            }
        }
    }

    async fn read_meter(&mut self, meter: MeterId) -> Result<f64, CallError> {
        let m = self.site.meter(meter);
        let map = m.profile.active_power;
        let words = self
            .read_words(
                m.endpoint.unit_id,
                m.endpoint.timeout,
                map.table,
                map.address,
                map.encoding.words(),
            )
            .await?;
        let v = map.decode(&words).ok_or_else(|| {
            CallError::Device(DeviceError::Malformed(
                "a power value that is not a finite number".into(),
            ))
        })?;
        let kw = map.to_watts(v) / 1000.0;
        if !(-1e7..=1e7).contains(&kw) {
            return Err(CallError::Device(DeviceError::Malformed(format!(
                "an absurd power of {kw} kW"
            ))));
        }
        Ok(kw)
    }

    async fn read_pdu(&mut self, pdu: PduId) -> Result<(Vec<bool>, Vec<f64>), CallError> {
        let site = self.site.clone();
        let p = site.pdu(pdu);
        let (unit, limit, n) = (p.endpoint.unit_id, p.endpoint.timeout, p.outlets);
        let relays = self.read_relays(unit, limit, &p.profile.relays, n).await?;
        let block = p.profile.outlet_power;
        let span = block.span(n).ok_or_else(|| {
            CallError::Device(DeviceError::Malformed(
                "outlet power block out of range".into(),
            ))
        })?;
        let words = self
            .read_words(unit, limit, block.table, block.address, span)
            .await?;
        let mut power_w = Vec::with_capacity(usize::from(n));
        for outlet in 1..=n {
            let map = block.outlet(outlet);
            let offset = usize::from(map.address - block.address);
            let w = words
                .get(offset..)
                .and_then(|w| map.decode(w))
                .map(|v| map.to_watts(v))
                .ok_or_else(|| {
                    CallError::Device(DeviceError::Malformed(format!(
                        "no power value for outlet {outlet}"
                    )))
                })?;
            power_w.push(w);
        }
        Ok((relays, power_w))
    }

    async fn read_relays(
        &mut self,
        unit: u8,
        limit: Duration,
        map: &site_config::profile::RelayMap,
        n: u16,
    ) -> Result<Vec<bool>, CallError> {
        let ctx = self
            .ctx
            .as_mut()
            .ok_or_else(|| CallError::Link(DeviceError::Transport("not connected".into())))?;
        ctx.set_slave(Slave(unit));
        let latency = &self.telemetry.modbus;
        let states = match map.table {
            RelayTable::Coil => call(limit, latency, ctx.read_coils(map.address, n)).await?,
            RelayTable::Holding => call(limit, latency, ctx.read_holding_registers(map.address, n))
                .await?
                .into_iter()
                .map(|w| w == map.on_value)
                .collect(),
        };
        if states.len() < usize::from(n) {
            return Err(CallError::Device(DeviceError::Malformed(format!(
                "{} relay states for {n} outlets",
                states.len()
            ))));
        }
        Ok(states[..usize::from(n)].to_vec())
    }

    /// Reads `count` registers, in as many requests as Modbus allows.
    async fn read_words(
        &mut self,
        unit: u8,
        limit: Duration,
        table: RegisterTable,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, CallError> {
        let ctx = self
            .ctx
            .as_mut()
            .ok_or_else(|| CallError::Link(DeviceError::Transport("not connected".into())))?;
        ctx.set_slave(Slave(unit));
        let latency = &self.telemetry.modbus;
        let mut out = Vec::with_capacity(usize::from(count));
        let mut done: u16 = 0;
        while done < count {
            let n = (count - done).min(MAX_READ_WORDS);
            let addr = address.wrapping_add(done);
            let chunk = match table {
                RegisterTable::Input => {
                    call(limit, latency, ctx.read_input_registers(addr, n)).await?
                }
                RegisterTable::Holding => {
                    call(limit, latency, ctx.read_holding_registers(addr, n)).await?
                }
            };
            if chunk.len() != usize::from(n) {
                return Err(CallError::Device(DeviceError::Malformed(format!(
                    "{} registers for {n}",
                    chunk.len()
                ))));
            }
            out.extend(chunk);
            done += n;
        }
        Ok(out)
    }

    /// Writes whatever differs between the desired state and the relays as last read.
    async fn actuate(&mut self) {
        let desired = self.desired.borrow_and_update().clone();
        let Some(want) = desired.asics else {
            return;
        };
        for i in 0..self.pdus.len() {
            if self.ctx.is_none() {
                return;
            }
            if self.backing_off(DeviceId::Pdu(self.pdus[i].id)) {
                continue;
            }
            if let Err(e) = self.write_pdu(i, &want).await {
                let pdu = self.pdus[i].id;
                self.device_failed(DeviceId::Pdu(pdu), e).await;
            }
        }
    }

    /// Writes the runs of one PDU that need it.
    async fn write_pdu(&mut self, i: usize, want: &[bool]) -> Result<(), CallError> {
        // The site is shared and read-only: hold it by Arc rather than copying the PDU.
        let site = self.site.clone();
        let p = site.pdu(self.pdus[i].id);
        let relays = p.profile.relays;
        let (unit, limit) = (p.endpoint.unit_id, p.endpoint.timeout);
        let retry_after = self.timing.verify_grace;
        let now = Instant::now();
        let plan = &self.pdus[i];
        // An outlet needs writing if it differs from what was read and no write for the same
        // state is still waiting to take effect.
        let needs = |asic: AsicId, outlet: u16| -> Option<bool> {
            let target = *want.get(asic.0 as usize)?;
            let seen = plan
                .relays
                .as_ref()
                .and_then(|r| r.get(usize::from(outlet) - 1).copied());
            // What the relay should be now: the last write not yet read back, else the reading.
            let pending = plan.unverified.get(&outlet);
            if pending.map(|(w, _)| *w).or(seen) != Some(target) {
                return Some(target);
            }
            match pending {
                // Written but still not seen to follow: write again (a lost or ignored write).
                Some((_, since)) if now.duration_since(*since) >= retry_after => Some(target),
                _ => None,
            }
        };
        let mut writes: Vec<(u16, Vec<bool>)> = Vec::new();
        for run in &plan.runs {
            let outlets = (run.first_outlet..).zip(&run.asics);
            let changed: Vec<(u16, bool)> = outlets
                .clone()
                .filter_map(|(o, a)| Some((o, needs(*a, o)?)))
                .collect();
            if changed.is_empty() {
                continue;
            }
            match relays.write {
                WriteMode::Multiple => {
                    // The whole run, absolute: outlets that already agree are written unchanged.
                    let states = outlets
                        .map(|(_, a)| want.get(a.0 as usize).copied().unwrap_or(true))
                        .collect();
                    writes.push((run.first_outlet, states));
                }
                WriteMode::Single => writes.extend(changed.into_iter().map(|(o, s)| (o, vec![s]))),
            }
        }
        if writes.is_empty() {
            return Ok(());
        }
        let ctx = self
            .ctx
            .as_mut()
            .ok_or_else(|| CallError::Link(DeviceError::Transport("not connected".into())))?;
        ctx.set_slave(Slave(unit));
        let latency = &self.telemetry.modbus;
        for (first, states) in &writes {
            let addr = relays.address + (first - 1);
            match (relays.table, states.as_slice()) {
                (RelayTable::Coil, [one]) if relays.write == WriteMode::Single => {
                    call(limit, latency, ctx.write_single_coil(addr, *one)).await?
                }
                (RelayTable::Coil, many) => {
                    call(limit, latency, ctx.write_multiple_coils(addr, many)).await?
                }
                (RelayTable::Holding, [one]) if relays.write == WriteMode::Single => {
                    let word = if *one {
                        relays.on_value
                    } else {
                        relays.off_value
                    };
                    call(limit, latency, ctx.write_single_register(addr, word)).await?
                }
                (RelayTable::Holding, many) => {
                    let words: Vec<u16> = many
                        .iter()
                        .map(|s| {
                            if *s {
                                relays.on_value
                            } else {
                                relays.off_value
                            }
                        })
                        .collect();
                    call(limit, latency, ctx.write_multiple_registers(addr, &words)).await?
                }
            }
        }
        let plan = &mut self.pdus[i];
        let at = Instant::now();
        for (first, states) in &writes {
            for (k, s) in states.iter().enumerate() {
                let outlet = first + k as u16;
                let seen = plan
                    .relays
                    .as_ref()
                    .and_then(|r| r.get(usize::from(outlet) - 1).copied());
                // The newest write is the one to verify: a write that undoes an earlier one
                // before it was read back must not leave the earlier one waiting forever.
                if seen == Some(*s) {
                    plan.unverified.remove(&outlet);
                } else {
                    plan.unverified.insert(outlet, (*s, at));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Site {
        site_config::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/sites/small.toml"
        ))
        .unwrap()
    }

    #[test]
    fn runs_never_cover_gpu_feeds_or_empty_outlets() {
        let site = small();
        let by_name = |n: &str| match site.device_by_name(n) {
            Some(DeviceId::Pdu(p)) => p,
            _ => panic!("{n}"),
        };
        assert_eq!(
            runs(&site, by_name("pdu-gpu")),
            vec![],
            "a GPU PDU has nothing to write"
        );
        let pdu4 = runs(&site, by_name("pdu-4"));
        assert_eq!(pdu4.len(), 1);
        assert_eq!(
            (pdu4[0].first_outlet, pdu4[0].asics.len()),
            (1, 6),
            "outlets 7-8 are empty"
        );
        for pdu in &site.pdus {
            for run in runs(&site, pdu.id) {
                for (k, asic) in run.asics.iter().enumerate() {
                    let a = site.asic(*asic);
                    assert_eq!((a.pdu, a.outlet), (pdu.id, run.first_outlet + k as u16));
                    for rack in &site.gpu_racks {
                        assert!(!rack.feeds.contains(&(pdu.id, a.outlet)));
                    }
                }
            }
        }
    }
}
