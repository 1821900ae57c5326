//! The planner: a pure function of (site, snapshot of readings, timeline, now) to a [`Plan`].
//!
//! No I/O and no clock: time is an argument, so every decision is tested as a table over time.
//! A plan is absolute, the desired relay state of every ASIC, never a delta, so a missed or
//! repeated cycle does no harm. A plan can only name ASICs (it is indexed by [`AsicId`]):
//! there is no way to express a command for a GPU rack.
//!
//! The ASIC budget under an import limit leaves room for the peak, over a recent window, of
//! everything on the site that is not an ASIC, so AI-training swings (metered or not) neither
//! break the limit nor make ASICs chatter:
//!
//! ```text
//!   limit ─────────────────────────────────────────────  }
//!   margin                                                } budget for ASICs =
//!   rest of the site: peak over window  ╭╮  ╭╮  ╭╮        }   limit − rest peak − margin
//!   rest of the site now               ╯  ╰╯  ╰╯  ╰  (GPU racks swing at 0.2–3 Hz)
//! ```
//!
//! Shed order: highest priority class first, then least efficient (highest J/TH).
//! Restore order: the reverse (most efficient first), in batches of the policy's size spaced by
//! its interval, and only what fits under the budget with a small deadband to spare (2 % of
//! the limit), so that noisy readings near the budget cannot switch an ASIC off and on again,
//! and never into room left by ASICs that are still on their way off. Minimum off and on times
//! are honoured, on the monotonic clock; an emergency directive may switch ASICs off before
//! their minimum on-time.

use site_config::{AsicId, Site};

use crate::decide::time::{Mono, Now};
use crate::decide::timeline::Timeline;
use crate::msg::Hold;

/// Power differences below this are noise (kW).
const EPS_KW: f64 = 1e-6;

/// What the controller knows of one ASIC at the time of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AsicState {
    /// On, as far as the controller can tell (for a PDU it cannot switch: on unless it is
    /// known to be off, the safe side of every limit).
    pub on: bool,
    /// When the relay last changed; `None` if unknown (min on/off then count as served).
    pub since: Option<Mono>,
    /// False when its PDU cannot be switched now (silent, refusing writes, relays that do not
    /// follow): it is counted as it stands and never planned to change.
    pub controllable: bool,
    /// Commanded to a state its relay has not been read in yet: an ASIC on its way off counts
    /// as off for shedding, but the room it leaves is not restored into until it is seen off.
    pub unconfirmed: bool,
}

/// The load besides the ASICs, as the estimator sees it (see [`crate::decide::estimate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// The peak over the policy window of everything that is not an ASIC (GPU racks, cooling,
    /// the rest), as the site meter shows it: what sheds answer to.
    pub rest_kw: f64,
    /// The same over a longer memory (at least `rest_kw`): what restores must fit under, so
    /// that an ASIC restored in a lull is not shed again at the next crest.
    pub restore_rest_kw: f64,
    /// Why nothing may be restored on these figures, if so (too young, no site meter).
    pub restore_held: Option<Hold>,
}

/// Readings the planner works from.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// One entry per ASIC, indexed by [`AsicId`].
    pub asics: Vec<AsicState>,
    pub load: Load,
    /// When ASICs were last switched (either way): the next restore batch waits the restore
    /// interval after it, so batches are spaced and nothing comes back right after a shed.
    pub last_switch: Option<Mono>,
}

