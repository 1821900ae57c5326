//! Measurement and verification: what an event asked of the site, and what the site meter shows
//! it got. Pure: samples in, a [`Measurement`] out; no I/O and no clock.
//!
//! ```text
//!      baseline window (300 s)       the event: start ........................ end
//!  |<--------------------------->|<- 1 min ->|<- 1 min ->|<- 1 min ->|<- 25 s ->|
//!   baseline = mean site kW        each interval: mean site kW, obligation, reduction
//!                                 ^ first response: reduction >= 5 % of the obligation
//!                                    ^ full response: reduction >= compliance % of it
//! ```
//!
//! The obligation (the reduction a directive asks for, kW) is, against the baseline:
//!
//! - `import_limit`: baseline − limit (nothing when the site was already under the limit; then
//!   an interval complies when its mean is at or under the limit);
//! - `shed`: the kW asked for;
//! - `shed_all`: the ASICs' own mean power over the baseline window.
//!
//! An interval complies when baseline − its mean site kW reaches the compliance percentage of
//! its mean obligation. Intervals run from the event's start (1-minute ones, and 15-minute ones
//! made of them); the last of each may be shorter. An interval with no reading (meter faulted,
//! controller down) does not comply: nothing shows that it did.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::decide::signal::{Action, Directive};
use crate::series::{round1, round3};

/// One reading of the site, as the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub at: Timestamp,
    pub site_kw: Option<f64>,
    pub asic_kw: Option<f64>,
    pub gpu_kw: Option<f64>,
    pub limit_kw: f64,
}

/// How events are measured (the site file's `[reporting]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub baseline_window: SignedDuration,
    pub compliance_pct: f64,
}

impl Settings {
    pub fn for_site(site: &site_config::Site) -> Settings {
        Settings {
            baseline_window: SignedDuration::try_from(site.reporting.baseline_window)
                .unwrap_or(SignedDuration::from_mins(5)),
            compliance_pct: site.reporting.compliance_pct,
        }
    }
}

/// The share of the obligation at which a response counts as begun.
const FIRST_RESPONSE_PCT: f64 = 5.0;
/// Obligations below this are nothing (kW).
const NOTHING_KW: f64 = 0.05;

const MINUTE: SignedDuration = SignedDuration::from_mins(1);

/// The site before the event: means over the baseline window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub site_kw: f64,
    pub asic_kw: Option<f64>,
    pub samples: u32,
}

impl Baseline {
    /// The means of the samples in `[start − window, start)`; `None` without a site reading.
    pub fn of<'a>(
        samples: impl IntoIterator<Item = &'a Sample>,
        start: Timestamp,
        window: SignedDuration,
    ) -> Option<Baseline> {
        let from = start.checked_sub(window).unwrap_or(Timestamp::MIN);
        let (mut site, mut asic, mut n, mut n_asic) = (0.0, 0.0, 0u32, 0u32);
        for s in samples {
            if s.at < from || s.at >= start {
                continue;
            }
            if let Some(kw) = s.site_kw {
                site += kw;
                n += 1;
            }
            if let Some(kw) = s.asic_kw {
                asic += kw;
                n_asic += 1;
            }
        }
        (n > 0).then(|| Baseline {
            site_kw: site / f64::from(n),
            asic_kw: (n_asic > 0).then(|| asic / f64::from(n_asic)),
            samples: n,
        })
    }
}

/// What a directive asks of the site, against `baseline`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Obligation {
    /// The reduction asked for, kW (never negative).
    pub required_kw: f64,
    /// With nothing to reduce, the site complies at or under this.
    pub ceiling_kw: f64,
}

pub fn obligation(action: &Action, baseline: &Baseline) -> Obligation {
    let b = baseline.site_kw;
    match *action {
        Action::ImportLimit { kw } => Obligation {
            required_kw: (b - kw).max(0.0),
            ceiling_kw: kw,
        },
        Action::Shed { kw } => Obligation {
            required_kw: kw,
            ceiling_kw: b,
        },
        Action::ShedAll => Obligation {
            required_kw: baseline.asic_kw.unwrap_or(0.0).max(0.0),
            ceiling_kw: b,
        },
    }
}

