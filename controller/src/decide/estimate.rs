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
//! Restores look further back than sheds: they must fit under the peak of the last
//! [`RESTORE_MEMORY`] (five minutes, or two windows if longer). A sampled peak drifts as the
//! window slides over a swinging load, and loads beat against each other over longer than any
//! window (two racks at 2.3 s and 2.4 s periods crest together every 55 s); with one horizon for
//! both, ASICs would come back in a lull and go again at the next crest. With the longer one,
//! whatever was restored also fits the shorter horizon until a crest higher than any in five
//! minutes comes, and that is a real change. Sheds never wait: they answer to the window.
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

/// How far back restores look (at least two windows).
pub const RESTORE_MEMORY: Duration = Duration::from_secs(300);

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
    /// Samples taken ever: the sequence number of the next one.
    taken: u64,
    /// The extremes over the window and over the restore memory, kept as samples come (a
    /// site meter read four times a poll gives thousands of samples in five minutes, and
    /// every plan asks).
    in_window: Extremes,
    in_memory: Extremes,
    /// What is subtracted for the ASICs changed basis at this time (a PDU began or ceased to
    /// answer), and no sample has been taken on the new basis since.
    rebased: Option<Mono>,
}

/// The largest and smallest samples of a horizon that ends at the newest sample: monotonic
/// queues of (sequence number, time, value), so that each sample is queued and dropped once.
#[derive(Debug, Clone, Default)]
struct Extremes {
    horizon: Duration,
    /// Decreasing values: the front is the largest within the horizon.
    max: VecDeque<(u64, Mono, f64)>,
    /// Increasing values: the front is the smallest.
    min: VecDeque<(u64, Mono, f64)>,
    /// Decreasing `young` values.
    young: VecDeque<(u64, Mono, f64)>,
}

impl Extremes {
    fn new(horizon: Duration) -> Extremes {
        Extremes {
            horizon,
            ..Extremes::default()
        }
    }

    fn push(&mut self, seq: u64, at: Mono, kw: f64, young_kw: f64) {
        fn keep(
            q: &mut VecDeque<(u64, Mono, f64)>,
            entry: (u64, Mono, f64),
            ahead: impl Fn(f64) -> bool,
        ) {
            while q.back().is_some_and(|&(_, _, v)| !ahead(v)) {
                q.pop_back();
            }
            q.push_back(entry);
        }
        keep(&mut self.max, (seq, at, kw), |v| v > kw);
        keep(&mut self.min, (seq, at, kw), |v| v < kw);
        keep(&mut self.young, (seq, at, young_kw), |v| v > young_kw);
        let from = at - self.horizon;
        for q in [&mut self.max, &mut self.min, &mut self.young] {
            while q.front().is_some_and(|&(_, t, _)| t < from) {
                q.pop_front();
            }
        }
    }
}

impl Extremes {
    /// As [`Estimator::sampled_peak`] over the `n` samples of the horizon.
    fn peak(&self, n: usize) -> f64 {
        let max = self.max.front().map_or(0.0, |&(_, _, v)| v);
        let min = self.min.front().map_or(0.0, |&(_, _, v)| v);
        max + (max - min) / n.max(1) as f64
    }
}

impl Estimator {
    pub fn new(window: Duration, poll: Duration) -> Estimator {
        let memory = RESTORE_MEMORY.max(window * 2);
        Estimator {
            window,
            poll,
            rest: VecDeque::new(),
            young: VecDeque::new(),
            taken: 0,
            in_window: Extremes::new(window),
            in_memory: Extremes::new(memory),
            rebased: None,
        }
    }

