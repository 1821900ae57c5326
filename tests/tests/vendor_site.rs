//! The site of the report that started the pure control core (issue 12), as hardware-in-loop
//! tests against firmware-sim: six Acme PDUs (another vendor, through a profile file), 240 kW
//! of GPU training load behind no meter of its own, minimum on and off times of 10 s, batches
//! of 8 every 2 s, polls every 500 ms (`config/sites/acme.toml`). One device is silent or
//! refuses writes. The others must still bring the site under the limit within 5 s, hold it
//! without switching a live outlet back on, report honestly, and all come back after release.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hil::broker::Broker;
use hil::rig::Rig;
use serde_json::Value;
use site_config::{DeviceId, Faults, SignalFormat, Site};
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);
/// The limit of the report: one the five live PDUs meet easily.
const LIMIT_KW: f64 = 389.0;
/// How long the limit is held and watched.
const HOLD: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The PDU's port refuses connections from start-up.
    ClosedPort(&'static str),
    /// The PDU answers reads and refuses every write with exception 03 (illegal data value).
    RefusesWrites(&'static str),
    /// The lab rack's meter's port refuses connections from start-up.
    SilentGpuMeter,
}

impl Fault {
    /// The device it silences.
    fn device(self) -> &'static str {
        match self {
            Fault::ClosedPort(pdu) | Fault::RefusesWrites(pdu) => pdu,
            Fault::SilentGpuMeter => "lab-meter",
        }
    }
}

/// A port on 127.0.0.1 that refuses connections: bound, then let go.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Points `device` at a port nobody listens on.
fn close(site: &mut Site, device: &str) {
    let port = closed_port();
    match site.device_by_name(device) {
        Some(DeviceId::Pdu(p)) => site.pdus[p.0 as usize].endpoint.port = port,
        Some(DeviceId::Meter(m)) => site.meters[m.0 as usize].endpoint.port = port,
        None => panic!("no device {device}"),
    }
}

fn faulted(status: &Value, device: &str) -> bool {
    status["faulted"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x["device"] == device))
}

/// The ASIC outlets of `pdu` as the simulator has them: (outlet number, relay on).
fn relays(rig: &Rig, pdu: &str) -> Vec<(u16, bool)> {
    let id = match rig.site.device_by_name(pdu) {
        Some(DeviceId::Pdu(p)) => p,
        _ => panic!("no PDU {pdu}"),
    };
    let outlets = rig.sim.outlets(pdu).expect("pdu");
    rig.site
        .asics
        .iter()
        .filter(|a| a.pdu == id)
        .map(|a| (a.outlet, outlets[usize::from(a.outlet) - 1].relay_on))
        .collect()
}

/// The journal's records, one JSON value per line.
fn journal(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("journal")
        .lines()
        .map(|l| serde_json::from_str(l).expect("journal line"))
        .collect()
}