impl Snapshot {
    /// Every ASIC on, controllable and long settled; the rest of the site at `gpu_kw`, and
    /// figures good enough to restore on.
    pub fn all_on(site: &Site, gpu_kw: f64) -> Snapshot {
        Snapshot {
            asics: vec![
                AsicState {
                    on: true,
                    since: None,
                    controllable: true,
                    unconfirmed: false,
                };
                site.asics.len()
            ],
            load: Load {
                rest_kw: gpu_kw,
                restore_rest_kw: gpu_kw,
                restore_held: None,
            },
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
    pub next_wake: Option<Mono>,
    /// The import limit in force: the subscription limit or a lower directive.
    pub limit_kw: f64,
    /// Rated kW the ASICs may draw.
    pub budget_kw: f64,
    /// Rated kW of the ASICs left on.
    pub planned_asic_kw: f64,
    /// How far the plan stays above the budget, kW: ASICs that could not be switched off (faulted
    /// PDU, minimum on-time), or GPU and other load alone above the limit.
    pub shortfall_kw: f64,
    /// The rest of the site (its peak over the window) the budget was computed with.
    pub rest_kw: f64,
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

/// The site's shed and restore orders, computed once.
#[derive(Debug, Clone)]
pub struct Planner {
    /// ASICs in the order they are switched off.
    shed_order: Vec<AsicId>,
    /// ASICs in the order they come back: the shed order reversed, ties by id.
    restore_order: Vec<AsicId>,
    fleet_rated_kw: f64,
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
        }
    }

    /// ASICs in the order they are switched off: priority class, then least efficient first.
    pub fn shed_order(&self) -> &[AsicId] {
        &self.shed_order
    }

    pub fn plan(&self, site: &Site, snap: &Snapshot, timeline: &Timeline, now: Now) -> Plan {
        let policy = &site.policy;
        let force = timeline.in_force(now.wall);
        let rated = |id: AsicId| site.asic(id).rated_w / 1000.0;
        let state = |id: AsicId| {
            snap.asics.get(id.0 as usize).copied().unwrap_or(AsicState {
                on: true,
                since: None,
                controllable: false,
                unconfirmed: false,
            })
        };

        let limit_kw = force
            .import_limit_kw
            .map_or(site.import_limit_kw, |l| l.min(site.import_limit_kw));
        let Load {
            rest_kw,
            restore_rest_kw,
            restore_held,
        } = snap.load;
        let caps = |rest: f64| {
            let mut b = limit_kw - rest.max(0.0) - policy.margin_kw;
            if let Some(shed) = force.shed_kw {
                b = b.min(self.fleet_rated_kw - shed);
            }
            if force.shed_all {
                b = b.min(0.0);
            }
            b
        };
        let budget_kw = caps(rest_kw);
        let restore_budget_kw = caps(restore_rest_kw.max(rest_kw));

        let mut desired: Vec<bool> = (0..site.asics.len())
            .map(|i| state(AsicId(i as u32)).on)
            .collect();
        let mut on_kw: f64 = site
            .asics
            .iter()
            .filter(|a| desired[a.id.0 as usize])
            .map(|a| rated(a.id))
            .sum();
        let mut wake = timeline.next_change(now.wall).map(|t| now.mono_of(t));
        let mut wake_at = |t: Mono| {
            if t > now.mono {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            }
        };
        let served = |since: Option<Mono>, min: std::time::Duration| {
            since.is_none_or(|s| now.mono.elapsed(s, min))
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
                    if let Some(since) = s.since {
                        wake_at(since + policy.min_on);
                    }
                    continue;
                }
                desired[id.0 as usize] = false;
                on_kw -= rated(id);
                switched_off += 1;
            }
        } else if let Some(hold) = restore_held {
            held = Some(hold);
        } else {
            let next_batch = snap
                .last_switch
                .map(|t| t + policy.restore_interval)
                .filter(|t| *t > now.mono);
            // Hysteresis: restore only what leaves a little room, so that readings wobbling
            // around the budget do not switch the same ASIC off and on again.
            let leaving_kw: f64 = site
                .asics
                .iter()
                .filter(|a| {
                    let s = state(a.id);
                    !desired[a.id.0 as usize] && s.unconfirmed
                })
                .map(|a| rated(a.id))
                .sum();
            let mut room = restore_budget_kw - on_kw - leaving_kw - restore_deadband(limit_kw);
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
                    if let Some(since) = s.since {
                        wake_at(since + policy.min_off);
                    }
                    continue;
                }
                if let Some(t) = next_batch {
                    held = Some(Hold::Interval);
                    wake_at(t);
                    break;
                }
                if restored as u32 >= policy.restore_batch_size {
                    wake_at(now.mono + policy.restore_interval);
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
            rest_kw,
            switched_off,
            restored,
            held: if restored > 0 { None } else { held },
            emergency: force.emergency,
        }
    }
}

/// Room kept free when restoring: 2 % of the limit, at least 0.5 kW.
pub fn restore_deadband(limit_kw: f64) -> f64 {
    (limit_kw.abs() * 0.02).max(0.5)
}

/// Shorthand for a one-off plan (builds the orders each call).
pub fn plan(site: &Site, snapshot: &Snapshot, timeline: &Timeline, now: Now) -> Plan {
    Planner::new(site).plan(site, snapshot, timeline, now)
}

#[cfg(test)]
mod tests;
