//! The core on virtual time, without a plant: what goes in, what comes out. Whole-site
//! behaviour (devices that fail, a plant that answers) is tested by the deterministic
//! simulation in `hil::simulate` and its scenarios.

use super::*;
use crate::msg::{Call, Function};
use site_config::SignalFormat;

fn small() -> Arc<Site> {
    Arc::new(
        site_config::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/sites/small.toml"
        ))
        .unwrap(),
    )
}

fn t0() -> Now {
    Now {
        wall: "2026-11-22T10:00:00Z".parse().unwrap(),
        mono: Mono::ZERO,
    }
}

fn at(secs: f64) -> Now {
    t0().after(Duration::from_secs_f64(secs))
}

fn topic(site: &Site, format: SignalFormat) -> String {
    site.mqtt
        .signals
        .iter()
        .find(|s| s.format == format)
        .unwrap()
        .topic
        .clone()
}

fn signal(core: &mut Core, now: Now, json: &str) {
    let topic = topic(&core.site.clone(), SignalFormat::Native);
    core.input(
        now,
        Input::Signal {
            topic,
            payload: json.as_bytes().to_vec(),
        },
    );
    core.tick(now);
}

fn acks(effects: &[Effect]) -> Vec<(Option<String>, AckStatus)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Ack(a) => Some((a.id.clone(), a.status)),
            _ => None,
        })
        .collect()
}

/// Every device answers once: every relay on, every outlet at its rating, meters as given.
fn all_answer(core: &mut Core, now: Now, site_kw: f64) {
    let site = core.site.clone();
    for p in &site.pdus {
        let n = usize::from(p.outlets);
        let mut power = vec![0.0; n];
        for a in site.asics.iter().filter(|a| a.pdu == p.id) {
            power[usize::from(a.outlet) - 1] = a.rated_w;
        }
        core.input(
            now,
            Input::Reading(Reading::Pdu {
                pdu: p.id,
                relays: vec![true; n],
                power_w: power,
            }),
        );
    }
    // The GPU meters first: the site meter's reading then gives a sample of the whole site.
    for m in site.meters.iter().filter(|m| m.id != site.site_meter) {
        core.input(
            now,
            Input::Reading(Reading::Meter {
                meter: m.id,
                kw: 25.0,
            }),
        );
    }
    let meter = site.site_meter;
    core.input(now, Input::Reading(Reading::Meter { meter, kw: site_kw }));
    core.tick(now);
}

#[test]
fn a_signal_is_journaled_then_acknowledged_and_a_bad_one_rejected_with_its_reason() {
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    signal(&mut core, at(0.0), r#"{"id":"e1","kind":"shed","kw":10}"#);
    let effects = core.take_effects();
    let first_record = effects
        .iter()
        .position(|e| matches!(e, Effect::Record(Record::Accepted { .. })));
    let first_ack = effects.iter().position(|e| matches!(e, Effect::Ack(_)));
    assert!(first_record < first_ack, "the record goes before its ack");
    assert_eq!(acks(&effects)[0], (Some("e1".into()), AckStatus::Accepted));
    assert!(core.state().timeline.contains("e1"));

    signal(&mut core, at(1.0), r#"{"id":"e2","kind":"shed","kw":-1}"#);
    let effects = core.take_effects();
    let Some(Effect::Ack(a)) = effects.iter().find(|e| matches!(e, Effect::Ack(_))) else {
        panic!("no ack: {effects:?}");
    };
    assert_eq!(a.status, AckStatus::Rejected);
    assert!(a.reason.as_deref().unwrap().contains("kw must be"), "{a:?}");
    assert!(!core.state().timeline.contains("e2"));
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Record(_))),
        "a rejection changes nothing"
    );
}

#[test]
fn nothing_is_planned_until_every_pdu_and_the_site_meter_were_heard_or_the_grace_is_over() {
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    core.tick(at(0.1));
    assert!(core.last_plan().is_none());
    all_answer(&mut core, at(0.2), 190.0);
    assert!(
        core.last_plan().is_some(),
        "planned once every device answered"
    );

    // Nobody answers: the grace is three timeouts (500 ms) and a poll (500 ms).
    let mut silent = Core::new(site.clone(), State::default(), Vec::new(), t0());
    silent.tick(at(1.9));
    assert!(silent.last_plan().is_none());
    assert_eq!(
        silent.next_wake(Mono::from_duration(Duration::from_millis(1900))),
        Mono::from_duration(Duration::from_secs(2))
    );
    silent.tick(at(2.0));
    assert!(silent.last_plan().is_some(), "planned after the grace");
}

