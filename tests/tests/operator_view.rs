//! The operator's window on a running controller: the Prometheus endpoint answers with the
//! site's figures, refuses what it does not serve, and the status page, loaded in a real
//! headless Chromium, shows the live values, the chart, the active directives and the faulted
//! devices.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use hil::broker::Broker;
use hil::rig::{Rig, http_get};
use site_config::{Faults, SignalFormat};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECOND: Duration = Duration::from_secs(1);
/// The PDU whose fault these tests inject.
const FAULTED: &str = "pdu-legacy";

/// Starts a rig, injects an exception fault into one PDU, sends one malformed signal and one
/// import limit of 120 kW, and waits until status shows both the directive and the fault.
async fn rig_with_an_event_and_a_fault(id: &str) -> Rig {
    let broker = Broker::embedded().expect("broker");
    let mut rig = Rig::start_on(broker, "small.toml", hil::rig::fast_policy).await;
    let faults = Faults {
        exception: Some(4),
        ..Faults::default()
    };
    rig.sim.set_faults(FAULTED, faults).expect("fault injected");
    rig.readings_for(3 * SECOND).await;
    let from = rig.utility.seen.len();
    rig.signal(
        SignalFormat::Native,
        r#"{"id":"bad","kind":"import_limit","kw":-5}"#,
    )
    .await;
    rig.signal(
        SignalFormat::Native,
        format!(r#"{{"id":"{id}","kind":"import_limit","kw":120}}"#),
    )
    .await;
    let status = rig.site.mqtt.status_topic.clone();
    rig.utility
        .wait_from(from, &status, 15 * SECOND, |s| {
            s["directives"].as_array().is_some_and(|d| d.len() == 1)
                && s["faulted"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f["device"] == FAULTED))
        })
        .await;
    rig
}

/// The samples of a Prometheus text exposition: `name{labels}` → value. Panics on a line
/// that is neither a comment nor a sample.
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        out.insert(key.to_owned(), value);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_answers_with_the_sites_figures() {
    let rig = rig_with_an_event_and_a_fault("metrics-evt").await;
    let addr = rig.http.expect("http endpoint");
    assert!(addr.ip().is_loopback());
    let (code, text) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    let m = samples(&text);
    let get = |k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing from\n{text}"))
    };

    for name in [
        "gridshed_site_kw",
        "gridshed_asic_kw",
        "gridshed_gpu_kw",
        "gridshed_limit_kw",
        "gridshed_shed_kw",
        "gridshed_devices_faulted",
        "gridshed_signals_total",
        "gridshed_modbus_request_seconds",
        "gridshed_plan_cycle_seconds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "no TYPE for {name}"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}"
        );
    }
    let site = get("gridshed_site_kw");
    assert!(
        (site - rig.site_kw()).abs() < 40.0,
        "metrics say {site} kW, the meter {}",
        rig.site_kw()
    );
    assert!(get("gridshed_gpu_kw") > 0.0);
    assert_eq!(get("gridshed_limit_kw"), 120.0);
    assert!(
        get("gridshed_shed_kw") > 0.0,
        "a limit of 120 kW sheds ASICs"
    );
    let outlets = get("gridshed_outlets{state=\"on\"}") + get("gridshed_outlets{state=\"off\"}");
    assert_eq!(outlets as usize, rig.site.asics.len());
    assert_eq!(get("gridshed_devices_faulted"), 1.0);
    assert_eq!(
        get(&format!("gridshed_device_faulted{{device=\"{FAULTED}\"}}")),
        1.0
    );
    assert_eq!(get("gridshed_signals_total{outcome=\"accepted\"}"), 1.0);
    assert_eq!(get("gridshed_signals_total{outcome=\"rejected\"}"), 1.0);
    assert_eq!(get("gridshed_directives_active"), 1.0);
    let requests = get("gridshed_modbus_request_seconds_count");
    assert!(requests > 10.0, "{requests} Modbus requests timed");
    assert_eq!(
        get("gridshed_modbus_request_seconds_bucket{le=\"+Inf\"}"),
        requests
    );
    assert!(get("gridshed_plan_cycle_seconds_count") > 0.0);
}

