//! The whole simulated site without sockets or a clock: every device of a site file, the
//! physics that ties them together (GPU racks feed their PDU outlets, the site meter sums
//! everything), and how a faulted device answers. [`crate::server`] serves it over Modbus TCP
//! in real time; a deterministic simulation drives it on virtual time.
//!
//! ```text
//!   GPU rack meters ──▶ their feed outlets ──┐
//!   PDUs (ASIC outlets) ─────────────────────┼──▶ site meter = ASICs + GPU racks + other load
//!   other load (base, optional swing) ───────┘
//! ```

use std::f64::consts::TAU;

use site_config::{DeviceId, Faults, Site};
use tokio_modbus::{ExceptionCode, Request, Response};

use crate::device::{Load, MeterDevice, MeterRole, PduDevice, Physics};
use crate::handler::{self, Device};
use crate::server::SimError;

/// How a device answers one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Response(Response),
    Exception(ExceptionCode),
    /// The request is read and never answered (the client times out).
    NoReply,
    /// The device drops the connection instead of answering.
    Disconnect,
}

/// Every device of `site`, as found at power-up, in [`Site::devices`] order.
pub fn devices(site: &Site) -> Result<Vec<Device>, SimError> {
    let sim = &site.sim;
    let physics = Physics {
        relay_delay_s: sim.relay_delay.as_secs_f64(),
        sequence_step_s: sim.sequence_step.map(|d| d.as_secs_f64()),
        boot_ramp_s: sim.boot_ramp.as_secs_f64(),
        noise: sim.noise_pct / 100.0,
    };
    let mut loads: Vec<Vec<Load>> = site
        .pdus
        .iter()
        .map(|p| vec![Load::Empty; usize::from(p.outlets)])
        .collect();
    for a in &site.asics {
        if let Some(slot) = loads[a.pdu.0 as usize].get_mut(usize::from(a.outlet) - 1) {
            *slot = Load::Asic { rated_w: a.rated_w };
        }
    }
    for (r, rack) in site.gpu_racks.iter().enumerate() {
        let feeds = rack.feeds.len() as u16;
        for &(pdu, outlet) in &rack.feeds {
            if let Some(slot) = loads[pdu.0 as usize].get_mut(usize::from(outlet) - 1) {
                *slot = Load::GpuFeed {
                    rack: r as u16,
                    feeds,
                };
            }
        }
    }
    let mut out = Vec::new();
    for id in site.devices() {
        let seed = sim
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(out.len() as u64);
        let faults = faults_of(site, id);
        out.push(match id {
            DeviceId::Pdu(p) => {
                let pdu = site.pdu(p);
                let mut dev =
                    PduDevice::new(pdu.profile.clone(), &loads[p.0 as usize], physics, seed)
                        .map_err(|e| SimError::Device {
                            device: pdu.name.clone(),
                            reason: e.to_string(),
                        })?;
                dev.set_stuck(stuck_mask(&faults.stuck_outlets));
                Device::Pdu(dev)
            }
            DeviceId::Meter(m) => {
                let meter = site.meter(m);
                let role = if m == site.site_meter {
                    MeterRole::Site
                } else if let Some(r) = site.gpu_racks.iter().position(|g| g.meter == m) {
                    MeterRole::GpuRack(sim.gpu[r])
                } else {
                    MeterRole::Idle
                };
                Device::Meter(MeterDevice::new(
                    meter.profile.clone(),
                    role,
                    sim.frequency_hz,
                    physics.noise,
                    seed,
                ))
            }
        });
    }
    Ok(out)
}

/// The faults the site file gives device `id` from start-up.
pub fn faults_of(site: &Site, id: DeviceId) -> Faults {
    site.sim
        .faults
        .iter()
        .find(|(d, _)| *d == id)
        .map(|(_, f)| f.clone())
        .unwrap_or_default()
}

