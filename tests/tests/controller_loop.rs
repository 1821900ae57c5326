//! The control loop end to end: utility signals over MQTT, the controller, firmware-sim's PDUs
//! and meters over Modbus TCP. Every scenario runs on the embedded broker and on Mosquitto
//! (skipped when Mosquitto is missing, required under CI=true).

use std::time::Duration;

use hil::rig::{BrokerKind, Rig};
use site_config::{Faults, SignalFormat};
use tokio::time::Instant;

use hil::on_both_brokers;

on_both_brokers!(
    an_import_limit_brings_the_site_meter_under_it_within_2_s,
    a_release_restores_asics_in_batches_never_past_the_limit,
    an_openadr_capacity_limit_event_is_followed_and_delete_ends_it,
    maestro_target_0_curtails_every_asic_and_100_brings_them_back,
    malformed_signals_are_rejected_on_the_ack_topic_and_change_nothing,
    a_pdu_that_stops_answering_is_reported_and_others_are_shed_instead,
);

const SECOND: Duration = Duration::from_secs(1);

/// Publishes on the native topic: with mosquitto_pub on the Mosquitto rig (a client we did not
/// write), with the test client otherwise.
async fn publish_native(rig: &Rig, kind: BrokerKind, payload: &str) {
    let topic = &rig.site.mqtt.signals[0].topic;
    if kind == BrokerKind::Mosquitto
        && let Some(bin) = hil::tools::require("mosquitto_pub")
    {
        let status = tokio::process::Command::new(bin)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &rig.broker.port().to_string(),
                "-q",
                "1",
                "-t",
                topic,
                "-m",
                payload,
            ])
            .status()
            .await
            .expect("mosquitto_pub runs");
        assert!(status.success());
        return;
    }
    rig.signal(SignalFormat::Native, payload).await;
}

