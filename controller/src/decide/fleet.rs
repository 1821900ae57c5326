//! What is known of every ASIC outlet, and the one place where writes are ordered and verified.
//!
//! Per outlet: its relay as last read (`seen`), what the core last wanted of it (`commanded`),
//! its power, and when its relay last changed (for minimum on and off times). Per PDU: when it
//! was last read, and the order it was last given.
//!
//! Writing and verifying:
//!
//! ```text
//!   plan: outlet 3 off ─▶ order 41 {outlets 1-8} ─▶ field task writes ─▶ Written{41} at t
//!   reads before t + grace: relay 3 still on   → waiting (the relay may be slow or sequenced)
//!   a read after t + grace: relay 3 still on   → Disagrees{[3]}: the PDU is faulted, the core
//!                                                stops claiming its outlets (they count as read)
//!   a read shows relay 3 off                   → confirmed
//! ```
//!
//! A PDU that cannot be switched (silent, refusing writes, relays that do not follow) gets no
//! orders, and what the core wanted of it is forgotten: its outlets count as they read, or as
//! the worst case for the limit (on) when they cannot be read.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use site_config::{AsicId, PduId, Site};

use crate::decide::planner::AsicState;
use crate::decide::time::Mono;
use crate::msg::{Order, Orders, Write};

/// What is known of one ASIC's outlet.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Outlet {
    /// The relay as last read.
    seen: Option<bool>,
    /// What the core last wanted (none: nothing asked, or no longer claimed).
    commanded: Option<bool>,
    /// Seen in its commanded state since the command.
    confirmed: bool,
    /// Active power at the last read, W.
    power_w: Option<f64>,
    /// Power at the last read that saw the relay on, W: what a silent PDU's ASIC is assumed
    /// to draw while it is believed on.
    on_power_w: Option<f64>,
    /// When the relay last changed (commanded or observed).
    since: Option<Mono>,
}

/// The last order given to a PDU.
#[derive(Debug, Clone)]
struct Issued {
    order: Arc<Order>,
    /// The outlets it was issued to change, and to what.
    wants: Vec<(AsicId, bool)>,
    issued: Mono,
    acked: Option<Mono>,
}

#[derive(Debug, Clone, Default)]
struct Pdu {
    read_at: Option<Mono>,
    order: Option<Issued>,
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
    let mut by_outlet: Vec<(u16, AsicId)> = site
        .asics
        .iter()
        .filter(|a| a.pdu == pdu)
        .map(|a| (a.outlet, a.id))
        .collect();
    by_outlet.sort();
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

/// What a PDU's reading showed beyond the relays themselves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadOutcome {
    /// A relay moved that the core did not move.
    pub moved: bool,
    /// A relay was read for the first time.
    pub first_sight: bool,
    /// Outlets that did not follow a write acknowledged more than the grace ago.
    pub stuck: Vec<u16>,
    /// Outlets that read off while drawing power.
    pub drawing_while_off: Vec<u16>,
    /// Switches that took effect (outlets seen in their commanded state for the first time).
    pub confirmed: usize,
    /// A relay left the state the core wants after it had followed it: the PDU's order was
    /// withdrawn, and a new one must be issued to put it back.
    pub reassert: bool,
}

/// Every outlet of the site, and the orders in flight.
#[derive(Debug, Clone)]
pub struct Fleet {
    outlets: Vec<Outlet>,
    /// Per ASIC, the last switch the journal knew of at start-up, until its relay is first seen.
    resumed: Vec<Option<(bool, Mono)>>,
    pdus: Vec<Pdu>,
    runs: Vec<Vec<Run>>,
    /// The ASICs of each PDU, in outlet order.
    by_pdu: Vec<Vec<AsicId>>,
    rated_w: Vec<f64>,
    /// How long relays may take to follow an acknowledged write.
    grace: Duration,
    next_order: u64,
    /// The orders as last published.
    published: Orders,
    /// The PDU of each ASIC.
    pdu_of: Vec<PduId>,
    /// Per PDU, its ASICs' estimate as last summed: the site meter is read several times a
    /// poll, and summing thousands of outlets each time is most of a large site's work.
    /// Cleared by every change to the PDU's outlets.
    estimates: Vec<Cell<Option<PduEstimate>>>,
}

