//! Utility signals: bytes in, a validated [`Signal`] or a [`Rejection`] with its reason out.
//!
//! Parsing is a pure function of (format, payload, site policy, now): no I/O, no clock, no panic
//! on any input. Three formats (README, "Signals"):
//!
//! - `native`: gridshed's JSON, strict (`deny_unknown_fields`, so a typo such as `duraton_s`
//!   cannot silently turn a one-hour event into an open-ended one);
//! - `openadr3`: an OpenADR 3.1 event object or the notification that wraps it;
//! - `maestro`: `{"target":0|100,"timestamp":UNIX_SECONDS}`, re-sent periodically.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use site_config::{SignalFormat, SimpleAction};

/// What the utility asks of the site while a directive is in force.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Keep the site's import at or below `kw`.
    ImportLimit { kw: f64 },
    /// Keep `kw` of ASIC load (at rated power) switched off.
    Shed { kw: f64 },
    /// Every sheddable ASIC off.
    ShedAll,
}

/// A validated request from the utility, in force over `[start, end)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Directive {
    /// The event it belongs to (native `id`, OpenADR event `id`, `maestro`).
    pub id: String,
    /// Position within the event: OpenADR intervals; 0 for single-interval formats.
    pub interval: u32,
    pub action: Action,
    pub start: Timestamp,
    /// `None`: until released.
    pub end: Option<Timestamp>,
    /// Lower is more important.
    pub priority: u32,
    /// May switch ASICs off before their minimum on-time has passed.
    pub emergency: bool,
    pub format: SignalFormat,
}

impl Directive {
    pub fn is_in_force(&self, now: Timestamp) -> bool {
        self.start <= now && self.end.is_none_or(|end| now < end)
    }
}

/// A parsed signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Signal {
    /// The directives of event `id`: they replace whatever the event said before, so a re-sent
    /// identical signal changes nothing. Empty when the event asks for normal operation.
    Event {
        id: String,
        directives: Vec<Directive>,
    },
    /// Ends event `id`, or every event when `None`.
    Release { id: Option<String> },
}

impl Signal {
    pub fn id(&self) -> Option<&str> {
        match self {
            Signal::Event { id, .. } => Some(id),
            Signal::Release { id } => id.as_deref(),
        }
    }
}

/// Why a signal was refused. Nothing changes because of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The signal's id, when it could be read.
    pub id: Option<String>,
    pub reason: String,
}

/// Priority of directives that do not say (least important).
pub const DEFAULT_PRIORITY: u32 = 1000;
/// No power value in a signal may exceed this (1 GW): anything larger is a unit or typing error.
pub const MAX_KW: f64 = 1_000_000.0;
/// How far ahead an event may start.
pub const MAX_LEAD: SignedDuration = SignedDuration::from_hours(7 * 24);
/// How long a bounded directive may last (longer ones should be open-ended and released).
pub const MAX_DURATION: SignedDuration = SignedDuration::from_hours(31 * 24);
/// How far behind local time a maestro timestamp may be (ahead, the site's
/// `policy.max_clock_skew_s` bounds it).
pub const MAESTRO_AGE: SignedDuration = SignedDuration::from_hours(24);

/// What parsing needs to know about the site.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub max_payload_bytes: usize,
    pub simple_levels: &'a [SimpleAction; 3],
    /// How far ahead of local time a send time may be.
    pub max_skew: SignedDuration,
    pub now: Timestamp,
}

impl<'a> Context<'a> {
    /// Parsing for `site` at `now`.
    pub fn new(site: &'a site_config::Site, now: Timestamp) -> Context<'a> {
        Context {
            max_payload_bytes: site.mqtt.max_payload_bytes,
            simple_levels: &site.policy.simple_levels,
            max_skew: SignedDuration::try_from(site.policy.max_clock_skew)
                .unwrap_or(SignedDuration::MAX),
            now,
        }
    }
}

/// Parses one signal payload received in `format`.
pub fn parse(format: SignalFormat, payload: &[u8], cx: &Context<'_>) -> Result<Signal, Rejection> {
    if payload.len() > cx.max_payload_bytes {
        return Err(Rejection {
            id: None,
            reason: format!(
                "payload of {} bytes exceeds the limit of {} bytes",
                payload.len(),
                cx.max_payload_bytes
            ),
        });
    }
    let fail = |reason: String| Rejection {
        id: peek_id(payload),
        reason,
    };
    match format {
        SignalFormat::Native => native(payload, cx).map_err(fail),
        SignalFormat::Openadr3 => openadr3(payload, cx).map_err(fail),
        SignalFormat::Maestro => maestro(payload, cx).map_err(fail),
    }
}

/// When the sender says it sent `payload`, for the formats that say (maestro's `timestamp`):
/// what orders re-sent messages that carry no event id. Call it on a payload that parsed.
pub fn sent_at(format: SignalFormat, payload: &[u8]) -> Option<Timestamp> {
    match format {
        SignalFormat::Maestro => {
            let m: Maestro = serde_json::from_slice(payload).ok()?;
            Timestamp::from_second(m.timestamp.trunc() as i64).ok()
        }
        SignalFormat::Native | SignalFormat::Openadr3 => None,
    }
}

/// The `id` of a JSON object (top level, or OpenADR's `object.id`), for acknowledging a signal
/// that is otherwise unreadable.
fn peek_id(payload: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let id = v
        .get("id")
        .or_else(|| v.get("object")?.get("id"))?
        .as_str()?;
    check_id(id).ok().map(str::to_owned)
}

fn check_id(id: &str) -> Result<&str, String> {
    if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
        Err("id must be 1-128 characters with no control characters".into())
    } else {
        Ok(id)
    }
}

