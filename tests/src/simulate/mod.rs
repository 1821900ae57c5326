//! Deterministic simulation of whole sites: the controller's pure core
//! (`controller::decide::core`) against firmware-sim's device physics, in one thread, on
//! virtual time, with no sockets. The anchors are TigerBeetle's VOPR, FoundationDB's
//! simulation testing and tokio's turmoil: the simulator owns the clock, the devices, the
//! broker, the disk and the faults; a seed decides everything; the invariants are checked as
//! it runs; a failing seed prints the one line that reproduces it.
//!
//! A run is one site-day (or part of one): [`shape`] draws a site from the seed (tens to 12,000
//! ASICs, unmetered load that may swing, metered GPU racks or none, PDUs of two vendors, devices
//! behind gateways), then the utility sends events in all three formats (overlapping, future,
//! open-ended, released, bursts, replays), and the world breaks things: silent devices, closed
//! ports, refused writes, stuck relays, slow answers, frozen meters, dropped connections,
//! broker outages, controller crashes (with the journal's unsynced tail lost or torn), clock
//! jumps, load steps. [`check`] holds the invariants:
//!
//! - nothing is ever written to a GPU rack's outlets or to a meter;
//! - once the controller has had time to answer, the site is under every limit that the
//!   ASICs it can switch can meet, and otherwise status reports a shortfall at least the real
//!   excess;
//! - no ASIC is restored while the site is over a limit it could meet;
//! - minimum off-times always, minimum on-times except in an emergency (or across a crash that
//!   lost the switch's record);
//! - toggles per ASIC per hour bounded by what happened that hour;
//! - every event acknowledged as accepted reaches a `completed` acknowledgement, and nothing
//!   acknowledged is forgotten by a restart;
//! - the journal read back gives the core's state.
//!
//! ```text
//! cargo run --release -p hil --bin simulate -- --seed 42 --hours 24
//! ```

pub mod check;
pub mod disk;
pub mod plant;
pub mod shape;
pub mod world;

use std::time::{Duration, Instant};

pub use check::Broken;

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub seed: u64,
    pub site: String,
    pub asics: usize,
    pub simulated: Duration,
    pub took: Duration,
    pub tally: check::Tally,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.tally;
        write!(
            f,
            "seed {:#x}: {:.1} h in {:.2} s; {}; {} signals ({} taken, {} refused), {} faults, {} restarts, {} broker outages, {} clock jumps, {} relay toggles, {} journal rotations, worst reported shortfall {:.1} kW",
            self.seed,
            self.simulated.as_secs_f64() / 3600.0,
            self.took.as_secs_f64(),
            self.site,
            t.signals,
            t.accepted,
            t.rejected,
            t.faults,
            t.restarts,
            t.outages,
            t.jumps,
            t.toggles,
            t.rotations,
            t.worst_excess_kw,
        )
    }
}

/// A broken invariant, and how to see it again.
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    pub hours: f64,
    /// The run let 12,000-ASIC sites come out (the seed draws another site without).
    pub large_ok: bool,
    pub at: Duration,
    pub broken: Broken,
    pub site: String,
    pub site_file: String,
}

impl Failure {
    /// The one line that reproduces it.
    pub fn command(&self) -> String {
        format!(
            "cargo run --release -p hil --bin simulate -- --seed {:#x} --hours {}{}",
            self.seed,
            self.hours,
            if self.large_ok { " --large" } else { "" }
        )
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invariant broken: {}\n  at {:.3} s of seed {:#x}: {}\n  site: {}\n  reproduce: {}",
            self.broken.invariant,
            self.at.as_secs_f64(),
            self.seed,
            self.broken.detail,
            self.site,
            self.command()
        )
    }
}

/// Runs the site-day of `seed` for `hours`; `large_ok` lets a 12,000-ASIC site come out.
pub fn run(seed: u64, hours: f64, large_ok: bool) -> Result<Summary, Box<Failure>> {
    run_traced(seed, hours, large_ok, false)
}

/// [`run`], printing every event to stderr when `trace`.
pub fn run_traced(
    seed: u64,
    hours: f64,
    large_ok: bool,
    trace: bool,
) -> Result<Summary, Box<Failure>> {
    let started = Instant::now();
    let mut world = world::World::new(seed, hours, large_ok);
    world.trace = trace;
    let site = world.shape.summary.clone();
    let asics = world.shape.site.asics.len();
    match world.run() {
        Ok(()) => Ok(Summary {
            seed,
            site,
            asics,
            simulated: world.simulated(),
            took: started.elapsed(),
            tally: world.tally.clone(),
        }),
        Err(broken) => Err(Box::new(Failure {
            seed,
            hours,
            large_ok,
            at: world.simulated(),
            broken,
            site,
            site_file: world.shape.text.clone(),
        })),
    }
}

/// The site that `seed` draws (what [`run`] would simulate), without running it.
pub fn shape_of(seed: u64, large_ok: bool) -> shape::Shape {
    let mut rng = <rand::rngs::SmallRng as rand::SeedableRng>::seed_from_u64(seed);
    shape::generate(&mut rng, large_ok)
}

/// Hours per run of a small site in a [`batch`].
pub const BATCH_HOURS: f64 = 10.0;
/// A run costs about the number of device reads per simulated second: (PDUs + meters) / poll
/// period. In a [`batch`], a site that reads more than this runs for proportionally fewer
/// hours (a quarter of one at least), so that a batch's time stays bounded while it keeps
/// sites of every size, 12,000-ASIC ones included.
pub const BATCH_READS_PER_S: f64 = 16.0;
pub const BATCH_MIN_HOURS: f64 = 0.25;

/// Runs from seed `base` on, each with its hours, until they make `site_hours`: what CI runs
/// (`tests/tests/simulation.rs`) and `simulate --batch` runs again. Large sites may come out
/// (run them with `large_ok`).
pub fn batch(base: u64, site_hours: f64) -> Vec<(u64, f64)> {
    let mut runs = Vec::new();
    let mut planned = 0.0;
    let mut k = 0;
    while planned < site_hours {
        let s = seed(base, k);
        let site = shape_of(s, true).site;
        let reads_per_s =
            (site.pdus.len() + site.meters.len()) as f64 / site.policy.poll_interval.as_secs_f64();
        let hours =
            (BATCH_HOURS * BATCH_READS_PER_S / reads_per_s).clamp(BATCH_MIN_HOURS, BATCH_HOURS);
        runs.push((s, hours));
        planned += hours;
        k += 1;
    }
    runs
}

/// The seed of run `k` of a batch starting at `base`: spread over the whole space.
pub fn seed(base: u64, k: u64) -> u64 {
    base.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}
