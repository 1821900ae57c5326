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

/// firmware-sim for small.toml on ports shifted by an offset found free, and the site file to
/// match (the binary reads a file, so the ports must be written in it).
async fn sim_and_site(broker: &Broker) -> (Sim, PathBuf) {
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
            );
            let path = temp(&format!("site-{offset}.toml"), &text);
            return (sim, path);
        }
    }
    panic!("no free port range for the simulator");
}

async fn start_gridshed(site: &PathBuf, utility: &mut Client) -> std::process::Child {
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(site)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    utility
        .wait_from(0, "sites/demo/status", 15 * SECOND, |s| s["online"] == true)
        .await;
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_leaves_the_outlets_as_they_are() {
    let broker = Broker::embedded().unwrap();
    let (sim, site) = sim_and_site(&broker).await;
    let mut utility =
        Client::connect(broker.port(), &["sites/demo/status", "sites/demo/ack"]).await;
    let mut child = start_gridshed(&site, &mut utility).await;
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