#[test]
fn after_a_tick_the_next_wake_is_always_later() {
    // The shell sleeps until next_wake: one that is not later would spin.
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    let mut t = 0.0;
    all_answer(&mut core, at(t), 190.0);
    signal(
        &mut core,
        at(0.1),
        r#"{"id":"e1","kind":"import_limit","kw":120}"#,
    );
    for _ in 0..200 {
        t += 0.05;
        core.tick(at(t));
        let now = at(t).mono;
        assert!(core.next_wake(now) > now, "at {t} s");
    }
}

#[test]
fn the_stale_signal_policy_runs_on_the_monotonic_clock() {
    let mut site = (*small()).clone();
    site.policy.stale_signal = StalePolicy::Curtail {
        after: Duration::from_secs(60),
    };
    let site = Arc::new(site);
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    all_answer(&mut core, at(0.0), 190.0);
    // The wall clock jumps an hour ahead (NTP) at 10 s: that is not an hour without signals.
    let jumped = |secs: f64| Now {
        wall: at(secs).wall + jiff::SignedDuration::from_hours(1),
        mono: at(secs).mono,
    };
    core.tick(jumped(10.0));
    assert!(!core.state().timeline.contains(STALE_ID));
    core.tick(jumped(59.9));
    assert!(!core.state().timeline.contains(STALE_ID));
    core.tick(jumped(60.0));
    assert!(
        core.state().timeline.contains(STALE_ID),
        "60 s without a signal"
    );
    signal(
        &mut core,
        jumped(61.0),
        r#"{"id":"hb","kind":"shed","kw":1}"#,
    );
    assert!(
        !core.state().timeline.contains(STALE_ID),
        "the next signal ends it"
    );
}

#[test]
fn a_directive_ends_when_its_wall_time_says_and_minimum_off_times_do_not_move_with_the_clock() {
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    all_answer(&mut core, at(0.0), 190.0);
    signal(
        &mut core,
        at(1.0),
        r#"{"id":"e1","kind":"shed_all","duration_s":3600}"#,
    );
    core.take_effects();
    // The wall clock jumps 2 h ahead: the directive is over by the utility's clock.
    let jumped = Now {
        wall: at(2.0).wall + jiff::SignedDuration::from_hours(2),
        mono: at(2.0).mono,
    };
    core.tick(jumped);
    let effects = core.take_effects();
    assert!(acks(&effects).contains(&(Some("e1".into()), AckStatus::Completed)));
    // But the ASICs switched off at 1 s have been off for 1 s, not 2 h: nothing comes back.
    let plan = core.last_plan().unwrap();
    assert!(plan.desired.iter().all(|on| !on), "{:?}", plan.held);
}

#[test]
fn a_resent_signal_changes_nothing_and_a_replay_of_an_ended_event_is_refused() {
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    all_answer(&mut core, at(0.0), 190.0);
    let evt = r#"{"id":"e1","kind":"shed","kw":10,"start":"2026-11-22T10:00:00Z"}"#;
    signal(&mut core, at(1.0), evt);
    core.take_effects();
    signal(&mut core, at(2.0), evt);
    let effects = core.take_effects();
    assert!(!effects.iter().any(|e| matches!(e, Effect::Orders(_))));
    signal(&mut core, at(3.0), r#"{"id":"e1","kind":"release"}"#);
    core.take_effects();
    signal(&mut core, at(4.0), evt);
    let effects = core.take_effects();
    assert_eq!(
        acks(&effects),
        vec![(Some("e1".into()), AckStatus::Rejected)]
    );
}

#[test]
fn a_limit_is_planned_and_shown_in_the_tick_that_takes_it() {
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    all_answer(&mut core, at(0.0), 190.0);
    core.take_effects();
    signal(
        &mut core,
        at(0.5),
        r#"{"id":"e1","kind":"import_limit","kw":120}"#,
    );
    assert_eq!(core.last_plan().unwrap().limit_kw, 120.0);
    let effects = core.take_effects();
    let statuses: Vec<&Status> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Status {
                status,
                publish: true,
                ..
            } => Some(status),
            _ => None,
        })
        .collect();
    assert!(
        statuses.iter().all(|s| s.limit_kw == 120.0),
        "{statuses:#?}"
    );
}