/// A PDU's summed estimate (see [`Fleet::pdu_estimate_w`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct PduEstimate {
    readable: bool,
    w: f64,
    /// When an ASIC in it stops counting as booting, which changes the sum.
    until: Option<Mono>,
}

/// How long after it is switched on an ASIC counts at least at its rating in the estimate of
/// the rest of the site: an ASIC's power supply and hashboards take up to a minute to reach full
/// power, and an outlet read a moment before the site meter shows less than the meter already
/// includes. Counting the rating meanwhile makes that skew err low, which a peak ignores.
const BOOTING: Duration = Duration::from_secs(60);

/// Power above which an outlet that reads off is drawing: 50 W, or 5 % of its ASIC's rating.
fn drawing_w(rated_w: f64) -> f64 {
    (rated_w * 0.05).max(50.0)
}

impl Fleet {
    /// `resumed`: per ASIC, the last switch the journal knows of (its state, when), for the
    /// minimum off and on times across a restart.
    pub fn new(site: &Site, grace: Duration, resumed: Vec<Option<(bool, Mono)>>) -> Fleet {
        let runs: Vec<Vec<Run>> = site.pdus.iter().map(|p| runs(site, p.id)).collect();
        let by_pdu = runs
            .iter()
            .map(|rs| rs.iter().flat_map(|r| r.asics.iter().copied()).collect())
            .collect();
        Fleet {
            outlets: vec![Outlet::default(); site.asics.len()],
            resumed,
            pdus: vec![Pdu::default(); site.pdus.len()],
            runs,
            by_pdu,
            rated_w: site.asics.iter().map(|a| a.rated_w).collect(),
            grace,
            next_order: 1,
            published: Orders {
                pdus: vec![None; site.pdus.len()].into(),
            },
            pdu_of: site.asics.iter().map(|a| a.pdu).collect(),
            estimates: vec![Cell::new(None); site.pdus.len()],
        }
    }

    /// Forgets `pdu`'s summed estimate (its outlets changed).
    fn touch(&self, pdu: PduId) {
        if let Some(c) = self.estimates.get(pdu.0 as usize) {
            c.set(None);
        }
    }

    /// The ASICs of `pdu`, in outlet order.
    pub fn asics_of(&self, pdu: PduId) -> &[AsicId] {
        self.by_pdu.get(pdu.0 as usize).map_or(&[], Vec::as_slice)
    }

