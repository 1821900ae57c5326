//! Device physics, free of I/O: outlet relays with an operate delay and optional sequencing,
//! outlet power that follows the relay with a boot ramp and noise, meters.
//!
//! Time only moves through [`PduDevice::step`] and [`MeterDevice::step`], so every behaviour
//! is tested by stepping a device by hand. Storage is fixed-capacity (`heapless`), as in
//! firmware: a PDU holds at most [`MAX_OUTLETS`] outlets and never allocates after creation.

use std::f64::consts::TAU;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use site_config::GpuSim;
use site_config::profile::{MeterProfile, PduProfile};

pub const MAX_OUTLETS: usize = site_config::MAX_OUTLETS_PER_PDU as usize;

/// What is plugged into an outlet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    Empty,
    Asic {
        rated_w: f64,
    },
    /// One of the outlets feeding GPU rack `rack`; the rack's power is split evenly over `feeds`.
    GpuFeed {
        rack: u16,
        feeds: u16,
    },
}

/// How a PDU's relays and loads behave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Physics {
    /// Seconds from a command to the relay moving.
    pub relay_delay_s: f64,
    /// When set, relays move one at a time, this many seconds apart.
    pub sequence_step_s: Option<f64>,
    /// Seconds for an ASIC to ramp from 0 to rated power after its relay closes.
    pub boot_ramp_s: f64,
    /// Noise as a fraction of the value (0.01 = ±1 %).
    pub noise: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Pending {
    on: bool,
    due: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outlet {
    pub load: Load,
    /// The relay's actual state (what a read returns).
    pub relay_on: bool,
    pending: Option<Pending>,
    /// Device time at which the relay last closed.
    on_since: f64,
    /// Measured active power.
    pub power_w: f64,
    /// For a GPU feed: its share of the rack's draw at the last step that knew it.
    feed_w: f64,
    /// Times the relay actually moved.
    pub toggles: u32,
    /// Relay commands received for this outlet.
    pub commands: u32,
}

/// The capacity of a device's fixed storage was exceeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a PDU holds at most {MAX_OUTLETS} outlets")]
pub struct CapacityError;

#[derive(Debug, Clone)]
pub struct PduDevice {
    pub profile: Arc<PduProfile>,
    outlets: heapless::Vec<Outlet, MAX_OUTLETS>,
    physics: Physics,
    /// Device time in seconds since power-up.
    clock: f64,
    /// With sequencing: the earliest time the sequencer can move the next relay.
    sequencer_free_at: f64,
    /// Outlets (bit n-1 for outlet n) whose relays are welded in place.
    stuck: u64,
    /// Relay movements since power-up, all outlets together.
    moves: u64,
    rng: SmallRng,
}

impl PduDevice {
    /// A PDU with every relay closed and every ASIC at full power, as found at start-up.
    pub fn new(
        profile: Arc<PduProfile>,
        loads: &[Load],
        physics: Physics,
        seed: u64,
    ) -> Result<Self, CapacityError> {
        let mut outlets = heapless::Vec::new();
        for &load in loads {
            let outlet = Outlet {
                load,
                relay_on: true,
                pending: None,
                on_since: f64::NEG_INFINITY,
                power_w: 0.0,
                feed_w: 0.0,
                toggles: 0,
                commands: 0,
            };
            outlets.push(outlet).map_err(|_| CapacityError)?;
        }
        let mut pdu = PduDevice {
            profile,
            outlets,
            physics,
            clock: 0.0,
            sequencer_free_at: 0.0,
            stuck: 0,
            moves: 0,
            rng: SmallRng::seed_from_u64(seed),
        };
        pdu.step(0.0, &[]);
        Ok(pdu)
    }

    pub fn outlet_count(&self) -> u16 {
        self.outlets.len() as u16
    }

    pub fn outlets(&self) -> &[Outlet] {
        &self.outlets
    }

    /// Outlet by 0-based index.
    pub fn outlet(&self, index: u16) -> Option<&Outlet> {
        self.outlets.get(usize::from(index))
    }

    /// Sets which outlets are stuck (bit n-1 for outlet n).
    pub fn set_stuck(&mut self, mask: u64) {
        self.stuck = mask;
    }

    /// Commands outlet `index` (0-based) on or off. The relay moves after the operate delay
    /// (and its turn in the sequence); a stuck relay accepts the command and never moves.
    /// Returns false if there is no such outlet.
    pub fn command(&mut self, index: u16, on: bool) -> bool {
        let clock = self.clock;
        let stuck = self.stuck & (1u64 << (index % 64)) != 0;
        let Some(outlet) = self.outlets.get_mut(usize::from(index)) else {
            return false;
        };
        outlet.commands = outlet.commands.saturating_add(1);
        if stuck {
            return true;
        }
        let target_now = outlet.pending.map_or(outlet.relay_on, |p| p.on);
        if target_now == on {
            return true;
        }
        if outlet.relay_on == on {
            // A command that undoes a pending one before the relay moved.
            outlet.pending = None;
            return true;
        }
        let mut due = clock + self.physics.relay_delay_s;
        if let Some(step) = self.physics.sequence_step_s {
            due = due.max(self.sequencer_free_at);
            self.sequencer_free_at = due + step;
        }
        outlet.pending = Some(Pending { on, due });
        true
    }

    /// Advances device time by `dt` seconds: relays whose time has come move, and outlet power
    /// follows. `gpu_kw[r]` is GPU rack r's present draw, for the outlets that feed it; racks
    /// missing from it keep their last known draw.
    pub fn step(&mut self, dt: f64, gpu_kw: &[f64]) {
        if dt.is_finite() && dt > 0.0 {
            self.clock += dt;
        }
        let clock = self.clock;
        let Physics {
            boot_ramp_s, noise, ..
        } = self.physics;
        for outlet in self.outlets.iter_mut() {
            if let Some(p) = outlet.pending
                && p.due <= clock
            {
                outlet.pending = None;
                if outlet.relay_on != p.on {
                    outlet.relay_on = p.on;
                    outlet.toggles = outlet.toggles.saturating_add(1);
                    self.moves += 1;
                    if p.on {
                        outlet.on_since = p.due;
                    }
                }
            }
            let nominal_w = match (outlet.relay_on, outlet.load) {
                (false, _) | (_, Load::Empty) => 0.0,
                (true, Load::Asic { rated_w }) => {
                    let since = clock - outlet.on_since;
                    let ramp = if boot_ramp_s > 0.0 {
                        (since / boot_ramp_s).clamp(0.0, 1.0)
                    } else {
                        1.0
                    };
                    rated_w * ramp
                }
                (true, Load::GpuFeed { rack, feeds }) => {
                    if let Some(kw) = gpu_kw.get(usize::from(rack)) {
                        outlet.feed_w = kw * 1000.0 / f64::from(feeds.max(1));
                    }
                    outlet.feed_w
                }
            };
            outlet.power_w = jitter(&mut self.rng, nominal_w, noise);
        }
    }

    /// Relay movements since power-up, all outlets together: a cheap way to see that
    /// nothing moved since the last look.
    pub fn moves(&self) -> u64 {
        self.moves
    }

    /// True if an outlet feeds a GPU rack (its power follows the rack's draw).
    pub fn feeds_gpu(&self) -> bool {
        self.outlets
            .iter()
            .any(|o| matches!(o.load, Load::GpuFeed { .. }))
    }

    /// Sum of the outlets' power.
    pub fn total_w(&self) -> f64 {
        self.outlets.iter().map(|o| o.power_w).sum()
    }

    /// Power drawn by ASIC outlets only (what the site meter adds for this PDU).
    pub fn asic_w(&self) -> f64 {
        self.outlets
            .iter()
            .filter(|o| matches!(o.load, Load::Asic { .. }))
            .map(|o| o.power_w)
            .sum()
    }

    /// True when stepping would change nothing but the noise: no relay is waiting to move
    /// and no ASIC is still ramping up.
    pub fn is_steady(&self) -> bool {
        let ramp = self.physics.boot_ramp_s;
        self.outlets.iter().all(|o| {
            o.pending.is_none()
                && !(o.relay_on
                    && matches!(o.load, Load::Asic { .. })
                    && self.clock - o.on_since < ramp)
        })
    }

    /// True while any relay command is still waiting for its relay to move.
    pub fn is_settling(&self) -> bool {
        self.outlets.iter().any(|o| o.pending.is_some())
    }
}

/// What a meter measures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MeterRole {
    /// The grid connection: the sum of everything, set by the site each step.
    Site,
    /// A GPU rack: steady base plus training oscillation, untouched by anything else.
    GpuRack(GpuSim),
    /// A meter the site file declares but nothing is attached to.
    Idle,
}