/// Sums over the samples of one stretch of time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sums {
    site_kw: f64,
    required_kw: f64,
    ceiling_kw: f64,
    n: u32,
}

impl Sums {
    fn add(&mut self, site_kw: f64, o: Obligation) {
        self.site_kw += site_kw;
        self.required_kw += o.required_kw;
        self.ceiling_kw += o.ceiling_kw;
        self.n += 1;
    }

    fn merge(&mut self, other: &Sums) {
        self.site_kw += other.site_kw;
        self.required_kw += other.required_kw;
        self.ceiling_kw += other.ceiling_kw;
        self.n += other.n;
    }

    fn mean(&self, total: f64) -> Option<f64> {
        (self.n > 0).then(|| total / f64::from(self.n))
    }
}

/// One averaging interval of an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// 1 or 15.
    pub minutes: u32,
    pub start: Timestamp,
    pub end: Timestamp,
    pub samples: u32,
    pub mean_kw: Option<f64>,
    pub required_kw: Option<f64>,
    pub reduction_kw: Option<f64>,
    /// Reduction as a percentage of the obligation (none when nothing was asked).
    pub performance_pct: Option<f64>,
    pub compliant: bool,
}

/// How the intervals of one length fared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Compliance {
    pub intervals: u32,
    pub compliant: u32,
    /// Intervals without a single reading.
    pub unmeasured: u32,
    /// The lowest performance of any interval.
    pub worst_pct: Option<f64>,
}

/// An event as measured: what the ack carries and `gridshed report` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub id: String,
    pub start: Timestamp,
    pub end: Timestamp,
    pub baseline_kw: Option<f64>,
    pub baseline_samples: u32,
    pub baseline_window_s: u64,
    /// Mean obligation over the event, kW.
    pub required_kw: Option<f64>,
    /// Mean site power during the event, kW.
    pub mean_kw: Option<f64>,
    pub reduction_kw: Option<f64>,
    pub performance_pct: Option<f64>,
    /// From the start until the reduction reached 5 % of the obligation.
    pub first_response_s: Option<f64>,
    /// From the start until the reduction reached the compliance percentage of the obligation.
    pub full_response_s: Option<f64>,
    /// The bar an interval must reach.
    pub compliance_pct: f64,
    pub one_minute: Compliance,
    pub fifteen_minute: Compliance,
    /// Every interval of both lengths complied.
    pub compliant: bool,
}

/// Mean site power over one of the event's own intervals (OpenADR intervals), for reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventInterval {
    /// The directive's position in its event.
    pub id: u32,
    pub start: Timestamp,
    pub end: Timestamp,
    pub mean_kw: Option<f64>,
}

impl EventInterval {
    /// Energy over the interval, kWh.
    pub fn kwh(&self) -> Option<f64> {
        let hours = self.end.duration_since(self.start).as_secs_f64() / 3600.0;
        self.mean_kw.map(|kw| kw * hours.max(0.0))
    }
}

/// The measurement of one event in progress: fed every sample from its start, finished when it
/// ends. Keeps sums per minute, not samples, so a long event costs little memory.
#[derive(Debug, Clone)]
pub struct Meter {
    id: String,
    start: Timestamp,
    settings: Settings,
    baseline: Option<Baseline>,
    directives: Vec<Directive>,
    /// Index k: `[start + k min, start + (k+1) min)`.
    minutes: Vec<Sums>,
    /// Per directive (its interval number).
    by_directive: BTreeMap<u32, Sums>,
    first_response: Option<Timestamp>,
    full_response: Option<Timestamp>,
}

