//! `shed-bench`: how fast gridshed sheds a large site, measured end to end on one machine.
//!
//! An embedded broker and firmware-sim run in this process; the controller (`gridshed run`) runs
//! as its own process so its memory and CPU time are its own. For each event the bench publishes
//! an import limit that needs about half the ASICs off, then a release, and measures from the
//! moment of publishing to:
//!
//! - `commanded`: the last outlet write of the shed acknowledged by its PDU;
//! - `confirmed`: the site meter under the limit (the simulator's meter updates every 50 ms);
//! - `restored`: after the release, the last restore batch acknowledged.
//!
//! Then the same shed is done the naive way, one outlet at a time over one connection at a
//! time, and the ratio printed. The last line of output is a JSON object with every figure.
//!
//! Two failure scenarios can follow the events:
//!
//! - `--dead-pct P`: P % of the PDUs stop answering just before an event; how soon the others
//!   still bring the site meter under the limit, against two Modbus timeouts;
//! - `--outage-s S`: the broker is gone for S seconds mid-event (and comes back having forgotten
//!   every session); whether the shed was held, how soon the controller was back online, and how
//!   many lines it logged meanwhile.
//!
//! ```text
//! cargo build --release -p controller && \
//!   cargo run --release -p hil --bin shed-bench -- --site config/sites/large.toml --events 20
//! cargo run --release -p hil --bin shed-bench -- --pdus 2000 --outlets 24 --events 5
//! cargo run --release -p hil --bin shed-bench -- --events 3 --dead-pct 10 --outage-s 30
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use firmware_sim::{Bind, Sim, SimOptions};
use hil::broker::Broker;
use hil::rig::Client;
use serde_json::{Value, json};
use site_config::Faults;
use tokio::time::Instant;
use tokio_modbus::client::{Writer, tcp};
use tokio_modbus::prelude::SlaveContext;

#[derive(Debug, clap::Parser)]
#[command(about = "How fast gridshed sheds a large site, end to end on one machine")]
struct Args {
    /// The site file to bench (default: config/sites/large.toml).
    #[arg(long, conflicts_with = "pdus")]
    site: Option<PathBuf>,
    /// A generated site of this many PDUs, in the shape of large.toml, instead of a file.
    #[arg(long)]
    pdus: Option<u32>,
    /// ASICs per PDU of a generated site.
    #[arg(long, default_value_t = 24, requires = "pdus")]
    outlets: u16,
    /// Shed-and-release events to time.
    #[arg(long, default_value_t = 20)]
    events: usize,
    /// How long the simulated relays take to move, ms.
    #[arg(long, default_value_t = 0)]
    relay_delay_ms: u32,
    /// Skip the naive one-outlet-at-a-time comparison.
    #[arg(long = "no-naive", action = clap::ArgAction::SetFalse)]
    naive: bool,
    /// Percent of PDUs made dead for the dead-PDU scenario (0: not run).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=50))]
    dead_pct: u32,
    /// Seconds of broker outage for the outage scenario (0: not run).
    #[arg(long, default_value_t = 0)]
    outage_s: u64,
}

fn args() -> Args {
    <Args as clap::Parser>::parse()
}

