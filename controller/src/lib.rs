//! `controller`: the gridshed edge controller.
//!
//! - [`signal`]: utility signals (native, OpenADR 3.1, maestro) parsed into directives, purely.
//! - [`timeline`]: the directives in force over time, resolved by priority and restriction.
pub mod signal;
pub mod timeline;