    /// Takes in a reading of `pdu` at `now`: relays and power by outlet (outlet 1 first), and
    /// checks the outlets against what was written.
    pub fn read(
        &mut self,
        site: &Site,
        pdu: PduId,
        relays: &[bool],
        power_w: &[f64],
        now: Mono,
    ) -> ReadOutcome {
        let mut out = ReadOutcome::default();
        self.touch(pdu);
        let Some(state) = self.pdus.get_mut(pdu.0 as usize) else {
            return out;
        };
        state.read_at = Some(now);
        let acked = state.order.as_ref().and_then(|o| o.acked.map(|at| (at, o)));
        let mut external = false;
        for &id in self
            .by_pdu
            .get(pdu.0 as usize)
            .map_or(&[][..], Vec::as_slice)
        {
            let k = usize::from(site.asic(id).outlet) - 1;
            let o = &mut self.outlets[id.0 as usize];
            let seen = relays.get(k).copied();
            o.power_w = power_w.get(k).copied().filter(|w| w.is_finite());
            if seen == Some(true) {
                o.on_power_w = o.power_w;
            }
            if seen.is_some() && seen != o.seen {
                let first = o.seen.is_none();
                if first {
                    // First sight (after a restart, as the journal last left it): the minimum
                    // off or on time runs from that switch; found off with no record of why,
                    // off from now on, so that no restore comes early.
                    o.since = match self.resumed[id.0 as usize] {
                        Some((on, at)) if Some(on) == seen => Some(at),
                        _ if seen == Some(false) => Some(now),
                        _ => None,
                    };
                } else if seen != o.commanded {
                    o.since = Some(now);
                    // A relay moved after it had followed the core: someone else moved it.
                    external |= o.confirmed;
                }
                o.seen = seen;
                if first {
                    out.first_sight = true;
                } else {
                    out.moved = true;
                }
            }
            match o.commanded {
                Some(c) if seen == Some(c) && !o.confirmed => {
                    o.confirmed = true;
                    out.confirmed += 1;
                }
                Some(c) if seen == Some(c) => {}
                Some(c) => {
                    o.confirmed = false;
                    let due = acked.is_some_and(|(at, issued)| {
                        now.elapsed(at, self.grace) && issued.wants.contains(&(id, c))
                    });
                    if due {
                        out.stuck.push(site.asic(id).outlet);
                    }
                }
                None => {}
            }
            if seen == Some(false)
                && o.power_w
                    .is_some_and(|w| w > drawing_w(self.rated_w[id.0 as usize]))
                && o.since.is_none_or(|s| now.elapsed(s, self.grace))
            {
                out.drawing_while_off.push(site.asic(id).outlet);
            }
        }
        if external {
            // Re-assert what the core wants with a new order.
            state_of(&mut self.pdus, pdu).order = None;
            out.reassert = true;
        }
        out
    }

    /// The core wants ASIC `id` `on` (a plan's change) from `now`.
    pub fn command(&mut self, id: AsicId, on: bool, now: Mono) {
        self.touch(self.pdu_of[id.0 as usize]);
        let o = &mut self.outlets[id.0 as usize];
        if o.commanded != Some(on) {
            o.commanded = Some(on);
            o.confirmed = o.seen == Some(on);
            o.since = Some(now);
        }
    }

    /// The core takes what the relays read as what it wants (the first plan, which switches
    /// nothing, claims the outlets as they are).
    pub fn claim_as_seen(&mut self, id: AsicId) {
        self.touch(self.pdu_of[id.0 as usize]);
        let o = &mut self.outlets[id.0 as usize];
        if o.commanded.is_none() {
            o.commanded = o.seen;
            o.confirmed = o.seen.is_some();
        }
    }

    /// `pdu` cannot be switched: forget what the core wanted of it (its outlets count as they
    /// read) and withdraw its order.
    pub fn release(&mut self, pdu: PduId) {
        self.touch(pdu);
        for &id in self
            .by_pdu
            .get(pdu.0 as usize)
            .map_or(&[][..], Vec::as_slice)
        {
            let o = &mut self.outlets[id.0 as usize];
            o.commanded = None;
            o.confirmed = false;
        }
        state_of(&mut self.pdus, pdu).order = None;
    }

    /// The field task wrote order `order` to `pdu` at `now`. False if it is not the PDU's
    /// current order (a newer one replaced it).
    pub fn written(&mut self, pdu: PduId, order: u64, now: Mono) -> bool {
        match &mut state_of(&mut self.pdus, pdu).order {
            Some(issued) if issued.order.id == order => {
                issued.acked = Some(now);
                true
            }
            _ => false,
        }
    }

    /// True if `order` is `pdu`'s current order.
    pub fn is_current(&self, pdu: PduId, order: u64) -> bool {
        self.pdus
            .get(pdu.0 as usize)
            .and_then(|p| p.order.as_ref())
            .is_some_and(|o| o.order.id == order)
    }

