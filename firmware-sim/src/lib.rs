//! `firmware-sim`: the PDUs and meters of a gridshed site file, simulated on loopback Modbus TCP
//! so the whole control loop runs hardware-in-loop on one machine.
//!
//! - [`device`]: physics without I/O: relays with operate delay and sequencing, outlet power with
//!   boot ramp and noise, GPU rack meters with training oscillation. Fixed-capacity storage.
//! - [`handler`]: the pure request handler, `handle(&mut Device, &Request) -> Result<Response,
//!   ExceptionCode>`, answering exactly as the device's profile says (exceptions 01, 02, 03).
//! - [`plant`]: the whole site without sockets or a clock: devices as found at power-up, the
//!   physics that ties them together, and how a faulted device answers. What a deterministic
//!   simulation drives on virtual time.
//! - [`server`]: [`Sim`]: listeners (tokio-modbus), the physics clock, fault injection
//!   (latency, no reply, exception, disconnect, stuck relays) and write counters for tests.

pub mod device;
pub mod handler;
pub mod plant;
pub mod server;

pub use server::{Bind, OutletView, Sim, SimError, SimOptions};
