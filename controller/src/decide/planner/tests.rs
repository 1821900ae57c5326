use super::*;
use crate::decide::estimate::Estimator;
use crate::decide::signal::{Action, Directive, Signal};
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use site_config::SignalFormat;
use std::time::Duration;

fn site() -> Site {
    site_config::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/sites/small.toml"
    ))
    .unwrap()
}

const T0: &str = "2026-11-22T10:00:00Z";

fn wall(secs: i64) -> Timestamp {
    T0.parse::<Timestamp>().unwrap() + SignedDuration::from_secs(secs)
}

/// `secs` from T0 on both clocks (mono 0 at T0).
fn at(secs: i64) -> Now {
    Now {
        wall: wall(secs),
        mono: mono(secs),
    }
}

fn mono(secs: i64) -> Mono {
    Mono::from_nanos(secs * 1_000_000_000)
}

/// Steady readings: GPU racks at `gpu` kW and 5 kW of other load, warm estimates.
fn snapshot(site: &Site, on: impl Fn(usize) -> bool, since: Option<Mono>, gpu: f64) -> Snapshot {
    let asics: Vec<AsicState> = (0..site.asics.len())
        .map(|i| AsicState {
            on: on(i),
            since,
            controllable: true,
            unconfirmed: false,
        })
        .collect();
    Snapshot {
        asics,
        load: Load {
            rest_kw: gpu + 5.0,
            restore_rest_kw: gpu + 5.0,
            restore_held: None,
        },
        last_switch: None,
    }
}

fn timeline(action: Action, emergency: bool) -> Timeline {
    let mut tl = Timeline::new();
    tl.apply(&Signal::Event {
        id: "e".into(),
        directives: vec![Directive {
            id: "e".into(),
            interval: 0,
            action,
            start: wall(0),
            end: None,
            priority: 1,
            emergency,
            format: SignalFormat::Native,
        }],
    });
    tl
}

fn off_ids(plan: &Plan) -> Vec<u32> {
    plan.desired
        .iter()
        .enumerate()
        .filter(|(_, on)| !**on)
        .map(|(i, _)| i as u32)
        .collect()
}

#[test]
fn an_import_limit_sheds_lowest_class_then_least_efficient_first() {
    let site = site();
    let snap = snapshot(&site, |_| true, None, 50.0);
    let plan = plan(
        &site,
        &snap,
        &timeline(Action::ImportLimit { kw: 120.0 }, false),
        at(1),
    );
    // budget = 120 - 50 (GPU peak) - 5 (other) - 3 (margin) = 62 kW
    assert!((plan.budget_kw - 62.0).abs() < 1e-9, "{}", plan.budget_kw);
    // Class 3 (pdu-legacy, ids 30-33) first, then the S19j Pros (29.5 J/TH) in id order.
    let mut expected: Vec<u32> = (0..=10).collect();
    expected.extend(30..=33);
    assert_eq!(off_ids(&plan), expected);
    assert!(plan.planned_asic_kw <= plan.budget_kw);
    assert_eq!(plan.shortfall_kw, 0.0);
    assert_eq!(plan.switched_off, 15);
}

#[test]
fn with_no_directive_only_the_subscription_limit_applies() {
    let site = site();
    let snap = snapshot(&site, |_| true, None, 50.0);
    let plan = plan(&site, &snap, &Timeline::new(), at(1));
    assert_eq!(plan.limit_kw, 200.0);
    assert!(off_ids(&plan).is_empty());
}

#[test]
fn min_on_time_holds_asics_unless_the_directive_is_an_emergency() {
    let site = site();
    let snap = snapshot(&site, |_| true, Some(mono(-5)), 50.0);
    let limit = Action::ImportLimit { kw: 120.0 };
    let held = plan(&site, &snap, &timeline(limit, false), at(0));
    assert!(off_ids(&held).is_empty());
    assert!(
        (held.shortfall_kw - (110.08 - 62.0)).abs() < 1e-6,
        "{}",
        held.shortfall_kw
    );
    assert_eq!(
        held.next_wake,
        Some(mono(5)),
        "wakes when min_on (10 s) is served"
    );
    let urgent = plan(&site, &snap, &timeline(limit, true), at(0));
    assert_eq!(urgent.switched_off, 15);
    assert_eq!(urgent.shortfall_kw, 0.0);
}

