//! Device faults, injected into firmware-sim while the controller runs: a PDU that times out,
//! answers with an exception, drops the connection, or acknowledges writes its relays never
//! follow. Each time the PDU is reported faulted in status, other ASICs are shed to cover for
//! it, the GPU racks are never written, and once the fault clears the PDU is retried and trusted
//! again. Then the site-wide case: 10 % of the PDUs dead just as a signal arrives.

use std::time::Duration;

use hil::broker::Broker;
use hil::rig::Rig;
use serde_json::Value;
use site_config::{Faults, SignalFormat};
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

/// The PDU whose ASICs the planner sheds first in small.toml (priority 3, least efficient):
/// a fault there is the one that most needs covering.
const FIRST_TO_SHED: &str = "pdu-legacy";

fn faulted(status: &Value, device: &str) -> Option<String> {
    status["faulted"]
        .as_array()?
        .iter()
        .find(|f| f["device"] == device)
        .map(|f| f["reason"].as_str().unwrap_or_default().to_owned())
}

/// Injects `faults` into the first PDU to shed, asks for 120 kW, and checks the fault is
/// reported with a reason mentioning `reason_has`, that the site still gets under the limit
/// and stays there, and that the PDU is trusted again once the fault clears.
async fn a_faulted_pdu_is_reported_covered_for_and_retried(faults: Faults, reason_has: &str) {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", hil::rig::fast_policy).await;
    rig.sim
        .set_faults(FIRST_TO_SHED, faults)
        .expect("fault injected");
    let from = rig.utility.seen.len();
    let t0 = Instant::now();
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"cover","kind":"import_limit","kw":120}"#,
    )
    .await;
    let status_topic = rig.site.mqtt.status_topic.clone();
    let status = rig
        .utility
        .wait_from(from, &status_topic, 10 * SECOND, |s| {
            faulted(s, FIRST_TO_SHED).is_some()
        })
        .await
        .json;
    let reason = faulted(&status, FIRST_TO_SHED).unwrap_or_default();
    assert!(reason.contains(reason_has), "fault reason: {reason}");

    let took = rig
        .until(10 * SECOND, "site under 120 kW with the PDU faulted", |r| {
            r.site_kw() < 120.0
        })
        .await;
    eprintln!(
        "{reason_has}: site under the limit {:?} after the signal",
        t0.elapsed().max(took)
    );
    // The first reading under the limit can come in a trough of the GPU swing, while the cover
    // (a second shed, once the fault is known) is still switching: the site must stay under
    // from when the relays are still. (Checking from the first reading failed 1 run in 6.)
    relays_still_for(&rig, SECOND, 10 * SECOND).await;
    let end = Instant::now() + 2 * SECOND;
    while Instant::now() < end {
        let kw = rig.site_kw();
        assert!(kw < 120.0, "site at {kw:.1} kW over the limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rig.protected_writes(), 0, "nothing written to a GPU rack");

    // The fault clears: the PDU is retried (with backoff) and trusted again.
    rig.sim.clear_faults();
    let from = rig.utility.seen.len();
    rig.utility
        .wait_from(from, &status_topic, 90 * SECOND, |s| {
            s["faulted"].as_array().is_some_and(|f| f.is_empty())
        })
        .await;
    rig.until(15 * SECOND, "site still under 120 kW", |r| {
        r.site_kw() < 120.0
    })
    .await;
}

/// Waits until no relay has moved for `still` (at most `limit`).
async fn relays_still_for(rig: &Rig, still: Duration, limit: Duration) {
    let start = Instant::now();
    let mut toggles = rig.sim.total_toggles();
    let mut since = Instant::now();
    while since.elapsed() < still {
        assert!(
            start.elapsed() < limit,
            "relays still moving after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = rig.sim.total_toggles();
        if now != toggles {
            (toggles, since) = (now, Instant::now());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_that_times_out_is_reported_covered_for_and_retried() {
    let faults = Faults {
        no_reply: true,
        ..Faults::default()
    };
    a_faulted_pdu_is_reported_covered_for_and_retried(faults, "no answer within").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_answering_with_an_exception_is_reported_covered_for_and_retried() {
    let faults = Faults {
        exception: Some(4),
        ..Faults::default()
    };
    a_faulted_pdu_is_reported_covered_for_and_retried(faults, "exception").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_that_drops_the_connection_is_reported_covered_for_and_retried() {
    let faults = Faults {
        disconnect: true,
        ..Faults::default()
    };
    a_faulted_pdu_is_reported_covered_for_and_retried(faults, "connection failed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_whose_relays_stick_is_reported_covered_for_and_retried() {
    let faults = Faults {
        stuck_outlets: vec![1, 2, 3, 4],
        ..Faults::default()
    };
    a_faulted_pdu_is_reported_covered_for_and_retried(faults, "relays disagree").await;
}

/// A row of 20 PDUs of 8 ASICs (480 kW), one GPU rack, 600 kW import: the least efficient
/// ASICs, shed first, sit on the first two PDUs.
fn row_site() -> site_config::Site {
    let text = r#"
[site]
id = "row"
name = "A row of 20 PDUs"
import_limit_kw = 600.0
meter = "site-meter"

[mqtt]
urls = ["mqtt://127.0.0.1:1883"]
client_id = "gridshed-row"
ack_topic = "sites/row/ack"
status_topic = "sites/row/status"

[[mqtt.signals]]
topic = "sites/row/signals"
format = "native"

[[meters]]
name = "site-meter"
host = "127.0.0.1"
port = 18000
timeout_ms = 300
profile = "generic-meter"

[[meters]]
name = "gpu-meter"
host = "127.0.0.1"
port = 18001
timeout_ms = 300
profile = "generic-meter"

[[pdus]]
name = "pdu"
count = 20
host = "127.0.0.1"
port = 18010
outlets = 8
timeout_ms = 300
profile = "generic-pdu"

[[asics]]
pdu = "pdu"
members = [1, 2]
outlets = [1, 8]
model = "S19"
rated_w = 3000.0
efficiency_j_per_th = 34.5
priority = 2

[[asics]]
pdu = "pdu"
members = [3, 20]
outlets = [1, 8]
model = "S21"
rated_w = 3000.0
efficiency_j_per_th = 17.5
priority = 2

[[gpu_racks]]
name = "gpu"
meter = "gpu-meter"
rated_kw = 60.0

[policy]
min_off_s = 1.0
min_on_s = 1.0
restore_batch_size = 16
restore_interval_s = 0.3
gpu_peak_window_s = 6.0
poll_interval_ms = 250
margin_kw = 6.0                     # above the meters' noise

[sim]
relay_delay_ms = 50
noise_pct = 0.5
base_load_kw = 5.0

[[sim.gpu]]
rack = "gpu"
base_kw = 40.0
swing_kw = 5.0
period_s = 1.0
"#;
    site_config::parse(std::path::Path::new("row.toml"), text).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_of_pdus_dead_as_a_signal_arrives_still_meet_the_limit_through_the_others() {
    let broker = Broker::embedded().expect("broker");
    let rig = Rig::start_site(broker, row_site(), |_| {}).await;
    let timeout = rig.site.pdus[0].endpoint.timeout;
    assert!(rig.site_kw() > 450.0, "the row starts at full power");
    // The two PDUs the planner would shed first stop answering just as the signal arrives.
    let dead = ["pdu-1", "pdu-2"];
    for pdu in dead {
        rig.sim
            .set_faults(
                pdu,
                Faults {
                    no_reply: true,
                    ..Faults::default()
                },
            )
            .expect("fault injected");
    }
    let t0 = Instant::now();
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"row-cap","kind":"import_limit","kw":300}"#,
    )
    .await;
    // Two timeouts is the target, measured by shed-bench; a loaded CI machine gets slack here.
    let took = rig
        .until(
            10 * SECOND,
            "row under 300 kW with 10 % of PDUs dead",
            |r| r.site_kw() < 300.0,
        )
        .await;
    eprintln!(
        "10 % of PDUs dead: site under the limit {:?} after the signal (two timeouts: {:?})",
        t0.elapsed().max(took),
        2 * timeout
    );
    for pdu in dead {
        assert!(
            rig.sim
                .outlets(pdu)
                .expect("pdu")
                .iter()
                .all(|o| o.relay_on),
            "{pdu} never took the write"
        );
    }
    let end = Instant::now() + 2 * SECOND;
    while Instant::now() < end {
        let kw = rig.site_kw();
        assert!(kw < 300.0, "row at {kw:.1} kW over the limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rig.protected_writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_gpu_meter_counts_its_rack_at_rating_and_the_site_stays_under_the_limit() {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", hil::rig::fast_policy).await;
    rig.sim
        .set_faults(
            "gpu-meter-1",
            Faults {
                no_reply: true,
                ..Faults::default()
            },
        )
        .expect("fault injected");
    let from = rig.utility.seen.len();
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"blind","kind":"import_limit","kw":120}"#,
    )
    .await;
    let status_topic = rig.site.mqtt.status_topic.clone();
    rig.utility
        .wait_from(from, &status_topic, 10 * SECOND, |s| {
            faulted(s, "gpu-meter-1").is_some_and(|r| r.contains("no answer"))
        })
        .await;
    rig.until(
        10 * SECOND,
        "site under 120 kW without the GPU meter",
        |r| r.site_kw() < 120.0,
    )
    .await;
    let end = Instant::now() + 2 * SECOND;
    while Instant::now() < end {
        let kw = rig.site_kw();
        assert!(kw < 120.0, "site at {kw:.1} kW over the limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(rig.protected_writes(), 0, "the meter is only ever read");
}
