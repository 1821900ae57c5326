//! Reading a site file: TOML into the file's own shape (`deny_unknown_fields`), then one
//! validation pass that resolves every name and collects every problem with its field path.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{ConfigError, Problems};
use crate::model::*;
use crate::profile::{self, Profile};

// ---------------------------------------------------------------------------------------------
// The file's shape. Field names carry their units; see config/sites/small.toml for the reference.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteFile {
    site: SiteSection,
    mqtt: MqttSection,
    /// Extra profile files, relative to the site file.
    #[serde(default)]
    profiles: Vec<String>,
    #[serde(default)]
    pdus: Vec<PduDecl>,
    #[serde(default)]
    meters: Vec<MeterDecl>,
    #[serde(default)]
    asics: Vec<AsicGroup>,
    #[serde(default)]
    gpu_racks: Vec<GpuRackDecl>,
    #[serde(default)]
    policy: PolicySection,
    journal: Option<JournalSection>,
    #[serde(default)]
    reporting: ReportingSection,
    http: Option<HttpSection>,
    #[serde(default)]
    sim: SimSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportingSection {
    #[serde(default = "default_baseline_window_s")]
    baseline_window_s: f64,
    #[serde(default = "default_compliance_pct")]
    compliance_pct: f64,
    report_topic: Option<String>,
}

impl Default for ReportingSection {
    fn default() -> Self {
        ReportingSection {
            baseline_window_s: default_baseline_window_s(),
            compliance_pct: default_compliance_pct(),
            report_topic: None,
        }
    }
}

fn default_baseline_window_s() -> f64 {
    300.0
}
fn default_compliance_pct() -> f64 {
    95.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    port: u16,
    #[serde(default = "default_http_bind")]
    bind: String,
}

