//! `site-config`: the typed model of a gridshed site, shared by the controller and firmware-sim
//! so that a simulated site and its controller always agree on every address.
//!
//! - [`load`]: reads a site file (TOML), rejects unknown fields, resolves every name and reports
//!   every problem with the file, the field path and what is wrong.
//! - [`model`]: the validated site: devices, ASICs, GPU racks, MQTT, policy, simulation settings.
//! - [`profile`]: device register maps as data (addresses, function codes, encodings), with the
//!   encode/decode both sides use.
//! - [`error`]: [`ConfigError`] and its [`Problem`]s.

pub mod error;
pub mod load;
pub mod model;
pub mod profile;

pub use error::{ConfigError, Problem};
pub use load::{load, parse};
pub use model::*;
