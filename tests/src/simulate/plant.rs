//! firmware-sim's devices on virtual time: built by `firmware_sim::plant::devices`, answering
//! through `firmware_sim::plant::answer` (faults included), stepped lazily, each device on its
//! own clock, so a 12,000-ASIC site costs only what is read.

use std::f64::consts::TAU;
use std::sync::Arc;

use firmware_sim::device::{Load, MeterRole};
use firmware_sim::handler::{self, Device};
use firmware_sim::plant::{self, Answer};
use site_config::{DeviceId, Faults, Site};
use tokio_modbus::Request;

/// A relay that moved, for the invariants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Toggle {
    pub asic: usize,
    pub on: bool,
    pub at: f64,
}

pub struct Plant {
    site: Arc<Site>,
    devices: Vec<Device>,
    /// Device time (seconds) each device has been stepped to.
    clocks: Vec<f64>,
    pub faults: Vec<Faults>,
    frozen: Vec<Option<Device>>,
    /// The device's port refuses connections.
    pub closed: Vec<bool>,
    /// Write requests each device received.
    pub writes: Vec<u64>,
    pdus: usize,
    site_meter: usize,
    /// Device index of each GPU rack's meter.
    rack_meters: Vec<usize>,
    /// Load no device meters: its base (changed by the script) and its swing.
    pub other_base_kw: f64,
    other_swing_kw: f64,
    other_period_s: f64,
    /// Per ASIC: its relay as last seen, and where it is (device index, outlet index).
    relays: Vec<bool>,
    asic_at: Vec<(usize, usize)>,
    /// Per PDU: its ASICs (index, outlet index).
    asics_of: Vec<Vec<(usize, usize)>>,
    /// Relays that moved, not yet taken by the invariants.
    pub toggles: Vec<Toggle>,
    /// Per PDU: its relay movements as last seen, and whether it feeds a GPU rack.
    moves: Vec<u64>,
    feeds_gpu: Vec<bool>,
    /// The racks' draw, reused from step to step.
    gpu_kw: Vec<f64>,
}

impl Plant {
    pub fn new(site: Arc<Site>) -> Plant {
        let devices = plant::devices(&site).expect("the generated site builds");
        let n = devices.len();
        let pdus = site.pdus.len();
        let faults = site.devices().map(|d| plant::faults_of(&site, d)).collect();
        let asic_at: Vec<(usize, usize)> = site
            .asics
            .iter()
            .map(|a| (a.pdu.0 as usize, usize::from(a.outlet) - 1))
            .collect();
        let mut asics_of = vec![Vec::new(); pdus];
        for (k, &(d, o)) in asic_at.iter().enumerate() {
            asics_of[d].push((k, o));
        }
        let feeds_gpu = devices
            .iter()
            .take(pdus)
            .map(|d| matches!(d, Device::Pdu(p) if p.feeds_gpu()))
            .collect();
        Plant {
            moves: vec![0; pdus],
            feeds_gpu,
            gpu_kw: Vec::with_capacity(site.gpu_racks.len()),
            clocks: vec![0.0; n],
            faults,
            frozen: vec![None; n],
            closed: vec![false; n],
            writes: vec![0; n],
            pdus,
            site_meter: pdus + site.site_meter.0 as usize,
            rack_meters: site
                .gpu_racks
                .iter()
                .map(|g| pdus + g.meter.0 as usize)
                .collect(),
            other_base_kw: site.sim.base_load_kw,
            other_swing_kw: site.sim.other_swing_kw,
            other_period_s: site.sim.other_period.as_secs_f64().max(1e-3),
            relays: vec![true; site.asics.len()],
            asic_at,
            asics_of,
            toggles: Vec::new(),
            devices,
            site,
        }
    }

