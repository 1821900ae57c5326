//! The deterministic whole-site simulation (`hil::simulate`) as a test: thousands of seeded
//! site-hours, every invariant checked at every tick, plus the seeds that once broke one. A
//! failure prints the seed and the one line that reproduces it. `simulate --soak N` runs more
//! (README, "Deterministic simulation").

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Simulated site-hours per run of the suite.
const SITE_HOURS: f64 = 2000.0;
/// Seeds that broke an invariant once, each kept after its fix: (seed, hours, what it found).
const REGRESSIONS: &[(u64, f64, &str)] = &[
    (
        0x1,
        10.0,
        "a journal checkpoint listing switched outlets could not be read back after a crash",
    ),
    (
        0x248e_0b2b_1c06_b67e,
        10.0,
        "broke an invariant while the simulation and the core were being built",
    ),
    (
        0x5384_5412_7b09_6494,
        10.0,
        "broke an invariant while the simulation and the core were being built",
    ),
    (
        0x89b4_bc14_84a0_b533,
        10.0,
        "the checker held an emergency shed to the minimum on-time",
    ),
    (
        0x6670_0266_a989_33d0,
        10.0,
        "a PDU silent since a restart answered with its ASICs off, and the site was restored over its limit",
    ),
    (
        0x6031_76f5_b481_7a78,
        10.0,
        "the checker blamed the controller for a load step it could not see (site meter down)",
    ),
    (
        0x2e2a_c13e_f8f2_eaa0,
        10.0,
        "a maestro send time forgotten at runtime after a backward clock jump parted the core from its journal",
    ),
    (
        0x7156_09f7_c747_857f,
        3.6363636363636362,
        "the checker wanted the other outlets of a PDU with a stuck relay shed, which the controller rightly leaves alone during its backoff",
    ),
    (
        0x8bc9_953a_2ba0_0cb0,
        10.0,
        "a steady site meter was taken for frozen when a PDU silent since a restart answered",
    ),
];

#[test]
fn the_seeds_that_once_broke_an_invariant_keep_every_invariant() {
    for &(seed, hours, found) in REGRESSIONS {
        if let Err(failure) = hil::simulate::run(seed, hours, true) {
            panic!("regression ({found}):\n{failure}");
        }
    }
}

#[test]
fn thousands_of_simulated_site_hours_keep_every_invariant() {
    let started = Instant::now();
    let batch = hil::simulate::batch(0x5eed, SITE_HOURS);
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let hours = Mutex::new(0.0);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some(&(seed, run_hours)) = batch.get(next.fetch_add(1, Ordering::Relaxed))
                {
                    match hil::simulate::run(seed, run_hours, true) {
                        Ok(summary) => {
                            *hours.lock().unwrap() += summary.simulated.as_secs_f64() / 3600.0
                        }
                        Err(failure) => {
                            failures.lock().unwrap().push(failure.to_string());
                            // The others stop at their next run.
                            next.store(batch.len(), Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let hours = hours.into_inner().unwrap();
    eprintln!(
        "{hours:.0} simulated site-hours in {} runs in {:.1} s",
        batch.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(hours >= SITE_HOURS, "{hours:.0} site-hours simulated");
}