    /// What the planner sees of ASIC `id`, whose PDU is `controllable` now or not.
    pub fn state(&self, id: AsicId, controllable: bool) -> AsicState {
        let o = &self.outlets[id.0 as usize];
        let drawing = o.seen == Some(false)
            && o.power_w
                .is_some_and(|w| w > drawing_w(self.rated_w[id.0 as usize]));
        let on = if controllable {
            o.commanded.or(o.seen).unwrap_or(true) || drawing
        } else {
            // Not switchable: on unless known to be off, the safe side of every limit.
            o.seen != Some(false) || o.commanded == Some(true) || drawing
        };
        AsicState {
            on,
            since: o.since,
            controllable,
            unconfirmed: o.commanded.is_some() && o.seen != o.commanded,
        }
    }

    /// The power to subtract from the site reading for ASIC `id` when estimating the rest of
    /// the site at `now`, W. Where its PDU is `readable`, its reading; but an ASIC switched on
    /// within [`BOOTING`] counts at least at its rating, since its outlet may have been read
    /// before its relay closed or while it boots: every disagreement in time between outlet
    /// and site readings then errs low, which a peak over the window does not feel. Where the
    /// PDU cannot be read, what it is assumed to draw, never more than the planner counts for
    /// it (its rating while believed on).
    pub fn estimate_w(&self, id: AsicId, readable: bool, now: Mono) -> f64 {
        let o = &self.outlets[id.0 as usize];
        let rated = self.rated_w[id.0 as usize];
        if readable {
            let reading = o.power_w.unwrap_or(0.0);
            let switching_on = o.commanded == Some(true)
                && (!o.confirmed || o.since.is_some_and(|s| !now.elapsed(s, BOOTING)));
            return if switching_on {
                reading.max(rated)
            } else {
                reading
            };
        }
        if self.state(id, false).on {
            o.on_power_w.unwrap_or(rated).min(rated)
        } else {
            0.0
        }
    }

    /// The sum of [`Fleet::estimate_w`] over the ASICs of `pdu`, W, kept until the PDU's
    /// outlets change or an ASIC in it stops counting as booting.
    pub fn pdu_estimate_w(&self, pdu: PduId, readable: bool, now: Mono) -> f64 {
        let Some(cell) = self.estimates.get(pdu.0 as usize) else {
            return 0.0;
        };
        if let Some(e) = cell.get()
            && e.readable == readable
            && e.until.is_none_or(|u| now < u)
        {
            return e.w;
        }
        let mut w = 0.0;
        let mut until: Option<Mono> = None;
        for &id in self.asics_of(pdu) {
            w += self.estimate_w(id, readable, now);
            let o = &self.outlets[id.0 as usize];
            if readable
                && o.commanded == Some(true)
                && o.confirmed
                && let Some(s) = o.since
                && !now.elapsed(s, BOOTING)
            {
                let end = s + BOOTING;
                until = Some(until.map_or(end, |u| u.min(end)));
            }
        }
        cell.set(Some(PduEstimate { readable, w, until }));
        w
    }

    /// The measured power of ASIC `id`, W, if its PDU answered.
    pub fn power_w(&self, id: AsicId) -> Option<f64> {
        self.outlets[id.0 as usize].power_w
    }

