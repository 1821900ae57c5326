//! What the site draws besides the ASICs the controller can switch, from the site meter.
//!
//! Every settled site reading gives one sample of the rest of the site: the site meter minus the
//! ASICs' power. GPU racks (metered or not), cooling, offices and anything else are all in it,
//! so one figure covers them, and its **peak** over the policy window is what the budget leaves
//! room for:
//!
//! ```text
//!   site meter ─┐
//!               ├─ rest = site − ASICs   one sample per settled site reading
//!   ASICs ──────┘        peak over the window ─────▶ rest_kw     budget = limit − rest_kw − margin
//!
//!   rest    ╭╮  ╭╮  ╭╮    ← GPU training swings (0.2–3 Hz), metered or not
//!   ────────╯╰──╯╰──╯╰─   peak = what the site must leave room for
//! ```
//!
//! Restores look further back than sheds: they must fit under the peak of *two* windows. A
//! sampled peak drifts by a few kW as the window slides over a swinging load; with one
//! horizon for both, ASICs would come back in a lull and go again at the next crest. With
//! two, whatever was restored also fits the shorter horizon until a crest higher than any in
//! two windows comes, and that is a real change.
//!
//! A peak rather than a mean, because a load that swings and is not metered (a site's GPU racks
//! behind one feeder) would take the site over the limit at every crest of a mean-based
//! budget. Only ASIC outlet readings are subtracted, and ASICs draw steadily, so readings taken
//! a few hundred milliseconds apart agree; samples are not taken while relays move. A GPU meter
//! is not needed for the budget at all: it shows the operator where the load is.
//!
//! What is subtracted for a PDU that cannot be read is never more than the planner counts for
//! it (README, "What it assumes of a device it cannot read"), so whatever its ASICs really draw
//! stays inside the site reading and the budget errs on the safe side.

use std::collections::VecDeque;
use std::time::Duration;

use crate::decide::planner::Load;
use crate::decide::time::Mono;
use crate::msg::Hold;

/// Samples needed within the window before anything is restored.
pub const MIN_SAMPLES: usize = 5;

/// The history behind the estimate; pure, fed by the core.
#[derive(Debug, Clone)]
pub struct Estimator {
    window: Duration,
    poll: Duration,
    /// The rest of the site (site meter − ASICs), oldest first, with what the GPU meters read
    /// at the same time.
    rest: VecDeque<(Mono, f64)>,
    /// Per sample (as `rest`): the same with the GPU racks that answered counted at their
    /// rating instead of their reading.
    young: VecDeque<f64>,
}

impl Estimator {
    pub fn new(window: Duration, poll: Duration) -> Estimator {
        Estimator {
            window,
            poll,
            rest: VecDeque::new(),
            young: VecDeque::new(),
        }
    }

    /// One sample of the rest of the site, kW; and the same with the GPU racks whose meters
    /// answered counted at their rating (`young_kw`: what counts until the window has seen
    /// their swings).
    pub fn rest(&mut self, at: Mono, kw: f64, young_kw: f64) {
        if !kw.is_finite() || !young_kw.is_finite() {
            return;
        }
        self.rest.push_back((at, kw));
        self.young.push_back(young_kw.max(kw));
        // Keep two windows (restores look that far back), and at least the latest few
        // whatever their age (an estimate does not expire because the meter went quiet).
        while self.rest.len() > MIN_SAMPLES
            && self
                .rest
                .front()
                .is_some_and(|(t, _)| *t < at - self.window * 2)
        {
            self.rest.pop_front();
            self.young.pop_front();
        }
    }

    /// The figures to plan on at `now`; with no sample at all, `fallback_kw` and nothing
    /// restored. Until the samples are warm, the peak of a few readings may have missed the
    /// GPU racks' crests: where `strict` (a utility's directive is in force), the metered racks
    /// count at their rating meanwhile. Under the subscription limit alone they do not: the
    /// site ran under it before the controller started, and shedding at every start-up of a
    /// site that sits near its limit would be a fault of its own.
    pub fn load(&self, now: Mono, fallback_kw: f64, strict: bool) -> Load {
        let samples = self.recent(now, self.window);
        let warm = self.is_warm(&samples, now);
        let peak = sampled_peak(&samples);
        let long_peak = sampled_peak(&self.recent(now, self.window * 2));
        let young = (!warm && strict)
            .then(|| {
                let skip = self.rest.len() - samples.len();
                self.young.iter().skip(skip).copied().reduce(f64::max)
            })
            .flatten();
        let rest_kw = match (peak, young) {
            (Some(p), Some(y)) => p.max(y),
            (Some(p), None) => p,
            _ => fallback_kw,
        };
        Load {
            rest_kw,
            restore_rest_kw: long_peak.unwrap_or(fallback_kw).max(rest_kw),
            restore_held: (!warm).then_some(Hold::EstimateWarmingUp),
        }
    }

    /// True once a site reading was ever sampled.
    pub fn knows_rest(&self) -> bool {
        !self.rest.is_empty()
    }

    /// The samples to estimate from: those within `window`, or, when fewer than
    /// [`MIN_SAMPLES`] are there, the latest that many whatever their age.
    fn recent(&self, now: Mono, window: Duration) -> Vec<(Mono, f64)> {
        let from = now - window;
        let past: Vec<(Mono, f64)> = self
            .rest
            .iter()
            .copied()
            .filter(|(t, _)| *t <= now)
            .collect();
        let recent: Vec<(Mono, f64)> = past.iter().copied().filter(|(t, _)| *t >= from).collect();
        if recent.len() >= MIN_SAMPLES {
            recent
        } else {
            past[past.len().saturating_sub(MIN_SAMPLES)..].to_vec()
        }
    }