impl Meter {
    /// Starts measuring event `id` from `start`, with the baseline taken from `history` (the
    /// samples before `start`; later ones are ignored).
    pub fn begin<'a>(
        id: &str,
        directives: &[Directive],
        start: Timestamp,
        history: impl IntoIterator<Item = &'a Sample>,
        settings: Settings,
    ) -> Meter {
        Meter {
            id: id.to_owned(),
            start,
            settings,
            baseline: Baseline::of(history, start, settings.baseline_window),
            directives: directives.to_vec(),
            minutes: Vec::new(),
            by_directive: BTreeMap::new(),
            first_response: None,
            full_response: None,
        }
    }

    pub fn start(&self) -> Timestamp {
        self.start
    }

    pub fn baseline(&self) -> Option<&Baseline> {
        self.baseline.as_ref()
    }

    /// The event's directives changed (an update from the utility): later samples are measured
    /// against the new ones.
    pub fn set_directives(&mut self, directives: &[Directive]) {
        self.directives = directives.to_vec();
    }

    /// Takes in one sample (ignored before the start, without a site reading, without a
    /// baseline, or while none of the event's directives is in force).
    pub fn add(&mut self, s: &Sample) {
        let (Some(site_kw), Some(baseline)) = (s.site_kw, self.baseline) else {
            return;
        };
        if s.at < self.start {
            return;
        }
        // Of the event's directives in force (normally one), the most demanding.
        let Some((interval, o)) = self
            .directives
            .iter()
            .filter(|d| d.is_in_force(s.at))
            .map(|d| (d.interval, obligation(&d.action, &baseline)))
            .max_by(|a, b| a.1.required_kw.total_cmp(&b.1.required_kw))
        else {
            return;
        };
        let k = minute_index(self.start, s.at);
        if self.minutes.len() <= k {
            self.minutes.resize(k + 1, Sums::default());
        }
        self.minutes[k].add(site_kw, o);
        self.by_directive
            .entry(interval)
            .or_default()
            .add(site_kw, o);
        if o.required_kw > NOTHING_KW {
            let pct = (baseline.site_kw - site_kw) / o.required_kw * 100.0;
            if self.first_response.is_none() && pct >= FIRST_RESPONSE_PCT {
                self.first_response = Some(s.at);
            }
            if self.full_response.is_none() && pct >= self.settings.compliance_pct {
                self.full_response = Some(s.at);
            }
        }
    }

    /// The measurement of the event, ended at `end`, with every interval.
    pub fn finish(&self, end: Timestamp) -> (Measurement, Vec<Interval>) {
        let end = end.max(self.start);
        let baseline = self.baseline.map(|b| b.site_kw);
        let pct = self.settings.compliance_pct;
        let span = end.duration_since(self.start);
        let count = |len: SignedDuration| -> usize {
            let (span, len) = (span.as_nanos().max(0), len.as_nanos().max(1));
            let n = span / len + i128::from(span % len != 0);
            usize::try_from(n).unwrap_or(usize::MAX).max(1)
        };
        let mut intervals = Vec::new();
        let mut one = Compliance::default();
        for k in 0..count(MINUTE) {
            let sums = self.minutes.get(k).copied().unwrap_or_default();
            let iv = self.interval(1, k, &sums, end, baseline, pct);
            tally(&mut one, &iv);
            intervals.push(iv);
        }
        let mut fifteen = Compliance::default();
        for q in 0..count(MINUTE * 15) {
            let mut sums = Sums::default();
            for k in q * 15..(q + 1) * 15 {
                if let Some(m) = self.minutes.get(k) {
                    sums.merge(m);
                }
            }
            let iv = self.interval(15, q, &sums, end, baseline, pct);
            tally(&mut fifteen, &iv);
            intervals.push(iv);
        }
        let mut all = Sums::default();
        for m in &self.minutes {
            all.merge(m);
        }
        let whole = evaluate(&all, baseline, pct);
        let since =
            |t: Option<Timestamp>| t.map(|t| round3(t.duration_since(self.start).as_secs_f64()));
        let m = Measurement {
            id: self.id.clone(),
            start: self.start,
            end,
            baseline_kw: baseline.map(round1),
            baseline_samples: self.baseline.map_or(0, |b| b.samples),
            baseline_window_s: self.settings.baseline_window.as_secs().max(0) as u64,
            required_kw: whole.required_kw,
            mean_kw: whole.mean_kw,
            reduction_kw: whole.reduction_kw,
            performance_pct: whole.performance_pct,
            first_response_s: since(self.first_response),
            full_response_s: since(self.full_response),
            compliance_pct: pct,
            compliant: one.compliant == one.intervals && fifteen.compliant == fifteen.intervals,
            one_minute: one,
            fifteen_minute: fifteen,
        };
        (m, intervals)
    }

    /// Mean site power over each of the event's own intervals that has begun by `end`.
    pub fn event_intervals(&self, end: Timestamp) -> Vec<EventInterval> {
        self.directives
            .iter()
            .filter(|d| d.start < end)
            .map(|d| {
                let sums = self
                    .by_directive
                    .get(&d.interval)
                    .copied()
                    .unwrap_or_default();
                EventInterval {
                    id: d.interval,
                    start: d.start,
                    end: d.end.map_or(end, |e| e.min(end)),
                    mean_kw: sums.mean(sums.site_kw).map(round3),
                }
            })
            .collect()
    }

    fn interval(
        &self,
        minutes: u32,
        k: usize,
        sums: &Sums,
        end: Timestamp,
        baseline: Option<f64>,
        pct: f64,
    ) -> Interval {
        let len = MINUTE * minutes as i32;
        let at = |k: usize| {
            self.start
                .checked_add(len * i32::try_from(k).unwrap_or(i32::MAX))
                .unwrap_or(Timestamp::MAX)
                .min(end)
        };
        let e = evaluate(sums, baseline, pct);
        Interval {
            minutes,
            start: at(k),
            end: at(k + 1),
            samples: sums.n,
            mean_kw: e.mean_kw,
            required_kw: e.required_kw,
            reduction_kw: e.reduction_kw,
            performance_pct: e.performance_pct,
            compliant: e.compliant,
        }
    }
}

