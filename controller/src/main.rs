//! `gridshed`: run the controller, check a site file, or dry-run a signal.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use controller::decide::planner::{Planner, Snapshot};
use controller::decide::signal::{self, Signal};
use controller::decide::timeline::Timeline;
use site_config::{SignalFormat, Site};

/// Grid demand response for mining + AI sites: utility signals in over MQTT, ASIC outlets
/// switched over Modbus TCP, GPU racks never touched.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Connect to the broker and every device, and follow the utility's signals until SIGINT or
    /// SIGTERM (outlets are left as they are on exit).
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a site file and print a summary of it.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Dry run: which ASICs a signal would switch off, against rated powers (no I/O).
    Plan {
        #[arg(long)]
        config: PathBuf,
        /// A file holding one signal (JSON).
        #[arg(long)]
        signal: PathBuf,
        /// The signal's format; guessed from its fields when absent.
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Measurement and verification of past events, from a journal: baseline, reduction,
    /// compliance on 1- and 15-minute averages, response times.
    Report {
        /// The journal's live file (the site file's `[journal] path`); rotated files beside it
        /// are read too.
        #[arg(long)]
        journal: PathBuf,
        /// CSV for settlement, one row per 1- and 15-minute interval, instead of the table.
        #[arg(long)]
        csv: bool,
        /// Only this event.
        #[arg(long)]
        event: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Native,
    Openadr3,
    Maestro,
}

impl From<Format> for SignalFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Native => SignalFormat::Native,
            Format::Openadr3 => SignalFormat::Openadr3,
            Format::Maestro => SignalFormat::Maestro,
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match real_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let site = site_config::load(&config)?;
            print!("{}", summary(&site));
            Ok(())
        }
        Command::Plan {
            config,
            signal,
            format,
        } => {
            let site = site_config::load(&config)?;
            let bytes =
                std::fs::read(&signal).with_context(|| format!("reading {}", signal.display()))?;
            let format = format
                .map(Into::into)
                .unwrap_or_else(|| guess_format(&bytes));
            print!("{}", dry_run(&site, format, &bytes)?);
            Ok(())
        }
        Command::Report {
            journal,
            csv,
            event,
        } => {
            let mut events = controller::show::report::read(&journal)
                .with_context(|| format!("reading the journal {}", journal.display()))?;
            if let Some(id) = &event {
                events.retain(|e| &e.measurement.id == id);
            }
            if events.is_empty() {
                bail!(
                    "no measured event{} in {} (events are measured when they complete)",
                    event.map(|id| format!(" {id:?}")).unwrap_or_default(),
                    journal.display()
                );
            }
            if csv {
                print!("{}", controller::show::report::csv(&events));
            } else {
                print!("{}", controller::show::report::table(&events));
            }
            Ok(())
        }
        Command::Run { config } => {
            let site = site_config::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async {
                tracing::info!(site = %site.id, asics = site.asics.len(), pdus = site.pdus.len(), "starting");
                controller::run(site, shutdown_signal()).await
            })?;
            Ok(())
        }
    }
}

fn summary(site: &Site) -> String {
    let mut s = String::new();
    let gpu_pdus = site
        .pdus
        .iter()
        .filter(|p| site.is_protected(site_config::DeviceId::Pdu(p.id)))
        .count();
    s += &format!(
        "site {} ({}): import limit {} kW\n",
        site.id, site.name, site.import_limit_kw
    );
    s += &format!(
        "devices: {} PDUs ({} carry no ASIC and are never written), {} meters\n",
        site.pdus.len(),
        gpu_pdus,
        site.meters.len()
    );
    let mut models: BTreeMap<&str, (usize, f64)> = BTreeMap::new();
    for a in &site.asics {
        let e = models.entry(&a.model).or_default();
        e.0 += 1;
        e.1 += a.rated_w / 1000.0;
    }
    s += &format!(
        "ASICs: {} ({:.1} kW rated)\n",
        site.asics.len(),
        site.asic_rated_kw()
    );
    for (model, (n, kw)) in models {
        s += &format!("  {model}: {n} ({kw:.1} kW)\n");
    }
    s += &format!(
        "GPU racks: {} ({:.1} kW rated, protected)\n",
        site.gpu_racks.len(),
        site.gpu_rated_kw()
    );
    let brokers: Vec<String> = site.mqtt.brokers.iter().map(|b| b.to_string()).collect();
    s += &format!("broker: {}\n", brokers.join(", then "));
    for t in &site.mqtt.signals {
        s += &format!("  signals: {} ({:?})\n", t.topic, t.format);
    }
    s += &format!(
        "  acks: {}\n  status: {}\n",
        site.mqtt.ack_topic, site.mqtt.status_topic
    );
    match &site.journal {
        Some(j) => {
            s += &format!(
                "journal: {} (rotated at {} MiB, {} kept, meters every {:?})\n",
                j.path.display(),
                j.max_bytes >> 20,
                j.keep,
                j.meter_interval
            )
        }
        None => s += "journal: none (directives will not survive a restart)\n",
    }
    s
}

fn guess_format(bytes: &[u8]) -> SignalFormat {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    if v.get("target").is_some() {
        SignalFormat::Maestro
    } else if v.get("intervals").is_some() || v.get("operation").is_some() {
        SignalFormat::Openadr3
    } else {
        SignalFormat::Native
    }
}

/// Plans `bytes` against a site with every ASIC on and every GPU rack at its rating.
fn dry_run(site: &Site, format: SignalFormat, bytes: &[u8]) -> anyhow::Result<String> {
    let now = jiff::Timestamp::now();
    let cx = signal::Context::new(site, now);
    let sig = match signal::parse(format, bytes, &cx) {
        Ok(s) => s,
        Err(r) => bail!("the signal would be rejected: {}", r.reason),
    };
    let at = match &sig {
        Signal::Event { directives, .. } => directives
            .iter()
            .map(|d| d.start)
            .min()
            .unwrap_or(now)
            .max(now),
        Signal::Release { .. } => now,
    };
    let mut timeline = Timeline::new();
    timeline.apply(&sig);
    let snap = Snapshot::all_on(site, site.gpu_rated_kw());
    let now = controller::decide::time::Now {
        wall: at,
        mono: controller::decide::time::Mono::ZERO,
    };
    let plan = Planner::new(site).plan(site, &snap, &timeline, now);
    let mut out =
        format!("signal: {sig:?}\nplanned at {at} (GPU racks at rated power, no other load)\n");
    let mut by_pdu: BTreeMap<u32, Vec<u16>> = BTreeMap::new();
    let mut off_kw = 0.0;
    for (id, on) in plan.changes(&snap) {
        if !on {
            let a = site.asic(id);
            by_pdu.entry(a.pdu.0).or_default().push(a.outlet);
            off_kw += a.rated_w / 1000.0;
        }
    }
    for (pdu, outlets) in &by_pdu {
        out += &format!(
            "  {}: outlets {:?} off\n",
            site.pdus[*pdu as usize].name, outlets
        );
    }
    let off = by_pdu.values().map(Vec::len).sum::<usize>();
    out += &format!(
        "{off} of {} ASICs off ({off_kw:.1} kW); ASICs {:.1} kW, rest of the site {:.1} kW; limit {:.1} kW, budget for ASICs {:.1} kW",
        site.asics.len(),
        plan.planned_asic_kw,
        plan.rest_kw,
        plan.limit_kw,
        plan.budget_kw
    );
    if plan.shortfall_kw > 0.0 {
        out += &format!("; shortfall {:.1} kW", plan.shortfall_kw);
    }
    out.push('\n');
    Ok(out)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}
