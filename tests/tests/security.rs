//! What may act on the site: only signals on the topics the site file names, and never a signal
//! replayed after its event ended. (TLS with client certificates and credentials from the
//! environment are in `mqtt_link.rs`; that credentials never reach the log is a process test in
//! the controller crate.)

use std::time::Duration;

use hil::on_both_brokers;
use hil::rig::{BrokerKind, Rig};
use site_config::SignalFormat;

on_both_brokers!(
    signals_on_topics_the_site_file_does_not_name_are_not_acted_on,
    a_signal_replayed_after_its_event_ended_changes_nothing,
);

const SECOND: Duration = Duration::from_secs(1);

async fn signals_on_topics_the_site_file_does_not_name_are_not_acted_on(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, hil::rig::fast_policy).await else {
        return;
    };
    let writes = rig.sim.all_writes();
    let from = rig.utility.seen.len();
    let shed_all = r#"{"id":"intruder","kind":"shed_all"}"#;
    for topic in [
        "sites/demo/signals/extra",
        "sites/demo/Signals",
        "sites/other/signals",
        "sites/demo",
    ] {
        rig.utility.publish(topic, shed_all).await;
    }
    // A signal on the site's own topic, sent after them, is heard: so they were delivered
    // before it, had the controller been listening.
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"marker","kind":"shed","kw":5}"#,
    )
    .await;
    rig.ack(from, "marker", "accepted", 5 * SECOND).await;
    rig.utility.drain();
    assert!(
        rig.utility.seen[from..]
            .iter()
            .all(|s| s.json["id"] != "intruder"),
        "a signal on a foreign topic was acknowledged"
    );
    rig.until(5 * SECOND, "the 5 kW shed", |r| {
        r.asics_on() == r.site.asics.len() - 2
    })
    .await;
    tokio::time::sleep(SECOND).await;
    assert_eq!(
        rig.asics_on(),
        rig.site.asics.len() - 2,
        "only the marker's 5 kW were shed"
    );
    assert!(rig.sim.all_writes().values().sum::<u64>() > writes.values().sum::<u64>());
}

async fn a_signal_replayed_after_its_event_ended_changes_nothing(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, hil::rig::fast_policy).await else {
        return;
    };
    let total = rig.site.asics.len();

    // Released by the utility, then replayed (same bytes): refused.
    let released = r#"{"id":"evt-r","kind":"shed_all","duration_s":3600}"#;
    let from = rig.utility.seen.len();
    rig.signal(SignalFormat::Native, released).await;
    rig.until(3 * SECOND, "every ASIC off", |r| r.asics_on() == 0)
        .await;
    rig.signal(SignalFormat::Native, r#"{"id":"evt-r","kind":"release"}"#)
        .await;
    rig.ack(from, "evt-r", "completed", 3 * SECOND).await;
    rig.until(20 * SECOND, "every ASIC back", |r| r.asics_on() == total)
        .await;
    let writes = rig.sim.all_writes();
    let from = rig.utility.seen.len();
    rig.signal(SignalFormat::Native, released).await;
    let ack = rig.ack(from, "evt-r", "rejected", 3 * SECOND).await;
    assert!(
        ack["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("replayed"),
        "{ack}"
    );

    // Ran its course, then replayed: refused as expired.
    let start = jiff::Timestamp::now();
    let short =
        format!(r#"{{"id":"evt-s","kind":"shed","kw":5,"start":"{start}","duration_s":1}}"#);
    rig.signal(SignalFormat::Native, short.clone()).await;
    rig.ack(from, "evt-s", "completed", 5 * SECOND).await;
    rig.until(20 * SECOND, "every ASIC back", |r| r.asics_on() == total)
        .await;
    let writes_after_short = rig.sim.all_writes();
    assert!(writes_after_short != writes);
    rig.signal(SignalFormat::Native, short).await;
    let ack = rig.ack(from, "evt-s", "rejected", 3 * SECOND).await;
    assert!(
        ack["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("expired"),
        "{ack}"
    );

    // Maestro: a curtailment older than the release that followed it is refused.
    let ts = jiff::Timestamp::now().as_second();
    let curtail = format!(r#"{{"target":0,"timestamp":{ts}}}"#);
    rig.signal(SignalFormat::Maestro, curtail.clone()).await;
    rig.until(3 * SECOND, "every ASIC off", |r| r.asics_on() == 0)
        .await;
    rig.signal(
        SignalFormat::Maestro,
        format!(r#"{{"target":100,"timestamp":{}}}"#, ts + 1),
    )
    .await;
    rig.until(20 * SECOND, "every ASIC back", |r| r.asics_on() == total)
        .await;
    let settled = rig.sim.all_writes();
    let from = rig.utility.seen.len();
    rig.signal(SignalFormat::Maestro, curtail).await;
    let ack = rig.ack(from, "maestro", "rejected", 3 * SECOND).await;
    assert!(
        ack["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("replayed"),
        "{ack}"
    );

    tokio::time::sleep(SECOND).await;
    assert_eq!(rig.asics_on(), total, "no replay switched anything off");
    assert_eq!(rig.sim.all_writes(), settled, "no replay wrote anything");
}
