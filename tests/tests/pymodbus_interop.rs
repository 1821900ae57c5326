//! Interop with a Modbus server we did not write: pymodbus (PyPI, the version pinned in
//! `tests/pymodbus/site.py`) plays a site meter (unit 1) and a PDU of eight outlets (unit 2)
//! behind one gateway port, and the controller reads them and switches the PDU's relays.
//! Skipped when python3 or pymodbus is missing; required under CI=true.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hil::broker::Broker;
use hil::rig::Client;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};

const OUTLETS: usize = 8;
const RATED_W: f64 = 3000.0;
const BASE_KW: f64 = 20.0;

/// The pymodbus site: its process, its port, and the coil writes it has printed.
struct PySite {
    child: Child,
    /// Closing it stops the script.
    stdin: Option<ChildStdin>,
    port: u16,
    writes: mpsc::UnboundedReceiver<String>,
    /// Relay states as written over the wire, outlet 1 first.
    coils: Vec<bool>,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pymodbus/site.py")
}

/// Starts the script and waits for its `ready PORT`. `None` (the test is skipped) when python3
/// or pymodbus is missing, except under CI=true, where that fails the test.
async fn start_pysite() -> Option<PySite> {
    let spawned = Command::new("python3")
        .arg(script())
        .args(["--outlets", &OUTLETS.to_string()])
        .args(["--rated-w", &RATED_W.to_string()])
        .args(["--base-kw", &BASE_KW.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            assert!(!hil::tools::ci(), "python3 is required under CI=true: {e}");
            eprintln!("skipping: python3 cannot be started: {e}");
            return None;
        }
    };
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the pymodbus site says ready within 20 s")
        .expect("its stdout is readable");
    let Some(port) = first
        .as_deref()
        .and_then(|l| l.strip_prefix("ready "))
        .and_then(|p| p.parse::<u16>().ok())
    else {
        // No `ready` line: the script has said why on stderr (exit code 2: pymodbus missing).
        let status = child.wait().await.expect("the script's exit status");
        assert!(
            !hil::tools::ci(),
            "pymodbus is required under CI=true (python3 -m pip install pymodbus==3.16.1); the script said {first:?} and exited {status}"
        );
        eprintln!("skipping: pymodbus is not installed (exit {status})");
        return None;
    };
    let (tx, writes) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Some(PySite {
        stdin: child.stdin.take(),
        child,
        port,
        writes,
        coils: vec![true; OUTLETS],
    })
}

impl PySite {
    /// Takes in the writes printed so far: `write UNIT ADDRESS V,V,...`.
    fn take_writes(&mut self) {
        while let Ok(line) = self.writes.try_recv() {
            let mut words = line.split_whitespace();
            assert_eq!(words.next(), Some("write"), "unexpected line: {line}");
            assert_eq!(words.next(), Some("2"), "only the PDU is written: {line}");
            let address: usize = words.next().and_then(|a| a.parse().ok()).expect(&line);
            let values = words.next().expect(&line).split(',');
            for (k, v) in values.enumerate() {
                self.coils[address + k] = v == "1";
            }
        }
    }

    fn coils_off(&self) -> usize {
        self.coils.iter().filter(|on| !**on).count()
    }
}

/// A site of the pymodbus meter and PDU, the PDU declared with `pdu_outlets` outlets.
fn site_text(modbus_port: u16, broker_port: u16, pdu_outlets: usize) -> String {
    format!(
        r#"
[site]
id = "py"
name = "pymodbus interop"
import_limit_kw = 200.0
meter = "site-meter"

[mqtt]
urls = ["mqtt://127.0.0.1:{broker_port}"]
client_id = "gridshed-pymodbus-{pid}"
ack_topic = "sites/py/ack"
status_topic = "sites/py/status"
status_interval_s = 1

[[mqtt.signals]]
topic = "sites/py/signals"
format = "native"

[[meters]]
name = "site-meter"
host = "127.0.0.1"
port = {modbus_port}
unit_id = 1
timeout_ms = 2000
profile = "generic-meter"

[[pdus]]
name = "pdu-py"
host = "127.0.0.1"
port = {modbus_port}
unit_id = 2
outlets = {pdu_outlets}
timeout_ms = 2000
profile = "generic-pdu"

[[asics]]
pdu = "pdu-py"
outlets = [1, {OUTLETS}]
model = "S19"
rated_w = {RATED_W:.1}
efficiency_j_per_th = 30.0
priority = 2

[policy]
min_off_s = 0.5
min_on_s = 0.5
restore_batch_size = {OUTLETS}
restore_interval_s = 0.5
gpu_peak_window_s = 2.0
poll_interval_ms = 250
"#,
        pid = std::process::id()
    )
}

fn kw(s: &Value, key: &str) -> f64 {
    s[key].as_f64().unwrap_or(f64::NAN)
}

/// The whole loop: the pymodbus site, a broker, the utility's client and the controller.
struct Loop {
    py: PySite,
    utility: Client,
    stop: oneshot::Sender<()>,
    controller: tokio::task::JoinHandle<Result<(), controller::RunError>>,
    _broker: Broker,
}

impl Loop {
    /// Starts it all, the site file declaring the PDU with `pdu_outlets` outlets. `None` when
    /// the test is skipped (see [`start_pysite`]).
    async fn start(pdu_outlets: usize) -> Option<Loop> {
        let py = start_pysite().await?;
        let broker = Broker::embedded().expect("embedded broker");
        let text = site_text(py.port, broker.port(), pdu_outlets);
        let site = site_config::parse(Path::new("pymodbus.toml"), &text)
            .expect("the interop site is valid");
        let utility = Client::connect(broker.port(), &["sites/py/status", "sites/py/ack"]).await;
        let (stop, stopped) = oneshot::channel::<()>();
        let controller = tokio::spawn(controller::run(site, async {
            let _ = stopped.await;
        }));
        Some(Loop {
            py,
            utility,
            stop,
            controller,
            _broker: broker,
        })
    }