struct Evaluated {
    mean_kw: Option<f64>,
    required_kw: Option<f64>,
    reduction_kw: Option<f64>,
    performance_pct: Option<f64>,
    compliant: bool,
}

fn evaluate(sums: &Sums, baseline: Option<f64>, pct: f64) -> Evaluated {
    let mean = sums.mean(sums.site_kw);
    let required = sums.mean(sums.required_kw);
    let ceiling = sums.mean(sums.ceiling_kw);
    let reduction = mean.zip(baseline).map(|(m, b)| b - m);
    let performance = reduction
        .zip(required)
        .filter(|(_, r)| *r > NOTHING_KW)
        .map(|(x, r)| x / r * 100.0);
    let compliant = match (performance, mean, ceiling) {
        (Some(p), _, _) => p >= pct,
        // Nothing to reduce: the site must simply stay at or under its ceiling.
        (None, Some(m), Some(c)) => m <= c,
        _ => false,
    };
    Evaluated {
        mean_kw: mean.map(round3),
        required_kw: required.map(round3),
        reduction_kw: reduction.map(round3),
        performance_pct: performance.map(round1),
        compliant,
    }
}

fn tally(c: &mut Compliance, iv: &Interval) {
    c.intervals += 1;
    if iv.compliant {
        c.compliant += 1;
    }
    if iv.samples == 0 {
        c.unmeasured += 1;
    }
    if let Some(p) = iv.performance_pct {
        c.worst_pct = Some(c.worst_pct.map_or(p, |w: f64| w.min(p)));
    }
}