#[derive(Debug, Clone)]
pub struct MeterDevice {
    pub profile: Arc<MeterProfile>,
    pub role: MeterRole,
    clock: f64,
    power_kw: f64,
    frequency_hz: f64,
    nominal_hz: f64,
    noise: f64,
    rng: SmallRng,
}

impl MeterDevice {
    pub fn new(
        profile: Arc<MeterProfile>,
        role: MeterRole,
        nominal_hz: f64,
        noise: f64,
        seed: u64,
    ) -> Self {
        let mut m = MeterDevice {
            profile,
            role,
            clock: 0.0,
            power_kw: 0.0,
            frequency_hz: nominal_hz,
            nominal_hz,
            noise,
            rng: SmallRng::seed_from_u64(seed),
        };
        m.step(0.0);
        m
    }

    /// Advances time. A GPU rack meter recomputes its rack's draw; every meter's frequency wanders
    /// a few mHz around nominal.
    pub fn step(&mut self, dt: f64) {
        if dt.is_finite() && dt > 0.0 {
            self.clock += dt;
        }
        if let MeterRole::GpuRack(g) = self.role {
            let period = g.period.as_secs_f64().max(1e-3);
            let kw = g.base_kw + g.swing_kw * (TAU * self.clock / period).sin();
            self.power_kw = jitter(&mut self.rng, kw.max(0.0), self.noise);
        }
        self.frequency_hz = self.nominal_hz + self.rng.random_range(-0.01..=0.01);
    }