#[test]
fn restore_comes_in_batches_most_efficient_first_spaced_by_the_interval() {
    let site = site();
    let tl = Timeline::new();
    // Everything off for a minute; batch size 4, interval 2 s (small.toml).
    let mut snap = snapshot(&site, |_| false, Some(mono(-60)), 50.0);
    // Table over time: (now, ids restored this cycle, next wake)
    let steps: [(i64, Vec<u32>, Option<i64>); 4] = [
        (0, vec![24, 25, 26, 27], Some(2)),
        (1, vec![], Some(2)),
        // The last two S21s, then the S19 XPs (21.5 J/TH), listed in id order.
        (2, vec![16, 17, 28, 29], Some(4)),
        (4, vec![18, 19, 20, 21], Some(6)),
    ];
    for (now, ids, wake) in steps {
        let p = plan(&site, &snap, &tl, at(now));
        let restored: Vec<u32> = p
            .changes(&snap)
            .map(|(id, on)| {
                assert!(on, "a restore cycle only switches on");
                id.0
            })
            .collect();
        assert_eq!(restored, ids, "at {now}s");
        assert_eq!(p.next_wake, wake.map(mono), "at {now}s");
        if !restored.is_empty() {
            snap.last_switch = Some(mono(now));
            for id in &restored {
                snap.asics[*id as usize] = AsicState {
                    on: true,
                    since: Some(mono(now)),
                    controllable: true,
                    unconfirmed: false,
                };
            }
        }
        assert!(p.planned_asic_kw <= p.budget_kw + 1e-9);
    }
}

#[test]
fn restore_order_is_class_then_efficiency() {
    let site = site();
    let snap = snapshot(&site, |_| false, None, 50.0);
    let p = plan(&site, &snap, &Timeline::new(), at(0));
    let mut on: Vec<u32> = p.changes(&snap).map(|(id, _)| id.0).collect();
    on.sort();
    assert_eq!(
        on,
        vec![24, 25, 26, 27],
        "the class-1 S21s (17.5 J/TH) come back first"
    );
}

#[test]
fn restore_never_goes_past_the_limit_and_keeps_a_deadband() {
    let site = site();
    // 15 S19j Pros and 3 S19 XPs on: 57.78 kW. Limit 125: budget 67 kW, room 9.22 kW, of
    // which 2.5 kW (2 % of the limit) is kept free: the most efficient that fit come back.
    let on = |i: usize| (0..=14).contains(&i) || (16..=18).contains(&i);
    let snap = snapshot(&site, on, None, 50.0);
    let limit = timeline(Action::ImportLimit { kw: 125.0 }, false);
    let p = plan(&site, &snap, &limit, at(0));
    // (A 3.01 kW S19 XP still fits in what is left.)
    assert_eq!(
        p.changes(&snap).map(|(id, _)| id.0).collect::<Vec<_>>(),
        vec![19, 24]
    );
    assert!(p.planned_asic_kw <= p.budget_kw - restore_deadband(125.0) + 1e-9);
}

#[test]
fn a_swinging_site_is_shed_once_for_its_crests_and_then_nothing_toggles() {
    let site = site();
    let limit = timeline(Action::ImportLimit { kw: 120.0 }, false);
    let window = site.policy.gpu_peak_window;
    let mut estimator = Estimator::new(window, site.policy.poll_interval);
    // GPU racks swinging 40..70 kW with 5 kW of other load, and ±1.5 kW of meter noise.
    let rest = |k: i64| {
        let swing = if k % 3 == 0 { 70.0 } else { 40.0 };
        let noise = if k % 2 == 0 { 1.5 } else { -1.5 };
        swing + 5.0 + noise
    };
    for k in -40..=0 {
        estimator.rest(mono(k), rest(k), rest(k));
    }
    let mut snap = snapshot(&site, |_| true, None, 50.0);
    snap.load = estimator.load(mono(0), 80.0, true);
    let first = plan(&site, &snap, &limit, at(0));
    assert!(first.switched_off > 0);
    for (i, on) in first.desired.iter().enumerate() {
        snap.asics[i].on = *on;
    }
    let mut switched = 0;
    for k in 1..120 {
        estimator.rest(mono(k), rest(k), rest(k));
        snap.load = estimator.load(mono(k), 80.0, true);
        let p = plan(&site, &snap, &limit, at(k));
        switched += p.changes(&snap).count();
        for (i, on) in p.desired.iter().enumerate() {
            snap.asics[i].on = *on;
        }
    }
    assert_eq!(switched, 0, "ASICs followed the swings");
}