/// A site of `pdus` PDUs with `outlets` ASICs each, 8 GPU racks, in the shape of large.toml.
fn generated_site(pdus: u32, outlets: u16) -> String {
    let cut = |f: f64| ((f64::from(pdus) * f).round() as u32).clamp(1, pdus);
    let (a, b, c) = (cut(0.4), cut(0.7), cut(0.9));
    let mut groups = String::new();
    for (first, last, model, w, eff, prio) in [
        (1, a, "S19j Pro", 3250.0, 29.5, 2),
        (a + 1, b, "T21", 3610.0, 19.0, 2),
        (b + 1, c, "S21", 3500.0, 17.5, 2),
        (c + 1, pdus, "S21 (hosted)", 3500.0, 17.5, 1),
    ] {
        if first <= last {
            groups += &format!(
                "[[asics]]\npdu = \"row\"\nmembers = [{first}, {last}]\noutlets = [1, {outlets}]\nmodel = \"{model}\"\nrated_w = {w:.1}\nefficiency_j_per_th = {eff}\npriority = {prio}\n\n"
            );
        }
    }
    let racks: String = (1..=8)
        .map(|k| {
            format!(
                "[[gpu_racks]]\nname = \"gpu-{k}\"\nmeter = \"gpu-meter-{k}\"\nrated_kw = 120.0\n\n"
            )
        })
        .collect();
    let gpu_sims: String = (1..=8)
        .map(|k| {
            format!(
                "[[sim.gpu]]\nrack = \"gpu-{k}\"\nbase_kw = 85.0\nswing_kw = 25.0\nperiod_s = {}\n\n",
                0.4 + 0.3 * f64::from(k)
            )
        })
        .collect();
    format!(
        r#"[site]
id = "bench"
name = "Generated bench site"
import_limit_kw = {limit:.1}
meter = "site-meter"

[mqtt]
urls = ["mqtt://127.0.0.1:1883"]
client_id = "gridshed-bench"
ack_topic = "sites/bench/ack"
status_topic = "sites/bench/status"

[[mqtt.signals]]
topic = "sites/bench/signals"
format = "native"

[[meters]]
name = "site-meter"
host = "127.0.0.1"
port = 1000
profile = "generic-meter"

[[meters]]
name = "gpu-meter"
count = 8
host = "127.0.0.1"
port = 1001
profile = "generic-meter"

[[pdus]]
name = "row"
count = {pdus}
host = "127.0.0.1"
port = 1010
outlets = {outlets}
profile = "generic-pdu"

{groups}{racks}[policy]
margin_kw = 200.0

[sim]
noise_pct = 0.5
base_load_kw = 800.0

{gpu_sims}"#,
        limit = f64::from(pdus) * f64::from(outlets) * 4.0 + 2000.0,
    )
}

/// The bench's policy: no minimum times (every event starts from a settled site), restores in
/// four batches half a second apart, a 6 s GPU window with 500 ms polls.
fn bench_policy(asics: usize) -> String {
    format!(
        "[policy]\nmin_off_s = 0.0\nmin_on_s = 0.0\nrestore_batch_size = {}\nrestore_interval_s = 0.5\ngpu_peak_window_s = 6.0\nmargin_kw = 200.0\npoll_interval_ms = 500\n",
        asics.div_ceil(4).max(1)
    )
}

/// Replaces the site text's `[policy]` tables, points it at `broker_port`, and shifts every
/// device port by `offset`.
fn bench_text(text: &str, offset: u16, broker_port: u16, asics: usize) -> String {
    let mut out = String::new();
    let mut in_policy = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            in_policy = t.starts_with("[policy]") || t.starts_with("[policy.");
        }
        if in_policy {
            continue;
        }
        if let Some(rest) = t.strip_prefix("port = ") {
            let num = rest.split_whitespace().next().unwrap_or("");
            if let Ok(p) = num.parse::<u32>() {
                out += &format!("port = {}\n", p + u32::from(offset));
                continue;
            }
        }
        if t.starts_with("urls = ") {
            out += &format!("urls = [\"mqtt://127.0.0.1:{broker_port}\"]\n");
            continue;
        }
        if t.starts_with("relay_delay_ms") {
            continue;
        }
        out += line;
        out.push('\n');
    }
    out + "\n" + &bench_policy(asics)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    Stats {
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// Peak resident memory (VmHWM) and CPU time (user + system) of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let clk = 100.0; // USER_HZ on Linux
    (hwm_kb / 1024.0, (ticks(11) + ticks(12)) / clk)
}

fn gridshed_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let bin = exe.with_file_name("gridshed");
    if !bin.is_file() {
        eprintln!(
            "{} is missing: build the controller in the same profile first:\n  cargo build --release -p controller",
            bin.display()
        );
        std::process::exit(2);
    }
    bin
}

