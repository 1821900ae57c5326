use super::*;
use crate::decide::signal::{Action, Directive, Signal};
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

fn at(secs: i64) -> Timestamp {
    T0.parse::<Timestamp>().unwrap() + SignedDuration::from_secs(secs)
}

/// Steady readings: GPU racks at `gpu` kW for the last minute, 5 kW of other load.
fn snapshot(
    site: &Site,
    on: impl Fn(usize) -> bool,
    since: Option<Timestamp>,
    gpu: f64,
    now: Timestamp,
) -> Snapshot {
    let asics: Vec<AsicState> = (0..site.asics.len())
        .map(|i| AsicState {
            on: on(i),
            since,
            controllable: true,
        })
        .collect();
    Snapshot {
        asics,
        gpu_kw: (0..60)
            .map(|s| (now - SignedDuration::from_secs(60 - s), gpu))
            .collect(),
        other_kw: (1..=30)
            .map(|s| (now - SignedDuration::from_secs(s), 5.0))
            .collect(),
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
            start: at(0),
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
    let snap = snapshot(&site, |_| true, None, 50.0, at(1));
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
    let snap = snapshot(&site, |_| true, None, 50.0, at(1));
    let plan = plan(&site, &snap, &Timeline::new(), at(1));
    assert_eq!(plan.limit_kw, 200.0);
    assert!(off_ids(&plan).is_empty());
}

#[test]
fn min_on_time_holds_asics_unless_the_directive_is_an_emergency() {
    let site = site();
    let snap = snapshot(&site, |_| true, Some(at(-5)), 50.0, at(0));
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
        Some(at(5)),
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
    let mut snap = snapshot(&site, |_| false, Some(at(-60)), 50.0, at(0));
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
        assert_eq!(p.next_wake, wake.map(at), "at {now}s");
        if !restored.is_empty() {
            snap.last_switch = Some(at(now));
            for id in &restored {
                snap.asics[*id as usize] = AsicState {
                    on: true,
                    since: Some(at(now)),
                    controllable: true,
                };
            }
        }
        assert!(p.planned_asic_kw <= p.budget_kw + 1e-9);
    }
}

