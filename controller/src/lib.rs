//! `controller`: the gridshed edge controller.
//!
//! - [`signal`]: utility signals (native, OpenADR 3.1, maestro) parsed into directives, purely.
//! - [`timeline`]: the directives in force over time, resolved by priority and restriction.
//! - [`planner`]: `plan(site, snapshot, timeline, now) -> Plan`, pure and deterministic.
pub mod planner;
pub mod signal;
pub mod timeline;
