//! The `gridshed` binary as an operator runs it: `check`, `plan`, and `run` against a broker and
//! firmware-sim, stopped by SIGTERM (graceful) or SIGKILL (a crash: the last will speaks).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use firmware_sim::{Bind, Sim, SimOptions};
use hil::broker::Broker;
use hil::rig::Client;

const BIN: &str = env!("CARGO_BIN_EXE_gridshed");
const SECOND: Duration = Duration::from_secs(1);

fn small() -> String {
    hil::site::path("small.toml").display().to_string()
}

fn temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gridshed-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_summarises_a_valid_site() {
    let out = Command::new(BIN)
        .args(["check", "--config", &small()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ASICs: 34 (110.1 kW rated)"), "{text}");
    assert!(
        text.contains("GPU racks: 2 (80.0 kW rated, protected)"),
        "{text}"
    );
    assert!(text.contains("sites/demo/openadr (Openadr3)"), "{text}");
}

#[test]
fn check_names_the_field_of_every_problem_and_fails() {
    let text = std::fs::read_to_string(small())
        .unwrap()
        .replace("rated_w = 3500.0", "rated_w = -1.0");
    let bad = temp("bad.toml", &text);
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("asics[2].rated_w"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");
}

#[test]
fn plan_dry_runs_a_signal_against_rated_power() {
    let sig = temp(
        "limit.json",
        r#"{"id":"dry","kind":"import_limit","kw":120}"#,
    );
    let out = Command::new(BIN)
        .args(["plan", "--config", &small(), "--signal"])
        .arg(&sig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("pdu-legacy: outlets [1, 2, 3, 4] off"),
        "{text}"
    );
    assert!(text.contains("23 of 34 ASICs off"), "{text}");
    assert!(!text.contains("pdu-gpu"), "{text}");
    let bad = temp("bad.json", r#"{"id":"dry","kind":"import_limit","kw":-1}"#);
    let out = Command::new(BIN)
        .args(["plan", "--config", &small(), "--signal"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("would be rejected"));
}

/// A journal line holding the measurement of event `id`: a 200 kW site asked to shed 50 kW,
/// which came down to `kw` for 90 s.
fn measured_line(id: &str, start_s: i64, kw: f64) -> String {
    use controller::decide::mv::{Meter, Sample, Settings};
    use controller::decide::signal::{Action, Directive};
    let t = |s: i64| jiff::Timestamp::from_second(1_800_000_000 + start_s + s).unwrap();
    let sample = |s: i64, site_kw: f64| Sample {
        at: t(s),
        site_kw: Some(site_kw),
        asic_kw: Some(100.0),
        gpu_kw: Some(60.0),
        limit_kw: 300.0,
    };
    let directive = Directive {
        id: id.into(),
        interval: 0,
        action: Action::Shed { kw: 50.0 },
        start: t(60),
        end: None,
        priority: 1,
        emergency: false,
        format: site_config::SignalFormat::Native,
    };
    let settings = Settings {
        baseline_window: jiff::SignedDuration::from_secs(60),
        compliance_pct: 95.0,
    };
    let history = [sample(10, 200.0), sample(40, 200.0)];
    let mut meter = Meter::begin(id, &[directive], t(60), &history, settings);
    for s in (60..150).step_by(2) {
        meter.add(&sample(s, kw));
    }
    let (measurement, intervals) = meter.finish(t(150));
    let record = controller::journal::Record::Measured {
        at: t(150),
        measurement,
        intervals,
    };
    serde_json::to_string(&record).unwrap() + "\n"
}

fn report(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).arg("report").args(args).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn report_prints_each_measured_event_as_a_table_and_as_settlement_csv() {
    let meters = r#"{"record":"meters","at":"2027-01-15T08:00:00Z","site_kw":200.0,"asic_kw":100.0,"gpu_kw":60.0,"limit_kw":300.0,"shed_kw":0.0}"#;
    let text = format!(
        "{meters}\n{}{}{{\"record\":\"torn",
        measured_line("evt-a", 0, 148.0),
        measured_line("evt-b", 1000, 160.0)
    );
    let journal = temp("report.jsonl", &text);
    let path = journal.to_str().unwrap();

    let (ok, table, err) = report(&["--journal", path]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    // evt-a: 52 of 50 kW (104 %), compliant; evt-b: 40 of 50 kW (80 %), not.
    assert!(lines[1].starts_with("evt-a"), "{table}");
    for figure in ["200.0", "50.0", "52.0", "104.0", "2/2", "1/1", "yes"] {
        assert!(lines[1].contains(figure), "{figure} in {table}");
    }
    assert!(lines[2].starts_with("evt-b"), "{table}");
    for figure in ["40.0", "80.0", "0/2", "0/1", "NO"] {
        assert!(lines[2].contains(figure), "{figure} in {table}");
    }

    let (ok, csv, _) = report(&["--journal", path, "--csv"]);
    assert!(ok);
    let rows: Vec<&str> = csv.lines().collect();
    assert!(
        rows[0].starts_with("event,event_start,event_end,baseline_kw"),
        "{csv}"
    );
    // Two 1-minute intervals and one 15-minute interval per event.
    assert_eq!(rows.len(), 1 + 3 + 3, "{csv}");
    assert!(rows.iter().all(|r| r.split(',').count() == 15), "{csv}");

    let (ok, only, _) = report(&["--journal", path, "--event", "evt-b"]);
    assert!(
        ok && only.contains("evt-b") && !only.contains("evt-a"),
        "{only}"
    );
    let (ok, _, err) = report(&["--journal", path, "--event", "nope"]);
    assert!(!ok && err.contains("no measured event \"nope\""), "{err}");
    let (ok, _, err) = report(&["--journal", "/nonexistent/journal.jsonl"]);
    assert!(!ok && err.contains("no journal at"), "{err}");
}

/// firmware-sim for small.toml on ports shifted by an offset found free, and the site file to
/// match (the binary reads a file, so the ports must be written in it).
async fn sim_and_site(broker: &Broker) -> (Sim, PathBuf) {
    sim_and_site_with(broker, "").await
}

/// Like [`sim_and_site`], with `extra` appended to the site file (a `[journal]`, say).
async fn sim_and_site_with(broker: &Broker, extra: &str) -> (Sim, PathBuf) {
    let site = hil::site::load("small.toml");
    let seed = std::process::id() as u16;
    for attempt in 0..50u16 {
        let offset =
            20_000 + (seed.wrapping_mul(31).wrapping_add(attempt.wrapping_mul(97))) % 20_000;
        let options = SimOptions {
            bind: Bind::AsConfigured {
                port_offset: i32::from(offset),
            },
            ..SimOptions::default()
        };
        if let Ok(sim) = Sim::start(&site, options).await {
            let text = hil::site::text_with_port_offset("small.toml", offset, broker.port());
            let text = text.replace(
                "client_id = \"gridshed-demo\"",
                &format!("client_id = \"gridshed-cli-{offset}\""),
            ) + extra;
            let path = temp(&format!("site-{offset}.toml"), &text);
            return (sim, path);
        }
    }
    panic!("no free port range for the simulator");
}

/// A `gridshed` child process that is killed when dropped: a test that fails half-way must
/// not leave a controller running, which would go on switching whatever simulator binds its
/// ports next (another test's).
struct Gridshed(Option<std::process::Child>);

impl Gridshed {
    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, std::process::Child::id)
    }

    fn kill(&mut self) -> std::io::Result<()> {
        match &mut self.0 {
            Some(c) => c.kill(),
            None => Ok(()),
        }
    }

    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match &mut self.0 {
            Some(c) => c.wait(),
            None => Err(std::io::Error::other("already waited for")),
        }
    }

    /// The child, no longer killed on drop (the caller waits for it).
    fn take(mut self) -> std::process::Child {
        self.0.take().expect("a child")
    }
}

impl Drop for Gridshed {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn start_gridshed(site: &PathBuf, utility: &mut Client) -> Gridshed {
    start_gridshed_logging(site, utility, None, &[]).await
}

/// Starts `gridshed run` with its log in `log` (at `RUST_LOG=info`) and extra environment
/// variables, and waits until it says it is online (after whatever the utility saw so far).
async fn start_gridshed_logging(
    site: &PathBuf,
    utility: &mut Client,
    log: Option<&PathBuf>,
    env: &[(&str, &str)],
) -> Gridshed {
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
        None => Stdio::null(),
    };
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(site)
        .env("RUST_LOG", if log.is_some() { "info" } else { "warn" })
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let child = Gridshed(Some(child));
    utility.drain();
    let from = utility.seen.len();
    utility
        .wait_from(from, "sites/demo/status", 15 * SECOND, |s| {
            s["online"] == true
        })
        .await;
    child
}

/// Stops a child with SIGTERM and waits for it.
/// Sends `signal` (a name, e.g. "STOP") to `child`.
fn kill(child: &Gridshed, signal: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status();
    assert!(sent.is_ok_and(|s| s.success()), "kill -{signal}");
}

/// Waits until the utility, back on a broker that forgot it, is subscribed to `topic` again:
/// it publishes probes there until one comes back.
async fn subscribed_again(utility: &mut Client, topic: &str) {
    let start = tokio::time::Instant::now();
    for n in 0u32.. {
        assert!(
            start.elapsed() < 10 * SECOND,
            "not subscribed again within 10 s"
        );
        utility.publish(topic, format!(r#"{{"probe":{n}}}"#)).await;
        let from = utility.seen.len();
        let back = utility.wait_from(from, topic, 10 * SECOND, |m| m["probe"] == n);
        if tokio::time::timeout(Duration::from_millis(200), back)
            .await
            .is_ok()
        {
            return;
        }
    }
}

async fn terminate(child: Gridshed) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut child = child.take();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_leaves_the_outlets_as_they_are() {
    let broker = Broker::embedded().unwrap();
    let (sim, site) = sim_and_site(&broker).await;
    let mut utility =
        Client::connect(broker.port(), &["sites/demo/status", "sites/demo/ack"]).await;
    let child = start_gridshed(&site, &mut utility).await;
    utility
        .publish("sites/demo/signals", r#"{"id":"t","kind":"shed","kw":20}"#)
        .await;
    utility
        .wait_from(0, "sites/demo/ack", 5 * SECOND, |a| a["status"] == "active")
        .await;
    let deadline = tokio::time::Instant::now() + 5 * SECOND;
    while sim
        .outlets("pdu-legacy")
        .unwrap()
        .iter()
        .any(|o| o.relay_on)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "shed never happened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let writes = sim.all_writes();
    let from = utility.seen.len();
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let mut child = child.take();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    utility
        .wait_from(from, "sites/demo/status", 5 * SECOND, |s| {
            s["online"] == false
        })
        .await;
    assert_eq!(sim.all_writes(), writes, "nothing written on the way out");
    assert!(
        sim.outlets("pdu-legacy")
            .unwrap()
            .iter()
            .all(|o| !o.relay_on),
        "shed ASICs stay off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_will_marks_the_controller_offline_when_it_is_killed() {
    let broker = Broker::embedded().unwrap();
    let (_sim, site) = sim_and_site(&broker).await;
    let mut utility = Client::connect(broker.port(), &["sites/demo/status"]).await;
    let mut child = start_gridshed(&site, &mut utility).await;
    let from = utility.seen.len();
    child.kill().unwrap(); // SIGKILL: no goodbye
    let _ = child.wait();
    let will = utility
        .wait_from(from, "sites/demo/status", 5 * SECOND, |s| {
            s["online"] == false
        })
        .await;
    assert_eq!(will.json["site"], "demo");
}

/// Waits until `check` holds, polling every 20 ms, failing after `limit`.
async fn until(limit: Duration, what: &str, check: impl Fn() -> bool) -> Duration {
    let start = tokio::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gridshed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_event_resumes_it_from_the_journal_and_restores_nothing_early() {
    let broker = Broker::embedded().unwrap();
    let journal = temp_dir("resume").join("journal.jsonl");
    let extra = format!("\n[journal]\npath = \"{}\"\n", journal.display());
    let (sim, site) = sim_and_site_with(&broker, &extra).await;
    let asics = sim.site().asics.len();
    let mut utility =
        Client::connect(broker.port(), &["sites/demo/status", "sites/demo/ack"]).await;
    let child = start_gridshed(&site, &mut utility).await;

    let event_s = 12;
    let ends = tokio::time::Instant::now() + Duration::from_secs(event_s);
    utility
        .publish(
            "sites/demo/signals",
            format!(r#"{{"id":"evt-kill","kind":"shed_all","duration_s":{event_s}}}"#),
        )
        .await;
    until(5 * SECOND, "every ASIC off", || {
        sim.asic_relays_off() == asics
    })
    .await;
    utility
        .wait_from(0, "sites/demo/ack", 5 * SECOND, |a| {
            a["id"] == "evt-kill" && a["status"] == "active"
        })
        .await;

    // SIGKILL mid-event, once the journal holds the shed: the devices get their orders before
    // the record goes to disk, and a loaded disk can hold that record back for seconds, which a
    // kill would lose (harmlessly: the restart reads every PDU). What is tested here is the
    // resume, so the kill comes after the record.
    until(10 * SECOND, "the shed is journaled", || {
        std::fs::read_to_string(&journal).is_ok_and(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .any(|r| {
                    r["record"] == "plan" && r["off"].as_object().is_some_and(|o| !o.is_empty())
                })
        })
    })
    .await;
    // No goodbye, no flush beyond what the journal already wrote.
    let mut child = child;
    child.kill().unwrap();
    let _ = child.wait();
    let toggles = sim.total_toggles();

    let from = utility.seen.len();
    let child = start_gridshed(&site, &mut utility).await;
    utility
        .wait_from(from, "sites/demo/ack", 5 * SECOND, |a| {
            a["id"] == "evt-kill" && a["status"] == "active"
        })
        .await;
    // The event goes on: until it ends, not one ASIC comes back.
    while tokio::time::Instant::now() + Duration::from_millis(300) < ends {
        assert_eq!(sim.asic_relays_off(), asics, "an ASIC was restored early");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sim.total_toggles(),
        toggles,
        "no relay moved while the event lasted"
    );
    // And it ends on time, in the restarted controller, which then restores.
    utility
        .wait_from(from, "sites/demo/ack", 10 * SECOND, |a| {
            a["id"] == "evt-kill" && a["status"] == "completed"
        })
        .await;
    until(20 * SECOND, "ASICs restored after the event", || {
        sim.asic_relays_off() < asics
    })
    .await;
    terminate(child).await;

    let text = std::fs::read_to_string(&journal).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("every journal line is JSON"))
        .collect();
    let count = |kind: &str| records.iter().filter(|r| r["record"] == kind).count();
    assert_eq!(count("checkpoint"), 2, "one checkpoint per run");
    assert_eq!(count("accepted"), 1);
    let plans_that = |switch: &str| {
        records
            .iter()
            .filter(|r| r["record"] == "plan")
            .filter(|r| r[switch].as_object().is_some_and(|o| !o.is_empty()))
            .count()
    };
    assert!(plans_that("off") >= 1, "the shed is journaled");
    assert!(plans_that("on") >= 1, "the restores are journaled");
    assert!(count("meters") >= 5, "meters every 2 s");
    let done = records
        .iter()
        .find(|r| r["record"] == "completed")
        .expect("the end is journaled");
    assert_eq!(
        (done["id"].as_str(), done["end"].as_str()),
        (Some("evt-kill"), Some("expired"))
    );
    let second_run = &records[records
        .iter()
        .rposition(|r| r["record"] == "checkpoint")
        .unwrap()];
    assert!(
        second_run["state"]["timeline"]["evt-kill"].is_array(),
        "the restart's checkpoint holds the event: {second_run}"
    );
    // The restarted controller measured the event it resumed, and the report finds it.
    assert_eq!(count("measured"), 1);
    let (ok, table, err) = report(&["--journal", journal.to_str().unwrap()]);
    assert!(ok && table.contains("evt-kill"), "{table}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_acknowledged_as_accepted_survives_a_kill_right_after() {
    let broker = Broker::embedded().unwrap();
    let journal = temp_dir("acked").join("journal.jsonl");
    let extra = format!("\n[journal]\npath = \"{}\"\n", journal.display());
    let (_sim, site) = sim_and_site_with(&broker, &extra).await;
    let mut utility =
        Client::connect(broker.port(), &["sites/demo/status", "sites/demo/ack"]).await;
    let mut child = start_gridshed(&site, &mut utility).await;
    utility
        .publish(
            "sites/demo/signals",
            r#"{"id":"evt-acked","kind":"shed","kw":20,"duration_s":600}"#,
        )
        .await;
    utility
        .wait_from(0, "sites/demo/ack", 5 * SECOND, |a| {
            a["id"] == "evt-acked" && a["status"] == "accepted"
        })
        .await;
    // The utility has been told: the acceptance must already be on disk. (On an idle disk the
    // journal is quick enough for this to pass either way; the order itself is shown by the
    // journal's unit test `what_follows_a_record_runs_only_once_the_record_is_on_disk`.)
    child.kill().unwrap();
    let _ = child.wait();

    let from = utility.seen.len();
    let child = start_gridshed(&site, &mut utility).await;
    utility
        .wait_from(from, "sites/demo/ack", 5 * SECOND, |a| {
            a["id"] == "evt-acked" && a["status"] == "active"
        })
        .await;
    terminate(child).await;
}

/// A broker outage mid-event, with the broker stopped and started again by the test.
async fn a_broker_outage_holds_the_shed_and_reconnects_without_a_log_flood(broker: Broker) {
    let mut broker = broker;
    let (sim, site) = sim_and_site(&broker).await;
    let asics = sim.site().asics.len();
    let mut utility =
        Client::connect(broker.port(), &["sites/demo/status", "sites/demo/ack"]).await;
    let log = temp_dir(&format!("outage-{}", broker.port())).join("gridshed.log");
    let child = start_gridshed_logging(&site, &mut utility, Some(&log), &[]).await;
    utility
        .publish(
            "sites/demo/signals",
            r#"{"id":"evt-out","kind":"shed_all"}"#,
        )
        .await;
    until(5 * SECOND, "every ASIC off", || {
        sim.asic_relays_off() == asics
    })
    .await;
    utility
        .wait_from(0, "sites/demo/ack", 5 * SECOND, |a| a["status"] == "active")
        .await;

    let writes = sim.all_writes();
    let outage = 5 * SECOND;
    broker.stop();
    let end = tokio::time::Instant::now() + outage;
    while tokio::time::Instant::now() < end {
        assert_eq!(sim.asic_relays_off(), asics, "the shed is held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sim.all_writes(),
        writes,
        "nothing written during the outage"
    );

    // The broker returns having forgotten every session. An ack is not retained: only who is
    // subscribed when it goes sees it. So the controller is held back (SIGSTOP) until the
    // utility has subscribed again, or the two race (a flake seen in CI).
    utility.drain();
    let from = utility.seen.len();
    kill(&child, "STOP");
    broker.restart(true).expect("broker restarts");
    subscribed_again(&mut utility, "sites/demo/ack").await;
    kill(&child, "CONT");
    let back = tokio::time::Instant::now();
    utility
        .wait_from(from, "sites/demo/ack", 10 * SECOND, |a| {
            a["id"] == "evt-out" && a["status"] == "active"
        })
        .await;
    let took = back.elapsed();
    eprintln!("active ack re-published {took:?} after the broker returned");
    utility
        .wait_from(from, "sites/demo/status", 5 * SECOND, |s| {
            s["online"] == true && s["directives"] == serde_json::json!(["evt-out"])
        })
        .await;
    // Subscribed again: the release is heard.
    utility
        .publish("sites/demo/signals", r#"{"id":"evt-out","kind":"release"}"#)
        .await;
    // Restores wait until the controller's estimate of the site spans a whole window
    // (small.toml: 30 s) from its start.
    until(40 * SECOND, "ASICs restored after the release", || {
        sim.asic_relays_off() < asics
    })
    .await;
    terminate(child).await;

    let text = std::fs::read_to_string(&log).unwrap();
    let attempts: Vec<u32> = text
        .lines()
        .filter(|l| l.contains("broker unreachable"))
        .map(|l| {
            let n = l.split("attempt=").nth(1).expect("attempt number");
            n.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    // Backoff 0.1, 0.2, 0.4, 0.8, then 1 s (+ up to 25 % jitter): about 8 attempts in 5 s,
    // of which the first four are logged, and then only the 8th, 16th, 32nd, ...
    assert!(
        attempts.len() >= 4 && attempts.len() <= 6,
        "{} warnings in a {outage:?} outage:\n{text}",
        attempts.len()
    );
    assert_eq!(
        attempts[..],
        [1, 2, 3, 4, 8, 16][..attempts.len()],
        "the first attempts, then powers of two"
    );
    assert!(
        text.contains("connected to broker again") && text.contains("down_for="),
        "the return is logged with how long the broker was gone:\n{text}"
    );
    assert!(
        text.lines().count() < 60,
        "the whole log of the outage fits on a screen:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_holds_the_shed_and_reconnects_without_a_log_flood_embedded() {
    let broker = Broker::embedded().unwrap();
    a_broker_outage_holds_the_shed_and_reconnects_without_a_log_flood(broker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_holds_the_shed_and_reconnects_without_a_log_flood_mosquitto() {
    let Some(broker) = Broker::mosquitto() else {
        return;
    };
    a_broker_outage_holds_the_shed_and_reconnects_without_a_log_flood(broker.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_appear_in_the_log_even_at_trace_level() {
    const SECRET: &str = "s3cret-Gateway-Pass";
    const WRONG: &str = "Wrong-but-also-Secret";
    let Some(started) = Broker::mosquitto_with_password("gateway", SECRET) else {
        return;
    };
    let (broker, auth_port) = started.expect("mosquitto starts");
    let dir = temp_dir("creds");
    let (_sim, site) = sim_and_site(&broker).await;
    // The controller logs in on the password-protected listener; the test client stays on the
    // anonymous one.
    let text = std::fs::read_to_string(&site).unwrap().replace(
        &format!("mqtt://127.0.0.1:{}", broker.port()),
        &format!("mqtt://127.0.0.1:{auth_port}"),
    );
    let text = text.replacen(
        "keep_alive_s = 15",
        "keep_alive_s = 15\nusername_env = \"GRIDSHED_MQTT_USERNAME\"\npassword_env = \"GRIDSHED_MQTT_PASSWORD\"",
        1,
    );
    std::fs::write(&site, text).unwrap();
    let mut utility =
        Client::connect(broker.port(), &["sites/demo/status", "sites/demo/ack"]).await;

    let good_log = dir.join("good.log");
    let env = |pass| {
        [
            ("RUST_LOG", "trace"),
            ("GRIDSHED_MQTT_USERNAME", "gateway"),
            ("GRIDSHED_MQTT_PASSWORD", pass),
        ]
    };
    let child = start_gridshed_logging(&site, &mut utility, Some(&good_log), &env(SECRET)).await;
    utility
        .publish(
            "sites/demo/signals",
            r#"{"id":"authed","kind":"shed","kw":5}"#,
        )
        .await;
    utility
        .wait_from(0, "sites/demo/ack", 5 * SECOND, |a| {
            a["id"] == "authed" && a["status"] == "active"
        })
        .await;
    terminate(child).await;

    // A wrong password: refused, and said so, without saying what it was.
    let bad_log = dir.join("bad.log");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&site)
        .envs(env(WRONG))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&bad_log).unwrap()))
        .spawn()
        .unwrap();
    until(10 * SECOND, "the refusal logged", || {
        std::fs::read_to_string(&bad_log).is_ok_and(|l| l.contains("broker unreachable"))
    })
    .await;
    child.kill().unwrap();
    let _ = child.wait();

    let good = std::fs::read_to_string(&good_log).unwrap();
    let bad = std::fs::read_to_string(&bad_log).unwrap();
    assert!(good.contains("connected to broker"), "{good}");
    assert!(good.lines().count() > 20, "trace logging was on");
    for (name, log) in [("good", &good), ("bad", &bad)] {
        for secret in [SECRET, WRONG] {
            assert!(
                !log.contains(secret),
                "the {name} run's log holds a password"
            );
        }
    }
}
