//! The site file's stale-signal policy: what happens when the utility goes silent.

use std::time::Duration;

use hil::broker::Broker;
use hil::rig::Rig;
use site_config::{SignalFormat, StalePolicy};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curtail_sheds_every_asic_after_the_silence_and_the_next_signal_lifts_it() {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", |s| {
        hil::rig::fast_policy(s);
        s.policy.stale_signal = StalePolicy::Curtail { after: 2 * SECOND };
    })
    .await;
    rig.until(6 * SECOND, "every ASIC off after 2 s of silence", |r| {
        r.asics_on() == 0
    })
    .await;
    let status = rig.site.mqtt.status_topic.clone();
    rig.utility
        .wait_from(0, &status, 6 * SECOND, |s| {
            s["directives"] == serde_json::json!(["stale-signal"])
        })
        .await;
    // The utility speaks again, re-sending as a heartbeat (an identical signal changes
    // nothing): a 10 kW shed, and the curtailment is over.
    let deadline = tokio::time::Instant::now() + 20 * SECOND;
    while rig.asics_on() < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "ASICs never came back"
        );
        rig.signal(
            SignalFormat::Native,
            r#"{"id":"back","kind":"shed","kw":10}"#,
        )
        .await;
        tokio::time::sleep(SECOND).await;
    }
    rig.utility
        .wait_from(0, &status, 6 * SECOND, |s| {
            s["directives"] == serde_json::json!(["back"])
        })
        .await;
    assert_eq!(rig.protected_writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_ends_every_directive_after_the_silence() {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", |s| {
        hil::rig::fast_policy(s);
        s.policy.stale_signal = StalePolicy::Release { after: 3 * SECOND };
    })
    .await;
    let from = rig.utility.seen.len();
    rig.signal(SignalFormat::Native, r#"{"id":"held","kind":"shed_all"}"#)
        .await;
    rig.until(2 * SECOND, "every ASIC off", |r| r.asics_on() == 0)
        .await;
    rig.ack(from, "held", "completed", 6 * SECOND).await;
    rig.until(15 * SECOND, "ASICs back", |r| {
        r.asics_on() == r.site.asics.len()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_keeps_what_is_in_force_through_the_silence() {
    let broker = Broker::embedded().expect("broker");
    let rig = Rig::start_on(broker, "small.toml", hil::rig::fast_policy).await;
    rig.signal(SignalFormat::Native, r#"{"id":"held","kind":"shed_all"}"#)
        .await;
    rig.until(2 * SECOND, "every ASIC off", |r| r.asics_on() == 0)
        .await;
    let writes = rig.sim.all_writes();
    tokio::time::sleep(4 * SECOND).await;
    assert_eq!(rig.asics_on(), 0);
    assert_eq!(rig.sim.all_writes(), writes);
}