    /// One sample of the rest of the site, kW; and the same with the GPU racks whose meters
    /// answered counted at their rating (`young_kw`: what counts until the window has seen
    /// their swings).
    pub fn rest(&mut self, at: Mono, kw: f64, young_kw: f64) {
        if !kw.is_finite() || !young_kw.is_finite() {
            return;
        }
        if self.rebased.is_some_and(|t| at > t) {
            self.rebased = None;
        }
        let young_kw = young_kw.max(kw);
        self.rest.push_back((at, kw));
        self.young.push_back(young_kw);
        self.in_window.push(self.taken, at, kw, young_kw);
        self.in_memory.push(self.taken, at, kw, young_kw);
        self.taken += 1;
        // Keep what restores look back on, and at least the latest few whatever their age
        // (an estimate does not expire because the meter went quiet).
        while self.rest.len() > MIN_SAMPLES
            && self
                .rest
                .front()
                .is_some_and(|(t, _)| *t < at - self.memory())
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
        let window = self.recent(now, self.window);
        let warm = self.is_warm(window.clone(), now);
        let (peak, young) = match self.kept(&self.in_window, window.clone()) {
            Some(e) => (
                Some(e.peak(window.len())),
                e.young.front().map(|&(_, _, v)| v),
            ),
            None => (
                self.sampled_peak(window.clone()),
                self.young.range(window.clone()).copied().reduce(f64::max),
            ),
        };
        let memory = self.recent(now, self.memory());
        let long_peak = match self.kept(&self.in_memory, memory.clone()) {
            Some(e) => Some(e.peak(memory.len())),
            None => self.sampled_peak(memory),
        };
        let young = young.filter(|_| !warm && strict);
        let rest_kw = match (peak, young) {
            (Some(p), Some(y)) => p.max(y),
            (Some(p), None) => p,
            _ => fallback_kw,
        };
        Load {
            rest_kw,
            restore_rest_kw: long_peak.unwrap_or(fallback_kw).max(rest_kw),
            restore_held: (!warm || self.rebased.is_some()).then_some(Hold::EstimateWarmingUp),
        }
    }