/// Sends raw bytes and returns the status code of the answer.
async fn raw(addr: SocketAddr, request: &[u8]) -> u16 {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before all of an oversized request is sent.
    let _ = s.write_all(request).await;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_endpoint_refuses_what_it_does_not_serve_and_keeps_serving() {
    let broker = Broker::embedded().expect("broker");
    let rig = Rig::start_on(broker, "small.toml", |_| {}).await;
    let addr = rig.http.expect("http endpoint");
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    for (request, code) in [
        (&b"POST /metrics HTTP/1.1\r\n\r\n"[..], 405),
        (b"GET /secret HTTP/1.1\r\n\r\n", 404),
        (b"GET /../../etc/passwd HTTP/1.1\r\n\r\n", 404),
        (b"\xff\xfe\x00garbage\r\n\r\n", 400),
        (b"GET / SPDY/3\r\n\r\n", 505),
        (huge.as_bytes(), 431),
    ] {
        assert_eq!(
            raw(addr, request).await,
            code,
            "{:?}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
    }
    // A client that connects and says nothing does not hold the server up.
    let _idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("gridshed_site_kw"));
}

/// The text of the element with `id` in `dom` (no nested tags).
fn text_of<'a>(dom: &'a str, id: &str) -> &'a str {
    let open = format!("id=\"{id}\"");
    let at = dom
        .find(&open)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let rest = &dom[at..];
    let start = rest.find('>').expect("tag end") + 1;
    let end = rest[start..].find('<').expect("element end");
    &rest[start..start + end]
}

/// The value of attribute `attr` on the first tag that contains `marker`.
fn attr_of<'a>(dom: &'a str, marker: &str, attr: &str) -> &'a str {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in the page"));
    let tag_start = dom[..at].rfind('<').expect("tag start");
    let tag_end = at + dom[at..].find('>').expect("tag end");
    let tag = &dom[tag_start..tag_end];
    let key = format!("{attr}=\"");
    let v = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {attr} in {tag}"))
        + key.len();
    let len = tag[v..].find('"').expect("attribute end");
    &tag[v..v + len]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_chart_directives_and_faults_in_headless_chromium() {
    let Some(chromium) = hil::tools::require("chromium") else {
        return;
    };
    let rig = rig_with_an_event_and_a_fault("page-evt").await;
    let addr = rig.http.expect("http endpoint");
    rig.until(10 * SECOND, "site under the limit", |r| r.site_kw() < 120.0)
        .await;
    // Seconds of readings, so the chart has a line to draw.
    rig.readings_for(3 * SECOND).await;

    let profile = std::env::temp_dir().join(format!("gridshed-chromium-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    let run = tokio::process::Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("http://{addr}/"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(90 * SECOND, run)
        .await
        .expect("chromium finished within 90 s")
        .expect("chromium ran");
    let _ = std::fs::remove_dir_all(&profile);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page's script did not render; stderr: {}\nDOM: {dom}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The live values are the controller's (the site moves with the GPU racks' oscillation).
    let shown: f64 = text_of(&dom, "site-kw")
        .parse()
        .expect("site kW is a number");
    let (_, body) = http_get(addr, "/api/status").await;
    let view: serde_json::Value = serde_json::from_str(&body).expect("json");
    let served = view["status"]["site_kw"].as_f64().expect("site kW");
    assert!(
        (shown - served).abs() < 30.0,
        "page {shown} kW, api {served} kW"
    );
    assert!(
        shown < 125.0,
        "the page shows {shown} kW under a 120 kW limit"
    );
    assert_eq!(text_of(&dom, "limit-kw"), "120.0");
    assert_eq!(text_of(&dom, "site"), rig.site.id);
    let on: usize = text_of(&dom, "asics-on").parse().expect("count");
    let off: usize = text_of(&dom, "asics-off").parse().expect("count");
    assert_eq!(on + off, rig.site.asics.len());
    assert!(off > 0, "a 120 kW limit sheds ASICs");

    // The chart: a line for each series, with the readings of the last seconds.
    for series in ["site", "asic", "gpu", "limit"] {
        let points: usize = attr_of(&dom, &format!("data-series=\"{series}\""), "data-points")
            .parse()
            .expect("point count");
        assert!(points >= 6, "{series}: {points} points");
    }

    // The active directive and the faulted device.
    assert!(
        dom.contains("data-id=\"page-evt\""),
        "directive missing: {dom}"
    );
    assert!(attr_of(&dom, "data-id=\"page-evt\"", "data-id") == "page-evt");
    assert!(
        dom.contains(&format!("data-device=\"{FAULTED}\"")),
        "fault missing: {dom}"
    );
    assert!(dom.contains("1 device(s) faulted"), "state badge: {dom}");
}
