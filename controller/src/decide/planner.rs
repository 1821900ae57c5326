//! The planner: a pure function of (site, snapshot of readings, timeline, now) to a [`Plan`].
//!
//! No I/O and no clock: time is an argument, so every decision is tested as a table over time.
//! A plan is absolute, the desired relay state of every ASIC, never a delta, so a missed or
//! repeated cycle does no harm. A plan can only name ASICs (it is indexed by [`AsicId`]):
//! there is no way to express a command for a GPU rack.
//!
//! The ASIC budget under an import limit leaves room for the GPU racks' peak over a recent
//! window, so AI-training swings neither break the limit nor make ASICs chatter:
//!
//! ```text
//!   limit ─────────────────────────────────────────────  }
//!   margin                                                } budget for ASICs =
//!   other load (site meter − ASICs − GPU)                 }   limit − GPU peak(window)
//!   GPU peak over window  ╭╮  ╭╮  ╭╮                      }   − other − margin
//!   GPU now              ╯  ╰╯  ╰╯  ╰  (0.2–3 Hz swings)
//! ```
//!
//! Shed order: highest priority class first, then least efficient (highest J/TH).
//! Restore order: the reverse (most efficient first), in batches of the policy's size spaced by
//! its interval, and only what fits under the budget with a small deadband to spare (2 % of
//! the limit), so that noisy readings near the budget cannot switch an ASIC off and on again. Minimum off and on times are honoured;
//! an emergency directive may switch ASICs off before their minimum on-time.

use jiff::{SignedDuration, Timestamp};
use site_config::{AsicId, Site};

use crate::decide::timeline::Timeline;

/// Power differences below this are noise (kW).
const EPS_KW: f64 = 1e-6;

/// Other-load estimates needed within the window before anything is restored.
pub const MIN_OTHER_SAMPLES: usize = 5;

/// True when the other-load samples are enough to restore on: the oldest at least half a
/// window old, and at least [`MIN_OTHER_SAMPLES`] of them within the window (fewer if the window
/// holds fewer polls: a quarter of what it can hold, at least one).
pub fn is_warm(
    samples: &[(Timestamp, f64)],
    now: Timestamp,
    window: std::time::Duration,
    poll: std::time::Duration,
) -> bool {
    let half = SignedDuration::try_from(window / 2).unwrap_or(SignedDuration::MAX);
    let oldest = samples.iter().map(|(t, _)| *t).filter(|t| *t <= now).min();
    let fits = (window.as_secs_f64() / poll.as_secs_f64().max(1e-3) / 4.0) as usize;
    samples.iter().filter(|(t, _)| *t <= now).count() >= MIN_OTHER_SAMPLES.min(fits.max(1))
        && oldest.is_some_and(|t| now.duration_since(t) >= half)
}

/// What the controller knows of one ASIC at the time of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AsicState {
    /// The relay's state as last read back, or as last commanded when no reading is fresh.
    pub on: bool,
    /// When the relay last changed; `None` if unknown (min on/off then count as served).
    pub since: Option<Timestamp>,
    /// False when its PDU is faulted: it cannot be switched and is counted as it stands.
    pub controllable: bool,
}

/// Readings the planner works from.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// One entry per ASIC, indexed by [`AsicId`].
    pub asics: Vec<AsicState>,
    /// Total GPU rack draw over time, oldest first; the peak over the policy window is used.
    pub gpu_kw: Vec<(Timestamp, f64)>,
    /// Other load (site meter − ASICs − GPU racks) over time, oldest first; a robust mean over
    /// the policy window is used, since meter and outlet readings are not taken at the same
    /// instant and single estimates spike while relays switch. None known: 0 (the margin is
    /// what covers it).
    pub other_kw: Vec<(Timestamp, f64)>,
    /// When ASICs were last switched (either way): the next restore batch waits the restore
    /// interval after it, so batches are spaced and nothing comes back right after a shed.
    pub last_switch: Option<Timestamp>,
}

