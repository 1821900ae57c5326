//! The README's demo command runs to the end, prints the timeline, the verdict and each event's
//! measurement, and draws the plot (played 3x faster here).

use std::process::Command;

#[test]
fn the_demo_plays_the_day_prints_the_timeline_and_writes_the_plot() {
    let dir = std::env::temp_dir().join(format!("gridshed-demo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plot = dir.join("demo.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_gridshed-demo"))
        .arg(&plot)
        .args(["--time-scale", "0.34"])
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        ">> utility: import limit 120 kW",
        ">> utility: emergency 80 kW",
        ">> utility: release",
        "site under the limit (2 s after each signal): yes",
        "writes to GPU racks and meters: 0",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // The M&V table: one line per event, each with a baseline and a verdict.
    let table = stdout
        .split_once("measurement and verification")
        .map(|(_, t)| t)
        .unwrap_or_else(|| panic!("no M&V table in:\n{stdout}"));
    for id in ["evt-limit", "evt-emergency"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} not measured:\n{table}"));
        let baseline: f64 = line
            .split_whitespace()
            .nth(4)
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("no baseline for {id}: {line}"));
        assert!(baseline > 50.0, "{line}");
        assert!(line.ends_with("yes") || line.ends_with("NO"), "{line}");
    }
    assert!(
        stdout.contains("status page: http://127.0.0.1:"),
        "{stdout}"
    );
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert_eq!(svg.matches("<path").count(), 4);
    let _ = std::fs::remove_dir_all(&dir);
}
