//! The planner alone, on 12,000 and 100,000 ASICs: a shed decision, a restore decision, and a
//! cycle with nothing to do (what runs at every poll).
//!
//! `cargo bench -p controller --bench planner`

use std::hint::black_box;
use std::path::Path;

use std::time::Duration;

use controller::decide::estimate::Estimator;
use controller::decide::planner::{AsicState, Planner, Snapshot};
use controller::decide::signal::{Action, Directive, Signal};
use controller::decide::time::{Mono, Now};
use controller::decide::timeline::Timeline;
use criterion::{Criterion, criterion_group, criterion_main};
use jiff::{SignedDuration, Timestamp};
use site_config::{SignalFormat, Site};

/// A site of `pdus` PDUs with `outlets` ASICs each, in four efficiency classes.
fn site(pdus: u32, outlets: u16) -> Site {
    let q = pdus / 4;
    let mut text = format!(
        "[site]\nid = \"b\"\nname = \"b\"\nimport_limit_kw = 1000000.0\nmeter = \"m\"\n\
         [mqtt]\nurls = [\"mqtt://127.0.0.1\"]\nclient_id = \"b\"\nack_topic = \"a\"\nstatus_topic = \"s\"\n\
         [[mqtt.signals]]\ntopic = \"t\"\nformat = \"native\"\n\
         [[meters]]\nname = \"m\"\nhost = \"127.0.0.1\"\nport = 1\nprofile = \"generic-meter\"\n\
         [[pdus]]\nname = \"p\"\ncount = {pdus}\nhost = \"10.0.0.1\"\nstep = \"host\"\nport = 502\noutlets = {outlets}\nprofile = \"generic-pdu\"\n"
    );
    for (k, (eff, prio)) in [(29.5, 2), (21.5, 2), (17.5, 2), (17.5, 1)]
        .iter()
        .enumerate()
    {
        let (first, last) = (
            k as u32 * q + 1,
            if k == 3 { pdus } else { (k as u32 + 1) * q },
        );
        text += &format!(
            "[[asics]]\npdu = \"p\"\nmembers = [{first}, {last}]\noutlets = [1, {outlets}]\nmodel = \"m{k}\"\nrated_w = 3300.0\nefficiency_j_per_th = {eff}\npriority = {prio}\n"
        );
    }
    site_config::parse(Path::new("bench.toml"), &text).expect("generated site is valid")
}

/// Every ASIC `on` for an hour, and a minute of the rest of the site (1.3 MW) estimated the way
/// the core does it (the estimate's cost is part of a cycle).
fn snapshot(site: &Site, on: bool, now: Now) -> Snapshot {
    let ago = |s: u64| now.mono - Duration::from_secs(s);
    let mut estimator = Estimator::new(site.policy.gpu_peak_window, site.policy.poll_interval);
    for s in (1..=60).rev() {
        estimator.rest(ago(s), 1300.0, 1300.0);
    }
    Snapshot {
        asics: vec![
            AsicState {
                on,
                since: Some(ago(3600)),
                controllable: true,
                unconfirmed: false,
            };
            site.asics.len()
        ],
        load: estimator.load(now.mono, site.gpu_rated_kw(), true),
        last_switch: Some(ago(3600)),
    }
}

fn limit(kw: f64, now: Timestamp) -> Timeline {
    let mut tl = Timeline::new();
    tl.apply(&Signal::Event {
        id: "e".into(),
        directives: vec![Directive {
            id: "e".into(),
            interval: 0,
            action: Action::ImportLimit { kw },
            start: now - SignedDuration::from_secs(1),
            end: None,
            priority: 1,
            emergency: false,
            format: SignalFormat::Native,
        }],
    });
    tl
}

fn bench(c: &mut Criterion) {
    let now = Now {
        wall: "2026-11-22T10:00:00Z".parse().unwrap(),
        mono: Mono::from_duration(Duration::from_secs(7200)),
    };
    for (name, pdus, outlets) in [("12k", 500, 24), ("100k", 2000, 50)] {
        let site = site(pdus, outlets);
        let planner = Planner::new(&site);
        let half = site.asic_rated_kw() / 2.0 + 1300.0;
        let all_on = snapshot(&site, true, now);
        let all_off = snapshot(&site, false, now);
        let shed = limit(half, now.wall);
        c.bench_function(&format!("plan/{name}/shed half"), |b| {
            b.iter(|| planner.plan(black_box(&site), black_box(&all_on), black_box(&shed), now))
        });
        c.bench_function(&format!("plan/{name}/restore a batch"), |b| {
            b.iter(|| {
                planner.plan(
                    black_box(&site),
                    black_box(&all_off),
                    black_box(&Timeline::new()),
                    now,
                )
            })
        });
        let steady = {
            let p = planner.plan(&site, &all_on, &shed, now);
            let mut s = all_on.clone();
            for (st, on) in s.asics.iter_mut().zip(&p.desired) {
                st.on = *on;
            }
            s
        };
        c.bench_function(&format!("plan/{name}/nothing to do"), |b| {
            b.iter(|| planner.plan(black_box(&site), black_box(&steady), black_box(&shed), now))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
