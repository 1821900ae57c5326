//! Measurement and verification, end to end: an event's baseline, reduction and compliance
//! arrive on the ack topic when it completes, the journal holds the same figures for
//! `gridshed report`, and OpenADR events get 3.1 reports upstream (availability before, usage
//! and demand per interval after).

use std::time::Duration;

use hil::broker::Broker;
use hil::rig::{Client, Rig};
use serde_json::Value;
use site_config::SignalFormat;

const SECOND: Duration = Duration::from_secs(1);
const REPORTS: &str = "sites/demo/reports";

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is a number in {v:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_event_is_acked_with_its_measurement_and_journaled_for_the_report() {
    let broker = Broker::embedded().expect("broker");
    let mut journal = None;
    let mut rig = Rig::start_on(broker, "small.toml", |site| {
        hil::rig::fast_policy(site);
        journal = Some(hil::rig::journal_in_temp(site));
        site.reporting.baseline_window = 2 * SECOND;
    })
    .await;
    let journal = journal.expect("journal path");
    rig.readings_for(3 * SECOND).await;
    let before = rig.site_kw();
    let from = rig.utility.seen.len();
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"mv-1","kind":"import_limit","kw":120,"duration_s":5}"#,
    )
    .await;
    let done = rig.ack(from, "mv-1", "completed", 20 * SECOND).await;
    let m = &done["measurement"];
    eprintln!("measurement: {m:#}");

    // The site drew 150-200 kW before; the limit asks for everything above 120.
    let baseline = num(m, "baseline_kw");
    assert!(
        (baseline - before).abs() < 40.0,
        "baseline {baseline} vs {before} read just before"
    );
    assert!(num(m, "baseline_samples") >= 3.0, "{m:#}");
    let required = num(m, "required_kw");
    assert!((required - (baseline - 120.0)).abs() < 0.1, "{m:#}");
    // The controller holds the site under the limit with a margin for the GPU swing: more
    // than asked is taken off.
    assert!(num(m, "reduction_kw") >= required, "{m:#}");
    assert!(num(m, "performance_pct") >= 95.0, "{m:#}");
    assert!(num(m, "first_response_s") < 2.0, "{m:#}");
    assert!(num(m, "full_response_s") < 3.0, "{m:#}");
    assert_eq!(m["one_minute"]["intervals"], 1, "{m:#}");
    assert_eq!(m["fifteen_minute"]["intervals"], 1, "{m:#}");
    assert_eq!(m["compliant"], true, "{m:#}");

    rig.stop_controller().await;
    let events = controller::show::report::read(&journal).expect("journal readable");
    assert_eq!(events.len(), 1, "{events:#?}");
    let journaled = serde_json::to_value(&events[0].measurement).expect("json");
    assert_eq!(
        &journaled, m,
        "the journal and the ack carry the same measurement"
    );
    // One 1-minute and one 15-minute interval, each with the readings of the 5 s.
    assert_eq!(events[0].intervals.len(), 2);
    assert!(
        events[0]
            .intervals
            .iter()
            .all(|i| i.samples >= 5 && i.compliant)
    );
    let table = controller::show::report::table(&events);
    assert!(table.contains("mv-1") && table.contains("yes"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openadr_event_gets_an_availability_report_before_and_a_usage_report_after() {
    let broker = Broker::embedded().expect("broker");
    let port = broker.port();
    let mut rig = Rig::start_on(broker, "small.toml", |site| {
        hil::rig::fast_policy(site);
        site.reporting.baseline_window = 2 * SECOND;
    })
    .await;
    let mut upstream = Client::connect(port, &[REPORTS]).await;
    rig.readings_for(3 * SECOND).await;
    // Two intervals of 3 s: 130 kW, then 110 kW.
    let event = r#"{"id":"oadr-mv","programID":"p","eventName":"capacity","priority":1,
        "payloadDescriptors":[{"payloadType":"IMPORT_CAPACITY_LIMIT","units":"KW"}],
        "intervalPeriod":{"start":"0001-01-01T00:00:00Z","duration":"PT3S"},
        "intervals":[{"id":0,"payloads":[{"type":"IMPORT_CAPACITY_LIMIT","values":[130]}]},
                     {"id":1,"payloads":[{"type":"IMPORT_CAPACITY_LIMIT","values":[110]}]}]}"#;
    let from = rig.utility.seen.len();
    rig.signal(SignalFormat::Openadr3, event).await;

    let offer = upstream
        .wait_from(0, REPORTS, 5 * SECOND, |r| {
            r["reportName"] == "oadr-mv-availability"
        })
        .await
        .json;
    assert_eq!(offer["eventID"], "oadr-mv");
    assert_eq!(offer["clientName"], rig.site.id.as_str());
    assert_eq!(
        offer["payloadDescriptors"][0]["payloadType"],
        "LOAD_SHED_DELTA_AVAILABLE"
    );
    let offered = &offer["resources"][0]["intervals"];
    assert_eq!(offered.as_array().map(Vec::len), Some(2), "{offer:#}");
    let available = offered[0]["payloads"][0]["values"][0].as_f64().expect("kW");
    // Every ASIC was on and answering: what they draw is on offer.
    assert!(available > 50.0, "{offer:#}");

    let done = rig.ack(from, "oadr-mv", "completed", 20 * SECOND).await;
    assert!(done["measurement"]["baseline_kw"].is_number(), "{done:#}");
    let usage = upstream
        .wait_from(0, REPORTS, 5 * SECOND, |r| {
            r["reportName"] == "oadr-mv-usage"
        })
        .await
        .json;
    eprintln!("usage report: {usage:#}");
    let descriptors: Vec<&str> = usage["payloadDescriptors"]
        .as_array()
        .expect("descriptors")
        .iter()
        .filter_map(|d| d["payloadType"].as_str())
        .collect();
    assert_eq!(descriptors, ["USAGE", "DEMAND"]);
    let resource = &usage["resources"][0];
    assert_eq!(resource["resourceName"], "site-meter");
    let intervals = resource["intervals"].as_array().expect("intervals");
    assert_eq!(intervals.len(), 2, "{usage:#}");
    for (k, (iv, limit)) in intervals.iter().zip([130.0, 110.0]).enumerate() {
        assert_eq!(iv["id"], k);
        assert_eq!(iv["intervalPeriod"]["duration"], "PT3S");
        let kwh = iv["payloads"][0]["values"][0].as_f64().expect("USAGE kWh");
        let kw = iv["payloads"][1]["values"][0].as_f64().expect("DEMAND kW");
        // Mean power: under (about) the interval's limit, and energy = power × 3 s.
        assert!(kw > 20.0 && kw < limit + 15.0, "interval {k}: {kw} kW");
        assert!(
            (kwh - kw * 3.0 / 3600.0).abs() < 0.002,
            "interval {k}: {kwh} kWh"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_offers_the_measured_kw_that_could_be_shed() {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", hil::rig::fast_policy).await;
    let status = rig.site.mqtt.status_topic.clone();
    let s = rig
        .utility
        .wait_from(0, &status, 10 * SECOND, |s| {
            s["load_shed_delta_available_kw"]
                .as_f64()
                .is_some_and(|kw| kw > 0.0)
                && s["asic_kw"].is_number()
        })
        .await
        .json;
    let available = num(&s, "load_shed_delta_available_kw");
    // Nothing shed and nothing faulted: every ASIC's measured power is on offer.
    assert!(
        (available - num(&s, "asic_kw")).abs() < 15.0,
        "available {available} vs ASICs {}",
        s["asic_kw"]
    );
}
