//! The validated site model: what the controller and firmware-sim work from.
//!
//! Everything here has been checked by [`crate::load`]: names resolve to indices, numbers are
//! finite and in range, no outlet is claimed twice. Devices are referred to by typed indices
//! (`PduId`, `MeterId`) into the site's vectors, so a lookup can never miss.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::profile::{MeterProfile, PduProfile};

/// Largest number of outlets one PDU may have: the fixed capacity of a simulated PDU's storage
/// and a bound that keeps every outlet addressable in one Modbus request.
pub const MAX_OUTLETS_PER_PDU: u16 = 64;

/// Index of a PDU in [`Site::pdus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PduId(pub u32);

/// Index of a meter in [`Site::meters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MeterId(pub u32);

/// Index of an ASIC in [`Site::asics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AsicId(pub u32);

/// Index of a GPU rack in [`Site::gpu_racks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GpuRackId(pub u32);

/// Any Modbus device of the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceId {
    Pdu(PduId),
    Meter(MeterId),
}

#[derive(Debug, Clone)]
pub struct Site {
    /// The site file this model was loaded from.
    pub source: PathBuf,
    pub id: String,
    pub name: String,
    /// The subscription import limit: the most the site may ever draw from the grid.
    pub import_limit_kw: f64,
    pub site_meter: MeterId,
    pub mqtt: Mqtt,
    pub pdus: Vec<Pdu>,
    pub meters: Vec<Meter>,
    pub asics: Vec<Asic>,
    pub gpu_racks: Vec<GpuRack>,
    pub policy: Policy,
    /// Where the record of directives, plans and readings is kept; `None`: no record, and
    /// directives do not survive a restart.
    pub journal: Option<Journal>,
    pub reporting: Reporting,
    /// The metrics endpoint and status page; `None`: not served.
    pub http: Option<Http>,
    pub sim: Sim,
}

/// Where a Modbus device answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// An IP literal or a host name.
    pub host: String,
    pub port: u16,
    pub unit_id: u8,
    /// How long one request may take before the device counts as not answering.
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Pdu {
    pub id: PduId,
    pub name: String,
    pub endpoint: Endpoint,
    pub outlets: u16,
    pub profile: Arc<PduProfile>,
}

#[derive(Debug, Clone)]
pub struct Meter {
    pub id: MeterId,
    pub name: String,
    pub endpoint: Endpoint,
    pub profile: Arc<MeterProfile>,
}

/// A sheddable load on one PDU outlet.
#[derive(Debug, Clone)]
pub struct Asic {
    pub id: AsicId,
    pub pdu: PduId,
    /// 1-based outlet number.
    pub outlet: u16,
    pub model: Arc<str>,
    pub rated_w: f64,
    pub efficiency_j_per_th: f64,
    /// Priority class: lower is more important, so the highest class is shed first.
    pub priority: u8,
}

/// A protected load: read through its meter, never written.
#[derive(Debug, Clone)]
pub struct GpuRack {
    pub id: GpuRackId,
    pub name: String,
    pub meter: MeterId,
    pub rated_kw: f64,
    /// The PDU outlets that feed this rack (1-based outlet numbers); nothing may switch them.
    pub feeds: Vec<(PduId, u16)>,
}