#[test]
fn restore_order_is_class_then_efficiency() {
    let site = site();
    let snap = snapshot(&site, |_| false, None, 50.0, at(0));
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
    let snap = snapshot(&site, on, None, 50.0, at(0));
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
fn readings_wobbling_around_the_budget_do_not_switch_an_asic_back_and_forth() {
    let site = site();
    let limit = timeline(Action::ImportLimit { kw: 120.0 }, false);
    let mut snap = snapshot(&site, |_| true, None, 50.0, at(0));
    let first = plan(&site, &snap, &limit, at(0));
    for (i, on) in first.desired.iter().enumerate() {
        snap.asics[i].on = *on;
    }
    // Other-load estimates wobble by ±1.5 kW from cycle to cycle, with a 15 kW spike now and
    // then (meter and outlets read at different instants while relays switch).
    let mut switched = 0;
    for k in 1..40 {
        let wobble = if k % 7 == 0 {
            15.0
        } else if k % 2 == 0 {
            1.5
        } else {
            -1.5
        };
        snap.other_kw.push((at(k), 5.0 + wobble));
        snap.gpu_kw.push((at(k), 50.0));
        let p = plan(&site, &snap, &limit, at(k));
        switched += p.changes(&snap).count();
        for (i, on) in p.desired.iter().enumerate() {
            snap.asics[i].on = *on;
        }
    }
    assert!(
        switched <= 1,
        "{switched} switches while the readings only wobbled"
    );
}

#[test]
fn the_gpu_peak_over_the_window_sets_the_budget_and_old_samples_are_forgotten() {
    let site = site();
    let mut snap = snapshot(&site, |_| true, None, 40.0, at(0));
    // A training swing: 40..60 kW at about 1 Hz, plus a 90 kW spike 40 s ago (window is 30 s).
    snap.gpu_kw = (0..60)
        .map(|s| {
            (
                at(s - 60),
                if s == 20 {
                    90.0
                } else if s % 2 == 0 {
                    60.0
                } else {
                    40.0
                },
            )
        })
        .collect();
    let p = plan(
        &site,
        &snap,
        &timeline(Action::ImportLimit { kw: 150.0 }, false),
        at(0),
    );
    assert_eq!(p.gpu_peak_kw, 60.0);
    snap.gpu_kw.clear();
    let p = plan(
        &site,
        &snap,
        &timeline(Action::ImportLimit { kw: 150.0 }, false),
        at(0),
    );
    assert_eq!(p.gpu_peak_kw, 80.0, "no samples: assume the racks' rating");
}

#[test]
fn shed_kw_keeps_that_much_rated_load_off() {
    let site = site();
    let snap = snapshot(&site, |_| true, None, 50.0, at(0));
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
    let mut snap = snapshot(&site, |_| true, None, 50.0, at(0));
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
    let snap = snapshot(&site, |_| true, None, 50.0, at(0));
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
            start: at(300),
            end: Some(at(900)),
            priority: 1,
            emergency: false,
            format: SignalFormat::Native,
        }],
    });
    let snap = snapshot(&site, |_| true, None, 50.0, at(0));
    assert_eq!(plan(&site, &snap, &tl, at(0)).next_wake, Some(at(300)));
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
        let since = if emergency { Some(now - SignedDuration::from_secs(held_secs)) } else { None };
        let snap = snapshot(&site, |i| on[i], since, gpu, now);
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
        let mut snap = snapshot(&site, |i| on[i], Some(at(-7)), 45.0, now);
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
    let mut snap = snapshot(&site, |_| false, Some(at(-60)), 50.0, at(0));
    snap.last_switch = Some(at(-1));
    let p = plan(&site, &snap, &Timeline::new(), at(0));
    assert_eq!(p.changes(&snap).count(), 0);
    assert_eq!(p.next_wake, Some(at(1)));
}

#[test]
fn nothing_is_restored_until_the_other_load_estimate_is_warm() {
    let site = site();
    let restores = |snap: &Snapshot| {
        plan(&site, snap, &Timeline::new(), at(0))
            .changes(snap)
            .count()
    };
    // small.toml's window is 30 s: estimates must reach 15 s back, and be at least five.
    let mut snap = snapshot(&site, |_| false, None, 50.0, at(0));
    snap.other_kw = (1..=14).map(|s| (at(-s), 5.0)).collect();
    assert_eq!(restores(&snap), 0, "too young");
    snap.other_kw = vec![(at(-20), 5.0), (at(-1), 5.0)];
    assert_eq!(restores(&snap), 0, "too few");
    snap.other_kw = (1..=15).map(|s| (at(-s), 5.0)).collect();
    assert!(restores(&snap) > 0);
}

#[test]
fn noisy_other_load_estimates_widen_the_restore_deadband() {
    let site = site();
    let mut snap = snapshot(&site, |i| i < 20, None, 50.0, at(0));
    let quiet = plan(&site, &snap, &Timeline::new(), at(0)).planned_asic_kw;
    // Same mean (5 kW), but single estimates scattered by ±6 kW.
    snap.other_kw = (1..=16)
        .map(|s| (at(-s), if s % 2 == 0 { 11.0 } else { -1.0 }))
        .collect();
    assert!(estimate_noise_kw(&snap.other_kw, at(0), Duration::from_secs(30)) > 4.0);
    let limit = timeline(Action::ImportLimit { kw: 140.0 }, false);
    let noisy = plan(&site, &snap, &limit, at(0));
    let calm = {
        let mut s = snap.clone();
        s.other_kw = (1..=16).map(|s| (at(-s), 5.0)).collect();
        plan(&site, &s, &limit, at(0))
    };
    assert!(
        noisy.planned_asic_kw < calm.planned_asic_kw,
        "noise leaves more room"
    );
    assert!(quiet > 0.0);
}
