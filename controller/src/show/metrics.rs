//! What the controller shows of itself: counters and histograms that the engine and the Modbus
//! tasks update as they go (atomics, no lock), and the latest status with the last hour of
//! readings for the status page (one short lock, never held across an await).
//!
//! [`Telemetry::prometheus`] renders it all in the Prometheus text format (version 0.0.4).

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::SignedDuration;
use serde::Serialize;

use crate::decide::mv::Sample;
use crate::decide::signal::Directive;
use crate::decide::state::End;
use crate::msg::Status;
use crate::series::{keep_recent, round1};

/// How far back the status page's chart reaches.
pub const HISTORY: SignedDuration = SignedDuration::from_hours(1);
/// The most points the chart is sent (one per 5 s over the hour).
const CHART_POINTS: usize = 720;

/// A Prometheus histogram with fixed buckets, updated without a lock.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds, seconds, ascending; `+Inf` is implied.
    bounds: &'static [f64],
    /// Per bucket (not cumulative), then the overflow.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let k = self.bounds.partition_point(|b| *b < s);
        if let Some(c) = self.counts.get(k) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let total = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {total}");
    }
}

pub use crate::msg::Outcome;

/// The latest view of the site, for the status page.
#[derive(Debug, Default)]
struct Live {
    status: Option<Status>,
    directives: Vec<Directive>,
    history: VecDeque<Sample>,
}

/// Everything the metrics endpoint and status page show; shared by the engine, the Modbus
/// tasks and the HTTP server.
#[derive(Debug)]
pub struct Telemetry {
    signals: [AtomicU64; 3],
    completed: [AtomicU64; 3],
    /// Every Modbus request, from sending to its answer (or timeout).
    pub modbus: Histogram,
    /// One sense → plan → actuate cycle of the engine.
    pub cycle: Histogram,
    live: Mutex<Live>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            signals: Default::default(),
            completed: Default::default(),
            modbus: Histogram::new(&[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            cycle: Histogram::new(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            ]),
            live: Mutex::default(),
        }
    }
}

/// The status page's data: `/api/status`.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    pub status: Option<Status>,
    /// The directives in force now.
    pub directives: Vec<Directive>,
    /// The last hour, oldest first.
    pub history: Vec<Point>,
}

/// One point of the chart: `[unix ms, site kW, ASIC kW, GPU kW, limit kW]`; a reading that was
/// missing is null.
pub type Point = (i64, Option<f64>, Option<f64>, Option<f64>, f64);