/// Checks the site meter stays under `limit_kw` for `span` (GPU racks keep swinging).
async fn stays_under(rig: &Rig, limit_kw: f64, span: Duration) {
    let end = Instant::now() + span;
    while Instant::now() < end {
        let kw = rig.site_kw();
        assert!(
            kw < limit_kw,
            "site meter {kw:.1} kW over the limit {limit_kw} kW"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn an_import_limit_brings_the_site_meter_under_it_within_2_s(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, |_| {}).await else {
        return;
    };
    assert!(rig.site_kw() > 150.0, "the site starts at full power");
    let from = rig.utility.seen.len();
    let t0 = Instant::now();
    publish_native(
        &rig,
        kind,
        r#"{"id":"evt-limit","kind":"import_limit","kw":120}"#,
    )
    .await;
    let took = rig
        .until(2 * SECOND, "site meter under 120 kW", |r| {
            r.site_kw() < 120.0
        })
        .await;
    eprintln!(
        "site meter under the limit {:?} after publishing",
        t0.elapsed().max(took)
    );
    rig.ack(from, "evt-limit", "accepted", SECOND).await;
    rig.ack(from, "evt-limit", "active", SECOND).await;
    stays_under(&rig, 120.0, 2 * SECOND).await;
    let status = rig
        .utility
        .wait_from(from, &rig.site.mqtt.status_topic.clone(), 6 * SECOND, |s| {
            s["directives"].as_array().is_some_and(|d| d.len() == 1)
        })
        .await
        .json;
    assert_eq!(status["limit_kw"], 120.0);
    assert!(status["shed_kw"].as_f64().unwrap() > 40.0, "{status}");
    assert_eq!(
        rig.protected_writes(),
        0,
        "nothing was written to a GPU rack or meter"
    );
}

async fn a_release_restores_asics_in_batches_never_past_the_limit(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, |s| {
        hil::rig::fast_policy(s);
        s.policy.restore_interval = Duration::from_millis(600);
        s.policy.restore_batch_size = 4;
    })
    .await
    else {
        return;
    };
    let total = rig.site.asics.len();
    let from = rig.utility.seen.len();
    publish_native(&rig, kind, r#"{"id":"evt-all","kind":"shed_all"}"#).await;
    rig.until(2 * SECOND, "every ASIC off", |r| r.asics_on() == 0)
        .await;
    // Restore under a limit that leaves room for only part of the fleet.
    publish_native(&rig, kind, r#"{"id":"evt-all","kind":"release"}"#).await;
    rig.ack(from, "evt-all", "completed", 2 * SECOND).await;
    publish_native(
        &rig,
        kind,
        r#"{"id":"cap","kind":"import_limit","kw":150,"priority":5}"#,
    )
    .await;

    // Record every change in the number of ASICs on until the restore settles. (The first
    // batch may wait for the controller's other-load estimate to be warm after start-up.)
    let mut steps: Vec<(Instant, usize)> = vec![(Instant::now(), 0)];
    rig.until(15 * SECOND, "the restore begins", |r| r.asics_on() > 0)
        .await;
    let deadline = Instant::now() + 20 * SECOND;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < 2 * SECOND {
        let on = rig.asics_on();
        if on != steps.last().map_or(0, |s| s.1) {
            steps.push((Instant::now(), on));
            quiet_since = Instant::now();
        }
        assert!(
            rig.site_kw() < 150.0,
            "restore went past the limit: {:.1} kW",
            rig.site_kw()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let restored = steps.last().unwrap().1;
    assert!(
        restored > 4 && restored < total,
        "restored {restored} of {total}: {steps:?}"
    );
    // Batches: at most 4 come on together, batches at least the interval apart (allowing for
    // the relay delay and the 50 ms physics tick of the simulator).
    let mut batch_starts: Vec<Instant> = Vec::new();
    let mut batch_base = 0;
    for w in steps.windows(2) {
        let (t, on) = w[1];
        if batch_starts
            .last()
            .is_none_or(|s| t.duration_since(*s) > Duration::from_millis(300))
        {
            batch_starts.push(t);
            batch_base = w[0].1;
        }
        assert!(
            on >= batch_base && on - batch_base <= 4,
            "more than a batch at once, or a restored ASIC shed again: {steps:?}"
        );
    }
    for pair in batch_starts.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(
            gap >= Duration::from_millis(450),
            "batches {gap:?} apart: {steps:?}"
        );
    }
    assert_eq!(rig.protected_writes(), 0);
}

async fn an_openadr_capacity_limit_event_is_followed_and_delete_ends_it(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, hil::rig::fast_policy).await else {
        return;
    };
    let event = r#"{"id":"oadr-1","programID":"p","eventName":"capacity","priority":1,
        "payloadDescriptors":[{"payloadType":"IMPORT_CAPACITY_LIMIT","units":"KW"}],
        "intervalPeriod":{"start":"0001-01-01T00:00:00Z","duration":"P9999Y"},
        "intervals":[{"id":0,"payloads":[{"type":"IMPORT_CAPACITY_LIMIT","values":[125]}]}]}"#;
    let from = rig.utility.seen.len();
    rig.signal(
        SignalFormat::Openadr3,
        format!(r#"{{"objectType":"EVENT","operation":"CREATE","object":{event}}}"#),
    )
    .await;
    rig.until(2 * SECOND, "site meter under 125 kW", |r| {
        r.site_kw() < 125.0
    })
    .await;
    rig.ack(from, "oadr-1", "active", SECOND).await;
    stays_under(&rig, 125.0, SECOND).await;
    let off = rig.site.asics.len() - rig.asics_on();
    rig.signal(
        SignalFormat::Openadr3,
        format!(r#"{{"objectType":"EVENT","operation":"DELETE","object":{event}}}"#),
    )
    .await;
    rig.ack(from, "oadr-1", "completed", 2 * SECOND).await;
    rig.until(15 * SECOND, "ASICs coming back", |r| {
        r.site.asics.len() - r.asics_on() < off
    })
    .await;
    assert_eq!(rig.protected_writes(), 0);
}

async fn maestro_target_0_curtails_every_asic_and_100_brings_them_back(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, hil::rig::fast_policy).await else {
        return;
    };
    let ts = jiff::Timestamp::now().as_second();
    let from = rig.utility.seen.len();
    rig.signal(
        SignalFormat::Maestro,
        format!(r#"{{"target":0,"timestamp":{ts}}}"#),
    )
    .await;
    rig.until(2 * SECOND, "every ASIC off", |r| r.asics_on() == 0)
        .await;
    rig.ack(from, "maestro", "active", SECOND).await;
    // GPU racks keep running: the site still draws their power and the base load.
    let kw = rig.site_kw();
    assert!(
        kw > 30.0 && kw < 75.0,
        "site at {kw:.1} kW with every ASIC off"
    );
    // Maestro re-sends periodically; a re-send changes nothing.
    let writes = rig.sim.all_writes();
    let resent = rig.utility.seen.len();
    rig.signal(
        SignalFormat::Maestro,
        format!(r#"{{"target":0,"timestamp":{}}}"#, ts + 1),
    )
    .await;
    rig.ack(resent, "maestro", "unchanged", SECOND).await;
    // The core plans as it takes a signal; any write that plan ordered goes out before the
    // PDU's next reads.
    let reads = rig.sim.requests("pdu-1").unwrap();
    rig.until(2 * SECOND, "two more polls of pdu-1", |r| {
        r.sim.requests("pdu-1").unwrap() >= reads + 2
    })
    .await;
    assert_eq!(
        rig.sim.all_writes(),
        writes,
        "an identical re-send wrote nothing"
    );
    // Sent after the re-send: a maestro message older than the newest taken is a replay.
    rig.signal(
        SignalFormat::Maestro,
        format!(r#"{{"target":100,"timestamp":{}}}"#, ts + 2),
    )
    .await;
    rig.ack(from, "maestro", "completed", 2 * SECOND).await;
    rig.until(15 * SECOND, "ASICs coming back", |r| r.asics_on() > 0)
        .await;
    assert_eq!(rig.protected_writes(), 0);
}

async fn malformed_signals_are_rejected_on_the_ack_topic_and_change_nothing(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, |_| {}).await else {
        return;
    };
    let past = "2020-01-01T00:00:00Z";
    let bad: Vec<(SignalFormat, String)> = vec![
        (SignalFormat::Native, "not json".into()),
        (
            SignalFormat::Native,
            r#"{"id":"b1","kind":"import_limit","kw":-5}"#.into(),
        ),
        (
            SignalFormat::Native,
            r#"{"id":"b2","kind":"import_limit","kw":"NaN"}"#.into(),
        ),
        (
            SignalFormat::Native,
            r#"{"id":"b3","kind":"import_limit","kw":1e15}"#.into(),
        ),
        (
            SignalFormat::Native,
            r#"{"id":"b4","kind":"overclock","kw":5}"#.into(),
        ),
        (
            SignalFormat::Native,
            format!(r#"{{"id":"b5","kind":"shed_all","start":"{past}","duration_s":60}}"#),
        ),
        (
            SignalFormat::Native,
            format!(
                r#"{{"id":"b6","kind":"shed","kw":5,"pad":"{}"}}"#,
                "x".repeat(20_000)
            ),
        ),
        (
            SignalFormat::Openadr3,
            r#"{"id":"b7","intervals":[]}"#.into(),
        ),
        (
            SignalFormat::Openadr3,
            r#"{"objectType":"EVENT","operation":"EXPLODE","object":{"id":"b8"}}"#.into(),
        ),
        (
            SignalFormat::Maestro,
            r#"{"target":0,"timestamp":1}"#.into(),
        ),
        (SignalFormat::Maestro, r#"{"target":42}"#.into()),
    ];
    let writes = rig.sim.all_writes();
    let on = rig.asics_on();
    let from = rig.utility.seen.len();
    for (format, payload) in &bad {
        rig.signal(*format, payload.clone()).await;
    }
    let ack_topic = rig.site.mqtt.ack_topic.clone();
    let deadline = Instant::now() + 5 * SECOND;
    loop {
        rig.utility.drain();
        let rejected = rig.utility.seen[from..]
            .iter()
            .filter(|s| s.topic == ack_topic && s.json["status"] == "rejected")
            .count();
        if rejected == bad.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{rejected} of {} rejections seen",
            bad.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reasons: Vec<String> = rig.utility.seen[from..]
        .iter()
        .filter(|s| s.topic == ack_topic)
        .map(|s| s.json["reason"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        reasons.iter().all(|r| !r.is_empty()),
        "every rejection has a reason: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("exceeds the limit")),
        "{reasons:?}"
    );
    // Nothing changed: a cycle later, no write anywhere and every relay as it was.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rig.sim.all_writes(), writes);
    assert_eq!(rig.asics_on(), on);
    // And the controller still works.
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"good","kind":"shed","kw":20}"#,
    )
    .await;
    rig.ack(from, "good", "active", 2 * SECOND).await;
}

async fn a_pdu_that_stops_answering_is_reported_and_others_are_shed_instead(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, |_| {}).await else {
        return;
    };
    // pdu-2 (eight S19j Pros, first in the shed order after the old S19s) goes silent.
    rig.sim
        .set_faults(
            "pdu-2",
            Faults {
                no_reply: true,
                ..Faults::default()
            },
        )
        .unwrap();
    let from = rig.utility.seen.len();
    let status_topic = rig.site.mqtt.status_topic.clone();
    rig.utility
        .wait_from(from, &status_topic, 5 * SECOND, |s| {
            s["faulted"]
                .as_array()
                .is_some_and(|f| f.iter().any(|d| d["device"] == "pdu-2"))
        })
        .await;
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"evt-f","kind":"import_limit","kw":120}"#,
    )
    .await;
    rig.until(3 * SECOND, "site meter under 120 kW without pdu-2", |r| {
        r.site_kw() < 120.0
    })
    .await;
    stays_under(&rig, 120.0, SECOND).await;
    let outlets = rig.sim.outlets("pdu-2").unwrap();
    assert!(
        outlets.iter().all(|o| o.relay_on),
        "the silent PDU kept its ASICs on"
    );
    assert!(
        rig.sim
            .outlets("pdu-3")
            .unwrap()
            .iter()
            .any(|o| !o.relay_on),
        "others were shed instead"
    );
    assert_eq!(rig.protected_writes(), 0);
}