fn default_http_bind() -> String {
    "127.0.0.1".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalSection {
    /// Relative to the site file.
    path: String,
    #[serde(default = "default_journal_max_mb")]
    max_mb: u32,
    #[serde(default = "default_journal_keep")]
    keep: u32,
    #[serde(default = "default_journal_meter_interval_s")]
    meter_interval_s: f64,
}

fn default_journal_max_mb() -> u32 {
    64
}
fn default_journal_keep() -> u32 {
    10
}
fn default_journal_meter_interval_s() -> f64 {
    2.0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteSection {
    id: String,
    name: String,
    import_limit_kw: f64,
    meter: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MqttSection {
    urls: Vec<String>,
    client_id: String,
    #[serde(default = "default_keep_alive_s")]
    keep_alive_s: u32,
    username_env: Option<String>,
    password_env: Option<String>,
    ca_file: Option<String>,
    client_cert_file: Option<String>,
    client_key_file: Option<String>,
    signals: Vec<SignalDecl>,
    ack_topic: String,
    status_topic: String,
    #[serde(default = "default_status_interval_s")]
    status_interval_s: u32,
    #[serde(default = "default_max_payload_bytes")]
    max_payload_bytes: usize,
}

fn default_keep_alive_s() -> u32 {
    15
}
fn default_status_interval_s() -> u32 {
    5
}
fn default_max_payload_bytes() -> usize {
    16 * 1024
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalDecl {
    topic: String,
    format: SignalFormat,
}

/// Where the devices of a group get their addresses: consecutive ports on one host, or
/// consecutive IPv4 hosts on one port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Step {
    #[default]
    Port,
    Host,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PduDecl {
    name: String,
    count: Option<u32>,
    #[serde(default)]
    step: Step,
    host: String,
    port: u16,
    #[serde(default = "default_unit_id")]
    unit_id: u8,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u32,
    outlets: u16,
    profile: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeterDecl {
    name: String,
    count: Option<u32>,
    #[serde(default)]
    step: Step,
    host: String,
    port: u16,
    #[serde(default = "default_unit_id")]
    unit_id: u8,
    #[serde(default = "default_timeout_ms")]
    timeout_ms: u32,
    profile: String,
}

fn default_unit_id() -> u8 {
    1
}
fn default_timeout_ms() -> u32 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AsicGroup {
    /// A PDU, or a PDU group declared with `count`.
    pdu: String,
    /// For a group: the first and last member (1-based, inclusive); absent = all members.
    members: Option<[u32; 2]>,
    /// First and last outlet (1-based, inclusive).
    outlets: [u16; 2],
    model: String,
    rated_w: f64,
    efficiency_j_per_th: f64,
    priority: u8,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuRackDecl {
    name: String,
    meter: String,
    rated_kw: f64,
    #[serde(default)]
    feeds: Vec<FeedDecl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedDecl {
    pdu: String,
    outlets: [u16; 2],
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct PolicySection {
    min_off_s: f64,
    min_on_s: f64,
    restore_batch_size: u32,
    restore_interval_s: f64,
    gpu_peak_window_s: f64,
    margin_kw: f64,
    poll_interval_ms: u32,
    stale_signal: StaleDecl,
    simple: SimpleDecl,
    max_events: u32,
    replay_window_h: f64,
    max_clock_skew_s: f64,
}

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            min_off_s: 60.0,
            min_on_s: 300.0,
            restore_batch_size: 10,
            restore_interval_s: 10.0,
            gpu_peak_window_s: 60.0,
            margin_kw: 0.0,
            poll_interval_ms: 1000,
            stale_signal: StaleDecl::default(),
            simple: SimpleDecl::default(),
            max_events: 256,
            replay_window_h: 168.0,
            max_clock_skew_s: 300.0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaleDecl {
    action: StaleAction,
    after_s: Option<f64>,
}

impl Default for StaleDecl {
    fn default() -> Self {
        StaleDecl {
            action: StaleAction::Hold,
            after_s: None,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StaleAction {
    Hold,
    Curtail,
    Release,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SimpleDecl {
    level_1: SimpleAction,
    level_2: SimpleAction,
    level_3: SimpleAction,
}

impl Default for SimpleDecl {
    fn default() -> Self {
        SimpleDecl {
            level_1: SimpleAction::None,
            level_2: SimpleAction::None,
            level_3: SimpleAction::ShedAll,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SimSection {
    relay_delay_ms: u32,
    sequence_step_ms: u32,
    noise_pct: f64,
    boot_ramp_s: f64,
    base_load_kw: f64,
    other_swing_kw: f64,
    other_period_s: f64,
    frequency_hz: f64,
    seed: u64,
    gpu: Vec<GpuSimDecl>,
    faults: Vec<FaultDecl>,
}

impl Default for SimSection {
    fn default() -> Self {
        SimSection {
            relay_delay_ms: 0,
            sequence_step_ms: 0,
            noise_pct: 0.0,
            boot_ramp_s: 0.0,
            base_load_kw: 0.0,
            other_swing_kw: 0.0,
            other_period_s: 2.0,
            frequency_hz: 60.0,
            seed: 1,
            gpu: Vec::new(),
            faults: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuSimDecl {
    rack: String,
    base_kw: f64,
    #[serde(default)]
    swing_kw: f64,
    #[serde(default = "default_swing_period_s")]
    period_s: f64,
}

fn default_swing_period_s() -> f64 {
    1.0
}

// No `deny_unknown_fields` here: serde cannot combine it with `flatten` (it would reject every
// fault key); unknown keys are collected in `FaultFields::unknown` and reported at their path.
#[derive(Debug, Deserialize)]
struct FaultDecl {
    device: String,
    #[serde(flatten)]
    faults: FaultFields,
}

/// `Faults` without `deny_unknown_fields`, which serde cannot combine with `flatten`;
/// unknown keys are caught by comparing against the known names below.
#[derive(Debug, Deserialize)]
struct FaultFields {
    #[serde(default)]
    latency_ms: u32,
    #[serde(default)]
    no_reply: bool,
    exception: Option<u8>,
    #[serde(default)]
    disconnect: bool,
    #[serde(default)]
    stuck_outlets: Vec<u16>,
    write_exception: Option<u8>,
    #[serde(default)]
    frozen: bool,
    #[serde(flatten)]
    unknown: HashMap<String, toml::Value>,
}

// ---------------------------------------------------------------------------------------------

/// Reads, parses and validates the site file at `path`.
pub fn load(path: impl AsRef<Path>) -> Result<Site, ConfigError> {
    let path = path.as_ref();
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: file.clone(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates a site file's text; `path` names it in errors and anchors relative paths.
pub fn parse(path: &Path, text: &str) -> Result<Site, ConfigError> {
    let file = path.display().to_string();
    let raw: SiteFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
        file: file.clone(),
        message: e.to_string().trim_end().to_owned(),
    })?;
    let base = path.parent().unwrap_or(Path::new(""));
    let mut p = Problems::new(file);
    let profiles = load_profiles(base, &raw.profiles, &mut p);
    let site = Resolver {
        p: &mut p,
        base,
        profiles,
    }
    .site(path, raw);
    p.finish()?;
    // The resolver only yields `None` after pushing a problem, so this is unreachable.
    site.ok_or_else(|| ConfigError::Parse {
        file: path.display().to_string(),
        message: "invalid site file".into(),
    })
}

fn load_profiles(base: &Path, extra: &[String], p: &mut Problems) -> HashMap<String, Profile> {
    let mut out = HashMap::new();
    for (name, text) in profile::BUILTIN {
        if let Ok(profile) = Profile::from_toml(name, text) {
            out.insert(profile.name().to_owned(), profile);
        }
    }
    for (i, rel) in extra.iter().enumerate() {
        let field = format!("profiles[{i}]");
        let path = base.join(rel);
        let loaded = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|text| {
                Profile::from_toml(&path.display().to_string(), &text).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(profile) => {
                if out.insert(profile.name().to_owned(), profile).is_some() {
                    p.push(field, "defines a profile name that is already defined");
                }
            }
            Err(e) => p.push(field, e),
        }
    }
    out
}

struct Resolver<'a> {
    p: &'a mut Problems,
    base: &'a Path,
    profiles: HashMap<String, Profile>,
}

/// A device of a group, after expansion.
struct Expanded {
    name: String,
    endpoint: Endpoint,
}

/// A device before its profile is known to be good; the site is only built when all are.
struct Draft<P> {
    /// Index of the declaration in `[[pdus]]` or `[[meters]]`, for error paths.
    decl: usize,
    name: String,
    endpoint: Endpoint,
    outlets: u16,
    profile: Option<Arc<P>>,
}

impl Resolver<'_> {
    fn site(&mut self, path: &Path, raw: SiteFile) -> Option<Site> {
        let s = &raw.site;
        if !is_name(&s.id) {
            self.p
                .push("site.id", "must be 1-64 characters of A-Z a-z 0-9 _ - .");
        }
        if s.name.trim().is_empty() {
            self.p.push("site.name", "must not be empty");
        }
        self.kw("site.import_limit_kw", s.import_limit_kw, false);

        let mqtt = self.mqtt(&raw.mqtt);

        // PDUs and meters, with groups expanded.
        let mut pdus = Vec::new();
        let mut pdu_groups: HashMap<String, (usize, Vec<PduId>)> = HashMap::new();
        for (i, d) in raw.pdus.iter().enumerate() {
            let at = format!("pdus[{i}]");
            let profile = self.profile(&format!("{at}.profile"), &d.profile, true);
            if d.outlets == 0 || d.outlets > MAX_OUTLETS_PER_PDU {
                self.p.push(
                    format!("{at}.outlets"),
                    format!("must be 1..={MAX_OUTLETS_PER_PDU} (got {})", d.outlets),
                );
            } else if let Some(prof) = &profile
                && let Err(e) = prof.check_outlets(d.outlets)
            {
                self.p.push(format!("{at}.outlets"), e);
            }
            let profile = match profile {
                Some(Profile::Pdu(prof)) => Some(Arc::new(prof)),
                _ => None,
            };
            let members = self.expand(
                &at,
                &d.name,
                d.count,
                d.step,
                &d.host,
                d.port,
                d.unit_id,
                d.timeout_ms,
            );
            let mut ids = Vec::new();
            for m in members {
                let id = PduId(pdus.len() as u32);
                ids.push(id);
                pdus.push(Draft {
                    decl: i,
                    name: m.name,
                    endpoint: m.endpoint,
                    outlets: d.outlets,
                    profile: profile.clone(),
                });
            }
            if d.count.is_some() {
                pdu_groups.insert(d.name.clone(), (i, ids));
            }
        }
        let mut meters = Vec::new();
        for (i, d) in raw.meters.iter().enumerate() {
            let at = format!("meters[{i}]");
            let profile = match self.profile(&format!("{at}.profile"), &d.profile, false) {
                Some(Profile::Meter(prof)) => Some(Arc::new(prof)),
                _ => None,
            };
            for m in self.expand(
                &at,
                &d.name,
                d.count,
                d.step,
                &d.host,
                d.port,
                d.unit_id,
                d.timeout_ms,
            ) {
                meters.push(Draft {
                    decl: i,
                    name: m.name,
                    endpoint: m.endpoint,
                    outlets: 0,
                    profile: profile.clone(),
                });
            }
        }
        self.unique_devices(&pdus, &meters);

        let pdu_by_name: HashMap<&str, PduId> = pdus
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.as_str(), PduId(i as u32)))
            .collect();
        let meter_by_name: HashMap<&str, MeterId> = meters
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.as_str(), MeterId(i as u32)))
            .collect();

        let site_meter = meter_by_name.get(s.meter.as_str()).copied();
        if site_meter.is_none() {
            self.p.push(
                "site.meter",
                format!("no meter named {:?} in [[meters]]", s.meter),
            );
        }

        // GPU racks first, so that ASIC groups can be checked against their feeds.
        let mut claimed: HashMap<(PduId, u16), String> = HashMap::new();
        let mut gpu_racks = Vec::new();
        let mut rack_meters = HashSet::new();
        for (i, g) in raw.gpu_racks.iter().enumerate() {
            let at = format!("gpu_racks[{i}]");
            if !is_name(&g.name) {
                self.p.push(
                    format!("{at}.name"),
                    "must be 1-64 characters of A-Z a-z 0-9 _ - .",
                );
            }
            if raw.gpu_racks[..i].iter().any(|o| o.name == g.name) {
                self.p.push(
                    format!("{at}.name"),
                    format!("{:?} is declared twice", g.name),
                );
            }
            self.kw(&format!("{at}.rated_kw"), g.rated_kw, false);
            let meter = meter_by_name.get(g.meter.as_str()).copied();
            match meter {
                None => self.p.push(
                    format!("{at}.meter"),
                    format!("no meter named {:?}", g.meter),
                ),
                Some(m) if Some(m) == site_meter => self.p.push(
                    format!("{at}.meter"),
                    "is the site meter; a GPU rack needs its own meter",
                ),
                Some(m) if !rack_meters.insert(m) => self.p.push(
                    format!("{at}.meter"),
                    format!("{:?} already meters another GPU rack", g.meter),
                ),
                Some(_) => {}
            }
            let mut feeds = Vec::new();
            for (j, f) in g.feeds.iter().enumerate() {
                let fat = format!("{at}.feeds[{j}]");
                let Some(&pdu) = pdu_by_name.get(f.pdu.as_str()) else {
                    self.p
                        .push(format!("{fat}.pdu"), format!("no PDU named {:?}", f.pdu));
                    continue;
                };
                let Some(range) = self.outlet_range(
                    &format!("{fat}.outlets"),
                    f.outlets,
                    pdus[pdu.0 as usize].outlets,
                ) else {
                    continue;
                };
                for outlet in range {
                    let owner = format!("GPU rack {:?}", g.name);
                    if let Some(prev) = claimed.insert((pdu, outlet), owner) {
                        self.p.push(
                            format!("{fat}.outlets"),
                            format!("outlet {outlet} of {:?} already feeds {prev}", f.pdu),
                        );
                    }
                    feeds.push((pdu, outlet));
                }
            }
            gpu_racks.push(GpuRack {
                id: GpuRackId(i as u32),
                name: g.name.clone(),
                meter: meter.unwrap_or(MeterId(0)),
                rated_kw: g.rated_kw,
                feeds,
            });
        }

        let mut asics = Vec::new();
        for (i, a) in raw.asics.iter().enumerate() {
            let at = format!("asics[{i}]");
            let members: Vec<PduId> = match (
                pdu_groups.get(&a.pdu),
                pdu_by_name.get(a.pdu.as_str()),
                a.members,
            ) {
                (Some((_, ids)), _, None) => ids.clone(),
                (Some((_, ids)), _, Some([first, last])) => {
                    if first == 0 || first > last || last as usize > ids.len() {
                        self.p.push(
                            format!("{at}.members"),
                            format!("must be [first, last] with 1 <= first <= last <= {} (got [{first}, {last}])", ids.len()),
                        );
                        continue;
                    }
                    ids[first as usize - 1..last as usize].to_vec()
                }
                (None, Some(&id), None) => vec![id],
                (None, Some(_), Some(_)) => {
                    self.p.push(
                        format!("{at}.members"),
                        format!(
                            "{:?} is a single PDU, not a group declared with count",
                            a.pdu
                        ),
                    );
                    continue;
                }
                (None, None, _) => {
                    self.p.push(
                        format!("{at}.pdu"),
                        format!("no PDU or PDU group named {:?}", a.pdu),
                    );
                    continue;
                }
            };
            if a.model.trim().is_empty() {
                self.p.push(format!("{at}.model"), "must not be empty");
            }
            self.range(&format!("{at}.rated_w"), a.rated_w, 1.0, 20_000.0);
            self.range(
                &format!("{at}.efficiency_j_per_th"),
                a.efficiency_j_per_th,
                1.0,
                500.0,
            );
            let model: Arc<str> = Arc::from(a.model.as_str());
            let mut reported = false;
            for pdu in members {
                let outlets = pdus[pdu.0 as usize].outlets;
                let Some(range) = self.outlet_range(&format!("{at}.outlets"), a.outlets, outlets)
                else {
                    break;
                };
                for outlet in range {
                    let owner = format!("asics[{i}]");
                    if let Some(prev) = claimed.insert((pdu, outlet), owner) {
                        if !reported {
                            let what = if prev.starts_with("GPU") {
                                "feeds"
                            } else {
                                "is assigned to"
                            };
                            self.p.push(
                                format!("{at}.outlets"),
                                format!(
                                    "outlet {outlet} of {:?} already {what} {prev}",
                                    pdus[pdu.0 as usize].name
                                ),
                            );
                            reported = true;
                        }
                        continue;
                    }
                    asics.push(Asic {
                        id: AsicId(asics.len() as u32),
                        pdu,
                        outlet,
                        model: model.clone(),
                        rated_w: a.rated_w,
                        efficiency_j_per_th: a.efficiency_j_per_th,
                        priority: a.priority,
                    });
                }
            }
        }

        let policy = self.policy(&raw.policy);
        let journal = raw.journal.as_ref().map(|j| self.journal(j));
        let reporting = self.reporting(&raw.reporting, &mqtt);
        let http = raw.http.as_ref().map(|h| self.http(h));
        let sim = self.sim(&raw.sim, &gpu_racks, &pdu_by_name, &meter_by_name, &pdus);

        if !self.p.is_empty() {
            return None;
        }
        let pdus = pdus
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                Some(Pdu {
                    id: PduId(i as u32),
                    name: d.name,
                    endpoint: d.endpoint,
                    outlets: d.outlets,
                    profile: d.profile?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let meters = meters
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                Some(Meter {
                    id: MeterId(i as u32),
                    name: d.name,
                    endpoint: d.endpoint,
                    profile: d.profile?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Site {
            source: path.to_path_buf(),
            id: s.id.clone(),
            name: s.name.clone(),
            import_limit_kw: s.import_limit_kw,
            site_meter: site_meter?,
            mqtt,
            pdus,
            meters,
            asics,
            gpu_racks,
            policy,
            journal,
            reporting,
            http,
            sim,
        })
    }

    fn reporting(&mut self, raw: &ReportingSection, mqtt: &Mqtt) -> Reporting {
        // Longer baselines are the utility's to compute from its own meter data; the
        // controller keeps readings for the last hour only.
        let window = raw.baseline_window_s;
        let baseline_window = if self.range("reporting.baseline_window_s", window, 1.0, 3600.0) {
            Duration::from_secs_f64(window)
        } else {
            Duration::ZERO
        };
        self.range("reporting.compliance_pct", raw.compliance_pct, 1.0, 100.0);
        if let Some(t) = &raw.report_topic {
            self.topic("reporting.report_topic", t);
            let taken = mqtt.signals.iter().any(|s| &s.topic == t)
                || [&mqtt.ack_topic, &mqtt.status_topic].contains(&t);
            if taken {
                self.p.push(
                    "reporting.report_topic",
                    "must differ from the signal, ack and status topics",
                );
            }
        }
        Reporting {
            baseline_window,
            compliance_pct: raw.compliance_pct,
            report_topic: raw.report_topic.clone(),
        }
    }

    fn http(&mut self, raw: &HttpSection) -> Http {
        let ip = raw.bind.parse::<IpAddr>().unwrap_or_else(|_| {
            self.p.push(
                "http.bind",
                format!(
                    "{:?} must be an IP address such as 127.0.0.1 or ::1",
                    raw.bind
                ),
            );
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        });
        Http {
            listen: std::net::SocketAddr::new(ip, raw.port),
        }
    }

    fn journal(&mut self, raw: &JournalSection) -> Journal {
        if raw.path.trim().is_empty() {
            self.p.push("journal.path", "must not be empty");
        }
        if !(1..=100_000).contains(&raw.max_mb) {
            self.p.push(
                "journal.max_mb",
                format!("must be 1..=100000 (got {})", raw.max_mb),
            );
        }
        if !(1..=1000).contains(&raw.keep) {
            self.p.push(
                "journal.keep",
                format!("must be 1..=1000 (got {})", raw.keep),
            );
        }
        let v = raw.meter_interval_s;
        let meter_interval = if self.range("journal.meter_interval_s", v, 0.1, 3600.0) {
            Duration::from_secs_f64(v)
        } else {
            Duration::ZERO
        };
        Journal {
            path: self.base.join(&raw.path),
            max_bytes: u64::from(raw.max_mb) * 1024 * 1024,
            keep: raw.keep,
            meter_interval,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn expand(
        &mut self,
        at: &str,
        name: &str,
        count: Option<u32>,
        step: Step,
        host: &str,
        port: u16,
        unit_id: u8,
        timeout_ms: u32,
    ) -> Vec<Expanded> {
        if !is_name(name) {
            self.p.push(
                format!("{at}.name"),
                "must be 1-64 characters of A-Z a-z 0-9 _ - .",
            );
        }
        let host_ok = self.host(&format!("{at}.host"), host);
        if port == 0 {
            self.p.push(format!("{at}.port"), "must be 1..=65535");
        }
        if !(1..=247).contains(&unit_id) && unit_id != 255 {
            self.p.push(
                format!("{at}.unit_id"),
                format!("must be 1..=247 or 255 (got {unit_id})"),
            );
        }
        if !(1..=60_000).contains(&timeout_ms) {
            self.p.push(
                format!("{at}.timeout_ms"),
                format!("must be 1..=60000 (got {timeout_ms})"),
            );
        }
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let endpoint = |host: String, port: u16| Endpoint {
            host,
            port,
            unit_id,
            timeout,
        };
        let Some(count) = count else {
            return vec![Expanded {
                name: name.to_owned(),
                endpoint: endpoint(host.to_owned(), port),
            }];
        };
        if !(1..=10_000).contains(&count) {
            self.p.push(
                format!("{at}.count"),
                format!("must be 1..=10000 (got {count})"),
            );
            return Vec::new();
        }
        let mut out = Vec::with_capacity(count as usize);
        match step {
            Step::Port => {
                if u32::from(port) + count - 1 > 65_535 {
                    self.p.push(
                        format!("{at}.count"),
                        format!("{count} devices from port {port} run past port 65535"),
                    );
                    return Vec::new();
                }
                for k in 0..count {
                    out.push(Expanded {
                        name: format!("{name}-{}", k + 1),
                        endpoint: endpoint(host.to_owned(), port + k as u16),
                    });
                }
            }
            Step::Host => {
                let Ok(first) = host.parse::<Ipv4Addr>() else {
                    if host_ok {
                        self.p.push(
                            format!("{at}.host"),
                            "step = \"host\" needs an IPv4 address",
                        );
                    }
                    return Vec::new();
                };
                let first = u32::from(first);
                if first.checked_add(count - 1).is_none() {
                    self.p
                        .push(format!("{at}.count"), "runs past 255.255.255.255");
                    return Vec::new();
                }
                for k in 0..count {
                    out.push(Expanded {
                        name: format!("{name}-{}", k + 1),
                        endpoint: endpoint(Ipv4Addr::from(first + k).to_string(), port),
                    });
                }
            }
        }
        out
    }

    fn unique_devices<P, M>(&mut self, pdus: &[Draft<P>], meters: &[Draft<M>]) {
        let mut names: HashSet<&str> = HashSet::new();
        let mut endpoints: HashMap<(String, u16, u8), &str> = HashMap::new();
        let all = pdus
            .iter()
            .map(|d| ("pdus", &d.name, &d.endpoint, d.decl))
            .chain(
                meters
                    .iter()
                    .map(|d| ("meters", &d.name, &d.endpoint, d.decl)),
            );
        for (table, name, ep, decl) in all {
            if !names.insert(name) {
                self.p.push(
                    format!("{table}[{decl}].name"),
                    format!("device name {name:?} is used twice"),
                );
            }
            let key = (canonical_host(&ep.host), ep.port, ep.unit_id);
            if let Some(prev) = endpoints.insert(key, name) {
                self.p.push(
                    format!("{table}[{decl}].port"),
                    format!(
                        "{name:?} and {prev:?} both answer at {}:{} unit {}",
                        ep.host, ep.port, ep.unit_id
                    ),
                );
            }
        }
    }

    fn profile(&mut self, at: &str, name: &str, pdu: bool) -> Option<Profile> {
        let Some(profile) = self.profiles.get(name) else {
            let mut known: Vec<&str> = self.profiles.keys().map(String::as_str).collect();
            known.sort_unstable();
            self.p.push(
                at,
                format!("no profile named {name:?} (known: {})", known.join(", ")),
            );
            return None;
        };
        match (profile, pdu) {
            (Profile::Pdu(_), true) | (Profile::Meter(_), false) => Some(profile.clone()),
            (Profile::Meter(_), true) => {
                self.p.push(
                    at,
                    format!("{name:?} is a meter profile; a PDU needs a pdu profile"),
                );
                None
            }
            (Profile::Pdu(_), false) => {
                self.p.push(
                    at,
                    format!("{name:?} is a PDU profile; a meter needs a meter profile"),
                );
                None
            }
        }
    }

    fn host(&mut self, at: &str, host: &str) -> bool {
        let ok = host.parse::<IpAddr>().is_ok() || is_hostname(host);
        if !ok {
            self.p.push(
                at,
                format!("{host:?} is neither an IP address nor a host name"),
            );
        }
        ok
    }

    fn outlet_range(
        &mut self,
        at: &str,
        [first, last]: [u16; 2],
        outlets: u16,
    ) -> Option<std::ops::RangeInclusive<u16>> {
        if first == 0 || first > last || last > outlets {
            self.p.push(
                at,
                format!("must be [first, last] with 1 <= first <= last <= {outlets} (got [{first}, {last}])"),
            );
            return None;
        }
        Some(first..=last)
    }

    fn range(&mut self, at: &str, v: f64, min: f64, max: f64) -> bool {
        let ok = v.is_finite() && (min..=max).contains(&v);
        if !ok {
            self.p
                .push(at, format!("must be a number in {min}..={max} (got {v})"));
        }
        ok
    }

    /// A power in kW: finite, at most 1 GW; zero allowed only where `zero_ok`.
    fn kw(&mut self, at: &str, v: f64, zero_ok: bool) -> bool {
        let ok = v.is_finite() && v <= 1_000_000.0 && (v > 0.0 || (zero_ok && v == 0.0));
        if !ok {
            let low = if zero_ok { ">= 0" } else { "> 0" };
            self.p.push(
                at,
                format!("must be a number {low} and <= 1000000 kW (got {v})"),
            );
        }
        ok
    }

    fn seconds(&mut self, at: &str, v: f64, max: f64) -> Duration {
        if self.range(at, v, 0.0, max) {
            Duration::from_secs_f64(v)
        } else {
            Duration::ZERO
        }
    }

    fn mqtt(&mut self, m: &MqttSection) -> Mqtt {
        if m.urls.is_empty() || m.urls.len() > 2 {
            self.p.push(
                "mqtt.urls",
                "must list one broker URL, or two (primary, fallback)",
            );
        }
        let mut brokers = Vec::new();
        for (i, u) in m.urls.iter().enumerate() {
            match parse_broker_url(u) {
                Ok(b) => brokers.push(b),
                Err(e) => {
                    self.p.push(format!("mqtt.urls[{i}]"), e);
                }
            }
        }
        if m.client_id.is_empty() || m.client_id.len() > 64 || !is_name(&m.client_id) {
            self.p.push(
                "mqtt.client_id",
                "must be 1-64 characters of A-Z a-z 0-9 _ - .",
            );
        }
        if !(1..=3600).contains(&m.keep_alive_s) {
            self.p.push(
                "mqtt.keep_alive_s",
                format!("must be 1..=3600 (got {})", m.keep_alive_s),
            );
        }
        for (field, v) in [
            ("mqtt.username_env", &m.username_env),
            ("mqtt.password_env", &m.password_env),
        ] {
            if let Some(v) = v
                && !is_env_name(v)
            {
                self.p.push(
                    field,
                    format!("{v:?} is not an environment variable name (A-Z, 0-9, _)"),
                );
            }
        }
        if m.password_env.is_some() && m.username_env.is_none() {
            self.p
                .push("mqtt.password_env", "needs mqtt.username_env as well");
        }
        let any_tls = brokers.iter().any(|b| b.tls);
        let file = |s: &mut Self, field: &str, v: &Option<String>| -> Option<PathBuf> {
            let v = v.as_ref()?;
            let path = s.base.join(v);
            if !path.is_file() {
                s.p.push(
                    field,
                    format!("{} does not exist or is not a file", path.display()),
                );
            }
            Some(path)
        };
        let ca = file(self, "mqtt.ca_file", &m.ca_file);
        let cert = file(self, "mqtt.client_cert_file", &m.client_cert_file);
        let key = file(self, "mqtt.client_key_file", &m.client_key_file);
        let tls = match (ca, cert, key) {
            (Some(ca_file), cert, key) => {
                let client_auth = match (cert, key) {
                    (Some(c), Some(k)) => Some((c, k)),
                    (None, None) => None,
                    _ => {
                        self.p.push(
                            "mqtt.client_cert_file",
                            "client_cert_file and client_key_file go together",
                        );
                        None
                    }
                };
                Some(TlsFiles {
                    ca_file,
                    client_auth,
                })
            }
            (None, None, None) => None,
            (None, _, _) => {
                self.p.push(
                    "mqtt.ca_file",
                    "client certificates need a ca_file to verify the broker",
                );
                None
            }
        };
        if any_tls && tls.is_none() {
            self.p.push(
                "mqtt.ca_file",
                "an mqtts:// broker needs ca_file to verify its certificate",
            );
        }
        if tls.is_some() && !any_tls && !brokers.is_empty() {
            self.p
                .push("mqtt.ca_file", "is set but no broker URL is mqtts://");
        }
        if m.signals.is_empty() {
            self.p
                .push("mqtt.signals", "must name at least one signal topic");
        }
        let mut seen = HashSet::new();
        for (i, s) in m.signals.iter().enumerate() {
            self.topic(&format!("mqtt.signals[{i}].topic"), &s.topic);
            if !seen.insert(s.topic.as_str()) {
                self.p.push(
                    format!("mqtt.signals[{i}].topic"),
                    format!("{:?} is listed twice", s.topic),
                );
            }
        }
        self.topic("mqtt.ack_topic", &m.ack_topic);
        self.topic("mqtt.status_topic", &m.status_topic);
        for (field, t) in [
            ("mqtt.ack_topic", &m.ack_topic),
            ("mqtt.status_topic", &m.status_topic),
        ] {
            if seen.contains(t.as_str()) {
                self.p.push(field, "must not be one of the signal topics");
            }
        }
        if m.ack_topic == m.status_topic {
            self.p
                .push("mqtt.status_topic", "must differ from mqtt.ack_topic");
        }
        if !(1..=3600).contains(&m.status_interval_s) {
            self.p.push(
                "mqtt.status_interval_s",
                format!("must be 1..=3600 (got {})", m.status_interval_s),
            );
        }
        if !(256..=1_048_576).contains(&m.max_payload_bytes) {
            self.p.push(
                "mqtt.max_payload_bytes",
                format!("must be 256..=1048576 (got {})", m.max_payload_bytes),
            );
        }
        Mqtt {
            brokers,
            client_id: m.client_id.clone(),
            keep_alive: Duration::from_secs(u64::from(m.keep_alive_s)),
            username_env: m.username_env.clone(),
            password_env: m.password_env.clone(),
            tls,
            signals: m
                .signals
                .iter()
                .map(|s| SignalTopic {
                    topic: s.topic.clone(),
                    format: s.format,
                })
                .collect(),
            ack_topic: m.ack_topic.clone(),
            status_topic: m.status_topic.clone(),
            status_interval: Duration::from_secs(u64::from(m.status_interval_s)),
            max_payload_bytes: m.max_payload_bytes,
        }
    }

    fn topic(&mut self, at: &str, t: &str) {
        let ok =
            !t.is_empty() && t.len() <= 256 && !t.contains(['+', '#', '\0']) && !t.starts_with('$');
        if !ok {
            self.p.push(
                at,
                format!("{t:?} must be 1-256 characters with no wildcard (+ #), NUL or leading $"),
            );
        }
    }

    fn policy(&mut self, raw: &PolicySection) -> Policy {
        const DAY: f64 = 86_400.0;
        let min_off = self.seconds("policy.min_off_s", raw.min_off_s, DAY);
        let min_on = self.seconds("policy.min_on_s", raw.min_on_s, DAY);
        if !(1..=100_000).contains(&raw.restore_batch_size) {
            self.p.push(
                "policy.restore_batch_size",
                format!("must be 1..=100000 (got {})", raw.restore_batch_size),
            );
        }
        let restore_interval =
            self.seconds("policy.restore_interval_s", raw.restore_interval_s, 3600.0);
        let gpu_peak_window =
            self.seconds("policy.gpu_peak_window_s", raw.gpu_peak_window_s, 3600.0);
        self.kw("policy.margin_kw", raw.margin_kw, true);
        if !(50..=60_000).contains(&raw.poll_interval_ms) {
            self.p.push(
                "policy.poll_interval_ms",
                format!("must be 50..=60000 (got {})", raw.poll_interval_ms),
            );
        }
        let after = raw
            .stale_signal
            .after_s
            .map(|s| self.seconds("policy.stale_signal.after_s", s, 7.0 * DAY));
        let stale_signal = match (raw.stale_signal.action, after) {
            (StaleAction::Hold, None) => StalePolicy::Hold,
            (StaleAction::Hold, Some(_)) => {
                self.p.push(
                    "policy.stale_signal.after_s",
                    "has no meaning with action = \"hold\"",
                );
                StalePolicy::Hold
            }
            (StaleAction::Curtail, Some(after)) => StalePolicy::Curtail { after },
            (StaleAction::Release, Some(after)) => StalePolicy::Release { after },
            (_, None) => {
                self.p.push(
                    "policy.stale_signal.after_s",
                    "is needed with action = \"curtail\" or \"release\"",
                );
                StalePolicy::Hold
            }
        };
        let levels = [raw.simple.level_1, raw.simple.level_2, raw.simple.level_3];
        for (i, l) in levels.iter().enumerate() {
            let at = format!("policy.simple.level_{}.kw", i + 1);
            match *l {
                SimpleAction::ImportLimit { kw } => {
                    self.kw(&at, kw, true);
                }
                SimpleAction::Shed { kw } => {
                    self.kw(&at, kw, false);
                }
                SimpleAction::None | SimpleAction::ShedAll => {}
            }
        }
        if !(1..=10_000).contains(&raw.max_events) {
            self.p.push(
                "policy.max_events",
                format!("must be 1..=10000 (got {})", raw.max_events),
            );
        }
        let replay_window = if self.range(
            "policy.replay_window_h",
            raw.replay_window_h,
            1.0,
            90.0 * 24.0,
        ) {
            Duration::from_secs_f64(raw.replay_window_h * 3600.0)
        } else {
            Duration::ZERO
        };
        let max_clock_skew = self.seconds("policy.max_clock_skew_s", raw.max_clock_skew_s, DAY);
        Policy {
            max_events: raw.max_events as usize,
            replay_window,
            max_clock_skew,
            min_off,
            min_on,
            restore_batch_size: raw.restore_batch_size,
            restore_interval,
            gpu_peak_window,
            margin_kw: raw.margin_kw,
            poll_interval: Duration::from_millis(u64::from(raw.poll_interval_ms)),
            stale_signal,
            simple_levels: levels,
        }
    }

    fn sim(
        &mut self,
        raw: &SimSection,
        racks: &[GpuRack],
        pdus: &HashMap<&str, PduId>,
        meters: &HashMap<&str, MeterId>,
        pdu_list: &[Draft<crate::profile::PduProfile>],
    ) -> Sim {
        if raw.relay_delay_ms > 60_000 {
            self.p.push("sim.relay_delay_ms", "must be at most 60000");
        }
        if raw.sequence_step_ms > 60_000 {
            self.p.push("sim.sequence_step_ms", "must be at most 60000");
        }
        self.range("sim.noise_pct", raw.noise_pct, 0.0, 50.0);
        let boot_ramp = self.seconds("sim.boot_ramp_s", raw.boot_ramp_s, 3600.0);
        self.kw("sim.base_load_kw", raw.base_load_kw, true);
        self.kw("sim.other_swing_kw", raw.other_swing_kw, true);
        if raw.other_swing_kw > raw.base_load_kw {
            self.p.push(
                "sim.other_swing_kw",
                "must not exceed base_load_kw (the load cannot draw negative power)",
            );
        }
        let other_period_ok = self.range("sim.other_period_s", raw.other_period_s, 0.1, 3600.0);
        self.range("sim.frequency_hz", raw.frequency_hz, 40.0, 70.0);

        // Racks not named in [[sim.gpu]] draw a steady half of their rating.
        let mut gpu: Vec<GpuSim> = racks
            .iter()
            .map(|r| GpuSim {
                base_kw: r.rated_kw / 2.0,
                swing_kw: 0.0,
                period: Duration::from_secs(1),
            })
            .collect();
        let mut named = HashSet::new();
        for (i, g) in raw.gpu.iter().enumerate() {
            let at = format!("sim.gpu[{i}]");
            let Some(idx) = racks.iter().position(|r| r.name == g.rack) else {
                self.p.push(
                    format!("{at}.rack"),
                    format!("no GPU rack named {:?}", g.rack),
                );
                continue;
            };
            if !named.insert(idx) {
                self.p.push(
                    format!("{at}.rack"),
                    format!("{:?} is simulated twice", g.rack),
                );
            }
            self.kw(&format!("{at}.base_kw"), g.base_kw, true);
            self.kw(&format!("{at}.swing_kw"), g.swing_kw, true);
            // Training swings of interest run at roughly 0.2-3 Hz; allow slower drifts too.
            let period_ok = self.range(&format!("{at}.period_s"), g.period_s, 0.1, 3600.0);
            if g.swing_kw > g.base_kw {
                self.p.push(
                    format!("{at}.swing_kw"),
                    "must not exceed base_kw (a rack cannot draw negative power)",
                );
            }
            if let Some(slot) = gpu.get_mut(idx) {
                *slot = GpuSim {
                    base_kw: g.base_kw,
                    swing_kw: g.swing_kw,
                    period: if period_ok {
                        Duration::from_secs_f64(g.period_s)
                    } else {
                        Duration::from_secs(1)
                    },
                };
            }
        }
        let mut faults = Vec::new();
        for (i, f) in raw.faults.iter().enumerate() {
            let at = format!("sim.faults[{i}]");
            for key in f.faults.unknown.keys() {
                self.p.push(format!("{at}.{key}"), "unknown field");
            }
            let device = if let Some(&p) = pdus.get(f.device.as_str()) {
                DeviceId::Pdu(p)
            } else if let Some(&m) = meters.get(f.device.as_str()) {
                DeviceId::Meter(m)
            } else {
                self.p.push(
                    format!("{at}.device"),
                    format!("no device named {:?}", f.device),
                );
                continue;
            };
            let x = &f.faults;
            for (key, code) in [
                ("exception", x.exception),
                ("write_exception", x.write_exception),
            ] {
                if let Some(code) = code
                    && !matches!(code, 1..=6 | 8 | 10 | 11)
                {
                    self.p.push(
                        format!("{at}.{key}"),
                        format!("{code} is not a Modbus exception code"),
                    );
                }
            }
            if x.frozen && matches!(device, DeviceId::Pdu(_)) {
                self.p
                    .push(format!("{at}.frozen"), "applies to meters only");
            }
            if x.latency_ms > 60_000 {
                self.p
                    .push(format!("{at}.latency_ms"), "must be at most 60000");
            }
            let outlets = match device {
                DeviceId::Pdu(p) => pdu_list[p.0 as usize].outlets,
                DeviceId::Meter(_) => 0,
            };
            if let Some(bad) = x.stuck_outlets.iter().find(|o| **o == 0 || **o > outlets) {
                self.p.push(
                    format!("{at}.stuck_outlets"),
                    format!("{bad} is not an outlet of {:?}", f.device),
                );
            }
            faults.push((
                device,
                Faults {
                    latency_ms: x.latency_ms,
                    no_reply: x.no_reply,
                    exception: x.exception,
                    disconnect: x.disconnect,
                    stuck_outlets: x.stuck_outlets.clone(),
                    write_exception: x.write_exception,
                    frozen: x.frozen,
                },
            ));
        }
        Sim {
            relay_delay: Duration::from_millis(u64::from(raw.relay_delay_ms)),
            sequence_step: (raw.sequence_step_ms > 0)
                .then(|| Duration::from_millis(u64::from(raw.sequence_step_ms))),
            noise_pct: raw.noise_pct,
            boot_ramp,
            base_load_kw: raw.base_load_kw,
            other_swing_kw: raw.other_swing_kw,
            other_period: if other_period_ok {
                Duration::from_secs_f64(raw.other_period_s)
            } else {
                Duration::from_secs(2)
            },
            frequency_hz: raw.frequency_hz,
            seed: raw.seed,
            gpu,
            faults,
        }
    }
}

/// Parses `mqtt://host:port` or `mqtts://host:port` (default ports 1883 and 8883).
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, String> {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((_, host)) = rest.rsplit_once('@')
    {
        // Never repeat what may be a password in an error message or a log.
        return Err(format!(
            "\"{scheme}://***@{host}\": credentials do not belong in the URL; name environment variables in mqtt.username_env and mqtt.password_env"
        ));
    }
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else {
        return Err(format!("{url:?} must start with mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#']) {
        return Err(format!(
            "{url:?} must be scheme://host[:port] with no path, user or query (credentials go in *_env)"
        ));
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("{url:?}: unclosed [ in IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{url:?}: expected :port after ]"))?,
            ),
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{url:?}: {host:?} is not an IPv6 address"));
        }
        (host, port)
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{url:?}: port {p:?} is not 1..=65535")),
        },
    };
    if host.parse::<IpAddr>().is_err() && !is_hostname(host) {
        return Err(format!(
            "{url:?}: {host:?} is not a host name or IP address"
        ));
    }
    Ok(BrokerUrl {
        tls,
        host: host.to_owned(),
        port,
    })
}

/// One spelling per host, so `::1` and `0:0:0:0:0:0:0:1` (or `LOCALHOST` and `localhost`) match.
fn canonical_host(h: &str) -> String {
    match h.parse::<IpAddr>() {
        Ok(ip) => ip.to_string(),
        Err(_) => h.to_ascii_lowercase(),
    }
}

fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        && !h.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn is_env_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && s.len() <= 128
}