impl Snapshot {
    /// Every ASIC on, controllable and long settled; no readings.
    pub fn all_on(site: &Site) -> Snapshot {
        Snapshot {
            asics: vec![
                AsicState {
                    on: true,
                    since: None,
                    controllable: true
                };
                site.asics.len()
            ],
            gpu_kw: Vec::new(),
            other_kw: Vec::new(),
            last_switch: None,
        }
    }
}

/// What the planner decided at `now`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Desired relay state per ASIC, indexed by [`AsicId`].
    pub desired: Vec<bool>,
    /// When the planner next needs to run even if nothing changes.
    pub next_wake: Option<Timestamp>,
    /// The import limit in force: the subscription limit or a lower directive.
    pub limit_kw: f64,
    /// Rated kW the ASICs may draw.
    pub budget_kw: f64,
    /// Rated kW of the ASICs left on.
    pub planned_asic_kw: f64,
    /// How far the plan stays above the budget, kW: ASICs that could not be switched off (faulted
    /// PDU, minimum on-time), or GPU and other load alone above the limit.
    pub shortfall_kw: f64,
    /// GPU peak over the window the budget was computed with.
    pub gpu_peak_kw: f64,
    /// Other load the budget was computed with.
    pub other_kw: f64,
    pub switched_off: usize,
    pub restored: usize,
    /// Why ASICs that are off were not restored this cycle, if any were held back.
    pub held: Option<Hold>,
    pub emergency: bool,
}

impl Plan {
    /// ASICs whose desired state differs from the snapshot.
    pub fn changes<'a>(
        &'a self,
        snapshot: &'a Snapshot,
    ) -> impl Iterator<Item = (AsicId, bool)> + 'a {
        self.desired
            .iter()
            .zip(&snapshot.asics)
            .enumerate()
            .filter(|(_, (want, have))| **want != have.on)
            .map(|(i, (want, _))| (AsicId(i as u32), *want))
    }
}

/// What holds a restore back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// They would not fit under the budget (with the deadband to spare).
    NoRoom,
    /// They have not been off for `min_off_s` yet.
    MinOff,
    /// The last switch was less than `restore_interval_s` ago.
    Interval,
    /// The other-load estimate is too young to restore on.
    EstimateWarmingUp,
}

/// The site's shed and restore orders, computed once.
#[derive(Debug, Clone)]
pub struct Planner {
    /// ASICs in the order they are switched off.
    shed_order: Vec<AsicId>,
    /// ASICs in the order they come back: the shed order reversed, ties by id.
    restore_order: Vec<AsicId>,
    fleet_rated_kw: f64,
    gpu_rated_kw: f64,
}

impl Planner {
    pub fn new(site: &Site) -> Planner {
        let mut shed_order: Vec<AsicId> = site.asics.iter().map(|a| a.id).collect();
        shed_order.sort_by(|x, y| {
            let (a, b) = (site.asic(*x), site.asic(*y));
            b.priority
                .cmp(&a.priority)
                .then(b.efficiency_j_per_th.total_cmp(&a.efficiency_j_per_th))
                .then(a.id.cmp(&b.id))
        });
        let mut restore_order = shed_order.clone();
        restore_order.sort_by(|x, y| {
            let (a, b) = (site.asic(*x), site.asic(*y));
            a.priority
                .cmp(&b.priority)
                .then(a.efficiency_j_per_th.total_cmp(&b.efficiency_j_per_th))
                .then(a.id.cmp(&b.id))
        });
        Planner {
            shed_order,
            restore_order,
            fleet_rated_kw: site.asic_rated_kw(),
            gpu_rated_kw: site.gpu_rated_kw(),
        }
    }