    /// Sets the measured power (the site meter's sum), adding measurement noise.
    pub fn set_measured_kw(&mut self, kw: f64) {
        self.power_kw = jitter(&mut self.rng, kw, self.noise);
    }

    pub fn power_kw(&self) -> f64 {
        self.power_kw
    }

    pub fn frequency_hz(&self) -> f64 {
        self.frequency_hz
    }
}

fn jitter(rng: &mut SmallRng, value: f64, noise: f64) -> f64 {
    if noise > 0.0 && value != 0.0 {
        value * (1.0 + rng.random_range(-noise..=noise))
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn profile() -> Arc<PduProfile> {
        let (_, text) = site_config::profile::BUILTIN[0];
        match site_config::profile::Profile::from_toml("generic-pdu", text).unwrap() {
            site_config::profile::Profile::Pdu(p) => Arc::new(p),
            _ => unreachable!(),
        }
    }

    fn physics(delay: f64, step: Option<f64>, ramp: f64) -> Physics {
        Physics {
            relay_delay_s: delay,
            sequence_step_s: step,
            boot_ramp_s: ramp,
            noise: 0.0,
        }
    }

    fn asics(n: usize) -> Vec<Load> {
        vec![Load::Asic { rated_w: 3000.0 }; n]
    }

    #[test]
    fn relay_moves_only_after_the_operate_delay() {
        let mut pdu = PduDevice::new(profile(), &asics(2), physics(0.2, None, 0.0), 1).unwrap();
        assert!(pdu.command(0, false));
        pdu.step(0.1, &[]);
        assert!(pdu.outlets()[0].relay_on, "moved before its delay");
        assert_eq!(pdu.outlets()[0].power_w, 3000.0);
        pdu.step(0.1, &[]);
        assert!(!pdu.outlets()[0].relay_on);
        assert_eq!(pdu.outlets()[0].power_w, 0.0);
        assert_eq!(pdu.outlets()[0].toggles, 1);
        assert!(
            pdu.outlets()[1].relay_on,
            "the other outlet was not commanded"
        );
    }

    #[test]
    fn sequencing_moves_one_relay_per_step() {
        let mut pdu =
            PduDevice::new(profile(), &asics(3), physics(0.0, Some(0.5), 0.0), 1).unwrap();
        for i in 0..3 {
            pdu.command(i, false);
        }
        let on = |p: &PduDevice| p.outlets().iter().filter(|o| o.relay_on).count();
        pdu.step(0.0, &[]);
        assert_eq!(on(&pdu), 2, "first relay moves at once");
        pdu.step(0.4, &[]);
        assert_eq!(on(&pdu), 2);
        pdu.step(0.1, &[]);
        assert_eq!(on(&pdu), 1, "second relay after one step");
        pdu.step(0.5, &[]);
        assert_eq!(on(&pdu), 0);
        assert!(!pdu.is_settling());
    }

    #[test]
    fn power_ramps_up_after_the_relay_closes() {
        let mut pdu = PduDevice::new(profile(), &asics(1), physics(0.0, None, 2.0), 1).unwrap();
        pdu.command(0, false);
        pdu.step(1.0, &[]);
        assert_eq!(pdu.total_w(), 0.0);
        pdu.command(0, true);
        pdu.step(0.0, &[]);
        assert_eq!(pdu.total_w(), 0.0, "no power at the instant of closing");
        pdu.step(1.0, &[]);
        assert!(
            (pdu.total_w() - 1500.0).abs() < 1e-6,
            "half-way up the ramp"
        );
        pdu.step(5.0, &[]);
        assert_eq!(pdu.total_w(), 3000.0);
    }

    #[test]
    fn a_stuck_relay_accepts_commands_and_never_moves() {
        let mut pdu = PduDevice::new(profile(), &asics(2), physics(0.0, None, 0.0), 1).unwrap();
        pdu.set_stuck(0b01);
        assert!(pdu.command(0, false));
        assert!(pdu.command(1, false));
        pdu.step(1.0, &[]);
        assert!(pdu.outlets()[0].relay_on);
        assert!(!pdu.outlets()[1].relay_on);
        assert_eq!(pdu.outlets()[0].commands, 1);
    }

    #[test]
    fn a_command_undone_before_the_relay_moves_cancels_it() {
        let mut pdu = PduDevice::new(profile(), &asics(1), physics(1.0, None, 0.0), 1).unwrap();
        pdu.command(0, false);
        pdu.step(0.5, &[]);
        pdu.command(0, true);
        pdu.step(1.0, &[]);
        assert!(pdu.outlets()[0].relay_on);
        assert_eq!(pdu.outlets()[0].toggles, 0);
    }

    #[test]
    fn gpu_feed_outlets_carry_their_share_of_the_rack() {
        let loads = [
            Load::GpuFeed { rack: 0, feeds: 2 },
            Load::GpuFeed { rack: 0, feeds: 2 },
        ];
        let mut pdu = PduDevice::new(profile(), &loads, physics(0.0, None, 0.0), 1).unwrap();
        pdu.step(0.1, &[30.0]);
        assert_eq!(pdu.outlets()[0].power_w, 15_000.0);
        assert_eq!(pdu.asic_w(), 0.0);
    }

    #[test]
    fn capacity_is_fixed() {
        let err = PduDevice::new(
            profile(),
            &asics(MAX_OUTLETS + 1),
            physics(0.0, None, 0.0),
            1,
        );
        assert_eq!(err.err(), Some(CapacityError));
        assert!(
            !PduDevice::new(profile(), &asics(2), physics(0.0, None, 0.0), 1)
                .unwrap()
                .command(5, true)
        );
    }

    #[test]
    fn gpu_meter_oscillates_around_its_base() {
        let meter_profile = match site_config::profile::Profile::from_toml(
            "generic-meter",
            site_config::profile::BUILTIN[1].1,
        )
        .unwrap()
        {
            site_config::profile::Profile::Meter(m) => Arc::new(m),
            _ => unreachable!(),
        };
        let g = GpuSim {
            base_kw: 100.0,
            swing_kw: 20.0,
            period: Duration::from_secs(2),
        };
        let mut m = MeterDevice::new(meter_profile, MeterRole::GpuRack(g), 60.0, 0.0, 1);
        let mut seen = Vec::new();
        for _ in 0..40 {
            m.step(0.1);
            seen.push(m.power_kw());
        }
        let max = seen.iter().cloned().fold(f64::MIN, f64::max);
        let min = seen.iter().cloned().fold(f64::MAX, f64::min);
        assert!(
            (max - 120.0).abs() < 0.5 && (min - 80.0).abs() < 0.5,
            "{min}..{max}"
        );
        assert!((m.frequency_hz() - 60.0).abs() <= 0.01);
    }
}