    /// Orders for every PDU whose outlets differ from what the core wants: one write per run
    /// of consecutive outlets that holds a change (or one per outlet where the profile writes
    /// singly), with the absolute state of every outlet of the run. A PDU not `controllable`
    /// gets none; one whose writes failed and whose backoff is over (`on_trial`) with nothing
    /// to change is probed by writing back the states its relays already have, which moves
    /// nothing. Returns the new orders if any changed.
    pub fn orders(
        &mut self,
        site: &Site,
        now: Mono,
        controllable: impl Fn(PduId) -> bool,
        on_trial: impl Fn(PduId) -> bool,
    ) -> Option<Orders> {
        let mut changed = false;
        let mut next: Vec<Option<Arc<Order>>> = self.published.pdus.to_vec();
        for (p, slot) in next.iter_mut().enumerate() {
            let pdu = PduId(p as u32);
            if !controllable(pdu) {
                if slot.take().is_some() {
                    changed = true;
                }
                self.pdus[p].order = None;
                continue;
            }
            let current = self.pdus[p].order.as_ref();
            // An outlet already reading as the core wants still needs writing if the order in
            // flight says otherwise (switched on, then off again before that write went out):
            // the new order supersedes it, or its write would land and stay.
            let contrary =
                |id: AsicId, c: bool| current.is_some_and(|i| i.wants.contains(&(id, !c)));
            let wants: Vec<(AsicId, bool)> = self.by_pdu[p]
                .iter()
                .filter_map(|&id| {
                    let o = &self.outlets[id.0 as usize];
                    let c = o.commanded?;
                    (o.seen != Some(c) || contrary(id, c)).then_some((id, c))
                })
                .collect();
            let in_flight =
                |issued: &Issued| issued.acked.is_some() || !now.elapsed(issued.issued, self.grace);
            let issue = if wants.is_empty() {
                // A trial with nothing to change: write back what the relays read.
                on_trial(pdu) && current.is_none_or(|i| !in_flight(i) || !i.wants.is_empty())
            } else {
                current.is_none_or(|i| !in_flight(i) || wants.iter().any(|w| !i.wants.contains(w)))
            };
            if !issue {
                continue;
            }
            let Some(writes) = self.writes(site, pdu, &wants) else {
                continue;
            };
            let order = Arc::new(Order {
                id: self.next_order,
                writes,
            });
            self.next_order += 1;
            *slot = Some(order.clone());
            self.pdus[p].order = Some(Issued {
                order,
                wants,
                issued: now,
                acked: None,
            });
            changed = true;
        }
        if !changed {
            return None;
        }
        self.published = Orders { pdus: next.into() };
        Some(self.published.clone())
    }

    /// The writes that bring `wants` about on `pdu` (the first run when `wants` is empty: a
    /// probe). `None` if nothing can be written (a PDU without ASICs, or relays never read).
    fn writes(&self, site: &Site, pdu: PduId, wants: &[(AsicId, bool)]) -> Option<Vec<Write>> {
        let single = site.pdu(pdu).profile.relays.write == site_config::profile::WriteMode::Single;
        let target = |id: AsicId| {
            let o = &self.outlets[id.0 as usize];
            o.commanded.or(o.seen)
        };
        let mut writes = Vec::new();
        for run in self.runs.get(pdu.0 as usize)? {
            let touched =
                wants.is_empty() || run.asics.iter().any(|a| wants.iter().any(|w| w.0 == *a));
            if !touched {
                continue;
            }
            if single {
                for (k, &id) in run.asics.iter().enumerate() {
                    let wanted = wants.iter().find(|w| w.0 == id).map(|w| w.1);
                    let state = match (wanted, wants.is_empty()) {
                        (Some(s), _) => s,
                        (None, true) => target(id)?,
                        (None, false) => continue,
                    };
                    writes.push(Write {
                        first_outlet: run.first_outlet + k as u16,
                        states: vec![state],
                    });
                    if wants.is_empty() {
                        break;
                    }
                }
            } else {
                let states = run
                    .asics
                    .iter()
                    .map(|&id| target(id))
                    .collect::<Option<Vec<bool>>>()?;
                writes.push(Write {
                    first_outlet: run.first_outlet,
                    states,
                });
            }
            if wants.is_empty() {
                break;
            }
        }
        (!writes.is_empty()).then_some(writes)
    }

    /// When a read of `pdu` would first be able to tell a stuck relay from a slow one, if any
    /// written outlet is still waiting for one.
    pub fn verify_due(&self, now: Mono) -> Option<Mono> {
        self.pdus
            .iter()
            .filter_map(|p| p.order.as_ref()?.acked)
            .map(|at| at + self.grace)
            .filter(|t| *t > now)
            .min()
    }

