//! A small SVG line chart of a site's power over time: enough for the demo's picture, with no
//! font or graphics dependency (the browser or viewer draws the text).

use std::fmt::Write as _;

/// One point of the timeline, in kW.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub t_s: f64,
    pub limit_kw: f64,
    pub site_kw: f64,
    pub asic_kw: f64,
    pub gpu_kw: f64,
    pub asics_on: usize,
}

/// A labelled moment (a signal sent).
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub t_s: f64,
    pub label: String,
}

/// A line: its legend, colour, dash pattern and value.
type Series = (&'static str, &'static str, &'static str, fn(&Sample) -> f64);

const W: f64 = 1000.0;
const H: f64 = 520.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

/// Renders the samples as an SVG document.
pub fn svg(title: &str, samples: &[Sample], marks: &[Mark]) -> String {
    let t_max = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let kw_max = samples
        .iter()
        .flat_map(|s| [s.limit_kw, s.site_kw])
        .fold(10.0, f64::max);
    let kw_top = nice_ceiling(kw_max * 1.1);
    let x = |t: f64| LEFT + (t / t_max) * (W - LEFT - RIGHT);
    let y = |kw: f64| H - BOTTOM - (kw.max(0.0) / kw_top) * (H - TOP - BOTTOM);

    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="28" font-size="17" font-weight="bold">{}</text>"#,
        escape(title)
    );

    // Grid and axes.
    let step_kw = nice_step(kw_top / 6.0);
    let mut kw = 0.0;
    while kw <= kw_top + 1e-9 {
        let yy = y(kw);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e4e4e4"/><text x="{:.1}" y="{:.1}" text-anchor="end">{kw:.0}</text>"##,
            W - RIGHT,
            LEFT - 8.0,
            yy + 4.0
        );
        kw += step_kw;
    }
    let step_t = nice_step(t_max / 10.0);
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let xx = x(t);
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t:.0}</text>"##,
            TOP,
            H - BOTTOM,
            H - BOTTOM + 18.0
        );
        t += step_t;
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time (s)</text><text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">power (kW)</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 14.0,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0
    );

    // Signals.
    for (i, m) in marks.iter().enumerate() {
        let xx = x(m.t_s);
        let yy = TOP + 14.0 + 15.0 * (i % 3) as f64;
        let _ = writeln!(
            out,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#7a7aa0" stroke-dasharray="3 4"/><text x="{:.1}" y="{yy:.1}" fill="#50507a">{}</text>"##,
            H - BOTTOM,
            xx + 4.0,
            escape(&m.label)
        );
    }

    // Series.
    let series: [Series; 4] = [
        ("import limit", "#d62728", "7 4", |s| s.limit_kw),
        ("site meter", "#1f1f1f", "", |s| s.site_kw),
        ("ASICs", "#ff8c00", "", |s| s.asic_kw),
        ("GPU racks", "#2ca02c", "", |s| s.gpu_kw),
    ];
    for (k, (name, color, dash, value)) in series.iter().enumerate() {
        let mut d = String::new();
        for (i, s) in samples.iter().enumerate() {
            let _ = write!(
                d,
                "{}{:.1},{:.1} ",
                if i == 0 { "M" } else { "L" },
                x(s.t_s),
                y(value(s))
            );
        }
        let _ = writeln!(
            out,
            r#"<path d="{d}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#
        );
        let ly = TOP + 20.0 + 24.0 * k as f64;
        let lx = W - RIGHT + 16.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="{color}" stroke-width="3" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{name}</text>"#,
            lx + 26.0,
            lx + 32.0,
            ly + 4.0
        );
    }
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// 1, 2 or 5 times a power of ten, at least `x`.
fn nice_step(x: f64) -> f64 {
    let x = x.max(1e-9);
    let p = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * p)
}

fn nice_ceiling(x: f64) -> f64 {
    let step = nice_step(x / 6.0);
    (x / step).ceil() * step
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_holds_every_series_and_mark_and_scales_to_the_data() {
        let samples: Vec<Sample> = (0..50)
            .map(|i| Sample {
                t_s: f64::from(i),
                limit_kw: if i < 20 { 200.0 } else { 120.0 },
                site_kw: 160.0,
                asic_kw: 100.0,
                gpu_kw: 55.0,
                asics_on: 30,
            })
            .collect();
        let marks = [Mark {
            t_s: 20.0,
            label: "limit <120 kW>".into(),
        }];
        let s = svg("demo & test", &samples, &marks);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<path").count(), 4);
        assert!(s.contains("limit &lt;120 kW&gt;") && s.contains("demo &amp; test"));
        assert!(s.contains(">250<"), "axis reaches past the 200 kW limit");
    }

    #[test]
    fn steps_are_round_numbers() {
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(33.0), 50.0);
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_ceiling(220.0), 250.0);
    }
}