/// Regression (the deterministic simulation, seed 0x3c6ef372fe94f82b): a maestro curtailment
/// (its directive starts at the epoch, so that re-sends are identical) resumed after a restart
/// was measured from 1970, and its completion wrote some 30 million one-minute intervals into
/// one journal record.
#[test]
fn a_resumed_maestro_curtailment_is_measured_from_the_readings_kept_not_from_1970() {
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    all_answer(&mut core, at(0.0), 190.0);
    let ts = at(1.0).wall.as_second();
    let topic = topic(&site, SignalFormat::Maestro);
    core.input(
        at(1.0),
        Input::Signal {
            topic,
            payload: format!(r#"{{"target":0,"timestamp":{ts}}}"#).into_bytes(),
        },
    );
    core.tick(at(1.0));
    // A restart: the state as the journal has it, and a new core.
    let state = core.state().clone();
    let mut core = Core::new(site.clone(), state, Vec::new(), at(10.0));
    all_answer(&mut core, at(10.5), 190.0);
    all_answer(&mut core, at(11.0), 120.0);
    let topic = self::topic(&site, SignalFormat::Maestro);
    core.input(
        at(70.0),
        Input::Signal {
            topic,
            payload: format!(r#"{{"target":100,"timestamp":{}}}"#, ts + 69).into_bytes(),
        },
    );
    core.tick(at(70.0));
    let measured = core
        .take_effects()
        .into_iter()
        .find_map(|e| match e {
            Effect::Record(Record::Measured { intervals, .. }) => Some(intervals),
            _ => None,
        })
        .expect("the curtailment was measured");
    assert!(measured.len() < 10, "{} intervals", measured.len());
}

/// Regression (the deterministic simulation, seed 0x248e0b2b1c06b67e): the wake-up for a
/// directive's start or end is reckoned on the wall clock of when it was planned; after the
/// wall clock jumped, the controller went on with a plan for a directive no longer in force.
#[test]
fn a_wall_clock_jump_replans_at_once() {
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    all_answer(&mut core, at(0.0), 190.0);
    signal(
        &mut core,
        at(1.0),
        r#"{"id":"e1","kind":"shed_all","duration_s":600}"#,
    );
    assert!(core.last_plan().unwrap().desired.iter().all(|on| !on));
    // NTP moves the clock 20 minutes ahead: the directive is over by the utility's clock.
    let jumped = Now {
        wall: at(2.0).wall + jiff::SignedDuration::from_mins(20),
        mono: at(2.0).mono,
    };
    core.tick(jumped);
    assert!(!core.state().timeline.contains("e1"), "completed at once");
    assert_eq!(
        core.last_plan().unwrap().limit_kw,
        200.0,
        "planned on the new clock"
    );
}

/// Regression (the deterministic simulation, seed 0x66700266a98933d0): a PDU silent since
/// start-up counts at its rating, and its ASICs were in fact off, so the rest of the site
/// looked smaller by their rating. When it answered, the plan in the same tick restored
/// into that room before any site reading had been sampled on the new basis, and the site went
/// 8 kW over an import limit.
#[test]
fn a_pdu_that_answers_again_brings_nothing_back_until_the_site_is_sampled_anew() {
    let mut site = (*small()).clone();
    site.policy.min_off = Duration::ZERO;
    let site = Arc::new(site);
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    let silent = match site.device_by_name("pdu-1") {
        Some(DeviceId::Pdu(p)) => p,
        _ => unreachable!(),
    };
    let read = |core: &mut Core, now: Now, pdu: PduId, on: bool| {
        let p = site.pdu(pdu);
        let n = usize::from(p.outlets);
        let mut power = vec![0.0; n];
        for a in site.asics.iter().filter(|a| a.pdu == pdu && on) {
            power[usize::from(a.outlet) - 1] = a.rated_w;
        }
        core.input(
            now,
            Input::Reading(Reading::Pdu {
                pdu,
                relays: vec![on; n],
                power_w: power,
            }),
        );
    };
    let rated = |pdu: PduId| -> f64 {
        site.asics
            .iter()
            .filter(|a| a.pdu == pdu)
            .map(|a| a.rated_w / 1000.0)
            .sum()
    };
    // The truth: pdu-1's ASICs are off; every other ASIC on; GPU racks 50 kW, 5 kW besides.
    let others_kw: f64 = site
        .pdus
        .iter()
        .filter(|p| p.id != silent)
        .map(|p| rated(p.id))
        .sum();
    let site_kw = others_kw + 55.0;
    let poll = |core: &mut Core, now: Now, k: u32, silent_answers: bool| {
        for p in &site.pdus {
            if p.id != silent {
                read(core, now, p.id, true);
            } else if silent_answers {
                read(core, now, p.id, false);
            } else {
                let call = Call {
                    function: Function::ReadCoils,
                    address: 0,
                    count: p.outlets,
                };
                let error = DeviceError::Timeout {
                    call,
                    limit: Duration::from_millis(500),
                };
                core.input(
                    now,
                    Input::Reading(Reading::ReadFailed {
                        device: DeviceId::Pdu(p.id),
                        error,
                    }),
                );
            }
        }
        let wobble = f64::from(k % 3) * 0.1;
        for m in site.meters.iter().filter(|m| m.id != site.site_meter) {
            let kw = 25.0 + wobble;
            core.input(now, Input::Reading(Reading::Meter { meter: m.id, kw }));
        }
        let meter = site.site_meter;
        let kw = site_kw + 2.0 * wobble;
        core.input(now, Input::Reading(Reading::Meter { meter, kw }));
        core.tick(now);
    };
    // A limit that leaves no room to restore anything on the truth (margin 3 kW, deadband 2 %).
    let limit = (site_kw + 0.2 + 3.0 + 0.02 * 150.0 + 1.0).ceil();
    for k in 0..80 {
        poll(&mut core, at(f64::from(k) * 0.5), k, false);
        if k == 70 {
            // Once the estimate is warm (before, the GPU racks would count at their rating).
            let json = format!(r#"{{"id":"e1","kind":"import_limit","kw":{limit}}}"#);
            signal(&mut core, at(35.01), &json);
        }
    }
    let plan = core.last_plan().unwrap();
    assert_eq!(plan.limit_kw, limit);
    assert!(
        plan.desired.iter().all(|on| *on),
        "pdu-1 counts on at its rating, and fits"
    );

    // pdu-1 answers: all off. Nothing comes back on the samples taken while it was assumed on.
    read(&mut core, at(40.0), silent, false);
    core.tick(at(40.0));
    core.tick(at(40.2));
    let plan = core.last_plan().unwrap();
    let on = plan.desired.iter().filter(|on| **on).count();
    assert_eq!(on, site.asics.len() - 8, "planned on what pdu-1 reads");
    let back: Vec<AsicId> = site
        .asics
        .iter()
        .filter(|a| a.pdu == silent && plan.desired[a.id.0 as usize])
        .map(|a| a.id)
        .collect();
    assert_eq!(back, vec![], "restored into room that is not there");
    assert_eq!(plan.held, Some(Hold::EstimateWarmingUp));

    // The next poll samples the site as it is: the rest of the site is 55 kW, and there is
    // still no room.
    poll(&mut core, at(40.5), 81, true);
    core.tick(at(41.0));
    let plan = core.last_plan().unwrap();
    assert!((plan.rest_kw - 55.0).abs() < 1.0, "{}", plan.rest_kw);
    assert_eq!(plan.restored, 0);
    assert_eq!(plan.held, Some(Hold::NoRoom));
}

#[test]
fn a_steady_site_meter_is_not_frozen_when_a_pdu_answers_again() {
    // Found by the simulation (seed 0x8bc9953a2ba00cb0): a PDU silent since a restart and
    // assumed on at its rating answered with every ASIC off. The ASICs' estimate dropped by
    // their rating while the site meter, rightly, did not move: taken for a frozen meter, it
    // stopped the estimate for good.
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    let silent = match site.device_by_name("pdu-1") {
        Some(DeviceId::Pdu(p)) => p,
        _ => unreachable!(),
    };
    let poll = |core: &mut Core, now: Now, k: u32, silent_answers: bool| {
        for p in &site.pdus {
            let n = usize::from(p.outlets);
            let on = p.id != silent;
            let reading = if p.id == silent && !silent_answers {
                let call = Call {
                    function: Function::ReadCoils,
                    address: 0,
                    count: p.outlets,
                };
                Reading::ReadFailed {
                    device: DeviceId::Pdu(p.id),
                    error: DeviceError::Timeout {
                        call,
                        limit: Duration::from_millis(500),
                    },
                }
            } else {
                let mut power_w = vec![0.0; n];
                for a in site.asics.iter().filter(|a| a.pdu == p.id && on) {
                    power_w[usize::from(a.outlet) - 1] = a.rated_w;
                }
                Reading::Pdu {
                    pdu: p.id,
                    relays: vec![on; n],
                    power_w,
                }
            };
            core.input(now, Input::Reading(reading));
        }
        for m in &site.meters {
            // The site meter perfectly steady (a simulated site, or a real one read at a
            // coarse register scale); the GPU racks' last digits moving, as they do.
            let kw = if m.id == site.site_meter {
                300.0
            } else {
                25.0 + f64::from(k % 3) * 0.1
            };
            core.input(now, Input::Reading(Reading::Meter { meter: m.id, kw }));
        }
        core.tick(now);
    };
    for k in 0..20 {
        poll(&mut core, at(f64::from(k) * 0.5), k, false);
    }
    for k in 20..60 {
        poll(&mut core, at(f64::from(k) * 0.5), k, true);
    }
    let status = core.status(at(30.0));
    let faulted: Vec<&str> = status.faulted.iter().map(|f| f.device.as_str()).collect();
    assert_eq!(faulted, Vec::<&str>::new());
    assert_eq!(status.restore_held, None, "{status:?}");
}

#[test]
fn an_identical_re_send_changes_nothing_and_a_changed_one_is_an_update() {
    // Issue 13: `{"id":"rs-1","kind":"shed","kw":10,"duration_s":20}` sent again 12 s later
    // moved the event's end, so it ran 32 s.
    let site = small();
    let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
    let rs = r#"{"id":"rs-1","kind":"shed","kw":10,"duration_s":20}"#;
    // What each signal was acknowledged as (not the `active` of an event that began).
    let taken = |effects: &[Effect]| -> Vec<(Option<String>, AckStatus)> {
        acks(effects)
            .into_iter()
            .filter(|(_, s)| *s != AckStatus::Active)
            .collect()
    };
    signal(&mut core, at(0.0), rs);
    let effects = core.take_effects();
    assert_eq!(
        taken(&effects),
        vec![(Some("rs-1".into()), AckStatus::Accepted)]
    );
    let end = |core: &Core| core.state().timeline.get("rs-1").unwrap()[0].end;
    let first_end = end(&core);
    assert_eq!(first_end, Some(at(20.0).wall));

    signal(&mut core, at(12.0), rs);
    let effects = core.take_effects();
    assert_eq!(
        taken(&effects),
        vec![(Some("rs-1".into()), AckStatus::Unchanged)]
    );
    assert!(
        !effects.iter().any(|e| matches!(e, Effect::Record(_))),
        "nothing journaled: {effects:?}"
    );
    assert_eq!(end(&core), first_end, "the end did not move");

    // Changed content: an update, acknowledged as one, reckoned from its own arrival.
    signal(
        &mut core,
        at(13.0),
        r#"{"id":"rs-1","kind":"shed","kw":15,"duration_s":20}"#,
    );
    let effects = core.take_effects();
    assert_eq!(
        taken(&effects),
        vec![(Some("rs-1".into()), AckStatus::Updated)]
    );
    assert_eq!(end(&core), Some(at(33.0).wall));

    // An explicit window sent twice is the same event, whenever the copy arrives.
    let fixed =
        r#"{"id":"fx","kind":"shed","kw":5,"start":"2026-11-22T11:00:00Z","duration_s":3600}"#;
    signal(&mut core, at(14.0), fixed);
    signal(&mut core, at(30.0), fixed);
    let effects = core.take_effects();
    assert_eq!(
        taken(&effects),
        vec![
            (Some("fx".into()), AckStatus::Accepted),
            (Some("fx".into()), AckStatus::Unchanged)
        ]
    );
    // A stale-signal clock is a heartbeat's business: the re-send still counts as heard.
    assert_eq!(core.last_signal, at(30.0).mono);
}

#[test]
fn strings_from_the_network_are_logged_quoted_and_cannot_forge_a_line() {
    // Issue 13: an `id` or `kind` holding a newline wrote a well-formed fake log line.
    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let forged = "\n2026-11-22T10:00:00Z  INFO controller: FORGED event completed";
    tracing::subscriber::with_default(subscriber, || {
        let site = small();
        let mut core = Core::new(site.clone(), State::default(), Vec::new(), t0());
        let evil = serde_json::to_string(forged).unwrap();
        // In a kind (its parse error quotes it), an id, a release id, and a topic.
        for payload in [
            format!(r#"{{"id":"x","kind":{evil}}}"#),
            format!(r#"{{"id":{evil},"kind":"shed","kw":1}}"#),
            format!(r#"{{"kind":"release","id":{evil}}}"#),
        ] {
            signal(&mut core, at(1.0), &payload);
        }
        core.input(
            at(2.0),
            Input::Signal {
                topic: format!("sites/demo/signals{forged}"),
                payload: b"{}".to_vec(),
            },
        );
    });
    let log = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(log.contains("FORGED"), "the strings were logged: {log}");
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-11-22T10:00:00Z  INFO controller: FORGED"),
            "a forged line: {line}\n{log}"
        );
    }
}