impl Telemetry {
    pub fn signal(&self, outcome: Outcome) {
        self.signals[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn completed(&self, end: End) {
        let k = match end {
            End::Released => 0,
            End::Expired => 1,
            End::Stale => 2,
        };
        self.completed[k].fetch_add(1, Ordering::Relaxed);
    }

    pub fn signals(&self, outcome: Outcome) -> u64 {
        self.signals[outcome as usize].load(Ordering::Relaxed)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        // A panic elsewhere while holding the lock leaves plain data: still fine to show.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine's newest status and the directives in force.
    pub fn set_status(&self, status: Status, directives: Vec<Directive>) {
        let mut live = self.live();
        live.status = Some(status);
        live.directives = directives;
    }

    /// A new reading of the site, for the chart.
    pub fn push_sample(&self, s: Sample) {
        let mut live = self.live();
        keep_recent(&mut live.history, |s| s.at, s.at, HISTORY);
        live.history.push_back(s);
    }

    /// Readings recovered from the journal, oldest first, before any live one.
    pub fn seed(&self, samples: &[Sample]) {
        for s in samples {
            self.push_sample(*s);
        }
    }

    pub fn view(&self) -> View {
        let live = self.live();
        let n = live.history.len();
        let step = n.div_ceil(CHART_POINTS).max(1);
        let r = |x: Option<f64>| x.map(round1);
        // Every `step`-th reading, and always the newest.
        let history = live
            .history
            .iter()
            .enumerate()
            .filter(|(i, _)| (n - 1 - i).is_multiple_of(step))
            .map(|(_, s)| {
                (
                    s.at.as_millisecond(),
                    r(s.site_kw),
                    r(s.asic_kw),
                    r(s.gpu_kw),
                    s.limit_kw,
                )
            })
            .collect();
        View {
            status: live.status.clone(),
            directives: live.directives.clone(),
            history,
        }
    }

    /// Everything, in the Prometheus text format.
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(4096);
        let (status, directives, last) = {
            let live = self.live();
            (
                live.status.clone(),
                live.directives.len(),
                live.history.back().copied(),
            )
        };
        // Power from the newest reading; the rest from the newest status.
        let reading = |f: fn(&Sample) -> Option<f64>| last.as_ref().and_then(f);
        let st = |f: fn(&Status) -> f64| status.as_ref().map(f);
        let gauges = [
            (
                "gridshed_site_kw",
                "Site import from the site meter, kW.",
                reading(|s| s.site_kw),
            ),
            (
                "gridshed_asic_kw",
                "ASIC power, the sum of the outlet readings, kW.",
                reading(|s| s.asic_kw),
            ),
            (
                "gridshed_gpu_kw",
                "GPU rack power from their meters, kW.",
                reading(|s| s.gpu_kw),
            ),
            (
                "gridshed_limit_kw",
                "Import limit in force, kW.",
                st(|s| s.limit_kw),
            ),
            (
                "gridshed_shed_kw",
                "Rated power of the ASICs gridshed has switched off, kW.",
                st(|s| s.shed_kw),
            ),
            (
                "gridshed_sheddable_kw",
                "Rated power of the ASICs still on that could be switched off, kW.",
                st(|s| s.sheddable_kw),
            ),
            (
                "gridshed_load_shed_delta_available_kw",
                "Measured power of the ASICs that could be switched off now, kW (OpenADR LOAD_SHED_DELTA_AVAILABLE).",
                st(|s| s.load_shed_delta_available_kw),
            ),
            (
                "gridshed_shortfall_kw",
                "How far the ASICs alone cannot meet the limit, kW.",
                st(|s| s.shortfall_kw),
            ),
            (
                "gridshed_directives_active",
                "Events whose directives count now.",
                status.as_ref().map(|_| directives as f64),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            // Unknown (a meter not yet read, or faulted): no sample rather than a made-up one.
            if let Some(v) = value {
                let _ = writeln!(out, "{name} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP gridshed_outlets ASIC outlets by the state gridshed holds them in.\n# TYPE gridshed_outlets gauge"
        );
        if let Some(s) = &status {
            let _ = writeln!(out, "gridshed_outlets{{state=\"on\"}} {}", s.asics_on);
            let _ = writeln!(out, "gridshed_outlets{{state=\"off\"}} {}", s.asics_off);
        }
        let faulted = status.as_ref().map_or(&[][..], |s| &s.faulted[..]);
        let _ = writeln!(
            out,
            "# HELP gridshed_devices_faulted Devices not answering, answering wrongly, or whose relays disagree.\n# TYPE gridshed_devices_faulted gauge\ngridshed_devices_faulted {}",
            faulted.len()
        );
        let _ = writeln!(
            out,
            "# HELP gridshed_device_faulted 1 for each faulted device.\n# TYPE gridshed_device_faulted gauge"
        );
        for f in faulted {
            let _ = writeln!(
                out,
                "gridshed_device_faulted{{device=\"{}\"}} 1",
                escape(&f.device)
            );
        }
        let _ = writeln!(
            out,
            "# HELP gridshed_signals_total Signals received, by outcome.\n# TYPE gridshed_signals_total counter"
        );
        for (label, o) in [
            ("accepted", Outcome::Accepted),
            ("rejected", Outcome::Rejected),
            ("ignored", Outcome::Ignored),
        ] {
            let _ = writeln!(
                out,
                "gridshed_signals_total{{outcome=\"{label}\"}} {}",
                self.signals(o)
            );
        }
        let _ = writeln!(
            out,
            "# HELP gridshed_events_completed_total Events ended, by how.\n# TYPE gridshed_events_completed_total counter"
        );
        for (k, label) in ["released", "expired", "stale"].iter().enumerate() {
            let _ = writeln!(
                out,
                "gridshed_events_completed_total{{end=\"{label}\"}} {}",
                self.completed[k].load(Ordering::Relaxed)
            );
        }
        self.modbus.render(
            &mut out,
            "gridshed_modbus_request_seconds",
            "Modbus requests, from sending to the answer or the timeout.",
        );
        self.cycle.render(
            &mut out,
            "gridshed_plan_cycle_seconds",
            "Engine cycles: sense, plan, and hand the setpoints to the Modbus tasks.",
        );
        out
    }
}

/// A label value as the text format wants it.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_in_the_text_format() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "help");
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.01\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_seconds_count 4\n"), "{out}");
        assert!(out.contains("x_seconds_sum 1.0105\n"), "{out}");
    }

    #[test]
    fn the_chart_keeps_an_hour_and_sends_at_most_720_points_with_the_newest_last() {
        let t0 = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let tel = Telemetry::default();
        for k in 0..4000 {
            tel.push_sample(Sample {
                at: t0 + SignedDuration::from_secs(k),
                site_kw: Some(k as f64),
                asic_kw: None,
                gpu_kw: Some(1.0),
                limit_kw: 100.0,
            });
        }
        let v = tel.view();
        assert!(v.history.len() <= CHART_POINTS, "{}", v.history.len());
        let first = v.history.first().unwrap();
        let last = v.history.last().unwrap();
        assert_eq!(last.1, Some(3999.0));
        assert!(first.1.unwrap() >= 3999.0 - 3600.0, "{first:?}");
        assert_eq!(last.2, None);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