#[test]
fn the_peak_of_the_rest_of_the_site_sets_the_budget() {
    let site = site();
    let limit = timeline(Action::ImportLimit { kw: 150.0 }, false);
    let low = plan(&site, &snapshot(&site, |_| true, None, 40.0), &limit, at(0));
    let high = plan(&site, &snapshot(&site, |_| true, None, 60.0), &limit, at(0));
    assert_eq!(low.rest_kw, 45.0);
    assert!((low.budget_kw - high.budget_kw - 20.0).abs() < 1e-9);
}

#[test]
fn shed_kw_keeps_that_much_rated_load_off() {
    let site = site();
    let snap = snapshot(&site, |_| true, None, 50.0);
    let p = plan(
        &site,
        &snap,
        &timeline(Action::Shed { kw: 30.0 }, false),
        at(0),
    );
    let off_kw: f64 = off_ids(&p)
        .iter()
        .map(|i| site.asics[*i as usize].rated_w / 1000.0)
        .sum();
    assert!((30.0..33.5).contains(&off_kw), "{off_kw}");
}

#[test]
fn shed_all_with_a_faulted_pdu_reports_the_shortfall_and_touches_nothing_else() {
    let site = site();
    let mut snap = snapshot(&site, |_| true, None, 50.0);
    for i in 16..=23 {
        snap.asics[i].controllable = false; // pdu-3 does not answer
    }
    let p = plan(&site, &snap, &timeline(Action::ShedAll, false), at(0));
    assert!(
        p.desired[16..=23].iter().all(|on| *on),
        "an unreachable PDU is not planned around blindly"
    );
    assert!(
        p.desired
            .iter()
            .enumerate()
            .all(|(i, on)| !on || (16..=23).contains(&i))
    );
    assert!(
        (p.shortfall_kw - 8.0 * 3.01).abs() < 1e-6,
        "{}",
        p.shortfall_kw
    );
}

#[test]
fn when_asics_cannot_meet_the_limit_all_are_shed_and_the_gap_reported() {
    let site = site();
    let snap = snapshot(&site, |_| true, None, 50.0);
    let p = plan(
        &site,
        &snap,
        &timeline(Action::ImportLimit { kw: 40.0 }, false),
        at(0),
    );
    assert!(p.desired.iter().all(|on| !on));
    // budget = 40 - 50 - 5 - 3 = -18: the site stays 18 kW over with every ASIC off.
    assert!((p.shortfall_kw - 18.0).abs() < 1e-6, "{}", p.shortfall_kw);
}