#[derive(Debug, Clone)]
pub struct Mqtt {
    /// The primary broker, then an optional fallback used when the first is unreachable.
    pub brokers: Vec<BrokerUrl>,
    pub client_id: String,
    pub keep_alive: Duration,
    /// Names of environment variables holding the credentials (never the secrets themselves).
    pub username_env: Option<String>,
    pub password_env: Option<String>,
    pub tls: Option<TlsFiles>,
    pub signals: Vec<SignalTopic>,
    pub ack_topic: String,
    pub status_topic: String,
    pub status_interval: Duration,
    /// Signals larger than this are refused before parsing.
    pub max_payload_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Certificate files for `mqtts://`, resolved relative to the site file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    /// Client certificate and key for mutual TLS, both or neither.
    pub client_auth: Option<(PathBuf, PathBuf)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignalTopic {
    pub topic: String,
    pub format: SignalFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalFormat {
    /// gridshed's own JSON (README, "Signals").
    Native,
    /// An OpenADR 3.1 event object or the notification that wraps one.
    Openadr3,
    /// `{"target":0|100,"timestamp":UNIX_SECONDS}`.
    Maestro,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// An ASIC switched off stays off at least this long (anti-short-cycle).
    pub min_off: Duration,
    /// An ASIC switched on stays on at least this long, unless an emergency directive says otherwise.
    pub min_on: Duration,
    pub restore_batch_size: u32,
    pub restore_interval: Duration,
    /// The GPU racks' peak power over this window is what the ASIC budget leaves room for.
    pub gpu_peak_window: Duration,
    pub margin_kw: f64,
    /// How often every device is read.
    pub poll_interval: Duration,
    pub stale_signal: StalePolicy,
    /// What OpenADR SIMPLE levels 1, 2 and 3 mean at this site (level 0 is normal operation).
    pub simple_levels: [SimpleAction; 3],
    /// Events held at once (in force or to come): a new one beyond is refused.
    pub max_events: usize,
    /// How long an ended event's id is refused (replay protection, by time).
    pub replay_window: Duration,
    /// How far ahead of the local clock a signal's send time may be.
    pub max_clock_skew: Duration,
}

/// The journal: an append-only, fsync'd JSON Lines file of every directive accepted, every
/// plan and its outcome, and periodic meter readings; what the controller resumes from after a
/// restart and what an operator hands to the utility for settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    /// The live file; rotated files are `path.1` (newest) .. `path.{keep}`.
    pub path: PathBuf,
    /// The live file is rotated once it grows past this.
    pub max_bytes: u64,
    /// How many rotated files are kept.
    pub keep: u32,
    /// How often the meters are recorded.
    pub meter_interval: Duration,
}

/// Measurement and verification of events, and what is reported upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Reporting {
    /// An event's baseline is the mean site power over this long before it starts.
    pub baseline_window: Duration,
    /// An interval complies when its reduction reaches this percentage of the obligation.
    pub compliance_pct: f64,
    /// Where OpenADR 3.1 reports on OpenADR events are published; `None`: none are.
    pub report_topic: Option<String>,
}

/// Where the Prometheus metrics (`/metrics`) and the status page (`/`) are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http {
    /// Port 0 takes a free port (the controller logs which).
    pub listen: std::net::SocketAddr,
}

/// What to do when no signal has arrived for too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StalePolicy {
    /// Keep whatever is in force (default).
    Hold,
    /// Shed every ASIC after `after` without a signal, as some mining contracts require.
    Curtail { after: Duration },
    /// End every directive after `after` without a signal.
    Release { after: Duration },
}

/// What an OpenADR SIMPLE level asks of the site.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum SimpleAction {
    /// Nothing beyond normal operation.
    None,
    /// Cap the site's import at `kw`.
    ImportLimit { kw: f64 },
    /// Reduce ASIC load by `kw`.
    Shed { kw: f64 },
    /// Every sheddable ASIC off.
    ShedAll,
}

/// How firmware-sim plays the site. The controller ignores this section.
#[derive(Debug, Clone, PartialEq)]
pub struct Sim {
    /// Time from a relay command to the relay changing.
    pub relay_delay: Duration,
    /// When set, a PDU switches one outlet at a time, this long apart.
    pub sequence_step: Option<Duration>,
    /// Outlet and meter noise, as a percentage of the value.
    pub noise_pct: f64,
    /// An ASIC's power ramps from 0 to rated over this long after its outlet turns on.
    pub boot_ramp: Duration,
    /// Load the site meter sees beyond ASICs and GPU racks (cooling, offices, racks nobody
    /// meters).
    pub base_load_kw: f64,
    /// That load swings by this much around `base_load_kw` (GPU racks behind no meter of their
    /// own train too): `base + swing * sin(2π t / other_period)`.
    pub other_swing_kw: f64,
    pub other_period: Duration,
    pub frequency_hz: f64,
    pub seed: u64,
    /// One entry per GPU rack, in the order of [`Site::gpu_racks`].
    pub gpu: Vec<GpuSim>,
    pub faults: Vec<(DeviceId, Faults)>,
}