fn minute_index(start: Timestamp, at: Timestamp) -> usize {
    let nanos = at.duration_since(start).as_nanos().max(0);
    usize::try_from(nanos / MINUTE.as_nanos()).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use site_config::SignalFormat;

    fn t(s: f64) -> Timestamp {
        Timestamp::from_millisecond(1_800_000_000_000 + (s * 1000.0) as i64).unwrap()
    }

    fn directive(action: Action, start: f64, end: Option<f64>) -> Directive {
        Directive {
            id: "evt".into(),
            interval: 0,
            action,
            start: t(start),
            end: end.map(t),
            priority: 1,
            emergency: false,
            format: SignalFormat::Native,
        }
    }

    fn sample(at: f64, site_kw: f64, asic_kw: f64) -> Sample {
        Sample {
            at: t(at),
            site_kw: Some(site_kw),
            asic_kw: Some(asic_kw),
            gpu_kw: Some(50.0),
            limit_kw: 300.0,
        }
    }

    const SETTINGS: Settings = Settings {
        baseline_window: SignedDuration::from_secs(60),
        compliance_pct: 95.0,
    };

    /// A site at 200 kW (ASICs 120) for a minute, then at `during` kW every 2 s from `at` on
    /// (at 200 kW before), measured from t = 60 s for `secs` seconds.
    fn measure(action: Action, during: f64, from: f64, secs: f64) -> (Measurement, Vec<Interval>) {
        let d = [directive(action, 60.0, None)];
        let history: Vec<Sample> = (0..30)
            .map(|k| sample(k as f64 * 2.0, 200.0, 120.0))
            .collect();
        let mut m = Meter::begin("evt", &d, t(60.0), &history, SETTINGS);
        let mut at = 60.0;
        while at < 60.0 + secs {
            let kw = if at >= from { during } else { 200.0 };
            m.add(&sample(at, kw, 0.0));
            at += 2.0;
        }
        m.finish(t(60.0 + secs))
    }

    #[test]
    fn the_baseline_is_the_mean_site_power_over_the_window_before_the_start() {
        let history = [
            sample(0.0, 500.0, 0.0), // outside the 60 s window
            sample(10.0, 100.0, 40.0),
            sample(30.0, 200.0, 60.0),
            sample(70.0, 900.0, 0.0), // after the start
        ];
        let b = Baseline::of(&history, t(70.0), SignedDuration::from_secs(60)).unwrap();
        assert_eq!((b.site_kw, b.asic_kw, b.samples), (150.0, Some(50.0), 2));
        assert_eq!(
            Baseline::of(&history[..1], t(70.0), SignedDuration::from_secs(60)),
            None
        );
    }

    #[test]
    fn obligations_table() {
        let b = Baseline {
            site_kw: 200.0,
            asic_kw: Some(120.0),
            samples: 1,
        };
        for (action, required, ceiling) in [
            (Action::ImportLimit { kw: 150.0 }, 50.0, 150.0),
            (Action::ImportLimit { kw: 250.0 }, 0.0, 250.0),
            (Action::Shed { kw: 30.0 }, 30.0, 200.0),
            (Action::ShedAll, 120.0, 200.0),
        ] {
            let o = obligation(&action, &b);
            assert_eq!(
                (o.required_kw, o.ceiling_kw),
                (required, ceiling),
                "{action:?}"
            );
        }
    }

    #[test]
    fn a_full_shed_within_seconds_complies_on_every_interval() {
        // Limit 150 against a 200 kW baseline: 50 kW asked, the site drops to 140 at +4 s.
        let (m, intervals) = measure(Action::ImportLimit { kw: 150.0 }, 140.0, 64.0, 300.0);
        assert_eq!(m.baseline_kw, Some(200.0));
        assert_eq!(m.baseline_samples, 30);
        assert_eq!(m.required_kw, Some(50.0));
        assert_eq!(m.first_response_s, Some(4.0));
        assert_eq!(m.full_response_s, Some(4.0));
        assert_eq!(m.one_minute.intervals, 5);
        assert_eq!(m.fifteen_minute.intervals, 1);
        // The first minute holds two samples at 200 kW: (2 × 0 + 28 × 60) / 30 = 56 kW reduced.
        assert_eq!(intervals[0].reduction_kw, Some(56.0));
        assert_eq!(intervals[0].performance_pct, Some(112.0));
        assert!(m.compliant, "{m:#?}");
    }

    #[test]
    fn a_reduction_short_of_the_bar_fails_the_intervals_it_misses() {
        // Shed 100 kW asked; the site comes down by only 90 (90 %).
        let (m, intervals) = measure(Action::Shed { kw: 100.0 }, 110.0, 60.0, 120.0);
        assert_eq!(m.performance_pct, Some(90.0));
        assert_eq!(m.first_response_s, Some(0.0));
        assert_eq!(m.full_response_s, None);
        assert_eq!(m.one_minute.compliant, 0);
        assert_eq!(m.one_minute.worst_pct, Some(90.0));
        assert!(!m.compliant);
        assert!(intervals.iter().all(|i| !i.compliant));
    }

    #[test]
    fn a_slow_response_fails_the_first_minute_only() {
        // Shed all (120 kW of ASICs): the site falls to 80 kW only after 50 s.
        let (m, intervals) = measure(Action::ShedAll, 80.0, 110.0, 180.0);
        assert_eq!(m.required_kw, Some(120.0));
        assert_eq!(m.full_response_s, Some(50.0));
        let ones: Vec<bool> = intervals
            .iter()
            .filter(|i| i.minutes == 1)
            .map(|i| i.compliant)
            .collect();
        assert_eq!(ones, [false, true, true]);
        assert_eq!(m.one_minute.compliant, 2);
        assert!(!m.compliant);
    }

    #[test]
    fn intervals_without_a_reading_do_not_comply() {
        let d = [directive(Action::Shed { kw: 10.0 }, 60.0, None)];
        let history = [sample(30.0, 200.0, 100.0)];
        let mut m = Meter::begin("evt", &d, t(60.0), &history, SETTINGS);
        m.add(&sample(130.0, 150.0, 50.0)); // only the second minute has a reading
        let (m, intervals) = m.finish(t(180.0));
        assert_eq!(m.one_minute.intervals, 2);
        assert_eq!(m.one_minute.unmeasured, 1);
        assert!(!intervals[0].compliant && intervals[1].compliant);
        assert!(!m.compliant);
    }

    #[test]
    fn without_a_baseline_nothing_is_measured_and_nothing_complies() {
        let d = [directive(Action::ShedAll, 60.0, None)];
        let mut m = Meter::begin("evt", &d, t(60.0), &[], SETTINGS);
        m.add(&sample(70.0, 10.0, 0.0));
        let (m, _) = m.finish(t(100.0));
        assert_eq!(
            (m.baseline_kw, m.reduction_kw, m.performance_pct),
            (None, None, None)
        );
        assert!(!m.compliant);
    }

    #[test]
    fn an_import_limit_already_met_complies_while_the_site_stays_under_it() {
        let (m, _) = measure(Action::ImportLimit { kw: 250.0 }, 200.0, 60.0, 60.0);
        assert_eq!(m.required_kw, Some(0.0));
        assert_eq!(m.performance_pct, None);
        assert!(m.compliant);
        let (m, _) = measure(Action::ImportLimit { kw: 250.0 }, 260.0, 60.0, 60.0);
        assert!(!m.compliant);
    }

    #[test]
    fn event_intervals_give_mean_power_and_energy_per_openadr_interval() {
        let mut d1 = directive(Action::ImportLimit { kw: 150.0 }, 60.0, Some(120.0));
        let mut d2 = directive(Action::ImportLimit { kw: 100.0 }, 120.0, Some(240.0));
        d1.interval = 0;
        d2.interval = 1;
        let history = [sample(30.0, 200.0, 100.0)];
        let mut m = Meter::begin("evt", &[d1, d2], t(60.0), &history, SETTINGS);
        for k in 0..30 {
            m.add(&sample(60.0 + k as f64 * 2.0, 140.0, 40.0));
            m.add(&sample(120.0 + k as f64 * 2.0, 90.0, 0.0));
        }
        // Ended early, half-way through the second interval.
        let iv = m.event_intervals(t(180.0));
        assert_eq!(iv.len(), 2);
        assert_eq!((iv[0].id, iv[0].mean_kw), (0, Some(140.0)));
        assert_eq!(iv[1].end, t(180.0));
        assert_eq!(iv[0].kwh(), Some(140.0 / 60.0));
        assert_eq!(iv[1].kwh(), Some(90.0 / 60.0));
    }
}