    /// The kept extremes of a horizon, if they are those of `samples`: the horizon ends at the
    /// newest sample and holds exactly them (not when fewer than [`MIN_SAMPLES`] are recent,
    /// nor when `now` is before the newest sample; those few cases are counted by hand).
    fn kept<'a>(&self, e: &'a Extremes, samples: std::ops::Range<usize>) -> Option<&'a Extremes> {
        let &(newest, _) = self.rest.back()?;
        let from = newest - e.horizon;
        let holds = samples.end == self.rest.len()
            && samples.start == self.rest.partition_point(|(t, _)| *t < from)
            && !samples.is_empty();
        holds.then_some(e)
    }

    /// What is subtracted for the ASICs changes basis at `at`: a PDU that was assumed at its
    /// rating answers with what it draws, or the reverse. Samples taken before mix the two
    /// (a PDU assumed on at rating whose ASICs turn out to be off made the rest of the site
    /// look smaller by their rating), so nothing is restored until a sample on the new basis
    /// comes; sheds go on meanwhile, and that sample corrects them within a poll.
    pub fn rebase(&mut self, at: Mono) {
        self.rebased = Some(at);
    }

    /// How far back restores look.
    fn memory(&self) -> Duration {
        RESTORE_MEMORY.max(self.window * 2)
    }

    /// True once a site reading was ever sampled.
    pub fn knows_rest(&self) -> bool {
        !self.rest.is_empty()
    }

    /// The samples to estimate from (indices into the history): those within `window` before
    /// the newest (which is `now` while the site meter answers), so that when it goes quiet the
    /// peak of the last window seen holds, rather than decaying as its crests age out; and at
    /// least the latest [`MIN_SAMPLES`] whatever their age.
    fn recent(&self, now: Mono, window: Duration) -> std::ops::Range<usize> {
        let end = self.rest.partition_point(|(t, _)| *t <= now);
        let Some(&(newest, _)) = end.checked_sub(1).and_then(|i| self.rest.get(i)) else {
            return 0..0;
        };
        let from = newest - window;
        let start = self.rest.partition_point(|(t, _)| *t < from).min(end);
        if end - start >= MIN_SAMPLES {
            start..end
        } else {
            end.saturating_sub(MIN_SAMPLES)..end
        }
    }

    /// The peak the samples point to: their largest, plus their range over their number. A
    /// few readings of a swinging load rarely catch its crest; the allowance shrinks as they
    /// grow (the largest of n draws, stretched by the mean gap between draws).
    fn sampled_peak(&self, samples: std::ops::Range<usize>) -> Option<f64> {
        let n = samples.len();
        let (min, max) =
            self.rest
                .range(samples)
                .fold(None, |acc: Option<(f64, f64)>, (_, kw)| {
                    Some(acc.map_or((*kw, *kw), |(lo, hi)| (lo.min(*kw), hi.max(*kw))))
                })?;
        Some(max + (max - min) / n as f64)
    }

    /// Enough to restore on: samples over a whole window (so the peak has seen the swings the
    /// window is sized for), the newest within it (so it is not an old story), and at least
    /// [`MIN_SAMPLES`] of them (fewer if the window holds fewer polls: a quarter of what it can
    /// hold, at least one).
    fn is_warm(&self, samples: std::ops::Range<usize>, now: Mono) -> bool {
        let fits = (self.window.as_secs_f64() / self.poll.as_secs_f64().max(1e-3) / 4.0) as usize;
        let oldest = self.rest.front().map(|(t, _)| *t);
        let newest = samples
            .end
            .checked_sub(1)
            .and_then(|i| self.rest.get(i))
            .map(|(t, _)| *t);
        samples.len() >= MIN_SAMPLES.min(fits.max(1))
            && oldest.is_some_and(|t| now.elapsed(t, self.window))
            && newest.is_some_and(|t| !now.elapsed(t, self.window))
    }
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
        // The 31 samples of the window before the newest (29..=59 s), from 240 to 280 kW:
        // their largest and a 40/31 kW allowance.
        let peak = e.load(s(60), 80.0, true).rest_kw;
        assert!((peak - (280.0 + 40.0 / 31.0)).abs() < 1e-9, "{peak}");
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
            (warm - (46.0 + 1.0 / 31.0)).abs() < 1e-9,
            "warm: the peak seen: {warm}"
        );
    }

    #[test]
    fn restores_look_five_minutes_back_so_a_passing_lull_brings_nothing_back() {
        let mut e = estimator();
        // A 300 kW crest 40 s ago, then 250 kW: outside the 30 s window, inside five minutes.
        e.rest(s(0), 300.0, 300.0);
        for t in 1..=301 {
            e.rest(s(t), 250.0, 250.0);
            if t == 40 {
                let load = e.load(s(40), 0.0, true);
                assert_eq!(load.rest_kw, 250.0);
                assert!(load.restore_rest_kw > 300.0, "{load:?}");
            }
        }
        assert_eq!(
            e.load(s(301), 0.0, true).restore_rest_kw,
            250.0,
            "five minutes on"
        );
    }

    /// Regression (the deterministic simulation, seed 0x538454127b096494): with the site meter
    /// silent, the estimate fell back to the last five samples, which sat in a trough of the
    /// swing; the peak it held decayed and the shortfall reported fell below the real excess.
    #[test]
    fn a_quiet_site_meter_holds_the_peak_of_the_last_window_seen() {
        let mut e = estimator();
        for t in 0..60 {
            let kw = if t % 7 == 0 { 280.0 } else { 240.0 };
            e.rest(s(t), kw, kw);
        }
        let later = e.load(s(600), 0.0, true);
        assert!(later.rest_kw >= 280.0, "{later:?}");
    }

    /// `load` as it was first written: every figure counted from the samples at each call.
    fn load_by_scan(e: &Estimator, now: Mono, fallback_kw: f64, strict: bool) -> Load {
        let window = e.recent(now, e.window);
        let warm = e.is_warm(window.clone(), now);
        let peak = e.sampled_peak(window.clone());
        let long_peak = e.sampled_peak(e.recent(now, e.memory()));
        let young = (!warm && strict)
            .then(|| e.young.range(window).copied().reduce(f64::max))
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

    proptest::proptest! {
        /// The extremes kept as samples come give what counting them at every plan gives.
        #[test]
        fn the_kept_extremes_match_a_count_of_every_sample(
            window_s in 1u64..90,
            steps in proptest::collection::vec((0u64..3_000, 0u8..20, 0.0f64..500.0, 0.0f64..100.0, 0i64..2_000), 1..600),
        ) {
            let mut e = Estimator::new(Duration::from_secs(window_s), Duration::from_millis(250));
            let mut t = 0i64;
            for (gap_ms, long, kw, extra, ahead_ms) in steps {
                // Mostly a few polls apart; now and then a quiet meter for minutes.
                t += if long == 0 { gap_ms as i64 * 200 } else { gap_ms as i64 };
                e.rest(Mono::from_nanos(t * 1_000_000), kw, kw + extra);
                for strict in [true, false] {
                    for now in [t, t + ahead_ms, t - ahead_ms / 4] {
                        let now = Mono::from_nanos(now * 1_000_000);
                        proptest::prop_assert_eq!(e.load(now, 77.0, strict), load_by_scan(&e, now, 77.0, strict));
                    }
                }
            }
        }
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