    pub fn index(&self, d: DeviceId) -> usize {
        match d {
            DeviceId::Pdu(p) => p.0 as usize,
            DeviceId::Meter(m) => self.pdus + m.0 as usize,
        }
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    fn other_kw(&self, t: f64) -> f64 {
        (self.other_base_kw + self.other_swing_kw * (TAU * t / self.other_period_s).sin()).max(0.0)
    }

    /// Steps device `i` (a meter that is not the site meter, or a PDU) to `t`.
    fn step(&mut self, i: usize, t: f64) {
        let dt = t - self.clocks[i];
        if dt <= 0.0 {
            return;
        }
        if i < self.pdus {
            let mut gpu = std::mem::take(&mut self.gpu_kw);
            gpu.clear();
            if self.feeds_gpu[i] {
                for r in 0..self.rack_meters.len() {
                    gpu.push(self.rack_kw(r, t));
                }
            }
            if let Device::Pdu(p) = &mut self.devices[i] {
                p.step(dt, &gpu);
            }
            self.gpu_kw = gpu;
            self.clocks[i] = t;
            self.note_toggles(i, t);
        } else if let Device::Meter(m) = &mut self.devices[i] {
            m.step(dt);
            self.clocks[i] = t;
        }
    }

    fn rack_kw(&mut self, r: usize, t: f64) -> f64 {
        let i = self.rack_meters[r];
        self.step(i, t);
        match &self.devices[i] {
            Device::Meter(m) => m.power_kw(),
            Device::Pdu(_) => 0.0,
        }
    }

    fn note_toggles(&mut self, pdu: usize, t: f64) {
        let Device::Pdu(p) = &self.devices[pdu] else {
            return;
        };
        if p.moves() == self.moves[pdu] {
            return;
        }
        self.moves[pdu] = p.moves();
        for &(asic, k) in &self.asics_of[pdu] {
            let on = p.outlets().get(k).is_some_and(|o| o.relay_on);
            if on != self.relays[asic] {
                self.relays[asic] = on;
                self.toggles.push(Toggle { asic, on, at: t });
            }
        }
    }

    /// Every device stepped to `t`; the site meter set to the sum of everything.
    pub fn settle(&mut self, t: f64) {
        for i in 0..self.pdus {
            // A PDU whose relays and ASICs are at rest draws what it drew at its last step
            // (its outlets' noise is drawn again when it is read).
            if !matches!(&self.devices[i], Device::Pdu(p) if p.is_steady() && !self.feeds_gpu[i]) {
                self.step(i, t);
            }
        }
        for r in 0..self.rack_meters.len() {
            self.rack_kw(r, t);
        }
        let total = self.total_kw(t);
        let i = self.site_meter;
        let dt = (t - self.clocks[i]).max(0.0);
        if let Device::Meter(m) = &mut self.devices[i] {
            m.set_measured_kw(total);
            m.step(dt);
            self.clocks[i] = t;
        }
        for i in self.pdus..self.devices.len() {
            self.step(i, t);
        }
    }

    /// What the site draws at `t` (the devices stepped to it), kW.
    fn total_kw(&self, t: f64) -> f64 {
        let asic_w: f64 = self
            .devices
            .iter()
            .take(self.pdus)
            .map(|d| match d {
                Device::Pdu(p) => p.asic_w(),
                Device::Meter(_) => 0.0,
            })
            .sum();
        let gpu: f64 = self
            .rack_meters
            .iter()
            .map(|&i| match &self.devices[i] {
                Device::Meter(m) => m.power_kw(),
                Device::Pdu(_) => 0.0,
            })
            .sum();
        asic_w / 1000.0 + gpu + self.other_kw(t)
    }

    /// The site's true draw at `t`, kW (no meter noise on the sum itself).
    pub fn site_kw(&mut self, t: f64) -> f64 {
        self.settle(t);
        self.total_kw(t)
    }

    /// ASIC `k`'s power at the last step, W.
    pub fn asic_w(&self, k: usize) -> f64 {
        let (d, o) = self.asic_at[k];
        match &self.devices[d] {
            Device::Pdu(p) => p.outlets().get(o).map_or(0.0, |x| x.power_w),
            Device::Meter(_) => 0.0,
        }
    }

    pub fn relay_on(&self, k: usize) -> bool {
        self.relays[k]
    }

    /// How device `i` answers `req` at `t`.
    pub fn answer(&mut self, i: usize, req: &Request<'_>, t: f64) -> Answer {
        if i == self.site_meter {
            self.settle(t);
        } else {
            self.step(i, t);
        }
        if handler::is_write(req) {
            self.writes[i] += 1;
        }
        let answer = plant::answer(
            &mut self.devices[i],
            self.frozen[i].as_ref(),
            &self.faults[i],
            req,
        );
        if i < self.pdus {
            // A write with no relay delay moves relays at once.
            if let Device::Pdu(p) = &mut self.devices[i] {
                p.step(0.0, &[]);
            }
            self.note_toggles(i, t);
        }
        answer
    }

    /// Gives device `i` these faults from `t`.
    pub fn set_faults(&mut self, i: usize, faults: Faults, t: f64) {
        self.step(i, t);
        if let Device::Pdu(p) = &mut self.devices[i] {
            p.set_stuck(plant::stuck_mask(&faults.stuck_outlets));
        }
        self.frozen[i] = faults.frozen.then(|| self.devices[i].clone());
        self.faults[i] = faults;
    }

    /// Relay commands received by outlets that feed GPU racks, and writes received by meters:
    /// both must stay zero.
    pub fn protected_writes(&self) -> u64 {
        let meters: u64 = self.writes[self.pdus..].iter().sum();
        let feeds: u64 = self
            .devices
            .iter()
            .take(self.pdus)
            .map(|d| match d {
                Device::Pdu(p) => p
                    .outlets()
                    .iter()
                    .filter(|o| matches!(o.load, Load::GpuFeed { .. } | Load::Empty))
                    .map(|o| u64::from(o.commands))
                    .sum(),
                Device::Meter(_) => 0,
            })
            .sum();
        meters + feeds
    }

    /// The role of meter device `i` (for fault choices).
    pub fn is_site_meter(&self, i: usize) -> bool {
        i == self.site_meter
    }

    pub fn is_gpu_meter(&self, i: usize) -> bool {
        self.rack_meters.contains(&i)
    }

    pub fn is_pdu(&self, i: usize) -> bool {
        i < self.pdus
    }

    pub fn site(&self) -> &Site {
        &self.site
    }

    /// Not used by the invariants, but handy in a failure report.
    pub fn describe(&self, i: usize) -> String {
        let id = self.site.devices().nth(i);
        let role = match (&self.devices[i], id) {
            (Device::Meter(m), _) if matches!(m.role, MeterRole::Site) => "site meter",
            (Device::Meter(_), _) => "meter",
            (Device::Pdu(_), _) => "PDU",
        };
        format!("{role} {}", id.map_or("?", |d| self.site.device_name(d)))
    }
}
