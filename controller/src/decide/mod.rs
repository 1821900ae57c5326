//! Deciding: the control core and everything it decides with. Pure: no I/O, no tokio, no
//! clock. Time, readings and signals come in as arguments; orders, acknowledgements, status,
//! records and reports go out as values. The shell (`crate::shell`) owns the sockets and the
//! timers and applies what comes out.
//!
//! - [`core`]: the state machine: inputs and `now` in, effects out.
//! - [`signal`]: utility signals (native, OpenADR 3.1, maestro) parsed into directives.
//! - [`timeline`]: the directives in force over time, by priority and restriction.
//! - [`replay`]: refuses signals that would bring back an event that has ended.
//! - [`state`]: the journal's records and the state a restart resumes from.
//! - [`health`]: one health record per device: readable, switchable, what is shown.
//! - [`fleet`]: what is known of every outlet; the one place writes are ordered and verified.
//! - [`estimate`]: the GPU peak and the other load, from readings taken at other instants.
//! - [`planner`]: `plan(site, snapshot, timeline, now) -> Plan`.
//! - [`mv`]: measurement and verification of each event.
//! - [`openadr`]: OpenADR 3.1 reports.
//! - [`time`]: the two clocks (wall and monotonic) the core is given.
pub mod core;
pub mod estimate;
pub mod fleet;
pub mod health;
pub mod intake;
pub mod mv;
pub mod openadr;
pub mod planner;
pub mod replay;
pub mod signal;
pub mod state;
pub mod time;
pub mod timeline;