async fn faulted_vendor_site(fault: Fault) {
    let broker = Broker::embedded().expect("broker");
    let mut journal_path = PathBuf::new();
    let mut rig = Rig::start_on(broker, "acme.toml", |site| {
        // The one change from the site file: a 12 s window (its swing is 1.3 s), so that the
        // estimate is warm within the test's time instead of after a minute.
        site.policy.gpu_peak_window = Duration::from_secs(12);
        journal_path = hil::rig::journal_in_temp(site);
        match fault {
            Fault::ClosedPort(pdu) => close(site, pdu),
            Fault::SilentGpuMeter => close(site, "lab-meter"),
            Fault::RefusesWrites(_) => {}
        }
    })
    .await;
    let device = fault.device();
    let status_topic = rig.site.mqtt.status_topic.clone();
    if let Fault::RefusesWrites(pdu) = fault {
        let faults = Faults {
            write_exception: Some(3),
            ..Faults::default()
        };
        rig.sim.set_faults(pdu, faults).expect("fault injected");
    } else {
        rig.utility
            .wait_from(0, &status_topic, 10 * SECOND, |s| faulted(s, device))
            .await;
    }
    // A controller that has run for a while when the limit comes: its estimate of the rest of
    // the site has seen a whole window. (Sooner, it sheds on a young estimate that counts the
    // metered rack at its rating, and restores what that over-shed once the window is seen:
    // README, "How it decides".)
    rig.readings_for(rig.site.policy.gpu_peak_window + SECOND)
        .await;
    let live: Vec<String> = rig
        .site
        .pdus
        .iter()
        .map(|p| p.name.clone())
        .filter(|p| p != device)
        .collect();
    assert!(
        rig.site_kw() > 520.0,
        "the site starts at full power: {:.1} kW",
        rig.site_kw()
    );

    // The limit: under it within 5 s.
    let from = rig.utility.seen.len();
    let t0 = Instant::now();
    rig.signal(
        SignalFormat::Native,
        format!(r#"{{"id":"cap","kind":"import_limit","kw":{LIMIT_KW}}}"#),
    )
    .await;
    let took = rig
        .until(5 * SECOND, "site under the limit", |r| {
            r.site_kw() < LIMIT_KW
        })
        .await;
    eprintln!("{fault:?}: under {LIMIT_KW} kW {took:?} after the signal");

    // Held: under the limit once the relays have moved, and no live outlet that went off comes
    // back while the limit holds (the report's flapping).
    let mut went_off: BTreeSet<(String, u16)> = BTreeSet::new();
    let mut worst_kw = 0.0_f64;
    let settle = t0 + 4 * SECOND;
    while t0.elapsed() < HOLD {
        for pdu in &live {
            for (outlet, on) in relays(&rig, pdu) {
                let key = (pdu.clone(), outlet);
                if !on {
                    went_off.insert(key);
                } else {
                    assert!(
                        !went_off.contains(&key),
                        "{pdu} outlet {outlet} switched back on while the limit holds"
                    );
                }
            }
        }
        if Instant::now() > settle {
            let kw = rig.site_kw();
            worst_kw = worst_kw.max(kw);
            assert!(kw < LIMIT_KW, "site at {kw:.1} kW over the limit");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "{fault:?}: held for {HOLD:?}, worst {worst_kw:.1} kW, {} live outlets off",
        went_off.len()
    );
    assert!(!went_off.is_empty(), "the live PDUs were shed");

    // Status is honest: the fault named, the ASICs measured, no shortfall (the live PDUs can
    // meet the limit), and as many ASICs off as the relays say.
    rig.utility.drain();
    let status = rig
        .utility
        .seen
        .iter()
        .rev()
        .find(|s| s.topic == status_topic)
        .expect("a status")
        .json
        .clone();
    assert!(faulted(&status, device), "{device} not faulted: {status:#}");
    assert_eq!(status["shortfall_kw"], 0.0, "{status:#}");
    assert!(status["asic_kw"].is_number(), "{status:#}");
    let relays_off = rig.site.asics.len() - rig.asics_on();
    assert_eq!(
        status["asics_off"].as_u64(),
        Some(relays_off as u64),
        "status against the relays: {status:#}"
    );
    assert_ne!(status["restore_held"], "site_meter_silent", "{status:#}");

    // Released: everything comes back (the faulted PDU's ASICs were never switched).
    rig.signal(SignalFormat::Native, r#"{"id":"cap","kind":"release"}"#)
        .await;
    rig.ack(from, "cap", "completed", 5 * SECOND).await;
    let n = rig.site.asics.len();
    let back = rig
        .until(60 * SECOND, "every ASIC back on after the release", |r| {
            r.asics_on() == n
        })
        .await;
    eprintln!("{fault:?}: all {n} ASICs back {back:?} after the release");
    assert_eq!(rig.protected_writes(), 0, "nothing written to a meter");

    // The journal: one fault record for the device for the whole event (not one per poll),
    // and no outlet of it listed as not following a plan (it was never commanded).
    let records = journal(&journal_path);
    let faults = records
        .iter()
        .filter(|r| r["record"] == "fault" && r["device"] == device)
        .count();
    assert_eq!(faults, 1, "fault records for {device}");
    for r in records.iter().filter(|r| r["record"] == "unconfirmed") {
        assert!(r["outlets"].get(device).is_none(), "{r}");
    }
    if let Fault::RefusesWrites(pdu) = fault {
        let written = rig.sim.writes(pdu).expect("pdu");
        // A write at the first plan that wanted it, then probes backing off from 2 s.
        assert!(
            written <= 8,
            "{pdu} written {written} times: retries do not back off"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pdu_at_a_closed_port_does_not_stall_shedding_or_restoring_on_the_others() {
    faulted_vendor_site(Fault::ClosedPort("acme-6")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdu_that_refuses_writes_stays_faulted_and_the_others_do_not_flap() {
    // acme-1: the first the planner sheds (ties go by outlet order).
    faulted_vendor_site(Fault::RefusesWrites("acme-1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_meter_that_never_answers_does_not_stall_shedding_or_restoring() {
    faulted_vendor_site(Fault::SilentGpuMeter).await;
}
