//! `simulate`: runs the deterministic whole-site simulation (`hil::simulate`) for one seed or
//! for many, and prints what each run did; a broken invariant prints the line that reproduces
//! it and exits non-zero.
//!
//! ```text
//! simulate --seed 0x2a --hours 24          # one site-day, again
//! simulate --runs 200 --hours 10           # 2,000 site-hours from seed 1
//! simulate --soak 100000                   # site-hours until one breaks, or all pass
//! simulate --batch 2000 --base 0x5eed       # CI's batch, again
//! ```

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Deterministic whole-site simulation of the gridshed core")]
struct Args {
    /// The one seed to run (decimal or 0x-hex).
    #[arg(long, value_parser = parse_seed)]
    seed: Option<u64>,
    /// Simulated hours per run.
    #[arg(long, default_value_t = 10.0)]
    hours: f64,
    /// Runs, from --base on (ignored with --seed).
    #[arg(long, default_value_t = 20)]
    runs: u64,
    /// The first seed of a batch.
    #[arg(long, value_parser = parse_seed, default_value = "1")]
    base: u64,
    /// Skip the first runs of the batch (to pick a batch up where it broke).
    #[arg(long, default_value_t = 0)]
    skip: u64,
    /// A long soak: this many site-hours, in runs of --hours.
    #[arg(long)]
    soak: Option<f64>,
    /// CI's batch of this many site-hours from --base (`tests/tests/simulation.rs` runs
    /// `--batch 2000 --base 0x5eed`): small sites for 10 h, larger ones for fewer.
    #[arg(long, conflicts_with_all = ["seed", "soak"])]
    batch: Option<f64>,
    /// Let 12,000-ASIC sites come out (slower; --batch always does). A seed draws another
    /// site with it than without: a failure's line says which.
    #[arg(long)]
    large: bool,
    /// Print the controller's log (RUST_LOG filter, `info` if unset) with simulated times.
    #[arg(long)]
    log: bool,
    /// Print every event of the simulation (with --seed).
    #[arg(long)]
    trace: bool,
}

fn parse_seed(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?} is not a seed: {e}"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.log {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .without_time()
            .init();
    }
    if !(args.hours > 0.0 && args.hours <= 24.0 * 30.0) {
        eprintln!("--hours must be in (0, 720]");
        return ExitCode::from(2);
    }
    let runs: Vec<(u64, f64)> = match (args.seed, args.soak, args.batch) {
        (Some(s), _, _) => vec![(s, args.hours)],
        (None, _, Some(total)) => hil::simulate::batch(args.base, total),
        (None, Some(total), None) => (0..(total / args.hours).ceil() as u64)
            .map(|k| (hil::simulate::seed(args.base, k), args.hours))
            .collect(),
        (None, None, None) => (args.skip..args.runs)
            .map(|k| (hil::simulate::seed(args.base, k), args.hours))
            .collect(),
    };
    let started = Instant::now();
    let mut hours = 0.0;
    for (seed, run_hours) in runs {
        let large = args.large || args.batch.is_some();
        if args.log || args.trace {
            eprintln!("running seed {seed:#x}");
        }
        match hil::simulate::run_traced(seed, run_hours, large, args.trace) {
            Ok(summary) => {
                hours += summary.simulated.as_secs_f64() / 3600.0;
                println!("{summary}");
            }
            Err(failure) => {
                eprintln!("{failure}\n  site file:\n{}", failure.site_file);
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "{hours:.0} site-hours in {:.1} s, every invariant held",
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}