    /// Stops the controller, then the script (by closing its stdin); returns how it exited.
    async fn finish(mut self) -> std::process::ExitStatus {
        let _ = self.stop.send(());
        self.controller
            .await
            .expect("controller task")
            .expect("controller ran");
        drop(self.py.stdin.take());
        tokio::time::timeout(Duration::from_secs(10), self.py.child.wait())
            .await
            .expect("the pymodbus site stops")
            .expect("its exit status")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reads_and_switches_a_pymodbus_site() {
    let Some(mut run) = Loop::start(OUTLETS).await else {
        return;
    };
    let (py, utility) = (&mut run.py, &mut run.utility);

    // Reads: the meter's f32 (high word first) and the outlets' u16 watts, through a gateway.
    let full_kw = BASE_KW + OUTLETS as f64 * RATED_W / 1000.0;
    let status = utility
        .wait_from(0, "sites/py/status", Duration::from_secs(20), |s| {
            s["online"] == true && s["asics_on"] == OUTLETS && !s["site_kw"].is_null()
        })
        .await
        .json;
    assert!((kw(&status, "site_kw") - full_kw).abs() < 0.01, "{status}");
    assert!(
        (kw(&status, "asic_kw") - full_kw + BASE_KW).abs() < 0.01,
        "{status}"
    );
    assert!(
        status["faulted"].as_array().is_some_and(|f| f.is_empty()),
        "{status}"
    );

    // Writes: shed 9 kW, three outlets' worth.
    utility
        .publish(
            "sites/py/signals",
            r#"{"id":"evt-py","kind":"shed","kw":9}"#,
        )
        .await;
    utility
        .wait_from(0, "sites/py/ack", Duration::from_secs(10), |a| {
            a["id"] == "evt-py" && a["status"] == "active"
        })
        .await;
    let from = utility.seen.len();
    let shed = utility
        .wait_from(from, "sites/py/status", Duration::from_secs(10), |s| {
            kw(s, "site_kw") <= full_kw - 9.0 + 0.01
        })
        .await
        .json;
    py.take_writes();
    let off = shed["asics_off"].as_u64().expect("asics_off") as usize;
    assert!((3..=4).contains(&off), "{shed}");
    assert_eq!(
        py.coils_off(),
        off,
        "the relays written over the wire are the ones the controller counts off: {:?}",
        py.coils
    );
    assert!(
        (kw(&shed, "site_kw") - (full_kw - off as f64 * RATED_W / 1000.0)).abs() < 0.01,
        "the meter follows the relays: {shed}"
    );

    // And back on after the release.
    utility
        .publish("sites/py/signals", r#"{"id":"evt-py","kind":"release"}"#)
        .await;
    let from = utility.seen.len();
    utility
        .wait_from(from, "sites/py/status", Duration::from_secs(10), |s| {
            s["asics_off"] == 0 && (kw(s, "site_kw") - full_kw).abs() < 0.01
        })
        .await;
    py.take_writes();
    assert_eq!(py.coils, vec![true; OUTLETS], "every relay written back on");

    // Closing its stdin stops the script cleanly.
    let status = run.finish().await;
    assert!(status.success(), "the pymodbus site exited {status}");
}

/// A site file that declares one outlet more than the PDU has: the controller reads outlet
/// power registers 100..=108, pymodbus answers exception 02 for 108, and the PDU is reported
/// faulted with that reason; nothing is written to it, whatever the signal asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pymodbus_exception_faults_the_pdu_and_nothing_is_written() {
    let Some(mut run) = Loop::start(OUTLETS + 1).await else {
        return;
    };
    let (py, utility) = (&mut run.py, &mut run.utility);
    let faulted = |s: &Value| {
        s["faulted"].as_array().is_some_and(|f| {
            f.iter().any(|d| {
                d["device"] == "pdu-py"
                    && d["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("IllegalDataAddress"))
            })
        })
    };
    let status = utility
        .wait_from(0, "sites/py/status", Duration::from_secs(20), |s| {
            s["online"] == true && faulted(s)
        })
        .await
        .json;
    assert!(
        (kw(&status, "site_kw") - BASE_KW - OUTLETS as f64 * RATED_W / 1000.0).abs() < 0.01,
        "the meter behind the same gateway still reads: {status}"
    );
    utility
        .publish("sites/py/signals", r#"{"id":"evt-x","kind":"shed_all"}"#)
        .await;
    utility
        .wait_from(0, "sites/py/ack", Duration::from_secs(10), |a| {
            a["id"] == "evt-x"
        })
        .await;
    // The event is in force, and the PDU still faulted and not written.
    let from = utility.seen.len();
    utility
        .wait_from(from, "sites/py/status", Duration::from_secs(10), |s| {
            faulted(s) && s["directives"] == serde_json::json!(["evt-x"])
        })
        .await;
    // The next status, a second on (four polls), still has it faulted.
    let from = utility.seen.len();
    utility
        .wait_from(from, "sites/py/status", Duration::from_secs(5), faulted)
        .await;
    py.take_writes();
    assert_eq!(
        py.coils,
        vec![true; OUTLETS],
        "nothing was written to the faulted PDU"
    );

    run.finish().await;
}