/// A GPU rack's simulated draw: `base_kw + swing_kw * sin(2π t / period)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuSim {
    pub base_kw: f64,
    pub swing_kw: f64,
    pub period: Duration,
}

/// Faults a simulated device can be told to show, from the site file or at run time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Added before every answer.
    #[serde(default)]
    pub latency_ms: u32,
    /// Requests are read and never answered.
    #[serde(default)]
    pub no_reply: bool,
    /// Every request is answered with this Modbus exception code.
    pub exception: Option<u8>,
    /// Every request makes the device drop the TCP connection instead of answering.
    #[serde(default)]
    pub disconnect: bool,
    /// These outlets (1-based) acknowledge writes but their relays never move.
    #[serde(default)]
    pub stuck_outlets: Vec<u16>,
    /// Writes (only) are answered with this Modbus exception code; reads are answered as usual
    /// (a PDU whose firmware refuses the off value, say).
    pub write_exception: Option<u8>,
    /// A meter keeps answering with the value it had when this was set (a stuck register).
    #[serde(default)]
    pub frozen: bool,
}

impl Site {
    pub fn pdu(&self, id: PduId) -> &Pdu {
        &self.pdus[id.0 as usize]
    }

    pub fn meter(&self, id: MeterId) -> &Meter {
        &self.meters[id.0 as usize]
    }

    pub fn asic(&self, id: AsicId) -> &Asic {
        &self.asics[id.0 as usize]
    }

    /// The device's name, as written in the site file.
    pub fn device_name(&self, id: DeviceId) -> &str {
        match id {
            DeviceId::Pdu(p) => &self.pdu(p).name,
            DeviceId::Meter(m) => &self.meter(m).name,
        }
    }

    pub fn device_endpoint(&self, id: DeviceId) -> &Endpoint {
        match id {
            DeviceId::Pdu(p) => &self.pdu(p).endpoint,
            DeviceId::Meter(m) => &self.meter(m).endpoint,
        }
    }

    /// Every device, PDUs first.
    pub fn devices(&self) -> impl Iterator<Item = DeviceId> + '_ {
        let pdus = self.pdus.iter().map(|p| DeviceId::Pdu(p.id));
        pdus.chain(self.meters.iter().map(|m| DeviceId::Meter(m.id)))
    }

    /// Looks a device up by name.
    pub fn device_by_name(&self, name: &str) -> Option<DeviceId> {
        self.devices().find(|d| self.device_name(*d) == name)
    }

    /// Devices the controller must never write: GPU rack meters, the site meter, and PDUs that
    /// feed GPU racks and carry no ASIC.
    pub fn is_protected(&self, id: DeviceId) -> bool {
        match id {
            DeviceId::Meter(_) => true,
            DeviceId::Pdu(p) => !self.asics.iter().any(|a| a.pdu == p),
        }
    }

    /// Sum of the ASICs' rated power.
    pub fn asic_rated_kw(&self) -> f64 {
        self.asics.iter().map(|a| a.rated_w).sum::<f64>() / 1000.0
    }

    pub fn gpu_rated_kw(&self) -> f64 {
        // A fold from +0.0: an empty `sum` of floats is -0.0, which prints as such.
        self.gpu_racks.iter().fold(0.0, |kw, g| kw + g.rated_kw)
    }
}

/// A name as the site file allows it: 1-64 characters of `A-Z a-z 0-9 _ - .`.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}