    /// Enough to restore on: samples over a whole window (so the peak has seen the swings the
    /// window is sized for), the newest within it (so it is not an old story), and at least
    /// [`MIN_SAMPLES`] of them (fewer if the window holds fewer polls: a quarter of what it can
    /// hold, at least one).
    fn is_warm(&self, samples: &[(Mono, f64)], now: Mono) -> bool {
        let fits = (self.window.as_secs_f64() / self.poll.as_secs_f64().max(1e-3) / 4.0) as usize;
        let oldest = self.rest.front().map(|(t, _)| *t);
        let newest = samples.iter().map(|(t, _)| *t).max();
        samples.len() >= MIN_SAMPLES.min(fits.max(1))
            && oldest.is_some_and(|t| now.elapsed(t, self.window))
            && newest.is_some_and(|t| !now.elapsed(t, self.window))
    }
}

/// The peak the samples point to: their largest, plus their range over their number. A few
/// readings of a swinging load rarely catch its crest; the allowance shrinks as they grow
/// (the largest of n draws, stretched by the mean gap between draws).
fn sampled_peak(samples: &[(Mono, f64)]) -> Option<f64> {
    let max = samples.iter().map(|(_, kw)| *kw).reduce(f64::max)?;
    let min = samples.iter().map(|(_, kw)| *kw).reduce(f64::min)?;
    Some(max + (max - min) / samples.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: i64) -> Mono {
        Mono::from_nanos(secs * 1_000_000_000)
    }

    /// small.toml's window (30 s) and poll (0.5 s).
    fn estimator() -> Estimator {
        Estimator::new(Duration::from_secs(30), Duration::from_millis(500))
    }

    #[test]
    fn nothing_is_restored_until_the_samples_cover_a_whole_window() {
        let mut e = estimator();
        for t in 0..29 {
            e.rest(s(t), 5.0, 5.0);
        }
        assert_eq!(
            e.load(s(29), 80.0, true).restore_held,
            Some(Hold::EstimateWarmingUp),
            "too young"
        );
        let mut e = estimator();
        e.rest(s(0), 5.0, 5.0);
        e.rest(s(30), 5.0, 5.0);
        assert_eq!(
            e.load(s(31), 80.0, true).restore_held,
            Some(Hold::EstimateWarmingUp),
            "too few"
        );
        let mut e = estimator();
        for t in 0..31 {
            e.rest(s(t), 5.0, 5.0);
        }
        let load = e.load(s(31), 80.0, true);
        assert_eq!(load.restore_held, None);
        assert_eq!(load.rest_kw, 5.0, "a steady load needs no allowance");
    }

    #[test]
    fn the_peak_over_the_window_counts_and_old_samples_are_forgotten() {
        let mut e = estimator();
        // An unmetered training swing 240..280 kW, and a 400 kW spike 40 s ago (the window is
        // 30 s): the budget leaves room for the crests, not the mean.
        for t in 0..60 {
            let kw = match t {
                20 => 400.0,
                t if t % 2 == 0 => 280.0,
                _ => 240.0,
            };
            e.rest(s(t), kw, kw);
        }
        // 30 samples from 240 to 280 kW: their largest and a 40/30 kW allowance.
        let peak = e.load(s(60), 80.0, true).rest_kw;
        assert!((peak - (280.0 + 40.0 / 30.0)).abs() < 1e-9, "{peak}");
        assert_eq!(
            estimator().load(s(60), 80.0, true).rest_kw,
            80.0,
            "no reading: the fallback"
        );
    }

    #[test]
    fn until_warm_the_metered_gpu_racks_count_at_their_rating() {
        let mut e = Estimator::new(Duration::from_secs(30), Duration::from_millis(500));
        // Two readings, both in a trough of the racks' swing (40 of 80 kW rated, 5 kW other).
        e.rest(s(0), 45.0, 85.0);
        e.rest(s(1), 46.0, 85.0);
        assert_eq!(
            e.load(s(1), 0.0, true).rest_kw,
            85.0,
            "5 kW other + 80 kW rated"
        );
        assert_eq!(
            e.load(s(1), 0.0, false).rest_kw,
            46.5,
            "under the subscription limit alone: the peak the two point to"
        );
        for t in 2..31 {
            e.rest(s(t), 45.0, 85.0);
        }
        let warm = e.load(s(31), 0.0, true).rest_kw;
        assert!(
            (warm - (46.0 + 1.0 / 30.0)).abs() < 1e-9,
            "warm: the peak seen: {warm}"
        );
    }

    #[test]
    fn restores_look_two_windows_back_so_a_passing_lull_brings_nothing_back() {
        let mut e = estimator();
        // A 300 kW crest 40 s ago, then 250 kW: outside the 30 s window, inside two.
        e.rest(s(0), 300.0, 300.0);
        for t in 1..61 {
            e.rest(s(t), 250.0, 250.0);
        }
        let load = e.load(s(40), 0.0, true);
        assert_eq!(load.rest_kw, 250.0);
        assert!(load.restore_rest_kw > 300.0, "{load:?}");
        assert_eq!(
            e.load(s(61), 0.0, true).restore_rest_kw,
            250.0,
            "two windows on"
        );
    }

    #[test]
    fn an_estimate_outlives_its_window_when_no_new_sample_comes() {
        let mut e = estimator();
        for t in 0..20 {
            e.rest(s(t), 240.0, 240.0);
        }
        let later = e.load(s(600), 0.0, true);
        assert_eq!(later.rest_kw, 240.0, "the latest samples stand");
        assert_eq!(later.restore_held, Some(Hold::EstimateWarmingUp));
        assert!(e.knows_rest());
        assert!(!estimator().knows_rest());
    }
}