async fn start_sim(text: &str, relay_delay_ms: u32) -> (Sim, u16) {
    let seed = std::process::id() as u16;
    for attempt in 0..40u16 {
        let offset = 10_000
            + (seed
                .wrapping_mul(13)
                .wrapping_add(attempt.wrapping_mul(1531)))
                % 30_000;
        let mut site = site_config::parse(Path::new("bench.toml"), text).unwrap_or_else(|e| {
            eprintln!("{e}");
            std::process::exit(2)
        });
        site.sim.relay_delay = Duration::from_millis(u64::from(relay_delay_ms));
        let options = SimOptions {
            bind: Bind::AsConfigured {
                port_offset: i32::from(offset),
            },
            ..SimOptions::default()
        };
        if let Ok(sim) = Sim::start(&site, options).await {
            return (sim, offset);
        }
    }
    eprintln!("no free port range for the simulator");
    std::process::exit(1)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let bin = gridshed_binary();
    let template = match (&args.site, args.pdus) {
        (_, Some(n)) => generated_site(n, args.outlets),
        (Some(p), None) => std::fs::read_to_string(p).unwrap_or_else(|e| {
            eprintln!("{}: {e}", p.display());
            std::process::exit(2)
        }),
        (None, None) => std::fs::read_to_string(hil::site::path("large.toml")).expect("large.toml"),
    };
    let probe = site_config::parse(Path::new("bench.toml"), &template).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    let asics = probe.asics.len();
    let mut broker = Broker::embedded().expect("embedded broker");
    let (sim, offset) = start_sim(
        &bench_text(&template, 0, broker.port(), asics),
        args.relay_delay_ms,
    )
    .await;
    let text = bench_text(&template, offset, broker.port(), asics);
    let site = site_config::parse(Path::new("bench.toml"), &text).expect("bench site");
    let dir = std::env::temp_dir().join(format!("gridshed-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let site_file = dir.join("site.toml");
    std::fs::write(&site_file, &text).expect("write site");
    let rated_kw = site.asic_rated_kw();
    println!(
        "shed-bench: {} ASICs on {} PDUs ({:.0} kW rated), {} GPU racks; relay delay {} ms; {} events",
        asics,
        site.pdus.len(),
        rated_kw,
        site.gpu_racks.len(),
        args.relay_delay_ms,
        args.events
    );

    let (status, ack, signals) = (
        site.mqtt.status_topic.clone(),
        site.mqtt.ack_topic.clone(),
        site.mqtt.signals[0].topic.clone(),
    );
    let mut utility = Client::connect(broker.port(), &[&status, &ack]).await;
    // The controller's log goes to a file beside this binary (kept after the run, overwritten
    // by the next): the outage scenario counts its lines.
    let log = std::env::current_exe()
        .expect("own path")
        .with_file_name("shed-bench.gridshed.log");
    let mut child: Child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&site_file)
        .env(
            "RUST_LOG",
            std::env::var("GRIDSHED_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start gridshed");
    let pid = child.id();
    utility
        .wait_from(0, &status, Duration::from_secs(60), |s| {
            s["online"] == true && s["asics_on"].as_u64() == Some(asics as u64)
        })
        .await;
    // Let the GPU window and the other-load estimate fill before the first event.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let site_meter = site.meter(site.site_meter).name.clone();
    let scene = Scene {
        sim: &sim,
        site: &site,
        site_meter: &site_meter,
        signals: &signals,
        status: &status,
        ack: &ack,
    };

    let (mut commanded, mut confirmed, mut restored) = (Vec::new(), Vec::new(), Vec::new());
    let mut shed_set: Vec<(String, Vec<u16>)> = Vec::new();
    let mut off_counts = Vec::new();
    for event in 0..args.events {
        let id = format!("bench-{event}");
        let Shed {
            at: t0,
            off,
            confirmed: conf,
            ..
        } = scene.half_shed(&utility, &id).await;
        let Some(last) = sim.last_write_since(t0) else {
            eprintln!("event {event}: nothing was written");
            break;
        };
        commanded.push((last - t0).as_secs_f64() * 1000.0);
        if let Some(c) = conf {
            confirmed.push(c * 1000.0);
        }
        off_counts.push(off);
        if event == 0 {
            for p in &site.pdus {
                shed_set.push((p.name.clone(), sim.outlets_off(&p.name).expect("pdu")));
            }
        }
        let t1 = scene.release(&utility, &id).await;
        if let Some(last) = sim.last_write_since(t1) {
            restored.push((last - t1).as_secs_f64() * 1000.0);
        }
        println!(
            "event {event:>3}: {off:>6} ASICs off, commanded {:>7.1} ms, confirmed {:>7.1} ms, restored {:>7.1} ms",
            commanded.last().unwrap_or(&f64::NAN),
            confirmed.last().unwrap_or(&f64::NAN),
            restored.last().unwrap_or(&f64::NAN)
        );
        utility.drain();
        utility.seen.clear();
    }

    // Idle: the controller polls every device every 500 ms and decides nothing.
    let (_, cpu_before) = proc_usage(pid);
    let idle = Duration::from_secs(5);
    tokio::time::sleep(idle).await;
    let (rss_mb, cpu_total) = proc_usage(pid);
    let idle_cpu_pct = (cpu_total - cpu_before) / idle.as_secs_f64() * 100.0;

    let dead = if args.dead_pct > 0 {
        Some(dead_pdus(&scene, &mut utility, args.dead_pct).await)
    } else {
        None
    };
    let outage = if args.outage_s > 0 {
        let outage = Duration::from_secs(args.outage_s);
        Some(broker_outage(&scene, &mut utility, &mut broker, &log, outage).await)
    } else {
        None
    };
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::task::spawn_blocking(move || child.wait()).await;

    let naive_ms = if args.naive {
        Some(naive(&site, &sim, &shed_set).await)
    } else {
        None
    };
    let (c, f, r) = (
        stats(commanded.clone()),
        stats(confirmed.clone()),
        stats(restored.clone()),
    );
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "from publish to ...", "p50 ms", "p99 ms", "max ms"
    );
    println!(
        "{:<34} {:>9.1} {:>9.1} {:>9.1}",
        "commanded (last shed write acked)", c.p50, c.p99, c.max
    );
    println!(
        "{:<34} {:>9.1} {:>9.1} {:>9.1}",
        "confirmed (site meter < limit)", f.p50, f.p99, f.max
    );
    println!(
        "{:<34} {:>9.1} {:>9.1} {:>9.1}",
        "restored (last batch acked)", r.p50, r.p99, r.max
    );
    println!(
        "controller: peak RSS {rss_mb:.1} MB, CPU {cpu_total:.2} s in all, idle {idle_cpu_pct:.1} % of one core"
    );
    if let Some(n) = naive_ms {
        println!(
            "naive (one outlet per write, one connection at a time): {n:.1} ms for the first event's shed, {:.0}x the p50",
            n / c.p50
        );
    }
    let line = json!({
        "asics": asics,
        "pdus": site.pdus.len(),
        "events": commanded.len(),
        "relay_delay_ms": args.relay_delay_ms,
        "asics_off_per_event": off_counts.first(),
        "commanded_ms": {"p50": c.p50, "p99": c.p99, "max": c.max},
        "confirmed_ms": {"p50": f.p50, "p99": f.p99, "max": f.max},
        "restored_ms": {"p50": r.p50, "p99": r.p99, "max": r.max},
        "controller_peak_rss_mb": rss_mb,
        "controller_cpu_s": cpu_total,
        "controller_idle_cpu_pct": idle_cpu_pct,
        "naive_ms": naive_ms,
        "naive_ratio": naive_ms.map(|n| n / c.p50),
        "dead_pdus": dead,
        "broker_outage": outage,
    });
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    println!(
        "controller log: {} lines in {} (GRIDSHED_BENCH_LOG sets its level; warn by default)",
        logged.lines().count(),
        log.display()
    );
    println!("{line}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a failure scenario works with: the simulated site and the utility's topics.
struct Scene<'a> {
    sim: &'a Sim,
    site: &'a site_config::Site,
    site_meter: &'a str,
    signals: &'a str,
    status: &'a str,
    ack: &'a str,
}

/// An import limit published and settled under.
struct Shed {
    /// When it was published.
    at: Instant,
    limit: f64,
    /// ASICs off once settled.
    off: usize,
    /// How soon (seconds) the site meter read under the limit.
    confirmed: Option<f64>,
}

impl Scene<'_> {
    /// Publishes, as event `id`, an import limit that needs about half the rated ASIC load
    /// off, and waits until the site settles under it.
    async fn half_shed(&self, utility: &Client, id: &str) -> Shed {
        let site_kw = self.sim.meter_kw(self.site_meter).expect("site meter");
        let limit = (site_kw - self.site.asic_rated_kw() / 2.0).max(1.0);
        let t0 = Instant::now();
        utility
            .publish(
                self.signals,
                format!(r#"{{"id":"{id}","kind":"import_limit","kw":{limit:.1}}}"#),
            )
            .await;
        let (off, confirmed) =
            settle(self.sim, self.site_meter, Some(limit), t0, |off| off > 0).await;
        Shed {
            at: t0,
            limit,
            off,
            confirmed,
        }
    }

    /// Releases event `id` and waits until every ASIC is back on; returns when the release was
    /// published.
    async fn release(&self, utility: &Client, id: &str) -> Instant {
        let t = Instant::now();
        utility
            .publish(self.signals, format!(r#"{{"id":"{id}","kind":"release"}}"#))
            .await;
        settle(self.sim, self.site_meter, None, t, |off| off == 0).await;
        t
    }
}

/// `pct` % of the PDUs (every (100 / pct)th) stop answering just before an import limit
/// arrives: the controller's writes to them time out, and the others must make up for them.
/// Prints and returns how soon the site meter read under the limit, against two timeouts.
async fn dead_pdus(scene: &Scene<'_>, utility: &mut Client, pct: u32) -> Value {
    let Scene { sim, site, .. } = *scene;
    let dead: Vec<&site_config::Pdu> = site.pdus.iter().step_by((100 / pct) as usize).collect();
    let no_reply = Faults {
        no_reply: true,
        ..Faults::default()
    };
    for p in &dead {
        sim.set_faults(&p.name, no_reply.clone()).expect("pdu");
    }
    let timeout_ms = dead
        .iter()
        .map(|p| p.endpoint.timeout.as_secs_f64() * 1000.0)
        .fold(0.0, f64::max);
    let Shed { off, confirmed, .. } = scene.half_shed(utility, "bench-dead").await;
    let confirmed_ms = confirmed.map(|c| c * 1000.0);
    let met = confirmed_ms.is_some_and(|c| c <= 2.0 * timeout_ms);
    println!(
        "{} of {} PDUs dead ({pct} %): {off} ASICs off, site meter under the limit after {} (two timeouts: {:.0} ms): {}",
        dead.len(),
        site.pdus.len(),
        confirmed_ms.map_or("never".into(), |c| format!("{c:.1} ms")),
        2.0 * timeout_ms,
        if met { "met" } else { "NOT met" }
    );
    scene.release(utility, "bench-dead").await;
    sim.clear_faults();
    // The PDUs answer again: wait until the controller has them all back (taking in first
    // what arrived before, when they were still fine).
    utility.drain();
    let from = utility.seen.len();
    utility
        .wait_from(from, scene.status, Duration::from_secs(60), |s| {
            s["faulted"].as_array().is_some_and(|f| f.is_empty())
        })
        .await;
    utility.seen.clear();
    json!({
        "pct": pct,
        "dead": dead.len(),
        "asics_off": off,
        "confirmed_ms": confirmed_ms,
        "two_timeouts_ms": 2.0 * timeout_ms,
        "met": met,
    })
}

/// The broker goes away for `outage` mid-event and comes back having forgotten every session.
/// Prints and returns whether the shed was held meanwhile, how soon after the broker's return
/// the controller was online again and had re-announced the event, and how many lines it
/// logged over the outage.
async fn broker_outage(
    scene: &Scene<'_>,
    utility: &mut Client,
    broker: &mut Broker,
    log: &Path,
    outage: Duration,
) -> Value {
    let sim = scene.sim;
    let from = utility.seen.len();
    let limit = scene.half_shed(utility, "bench-outage").await.limit;
    let active = |a: &Value| a["id"] == "bench-outage" && a["status"] == "active";
    utility
        .wait_from(from, scene.ack, Duration::from_secs(30), active)
        .await;
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    let line_count = || read_log().lines().count();
    let (off, writes, lines) = (sim.asic_relays_off(), sim.all_writes(), line_count());

    broker.stop();
    let end = Instant::now() + outage;
    let (mut fewest_off, mut highest_kw) = (off, 0.0f64);
    while Instant::now() < end {
        fewest_off = fewest_off.min(sim.asic_relays_off());
        highest_kw = highest_kw.max(sim.meter_kw(scene.site_meter).unwrap_or(f64::NAN));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let writes_during: u64 = sim
        .all_writes()
        .iter()
        .map(|(name, n)| n - writes.get(name).copied().unwrap_or(0))
        .sum();
    // Held: the site stayed under the limit throughout (the controller goes on following it,
    // so it may switch some ASICs back on as the rest of the site moves).
    let held = highest_kw <= limit;

    // Whatever arrived before the broker went is taken in first, so that only what follows
    // its return counts.
    utility.drain();
    let from = utility.seen.len();
    broker.restart(true).expect("the broker restarts");
    let back = Instant::now();
    let ms = |since: Instant| since.elapsed().as_secs_f64() * 1000.0;
    utility
        .wait_from(from, scene.status, Duration::from_secs(30), |s| {
            s["online"] == true
        })
        .await;
    let online_ms = ms(back);
    utility
        .wait_from(from, scene.ack, Duration::from_secs(30), active)
        .await;
    let announced_ms = ms(back);
    let logged = line_count() - lines;
    println!("the controller's log over the outage:");
    for l in read_log().lines().skip(lines) {
        println!("  {l}");
    }
    println!(
        "broker gone {:.0} s mid-event: shed held {} (site at most {highest_kw:.0} kW under a {limit:.0} kW limit; {off} ASICs off, fewest {fewest_off}; {writes_during} writes meanwhile); online again {online_ms:.0} ms after its return, event re-announced after {announced_ms:.0} ms; {logged} log lines",
        outage.as_secs_f64(),
        if held { "yes" } else { "NO" },
    );
    scene.release(utility, "bench-outage").await;
    utility.seen.clear();
    json!({
        "outage_s": outage.as_secs_f64(),
        "held": held,
        "limit_kw": limit,
        "highest_site_kw": highest_kw,
        "asics_off": off,
        "fewest_off": fewest_off,
        "writes_during": writes_during,
        "online_after_ms": online_ms,
        "reannounced_after_ms": announced_ms,
        "log_lines": logged,
    })
}

/// Waits until the number of ASICs off satisfies `done` and has not changed for 300 ms.
/// Returns that number and, with a limit, how long after `t0` the site meter first read under it.
async fn settle(
    sim: &Sim,
    site_meter: &str,
    limit: Option<f64>,
    t0: Instant,
    done: impl Fn(usize) -> bool,
) -> (usize, Option<f64>) {
    let mut confirmed = None;
    let mut last = sim.asic_relays_off();
    let mut stable_since = Instant::now();
    let deadline = t0 + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(2)).await;
        if let (Some(l), None) = (limit, confirmed)
            && sim.meter_kw(site_meter).unwrap_or(f64::MAX) < l
        {
            confirmed = Some(t0.elapsed().as_secs_f64());
        }
        let off = sim.asic_relays_off();
        if off != last {
            last = off;
            stable_since = Instant::now();
        }
        let settled = done(off) && stable_since.elapsed() > Duration::from_millis(300);
        if (settled && (limit.is_none() || confirmed.is_some())) || Instant::now() > deadline {
            return (off, confirmed);
        }
    }
}

/// The same shed as the first event's, done as a simple script would: one connection at a
/// time, one Write Single Coil per outlet, waiting for each answer. Returns milliseconds.
async fn naive(site: &site_config::Site, sim: &Sim, set: &[(String, Vec<u16>)]) -> f64 {
    let t0 = Instant::now();
    for (pdu, outlets) in set.iter().filter(|(_, o)| !o.is_empty()) {
        let addr = hil::modbus::addr(sim.site(), pdu);
        let unit = site
            .device_endpoint(site.device_by_name(pdu).expect("pdu"))
            .unit_id;
        let Ok(mut ctx) = tcp::connect(addr).await else {
            continue;
        };
        ctx.set_slave(tokio_modbus::Slave(unit));
        for o in outlets {
            let _ = ctx.write_single_coil(o - 1, false).await;
        }
    }
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    // Put the site back as it was.
    for (pdu, outlets) in set {
        let addr = hil::modbus::addr(sim.site(), pdu);
        if let Ok(mut ctx) = tcp::connect(addr).await {
            for o in outlets {
                let _ = ctx.write_single_coil(o - 1, true).await;
            }
        }
    }
    ms
}
