//! `gridshed report`: the events a journal measured, as a table for people and as CSV (one row
//! per 1- and 15-minute interval) for settlement.

use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use crate::decide::mv::{Interval, Measurement};
use crate::journal::{self, Record};

/// One event as the journal holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub measurement: Measurement,
    pub intervals: Vec<Interval>,
}

/// Every `measured` record of the journal at `path` (its rotated files included), in the order
/// the events started.
/// Lines that are not measurements, or cannot be read, are passed over.
pub fn read(path: &Path) -> io::Result<Vec<Measured>> {
    if !path.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no journal at {}", path.display()),
        ));
    }
    let mut out = Vec::new();
    // Rotated files first, oldest first, then the live one.
    for file in journal::files(path).iter().rev() {
        let reader = BufReader::new(std::fs::File::open(file)?);
        for line in reader.split(b'\n') {
            let line = line?;
            // Cheap test first: most lines are meters and plans.
            if !line.windows(10).any(|w| w == b"\"measured\"") {
                continue;
            }
            if let Ok(Record::Measured {
                measurement,
                intervals,
                ..
            }) = serde_json::from_slice(&line)
            {
                out.push(Measured {
                    measurement,
                    intervals,
                });
            }
        }
    }
    out.sort_by_key(|m| m.measurement.start);
    Ok(out)
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

/// A table, one line per event.
pub fn table(events: &[Measured]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<20} {:>7} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9}",
        "event",
        "start (UTC)",
        "min",
        "baseline",
        "required",
        "reduced",
        "perf %",
        "1-min",
        "15-min",
        "first s",
        "full s",
        "compliant"
    );
    for e in events {
        let m = &e.measurement;
        let minutes = m.end.duration_since(m.start).as_secs_f64() / 60.0;
        let start = m.start.strftime("%Y-%m-%d %H:%M:%S").to_string();
        let _ = writeln!(
            out,
            "{:<20} {:<20} {:>7.1} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9}",
            m.id,
            start,
            minutes,
            num(m.baseline_kw),
            num(m.required_kw),
            num(m.reduction_kw),
            num(m.performance_pct),
            format!("{}/{}", m.one_minute.compliant, m.one_minute.intervals),
            format!(
                "{}/{}",
                m.fifteen_minute.compliant, m.fifteen_minute.intervals
            ),
            num(m.first_response_s),
            num(m.full_response_s),
            yes(m.compliant),
        );
    }
    if let Some(pct) = events.first().map(|e| e.measurement.compliance_pct) {
        let _ = writeln!(
            out,
            "\nkW; baseline = mean site kW before the event; an interval complies at >= {pct}% of the \
             obligation; 1-min and 15-min = intervals complying / intervals."
        );
    }
    out
}

/// CSV for settlement: one row per interval, with its event's figures.
pub fn csv(events: &[Measured]) -> String {
    let mut out = String::from(
        "event,event_start,event_end,baseline_kw,compliance_pct,event_compliant,minutes,\
         interval_start,interval_end,samples,mean_kw,required_kw,reduction_kw,performance_pct,compliant\n",
    );
    let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    for e in events {
        let m = &e.measurement;
        for iv in &e.intervals {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                csv_field(&m.id),
                m.start,
                m.end,
                opt(m.baseline_kw),
                m.compliance_pct,
                m.compliant,
                iv.minutes,
                iv.start,
                iv.end,
                iv.samples,
                opt(iv.mean_kw),
                opt(iv.required_kw),
                opt(iv.reduction_kw),
                opt(iv.performance_pct),
                iv.compliant,
            );
        }
    }
    out
}

/// Quotes a field that needs it (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::mv::{Meter, Sample, Settings};
    use crate::decide::signal::{Action, Directive};
    use jiff::{SignedDuration, Timestamp};

    fn measured(id: &str) -> Measured {
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let d = Directive {
            id: id.into(),
            interval: 0,
            action: Action::Shed { kw: 50.0 },
            start: t(60),
            end: None,
            priority: 1,
            emergency: false,
            format: site_config::SignalFormat::Native,
        };
        let sample = |s: i64, kw: f64| Sample {
            at: t(s),
            site_kw: Some(kw),
            asic_kw: Some(80.0),
            gpu_kw: Some(20.0),
            limit_kw: 500.0,
        };
        let settings = Settings {
            baseline_window: SignedDuration::from_secs(60),
            compliance_pct: 95.0,
        };
        let history = [sample(0, 200.0), sample(30, 200.0)];
        let mut m = Meter::begin(id, &[d], t(60), &history, settings);
        for s in (60..150).step_by(2) {
            m.add(&sample(s, 148.0));
        }
        let (measurement, intervals) = m.finish(t(150));
        Measured {
            measurement,
            intervals,
        }
    }

    #[test]
    fn the_table_has_a_line_per_event_with_its_figures() {
        let out = table(&[measured("evt-a"), measured("evt-b")]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("event"), "{out}");
        assert!(lines[1].starts_with("evt-a"), "{out}");
        // Baseline 200, 50 asked, 52 reduced: 104 %, both 1-minute intervals and the
        // 15-minute one comply.
        for figure in ["200.0", "50.0", "52.0", "104.0", "2/2", "1/1", "yes"] {
            assert!(lines[1].contains(figure), "{figure} in {out}");
        }
        assert!(lines[2].starts_with("evt-b"), "{out}");
    }

    #[test]
    fn the_csv_has_a_row_per_interval_and_quotes_what_needs_it() {
        let out = csv(&[measured("odd,id")]);
        let rows: Vec<&str> = out.lines().collect();
        // 90 s: two 1-minute intervals and one 15-minute one.
        assert_eq!(rows.len(), 4, "{out}");
        assert!(rows[1].starts_with("\"odd,id\","), "{out}");
        assert!(rows[1].contains(",1,") && rows[3].contains(",15,"), "{out}");
        assert!(rows[1].ends_with(",104,true"), "{out}");
    }

    #[test]
    fn reading_finds_the_measured_records_in_every_file_of_the_journal_oldest_first() {
        let dir = std::env::temp_dir().join(format!("gridshed-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let live = dir.join("j.jsonl");
        let line = |m: &Measured| {
            let r = Record::Measured {
                at: m.measurement.end,
                measurement: m.measurement.clone(),
                intervals: m.intervals.clone(),
            };
            serde_json::to_string(&r).unwrap() + "\n"
        };
        let (a, b) = (measured("evt-old"), measured("evt-new"));
        std::fs::write(dir.join("j.jsonl.1"), line(&a)).unwrap();
        std::fs::write(&live, format!("not json\n{}{{\"record\":\"gap\"", line(&b))).unwrap();
        let got = read(&live).unwrap();
        assert_eq!(got, vec![a, b]);
        assert!(read(&dir.join("missing.jsonl")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