    /// The switches the journal last recorded (for outlets not yet seen).
    pub fn resumed(&self, id: AsicId) -> Option<(bool, Mono)> {
        self.resumed.get(id.0 as usize).copied().flatten()
    }
}

fn state_of(pdus: &mut [Pdu], pdu: PduId) -> &mut Pdu {
    &mut pdus[pdu.0 as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use site_config::DeviceId;

    fn small() -> Site {
        site_config::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/sites/small.toml"
        ))
        .unwrap()
    }

    fn ms(n: i64) -> Mono {
        Mono::from_nanos(n * 1_000_000)
    }

    fn pdu(site: &Site, name: &str) -> PduId {
        match site.device_by_name(name) {
            Some(DeviceId::Pdu(p)) => p,
            _ => panic!("{name}"),
        }
    }

    /// pdu-1 read with every relay as `relays` and every outlet at 3 kW where on.
    fn read(fleet: &mut Fleet, site: &Site, relays: [bool; 8], now: Mono) -> ReadOutcome {
        let power: Vec<f64> = relays
            .iter()
            .map(|on| if *on { 3000.0 } else { 0.0 })
            .collect();
        fleet.read(site, pdu(site, "pdu-1"), &relays, &power, now)
    }

    #[test]
    fn runs_never_cover_gpu_feeds_or_empty_outlets() {
        let site = small();
        assert_eq!(
            runs(&site, pdu(&site, "pdu-gpu")),
            vec![],
            "a GPU PDU has nothing to write"
        );
        let pdu4 = runs(&site, pdu(&site, "pdu-4"));
        assert_eq!(pdu4.len(), 1);
        assert_eq!(
            (pdu4[0].first_outlet, pdu4[0].asics.len()),
            (1, 6),
            "outlets 7-8 are empty"
        );
        for p in &site.pdus {
            for run in runs(&site, p.id) {
                for (k, asic) in run.asics.iter().enumerate() {
                    let a = site.asic(*asic);
                    assert_eq!((a.pdu, a.outlet), (p.id, run.first_outlet + k as u16));
                    for rack in &site.gpu_racks {
                        assert!(!rack.feeds.contains(&(p.id, a.outlet)));
                    }
                }
            }
        }
    }

    #[test]
    fn a_written_relay_that_does_not_follow_within_the_grace_is_stuck_and_one_that_does_is_confirmed()
     {
        let site = small();
        let p1 = pdu(&site, "pdu-1");
        let mut fleet = Fleet::new(&site, Duration::from_secs(2), vec![None; site.asics.len()]);
        read(&mut fleet, &site, [true; 8], ms(0));
        let (a, b) = (fleet.asics_of(p1)[2], fleet.asics_of(p1)[5]);
        fleet.command(a, false, ms(10));
        fleet.command(b, false, ms(10));
        let yes = |_| true;
        let orders = fleet
            .orders(&site, ms(10), yes, |_| false)
            .expect("an order");
        let order = orders.get(p1).unwrap().clone();
        assert_eq!(
            order.writes,
            vec![Write {
                first_outlet: 1,
                states: vec![true, true, false, true, true, false, true, true]
            }],
            "the whole run, absolute"
        );
        assert!(
            fleet.orders(&site, ms(20), yes, |_| false).is_none(),
            "not again while in flight"
        );
        assert!(fleet.written(p1, order.id, ms(30)));
        // Table over time: (ms, relays read, stuck outlets, confirmed)
        let mut relays = [true; 8];
        relays[5] = false; // outlet 6 follows; outlet 3 is stuck
        let table = [(500, vec![], 1), (2020, vec![], 0), (2040, vec![3u16], 0)];
        for (t, stuck, confirmed) in table {
            let out = read(&mut fleet, &site, relays, ms(t));
            assert_eq!(out.stuck, stuck, "at {t} ms");
            assert_eq!(out.confirmed, confirmed, "at {t} ms");
        }
        assert!(fleet.state(a, true).unconfirmed);
        assert!(!fleet.state(b, true).unconfirmed);
    }

    #[test]
    fn switched_on_then_off_again_before_the_write_went_out_the_newer_order_supersedes_it() {
        // Found by security.rs (1 run in 3): an ASIC restored, then shed again 200 ms later
        // while its relay still read off. Nothing was left to write for it, so the restore's
        // order went out, the relay came on, and stayed on under a shed-all.
        let site = small();
        let p1 = pdu(&site, "pdu-1");
        let mut fleet = Fleet::new(&site, Duration::from_secs(2), vec![None; site.asics.len()]);
        let mut relays = [true; 8];
        relays[2] = false;
        read(&mut fleet, &site, relays, ms(0));
        let a = fleet.asics_of(p1)[2];
        fleet.claim_as_seen(a);
        let yes = |_| true;
        fleet.command(a, true, ms(10));
        let on = fleet
            .orders(&site, ms(10), yes, |_| false)
            .expect("the restore");
        assert!(on.get(p1).unwrap().writes[0].states[2]);
        fleet.command(a, false, ms(200));
        let off = fleet
            .orders(&site, ms(200), yes, |_| false)
            .expect("a newer order, though the relay already reads off");
        let order = off.get(p1).unwrap();
        assert!(!order.writes[0].states[2], "{order:?}");

        // And if a stale write lands anyway after the relay followed, the read that sees it
        // asks for the core's wish to be written again.
        assert!(fleet.written(p1, order.id, ms(300)));
        assert!(!read(&mut fleet, &site, relays, ms(400)).reassert);
        assert!(read(&mut fleet, &site, [true; 8], ms(900)).reassert);
        let again = fleet
            .orders(&site, ms(900), yes, |_| false)
            .expect("re-asserted");
        assert!(!again.get(p1).unwrap().writes[0].states[2]);
    }

    #[test]
    fn a_pdu_that_cannot_be_switched_loses_its_order_and_counts_at_worst_as_on() {
        let site = small();
        let p1 = pdu(&site, "pdu-1");
        let mut fleet = Fleet::new(&site, Duration::from_secs(2), vec![None; site.asics.len()]);
        read(&mut fleet, &site, [true; 8], ms(0));
        let a = fleet.asics_of(p1)[0];
        fleet.command(a, false, ms(10));
        assert!(fleet.orders(&site, ms(10), |_| true, |_| false).is_some());
        fleet.release(p1);
        let orders = fleet
            .orders(&site, ms(20), |p| p != p1, |_| false)
            .expect("the order is withdrawn");
        assert!(orders.get(p1).is_none());
        let s = fleet.state(a, false);
        assert!(s.on && !s.controllable, "not seen off: on, the safe side");
        assert_eq!(
            fleet.estimate_w(a, false, ms(20)),
            3000.0,
            "at its last measured power"
        );
        read(&mut fleet, &site, [false; 8], ms(30));
        assert!(!fleet.state(a, false).on, "seen off");
        assert_eq!(fleet.estimate_w(a, false, ms(30)), 0.0);
    }

    #[test]
    fn an_asic_being_switched_on_counts_at_its_rating_until_it_has_settled() {
        let site = small();
        let p1 = pdu(&site, "pdu-1");
        let mut fleet = Fleet::new(&site, Duration::from_secs(2), vec![None; site.asics.len()]);
        read(&mut fleet, &site, [false; 8], ms(0));
        let a = fleet.asics_of(p1)[0];
        let rated = site.asic(a).rated_w;
        fleet.command(a, true, ms(100));
        assert_eq!(
            fleet.estimate_w(a, true, ms(200)),
            rated,
            "read off, but on its way on"
        );
        let mut booting = [false; 8];
        booting[0] = true;
        let power = [900.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        fleet.read(&site, p1, &booting, &power, ms(600));
        assert_eq!(fleet.estimate_w(a, true, ms(600)), rated, "booting");
        let full = [3100.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        fleet.read(&site, p1, &booting, &full, ms(60_200));
        assert_eq!(
            fleet.estimate_w(a, true, ms(60_200)),
            3100.0,
            "booted: its reading"
        );
    }

    #[test]
    fn a_pdus_summed_estimate_follows_its_outlets_and_the_end_of_booting() {
        let site = small();
        let p1 = pdu(&site, "pdu-1");
        let mut fleet = Fleet::new(&site, Duration::from_secs(2), vec![None; site.asics.len()]);
        let summed = |fleet: &Fleet, readable: bool, now: Mono| -> f64 {
            fleet
                .asics_of(p1)
                .iter()
                .map(|&a| fleet.estimate_w(a, readable, now))
                .sum()
        };
        let check = |fleet: &Fleet, now: Mono, why: &str| {
            for readable in [true, false, true] {
                assert_eq!(
                    fleet.pdu_estimate_w(p1, readable, now),
                    summed(fleet, readable, now),
                    "{why} (readable: {readable})"
                );
            }
        };
        check(&fleet, ms(0), "never read");
        read(&mut fleet, &site, [false; 8], ms(0));
        check(&fleet, ms(0), "read off");
        let a = fleet.asics_of(p1)[0];
        fleet.command(a, true, ms(100));
        check(&fleet, ms(100), "commanded on");
        let mut on = [false; 8];
        on[0] = true;
        let power = [900.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        fleet.read(&site, p1, &on, &power, ms(600));
        check(&fleet, ms(600), "booting");
        assert_eq!(
            fleet.pdu_estimate_w(p1, true, ms(60_099)),
            site.asic(a).rated_w
        );
        check(&fleet, ms(60_100), "booted, with no read since");
        assert_eq!(fleet.pdu_estimate_w(p1, true, ms(60_100)), 900.0);
        fleet.release(p1);
        check(&fleet, ms(60_200), "released");
        fleet.claim_as_seen(a);
        check(&fleet, ms(60_300), "claimed");
    }

    #[test]
    fn a_pdu_on_trial_with_nothing_to_change_is_probed_with_what_its_relays_read() {
        let site = small();
        let p1 = pdu(&site, "pdu-1");
        let mut fleet = Fleet::new(&site, Duration::from_secs(2), vec![None; site.asics.len()]);
        let mut relays = [true; 8];
        relays[0] = false;
        read(&mut fleet, &site, relays, ms(0));
        let orders = fleet
            .orders(&site, ms(10), |_| true, |p| p == p1)
            .expect("a probe");
        let probe = orders.get(p1).unwrap();
        assert_eq!(probe.writes.len(), 1);
        assert_eq!(probe.writes[0].states, relays.to_vec(), "nothing moves");
    }

    #[test]
    fn an_outlet_that_reads_off_while_drawing_power_is_caught_and_counted_on() {
        let site = small();
        let p1 = pdu(&site, "pdu-1");
        let mut fleet = Fleet::new(&site, Duration::from_secs(2), vec![None; site.asics.len()]);
        read(&mut fleet, &site, [true; 8], ms(0));
        let mut relays = [true; 8];
        relays[1] = false;
        let power = [3000.0; 8];
        let out = fleet.read(&site, p1, &relays, &power, ms(5000));
        assert!(
            out.drawing_while_off.is_empty(),
            "a relay just switched: meters may lag"
        );
        let out = fleet.read(&site, p1, &relays, &power, ms(7000));
        assert_eq!(out.drawing_while_off, vec![2]);
        assert!(fleet.state(fleet.asics_of(p1)[1], false).on);
    }
}