/// The outlets of `outlets` (1-based) as a bit mask (bit n-1 for outlet n).
pub fn stuck_mask(outlets: &[u16]) -> u64 {
    outlets
        .iter()
        .filter(|o| (1..=64).contains(*o))
        .fold(0, |m, o| m | 1u64 << (o - 1))
}

/// What ties the devices together: which are GPU rack meters, which is the site meter, and
/// the load no device meters.
#[derive(Debug, Clone)]
pub struct SitePhysics {
    pdus: usize,
    rack_meters: Vec<usize>,
    site_meter: usize,
    base_kw: f64,
    swing_kw: f64,
    swing_period_s: f64,
    clock: f64,
    gpu_kw: Vec<f64>,
}

impl SitePhysics {
    pub fn new(site: &Site) -> Self {
        let pdus = site.pdus.len();
        SitePhysics {
            pdus,
            rack_meters: site
                .gpu_racks
                .iter()
                .map(|g| pdus + g.meter.0 as usize)
                .collect(),
            site_meter: pdus + site.site_meter.0 as usize,
            base_kw: site.sim.base_load_kw,
            swing_kw: site.sim.other_swing_kw,
            swing_period_s: site.sim.other_period.as_secs_f64().max(1e-3),
            clock: 0.0,
            gpu_kw: vec![0.0; site.gpu_racks.len()],
        }
    }

    /// The load no device meters at the present time: the base, and its swing.
    pub fn other_kw(&self) -> f64 {
        self.base_kw + self.swing_kw * (TAU * self.clock / self.swing_period_s).sin()
    }

    /// Advances every device by `dt` seconds: GPU racks first, then the PDUs whose outlets feed
    /// them, then the site meter, which sees the sum of everything. `device(i)` lends device
    /// `i` (in [`Site::devices`] order) for the step.
    pub fn advance<D: std::ops::DerefMut<Target = Device>>(
        &mut self,
        n: usize,
        mut device: impl FnMut(usize) -> D,
        dt: f64,
    ) {
        if dt.is_finite() && dt > 0.0 {
            self.clock += dt;
        }
        for (r, &i) in self.rack_meters.iter().enumerate() {
            if let Device::Meter(m) = &mut *device(i) {
                m.step(dt);
                self.gpu_kw[r] = m.power_kw();
            }
        }
        let mut asic_w = 0.0;
        for i in 0..self.pdus {
            if let Device::Pdu(p) = &mut *device(i) {
                p.step(dt, &self.gpu_kw);
                asic_w += p.asic_w();
            }
        }
        let total_kw = asic_w / 1000.0 + self.gpu_kw.iter().sum::<f64>() + self.other_kw();
        for i in self.pdus..n {
            if let Device::Meter(m) = &mut *device(i) {
                if i == self.site_meter {
                    m.set_measured_kw(total_kw);
                }
                if !matches!(m.role, MeterRole::GpuRack(_)) {
                    m.step(dt);
                }
            }
        }
    }

    /// The GPU racks' draw at the last step, kW.
    pub fn gpu_kw(&self) -> f64 {
        self.gpu_kw.iter().sum()
    }
}

/// How `device` (with `faults`, and a copy of itself from when it froze, if it did) answers
/// `req`. Latency is the caller's: it is time, and this has no clock.
pub fn answer(
    device: &mut Device,
    frozen: Option<&Device>,
    faults: &Faults,
    req: &Request<'_>,
) -> Answer {
    if faults.disconnect {
        return Answer::Disconnect;
    }
    if faults.no_reply {
        return Answer::NoReply;
    }
    if let Some(code) = faults.exception {
        return Answer::Exception(ExceptionCode::new(code));
    }
    let write = handler::is_write(req);
    if let (Some(code), true) = (faults.write_exception, write) {
        return Answer::Exception(ExceptionCode::new(code));
    }
    let result = match frozen {
        Some(snapshot) if !write => handler::handle(&mut snapshot.clone(), req),
        _ => handler::handle(device, req),
    };
    match result {
        Ok(r) => Answer::Response(r),
        Err(code) => Answer::Exception(code),
    }
}