#[test]
fn the_plan_wakes_for_the_next_timeline_change() {
    let site = site();
    let mut tl = Timeline::new();
    tl.apply(&Signal::Event {
        id: "later".into(),
        directives: vec![Directive {
            id: "later".into(),
            interval: 0,
            action: Action::ShedAll,
            start: wall(300),
            end: Some(wall(900)),
            priority: 1,
            emergency: false,
            format: SignalFormat::Native,
        }],
    });
    let snap = snapshot(&site, |_| true, None, 50.0);
    assert_eq!(plan(&site, &snap, &tl, at(0)).next_wake, Some(mono(300)));
    assert_eq!(
        plan(&site, &snap, &tl, at(300))
            .desired
            .iter()
            .filter(|on| **on)
            .count(),
        0
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn never_above_the_budget_when_the_fleet_can_meet_it(
        on in proptest::collection::vec(any::<bool>(), 34),
        limit in 0.0f64..250.0,
        gpu in 0.0f64..80.0,
        emergency in any::<bool>(),
        held_secs in 0i64..30,
    ) {
        let site = site();
        let now = at(100);
        let since = if emergency { Some(now.mono - Duration::from_secs(held_secs as u64)) } else { None };
        let snap = snapshot(&site, |i| on[i], since, gpu);
        let p = plan(&site, &snap, &timeline(Action::ImportLimit { kw: limit }, emergency), now);
        prop_assert!(p.planned_asic_kw <= p.budget_kw.max(0.0) + 1e-6,
            "planned {} kW over budget {} kW", p.planned_asic_kw, p.budget_kw);
        prop_assert_eq!(p.desired.len(), site.asics.len());
    }

    #[test]
    fn same_input_same_plan(
        on in proptest::collection::vec(any::<bool>(), 34),
        controllable in proptest::collection::vec(any::<bool>(), 34),
        limit in 0.0f64..250.0,
        secs in 0i64..20,
    ) {
        let site = site();
        let now = at(secs);
        let mut snap = snapshot(&site, |i| on[i], Some(mono(-7)), 45.0);
        for (s, c) in snap.asics.iter_mut().zip(&controllable) {
            s.controllable = *c;
        }
        let tl = timeline(Action::ImportLimit { kw: limit }, false);
        let a = plan(&site, &snap, &tl, now);
        prop_assert_eq!(&a, &plan(&site, &snap, &tl, now));
        // Faulted ASICs are never planned to change.
        for (i, s) in snap.asics.iter().enumerate() {
            if !s.controllable {
                prop_assert_eq!(a.desired[i], s.on);
            }
        }
    }
}

#[test]
fn nothing_comes_back_within_the_restore_interval_after_a_shed() {
    let site = site();
    // Everything off long enough, but the last switch (a shed) was 1 s ago; interval 2 s.
    let mut snap = snapshot(&site, |_| false, Some(mono(-60)), 50.0);
    snap.last_switch = Some(mono(-1));
    let p = plan(&site, &snap, &Timeline::new(), at(0));
    assert_eq!(p.changes(&snap).count(), 0);
    assert_eq!(p.next_wake, Some(mono(1)));
}

#[test]
fn nothing_is_restored_while_the_estimate_says_so_but_sheds_go_ahead() {
    let site = site();
    let mut snap = snapshot(&site, |_| false, None, 50.0);
    snap.load.restore_held = Some(Hold::EstimateWarmingUp);
    let p = plan(&site, &snap, &Timeline::new(), at(0));
    assert_eq!(p.changes(&snap).count(), 0);
    assert_eq!(p.held, Some(Hold::EstimateWarmingUp));
    let mut snap = snapshot(&site, |_| true, None, 50.0);
    snap.load.restore_held = Some(Hold::SiteMeterSilent);
    let shed = plan(
        &site,
        &snap,
        &timeline(Action::ImportLimit { kw: 120.0 }, false),
        at(0),
    );
    assert_eq!(shed.switched_off, 15, "a shed never waits for the estimate");
}

#[test]
fn asics_on_their_way_off_count_as_off_but_their_room_is_not_restored_into() {
    let site = site();
    // Half the fleet commanded off and not yet seen off; the other half long off.
    let mut snap = snapshot(&site, |_| false, Some(mono(-60)), 50.0);
    for s in snap.asics.iter_mut().take(17) {
        s.unconfirmed = true;
    }
    // Limit 120: budget 62 kW, of which the 17 on their way off hold about 53.
    let limit = timeline(Action::ImportLimit { kw: 120.0 }, false);
    let p = plan(&site, &snap, &limit, at(0));
    let confirmed = snapshot(&site, |_| false, Some(mono(-60)), 50.0);
    let room_without = plan(&site, &confirmed, &limit, at(0));
    assert_eq!(room_without.restored, 4, "a full batch");
    assert!(
        p.restored < room_without.restored,
        "restored {} into room that is not confirmed",
        p.restored
    );
}