fn check_kw(what: &str, kw: Option<f64>, zero_ok: bool) -> Result<f64, String> {
    let kw = kw.ok_or_else(|| format!("{what} needs kw"))?;
    if !kw.is_finite() || kw < 0.0 || (kw == 0.0 && !zero_ok) || kw > MAX_KW {
        let low = if zero_ok { ">= 0" } else { "> 0" };
        return Err(format!(
            "kw must be a number {low} and <= {MAX_KW} (got {kw})"
        ));
    }
    Ok(kw)
}

/// Checks a directive's window against `now`: not over, not absurdly far ahead or long.
fn check_window(start: Timestamp, end: Option<Timestamp>, now: Timestamp) -> Result<(), String> {
    if let Some(end) = end
        && end <= now
    {
        return Err(format!("expired: ended at {end}"));
    }
    if start.duration_since(now) > MAX_LEAD {
        return Err(format!("starts at {start}, more than 7 days ahead"));
    }
    if let Some(end) = end
        && end.duration_since(start) > MAX_DURATION
    {
        return Err("lasts more than 31 days; send an open-ended directive and release it".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// native

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Native {
    id: Option<String>,
    kind: NativeKind,
    kw: Option<f64>,
    start: Option<String>,
    duration_s: Option<f64>,
    priority: Option<u32>,
    #[serde(default)]
    emergency: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum NativeKind {
    ImportLimit,
    Shed,
    ShedAll,
    Release,
}

fn native(payload: &[u8], cx: &Context<'_>) -> Result<Signal, String> {
    let n: Native =
        serde_json::from_slice(payload).map_err(|e| format!("invalid native signal: {e}"))?;
    let id = n.id.as_deref().map(check_id).transpose()?;
    let action = match n.kind {
        NativeKind::Release => {
            if n.kw.is_some() || n.start.is_some() || n.duration_s.is_some() {
                return Err("release takes only id".into());
            }
            return Ok(Signal::Release {
                id: id.map(str::to_owned),
            });
        }
        NativeKind::ImportLimit => Action::ImportLimit {
            kw: check_kw("import_limit", n.kw, true)?,
        },
        NativeKind::Shed => Action::Shed {
            kw: check_kw("shed", n.kw, false)?,
        },
        NativeKind::ShedAll if n.kw.is_some() => return Err("shed_all takes no kw".into()),
        NativeKind::ShedAll => Action::ShedAll,
    };
    let id = id.ok_or("id is required")?.to_owned();
    let start = match &n.start {
        None => cx.now,
        Some(s) => s
            .parse::<Timestamp>()
            .map_err(|e| format!("start {s:?} is not an RFC 3339 time: {e}"))?,
    };
    let end = match n.duration_s {
        None => None,
        Some(d) if d.is_finite() && d > 0.0 => {
            let d = SignedDuration::try_from_secs_f64(d)
                .map_err(|_| "duration_s is out of range".to_string())?;
            Some(
                start
                    .checked_add(d)
                    .map_err(|_| "start + duration_s is out of range".to_string())?,
            )
        }
        Some(d) => return Err(format!("duration_s must be a number > 0 (got {d})")),
    };
    check_window(start, end, cx.now)?;
    let priority = n.priority.unwrap_or(DEFAULT_PRIORITY);
    Ok(Signal::Event {
        id: id.clone(),
        directives: vec![Directive {
            id,
            interval: 0,
            action,
            start,
            end,
            priority,
            emergency: n.emergency,
            format: SignalFormat::Native,
        }],
    })
}

// ---------------------------------------------------------------------------------------------
// maestro

#[derive(Debug, Deserialize)]
struct Maestro {
    target: f64,
    timestamp: f64,
}

/// The id under which maestro's curtailment is held: it has no ids of its own.
pub const MAESTRO_ID: &str = "maestro";

fn maestro(payload: &[u8], cx: &Context<'_>) -> Result<Signal, String> {
    let m: Maestro =
        serde_json::from_slice(payload).map_err(|e| format!("invalid maestro signal: {e}"))?;
    if !m.timestamp.is_finite() {
        return Err("timestamp must be a number".into());
    }
    let at = Timestamp::from_second(m.timestamp.trunc() as i64)
        .map_err(|_| format!("timestamp {} is out of range", m.timestamp))?;
    let ahead = at.duration_since(cx.now);
    if ahead > cx.max_skew {
        return Err(format!(
            "timestamp {at} is {:.0} s ahead of local time {}: at most {:.0} s is allowed (policy.max_clock_skew_s)",
            ahead.as_secs_f64(),
            cx.now,
            cx.max_skew.as_secs_f64()
        ));
    }
    if -ahead > MAESTRO_AGE {
        return Err(format!(
            "timestamp {at} is more than 24 h behind local time {}",
            cx.now
        ));
    }
    match m.target {
        0.0 => Ok(Signal::Event {
            id: MAESTRO_ID.into(),
            directives: vec![Directive {
                id: MAESTRO_ID.into(),
                interval: 0,
                action: Action::ShedAll,
                // The curtailment holds from when it was first seen; re-sends must not move it.
                start: Timestamp::UNIX_EPOCH,
                end: None,
                priority: DEFAULT_PRIORITY,
                emergency: false,
                format: SignalFormat::Maestro,
            }],
        }),
        100.0 => Ok(Signal::Release {
            id: Some(MAESTRO_ID.into()),
        }),
        t => Err(format!(
            "target must be 0 (curtail) or 100 (full power), got {t}"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// OpenADR 3.1

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Notification {
    object_type: String,
    operation: String,
    object: serde_json::Value,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    id: Option<String>,
    priority: Option<i64>,
    interval_period: Option<IntervalPeriod>,
    #[serde(default)]
    payload_descriptors: Vec<PayloadDescriptor>,
    intervals: Vec<Interval>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IntervalPeriod {
    start: Option<String>,
    duration: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PayloadDescriptor {
    payload_type: Option<String>,
    units: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Interval {
    interval_period: Option<IntervalPeriod>,
    payloads: Vec<Payload>,
}

#[derive(Debug, Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: String,
    values: Vec<serde_json::Value>,
}

fn openadr3(payload: &[u8], cx: &Context<'_>) -> Result<Signal, String> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("invalid OpenADR JSON: {e}"))?;
    // An event object carries `objectType: "EVENT"` itself; a notification wraps one in `object`.
    let event = if value.get("operation").is_some() || value.get("object").is_some() {
        let n: Notification = serde_json::from_value(value)
            .map_err(|e| format!("invalid OpenADR notification: {e}"))?;
        if n.object_type != "EVENT" {
            return Err(format!("objectType {:?} is not EVENT", n.object_type));
        }
        match n.operation.as_str() {
            "CREATE" | "UPDATE" | "POST" | "PUT" => n.object,
            "DELETE" => {
                let id = n
                    .object
                    .get("id")
                    .and_then(|v| v.as_str())
                    .ok_or("DELETE needs object.id")?;
                return Ok(Signal::Release {
                    id: Some(check_id(id)?.to_owned()),
                });
            }
            other => {
                return Err(format!(
                    "operation {other:?} is not CREATE, UPDATE or DELETE"
                ));
            }
        }
    } else {
        value
    };
    let event: Event =
        serde_json::from_value(event).map_err(|e| format!("invalid OpenADR event: {e}"))?;
    let id = check_id(event.id.as_deref().ok_or("event id is required")?)?.to_owned();
    let priority = match event.priority {
        None => DEFAULT_PRIORITY,
        Some(p) if (0..=i64::from(DEFAULT_PRIORITY)).contains(&p) => p as u32,
        Some(p) => return Err(format!("priority must be 0..={DEFAULT_PRIORITY} (got {p})")),
    };
    if event.intervals.is_empty() {
        return Err("event has no intervals".into());
    }
    if event.intervals.len() > 1000 {
        return Err("event has more than 1000 intervals".into());
    }
    let default_period = event.interval_period.as_ref();
    let mut directives = Vec::new();
    // Intervals follow each other: each starts where the previous ended unless it says otherwise.
    let mut cursor: Option<Timestamp> = None;
    let mut any_live = false;
    for (k, interval) in event.intervals.iter().enumerate() {
        // The event's own period gives the first interval's start and every interval's length;
        // an interval's period, where present, overrides it.
        let (period, follows) = match &interval.interval_period {
            Some(p) => (Some(p), p.start.is_none()),
            None => (default_period, k > 0),
        };
        let previous = if follows { cursor } else { None };
        let (start, end) = interval_window(period, previous, follows, cx.now)
            .map_err(|e| format!("intervals[{k}]: {e}"))?;
        cursor = end;
        let action = interval_action(
            &interval.payloads,
            &event.payload_descriptors,
            cx.simple_levels,
        )
        .map_err(|e| format!("intervals[{k}]: {e}"))?;
        if end.is_none_or(|end| end > cx.now) {
            any_live = true;
        } else {
            continue;
        }
        check_window(start, end, cx.now).map_err(|e| format!("intervals[{k}]: {e}"))?;
        if let Some(action) = action {
            directives.push(Directive {
                id: id.clone(),
                interval: k as u32,
                action,
                start,
                end,
                priority,
                emergency: priority == 0,
                format: SignalFormat::Openadr3,
            });
        }
    }
    if !any_live {
        return Err("expired: every interval has ended".into());
    }
    Ok(Signal::Event { id, directives })
}

/// The start and end of an interval. `0001-01-01` as start means now; `P9999Y` as duration
/// means indefinitely; a missing start follows the previous interval.
fn interval_window(
    period: Option<&IntervalPeriod>,
    previous_end: Option<Timestamp>,
    follows: bool,
    now: Timestamp,
) -> Result<(Timestamp, Option<Timestamp>), String> {
    let period = period.ok_or("no intervalPeriod on the interval or the event")?;
    let start = if follows {
        // An interval after an open-ended one never starts.
        previous_end.ok_or("follows an interval that never ends")?
    } else {
        match &period.start {
            None => now,
            Some(s) => {
                let t = s
                    .parse::<Timestamp>()
                    .map_err(|e| format!("start {s:?} is not an RFC 3339 time: {e}"))?;
                if t.to_zoned(jiff::tz::TimeZone::UTC).date() == jiff::civil::date(1, 1, 1) {
                    now
                } else {
                    t
                }
            }
        }
    };
    let end = match period.duration.as_deref() {
        None | Some("P9999Y") => None,
        Some(d) => {
            let span: jiff::Span = d
                .parse()
                .map_err(|e| format!("duration {d:?} is not an ISO 8601 duration: {e}"))?;
            let end = start
                .to_zoned(jiff::tz::TimeZone::UTC)
                .checked_add(span)
                .map_err(|_| format!("duration {d:?} is out of range"))?
                .timestamp();
            if end <= start {
                return Err(format!("duration {d:?} must be positive"));
            }
            Some(end)
        }
    };
    Ok((start, end))
}

/// The action of an interval's first supported payload; `None` for normal operation.
fn interval_action(
    payloads: &[Payload],
    descriptors: &[PayloadDescriptor],
    simple: &[SimpleAction; 3],
) -> Result<Option<Action>, String> {
    let payload = payloads
        .iter()
        .find(|p| matches!(p.kind.as_str(), "IMPORT_CAPACITY_LIMIT" | "SIMPLE" | "DISPATCH_SETPOINT"))
        .ok_or_else(|| {
            let kinds: Vec<&str> = payloads.iter().map(|p| p.kind.as_str()).collect();
            format!("no supported payload type in {kinds:?} (IMPORT_CAPACITY_LIMIT, SIMPLE, DISPATCH_SETPOINT)")
        })?;
    let value = match payload.values.as_slice() {
        [v] => v
            .as_f64()
            .ok_or_else(|| format!("{} value must be a number", payload.kind))?,
        _ => return Err(format!("{} needs exactly one value", payload.kind)),
    };
    match payload.kind.as_str() {
        "SIMPLE" => {
            if value.fract() != 0.0 || !(0.0..=3.0).contains(&value) {
                return Err(format!("SIMPLE level must be 0, 1, 2 or 3 (got {value})"));
            }
            Ok(match value as usize {
                0 => None,
                level => match simple
                    .get(level - 1)
                    .copied()
                    .unwrap_or(SimpleAction::ShedAll)
                {
                    SimpleAction::None => None,
                    SimpleAction::ImportLimit { kw } => Some(Action::ImportLimit { kw }),
                    SimpleAction::Shed { kw } => Some(Action::Shed { kw }),
                    SimpleAction::ShedAll => Some(Action::ShedAll),
                },
            })
        }
        kind => {
            let units = descriptors
                .iter()
                .find(|d| d.payload_type.as_deref() == Some(kind))
                .and_then(|d| d.units.as_deref())
                .unwrap_or("KW");
            let factor = match units {
                "KW" => 1.0,
                "W" => 0.001,
                "MW" => 1000.0,
                other => return Err(format!("{kind} units {other:?} are not W, KW or MW")),
            };
            let kw = check_kw(kind, Some(value * factor), true)?;
            Ok(Some(Action::ImportLimit { kw }))
        }
    }
}

#[cfg(test)]
mod tests;
