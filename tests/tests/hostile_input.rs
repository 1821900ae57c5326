//! Hostile input through a real broker: thousands of mutated and malicious signals on every
//! signal topic. The controller must not panic, must not move one relay, and must reject each
//! one on the ack topic with a reason; afterwards it still takes a good signal.

use std::time::Duration;

use controller::decide::signal::{self, Context};
use hil::on_both_brokers;
use hil::rig::{BrokerKind, Rig};
use site_config::SignalFormat;
use tokio::time::Instant;

on_both_brokers!(
    thousands_of_mutated_signals_are_each_rejected_and_move_no_relay,
    a_message_too_large_to_read_costs_a_clean_reconnect_not_the_link,
);

const SECOND: Duration = Duration::from_secs(1);

/// How many hostile signals each run publishes.
const SIGNALS: usize = 2_000;

/// A small deterministic generator (xorshift64*): the same signals on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Valid signals of every format, the stock the mutants are bred from.
fn seeds(now: i64) -> Vec<(SignalFormat, String)> {
    vec![
        (
            SignalFormat::Native,
            r#"{"id":"evt-42","kind":"import_limit","kw":120,"duration_s":3600,"priority":1}"#
                .into(),
        ),
        (
            SignalFormat::Native,
            r#"{"id":"a","kind":"shed_all","emergency":true}"#.into(),
        ),
        (
            SignalFormat::Native,
            r#"{"id":"evt-7","kind":"shed","kw":30}"#.into(),
        ),
        (
            SignalFormat::Openadr3,
            r#"{"objectType":"EVENT","operation":"CREATE","object":{"id":"oadr-1","programID":"p","eventName":"cap","priority":0,"intervalPeriod":{"start":"0001-01-01T00:00:00Z","duration":"PT1H"},"payloadDescriptors":[{"payloadType":"IMPORT_CAPACITY_LIMIT","units":"KW"}],"intervals":[{"id":0,"payloads":[{"type":"IMPORT_CAPACITY_LIMIT","values":[120]}]}]}}"#.into(),
        ),
        (
            SignalFormat::Maestro,
            format!(r#"{{"target":0,"timestamp":{now}}}"#),
        ),
    ]
}

/// Signals built to hurt: absurd values, wrong types, oversize, deep nesting, not UTF-8.
fn malicious(now: i64) -> Vec<(SignalFormat, Vec<u8>)> {
    let n = |s: &str| (SignalFormat::Native, s.as_bytes().to_vec());
    vec![
        n(r#"{"id":"x","kind":"import_limit","kw":-5}"#),
        n(r#"{"id":"x","kind":"import_limit","kw":1e309}"#),
        n(r#"{"id":"x","kind":"shed","kw":"NaN"}"#),
        n(r#"{"id":"x","kind":"shed","kw":0}"#),
        n(r#"{"id":"x","kind":"shed_all","start":"2020-01-01T00:00:00Z","duration_s":60}"#),
        n(r#"{"id":"x","kind":"shed_all","duration_s":-1}"#),
        n(r#"{"id":"x","kind":"shed_all","start":"9999-12-31T23:59:59Z"}"#),
        n(r#"{"id":"","kind":"shed_all"}"#),
        n(r#"{"id":"x","kind":"reboot_everything"}"#),
        n(r#"{"id":"x","kind":"shed_all","__proto__":{}}"#),
        n(""),
        n("null"),
        n("[]"),
        (SignalFormat::Native, vec![0xff, 0xfe, 0x00, 0x7b]),
        (
            SignalFormat::Native,
            format!(
                r#"{{"id":"x","kind":"shed","kw":1,"pad":"{}"}}"#,
                "A".repeat(40_000)
            )
            .into_bytes(),
        ),
        (
            SignalFormat::Openadr3,
            format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)).into_bytes(),
        ),
        (
            SignalFormat::Openadr3,
            r#"{"objectType":"PROGRAM","operation":"CREATE","object":{"id":"p"}}"#.into(),
        ),
        (
            SignalFormat::Maestro,
            format!(r#"{{"target":0,"timestamp":{}}}"#, now - 3 * 86_400).into_bytes(),
        ),
        (
            SignalFormat::Maestro,
            br#"{"target":50,"timestamp":1}"#.to_vec(),
        ),
    ]
}

/// One random edit: overwrite, insert or delete a byte, splice in a hostile token, cut short.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    const TOKENS: [&str; 8] = [
        "NaN", "-1", "1e999", "null", "\"\"", "{}", "\\u0000", "\u{202e}",
    ];
    let i = rng.below(bytes.len() + 1);
    match rng.below(5) {
        0 if i < bytes.len() => bytes[i] = rng.next() as u8,
        1 => bytes.insert(i, rng.next() as u8),
        2 if i < bytes.len() => {
            bytes.remove(i);
        }
        3 => {
            let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
            let end = (i + rng.below(6)).min(bytes.len());
            bytes.splice(i..end, t.iter().copied());
        }
        _ => bytes.truncate(i),
    }
}

async fn thousands_of_mutated_signals_are_each_rejected_and_move_no_relay(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, |_| {}).await else {
        return;
    };
    let now = jiff::Timestamp::now();
    let cx = Context::new(&rig.site, now);
    // The hostile set: every malicious signal, then mutants of the seeds until there are
    // SIGNALS in all. A mutant the parser would take (a harmless edit) is not hostile; it is
    // left out, so every signal sent must come back rejected.
    let mut hostile = malicious(now.as_second());
    for (format, bytes) in &hostile {
        assert!(
            signal::parse(*format, bytes, &cx).is_err(),
            "test setup: a malicious signal parses: {}",
            String::from_utf8_lossy(bytes)
        );
    }
    let seeds = seeds(now.as_second());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    while hostile.len() < SIGNALS {
        let (format, text) = &seeds[rng.below(seeds.len())];
        let mut bytes = text.clone().into_bytes();
        for _ in 0..1 + rng.below(4) {
            mutate(&mut rng, &mut bytes);
        }
        if signal::parse(*format, &bytes, &cx).is_err() {
            hostile.push((*format, bytes));
        }
    }

    let writes = rig.sim.all_writes();
    let toggles = rig.sim.total_toggles();
    let on = rig.asics_on();
    let from = rig.utility.seen.len();
    for (format, bytes) in &hostile {
        rig.signal(*format, bytes.clone()).await;
    }
    let ack_topic = rig.site.mqtt.ack_topic.clone();
    let deadline = Instant::now() + 60 * SECOND;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rig.utility.drain();
        let acks: Vec<&serde_json::Value> = rig.utility.seen[from..]
            .iter()
            .filter(|s| s.topic == ack_topic)
            .map(|s| &s.json)
            .collect();
        for a in &acks {
            assert_eq!(a["status"], "rejected", "a hostile signal was taken: {a}");
            assert!(
                a["reason"].as_str().is_some_and(|r| !r.is_empty()),
                "a rejection without a reason: {a}"
            );
        }
        if acks.len() == hostile.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} hostile signals acknowledged within 60 s",
            acks.len(),
            hostile.len()
        );
    }
    assert_eq!(rig.sim.all_writes(), writes, "no device was written");
    assert_eq!(rig.sim.total_toggles(), toggles, "no relay moved");
    assert_eq!(rig.asics_on(), on);

    // Still alive and listening: a good signal is taken.
    let from = rig.utility.seen.len();
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"after-the-storm","kind":"shed","kw":10}"#,
    )
    .await;
    rig.ack(from, "after-the-storm", "accepted", 5 * SECOND)
        .await;
}

/// A message beyond the MQTT transport limit cannot be read, so it cannot be acknowledged;
/// with a persistent session the broker would re-deliver it after every reconnect. The
/// controller gives that session up once, and is listening again within seconds.
async fn a_message_too_large_to_read_costs_a_clean_reconnect_not_the_link(kind: BrokerKind) {
    let Some(mut rig) = Rig::start("small.toml", kind, |_| {}).await else {
        return;
    };
    let writes = rig.sim.all_writes();
    let huge = format!(
        r#"{{"id":"huge","kind":"shed_all","pad":"{}"}}"#,
        "A".repeat(512 * 1024)
    );
    rig.signal(SignalFormat::Native, huge).await;
    let deadline = Instant::now() + 20 * SECOND;
    let mut k = 0;
    loop {
        // Re-sent until heard: signals published while the link reconnects are lost with the
        // abandoned session, as a utility's periodic re-send would recover them.
        k += 1;
        let from = rig.utility.seen.len();
        rig.signal(
            SignalFormat::Native,
            format!(r#"{{"id":"next-{k}","kind":"shed","kw":10}}"#),
        )
        .await;
        let ack_topic = rig.site.mqtt.ack_topic.clone();
        tokio::time::sleep(SECOND).await;
        rig.utility.drain();
        if rig.utility.seen[from..]
            .iter()
            .any(|s| s.topic == ack_topic && s.json["status"] == "accepted")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the signal link never recovered");
    }
    assert!(
        rig.utility.seen.iter().all(|s| s.json["id"] != "huge"),
        "the unreadable message was not acted on"
    );
    // The shed of 10 kW is all that was written.
    rig.until(5 * SECOND, "the 10 kW shed", |r| {
        r.asics_on() < r.site.asics.len()
    })
    .await;
    assert!(rig.sim.all_writes().values().sum::<u64>() > writes.values().sum::<u64>());
    assert_eq!(rig.protected_writes(), 0);
}