    pub fn plan(&self, site: &Site, snap: &Snapshot, timeline: &Timeline, now: Timestamp) -> Plan {
        let policy = &site.policy;
        let force = timeline.in_force(now);
        let rated = |id: AsicId| site.asic(id).rated_w / 1000.0;
        let state = |id: AsicId| {
            snap.asics.get(id.0 as usize).copied().unwrap_or(AsicState {
                on: true,
                since: None,
                controllable: false,
            })
        };

        let limit_kw = force
            .import_limit_kw
            .map_or(site.import_limit_kw, |l| l.min(site.import_limit_kw));
        let gpu_peak_kw =
            gpu_peak(&snap.gpu_kw, now, policy.gpu_peak_window).unwrap_or(self.gpu_rated_kw);
        let others = other_samples(&snap.other_kw, now, policy.gpu_peak_window);
        let other_kw = robust_mean_since(&others, now, std::time::Duration::MAX)
            .unwrap_or(0.0)
            .max(0.0);
        // The other-load estimate subtracts GPU readings taken at other instants than the site
        // meter's, so single estimates are off by up to the GPU swing; only their mean over many
        // swings is good. Restoring on a young estimate is how ASICs chatter after start-up:
        // until the samples cover half the window, only shedding is allowed.
        let warm = is_warm(&others, now, policy.gpu_peak_window, policy.poll_interval);
        let mut budget_kw = limit_kw - gpu_peak_kw - other_kw - policy.margin_kw;
        if let Some(shed) = force.shed_kw {
            budget_kw = budget_kw.min(self.fleet_rated_kw - shed);
        }
        if force.shed_all {
            budget_kw = budget_kw.min(0.0);
        }

        let mut desired: Vec<bool> = (0..site.asics.len())
            .map(|i| state(AsicId(i as u32)).on)
            .collect();
        let mut on_kw: f64 = site
            .asics
            .iter()
            .filter(|a| desired[a.id.0 as usize])
            .map(|a| rated(a.id))
            .sum();
        let mut wake = timeline.next_change(now);
        let mut wake_at = |t: Timestamp| {
            if t > now {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
        };
        let served = |since: Option<Timestamp>, min: std::time::Duration| {
            since.is_none_or(|s| {
                now.duration_since(s)
                    >= SignedDuration::try_from(min).unwrap_or(SignedDuration::MAX)
            })
        };
        let until = |since: Option<Timestamp>, min: std::time::Duration| {
            since.and_then(|s| s.checked_add(SignedDuration::try_from(min).ok()?).ok())
        };

        let (mut switched_off, mut restored) = (0, 0);
        let mut held = None;
        if on_kw > budget_kw + EPS_KW {
            for &id in &self.shed_order {
                if on_kw <= budget_kw + EPS_KW {
                    break;
                }
                let s = state(id);
                if !s.controllable || !desired[id.0 as usize] {
                    continue;
                }
                if !force.emergency && !served(s.since, policy.min_on) {
                    if let Some(t) = until(s.since, policy.min_on) {
                        wake_at(t);
                    }
                    continue;
                }
                desired[id.0 as usize] = false;
                on_kw -= rated(id);
                switched_off += 1;
            }
        } else if !warm {
            held = Some(Hold::EstimateWarmingUp);
        } else {
            let next_batch = snap
                .last_switch
                .and_then(|t| until(Some(t), policy.restore_interval))
                .filter(|t| *t > now);
            // Hysteresis: restore only what leaves a little room, so that readings wobbling
            // around the budget do not switch the same ASIC off and on again.
            let noise = estimate_noise_kw(&others, now, std::time::Duration::MAX);
            let mut room = budget_kw - on_kw - restore_deadband(limit_kw).max(noise);
            for &id in &self.restore_order {
                let s = state(id);
                if !s.controllable || desired[id.0 as usize] {
                    continue;
                }
                if rated(id) > room + EPS_KW {
                    held = held.or(Some(Hold::NoRoom));
                    continue;
                }
                if !served(s.since, policy.min_off) {
                    held = Some(Hold::MinOff);
                    if let Some(t) = until(s.since, policy.min_off) {
                        wake_at(t);
                    }
                    continue;
                }
                if let Some(t) = next_batch {
                    held = Some(Hold::Interval);
                    wake_at(t);
                    break;
                }
                if restored as u32 >= policy.restore_batch_size {
                    if let Ok(t) = now.checked_add(
                        SignedDuration::try_from(policy.restore_interval).unwrap_or_default(),
                    ) {
                        wake_at(t);
                    }
                    break;
                }
                desired[id.0 as usize] = true;
                room -= rated(id);
                on_kw += rated(id);
                restored += 1;
            }
        }

        Plan {
            desired,
            next_wake: wake,
            limit_kw,
            budget_kw,
            planned_asic_kw: on_kw,
            shortfall_kw: (on_kw - budget_kw).max(0.0),
            gpu_peak_kw,
            other_kw,
            switched_off,
            restored,
            held: if restored > 0 { None } else { held },
            emergency: force.emergency,
        }
    }
}

/// How far the other-load estimate may move from one cycle to the next: three standard errors of
/// its mean (the spread of single estimates, from their interquartile range, over √n). Restores
/// keep at least this much room, so the estimate settling cannot undo them.
pub fn estimate_noise_kw(
    samples: &[(Timestamp, f64)],
    now: Timestamp,
    window: std::time::Duration,
) -> f64 {
    let mut v: Vec<f64> = within(samples, now, window).collect();
    if v.len() < 4 {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let iqr = v[v.len() * 3 / 4] - v[v.len() / 4];
    3.0 * (iqr / 1.35) / (v.len() as f64).sqrt()
}

/// Room kept free when restoring: 2 % of the limit, at least 0.5 kW.
pub fn restore_deadband(limit_kw: f64) -> f64 {
    (limit_kw.abs() * 0.02).max(0.5)
}

/// Shorthand for a one-off plan (builds the orders each call).
pub fn plan(site: &Site, snapshot: &Snapshot, timeline: &Timeline, now: Timestamp) -> Plan {
    Planner::new(site).plan(site, snapshot, timeline, now)
}

/// The finite values sampled within `window` before `now`.
fn within(
    samples: &[(Timestamp, f64)],
    now: Timestamp,
    window: std::time::Duration,
) -> impl Iterator<Item = f64> + '_ {
    let window = SignedDuration::try_from(window).unwrap_or(SignedDuration::MAX);
    let from = now.checked_sub(window).unwrap_or(Timestamp::MIN);
    samples
        .iter()
        .filter(move |(t, kw)| *t >= from && *t <= now && kw.is_finite())
        .map(|(_, kw)| *kw)
}

/// The interquartile mean of the samples within `window` before `now`: robust to the spikes a
/// skewed reading makes, and steady from one cycle to the next (a median of bimodal noise
/// flips between the modes).
pub fn robust_mean_since(
    samples: &[(Timestamp, f64)],
    now: Timestamp,
    window: std::time::Duration,
) -> Option<f64> {
    let mut v: Vec<f64> = within(samples, now, window).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let q = v.len() / 4;
    let middle = &v[q..v.len() - q];
    Some(middle.iter().sum::<f64>() / middle.len() as f64)
}

/// The other-load samples to estimate from: those within the window, or, when a burst of
/// switching left fewer than [`MIN_OTHER_SAMPLES`] there, the latest that many whatever their
/// age (other load moves slowly; an estimate does not expire because relays were busy).
pub fn other_samples(
    samples: &[(Timestamp, f64)],
    now: Timestamp,
    window: std::time::Duration,
) -> Vec<(Timestamp, f64)> {
    let window = SignedDuration::try_from(window).unwrap_or(SignedDuration::MAX);
    let from = now.checked_sub(window).unwrap_or(Timestamp::MIN);
    let past: Vec<(Timestamp, f64)> = samples
        .iter()
        .copied()
        .filter(|(t, kw)| *t <= now && kw.is_finite())
        .collect();
    let recent: Vec<(Timestamp, f64)> = past.iter().copied().filter(|(t, _)| *t >= from).collect();
    if recent.len() >= MIN_OTHER_SAMPLES {
        recent
    } else {
        past[past.len().saturating_sub(MIN_OTHER_SAMPLES)..].to_vec()
    }
}

/// The largest GPU draw sampled within `window` before `now`.
pub fn gpu_peak(
    samples: &[(Timestamp, f64)],
    now: Timestamp,
    window: std::time::Duration,
) -> Option<f64> {
    within(samples, now, window).reduce(f64::max)
}

#[cfg(test)]
mod tests;
