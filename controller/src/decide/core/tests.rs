//! The core on virtual time, without a plant: what goes in, what comes out. Whole-site
//! behaviour (devices that fail, a plant that answers) is tested by the deterministic
//! simulation in `hil::simulate` and its scenarios.

use super::*;
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
