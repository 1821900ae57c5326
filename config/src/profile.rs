//! Device register profiles: the register map of a device kind, as data.
//!
//! A profile says where a device keeps each quantity (table and address), how a value is
//! encoded in 16-bit words (type, scale, word order) and how outlets are switched (coils or
//! holding registers, one write per outlet or one write for many). A PDU of another vendor is a
//! new profile file, never new code: both the controller and firmware-sim read the device
//! through these types only.

use serde::Deserialize;

use crate::error::Problems;

/// Largest number of coils one Modbus read may ask for (Modbus Application Protocol v1.1b3, 6.1).
pub const MAX_READ_BITS: u16 = 2000;
/// Largest number of registers one Modbus read may ask for (6.3, 6.4).
pub const MAX_READ_WORDS: u16 = 125;
/// Largest number of coils one Write Multiple Coils may carry (6.11).
pub const MAX_WRITE_BITS: u16 = 1968;
/// Largest number of registers one Write Multiple Registers may carry (6.12).
pub const MAX_WRITE_WORDS: u16 = 123;

/// A device profile, tagged by the kind of device it describes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Profile {
    Pdu(PduProfile),
    Meter(MeterProfile),
}

impl Profile {
    pub fn name(&self) -> &str {
        match self {
            Profile::Pdu(p) => &p.name,
            Profile::Meter(m) => &m.name,
        }
    }
}

/// Register map of a power-distribution unit with switched, metered outlets.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PduProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The outlet relays: read for state, written to switch.
    pub relays: RelayMap,
    /// Per-outlet active power.
    pub outlet_power: BlockMap,
    /// The PDU's total active power, if the device reports one.
    pub total_power: Option<ValueMap>,
}

/// Register map of a power meter (site meter, GPU rack meter).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterProfile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub active_power: ValueMap,
    pub frequency: Option<ValueMap>,
}

/// Where outlet relays live and how they are switched.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayMap {
    /// `coil` (FC01 read, FC05/FC15 write) or `holding` (FC03 read, FC06/FC16 write).
    pub table: RelayTable,
    /// Address of outlet 1; outlet n is at `address + (n - 1)`.
    pub address: u16,
    /// `multiple`: one Write Multiple Coils/Registers for a run of outlets; `single`: one write per outlet.
    pub write: WriteMode,
    /// For `holding` relays: the word that means on.
    #[serde(default = "one")]
    pub on_value: u16,
    /// For `holding` relays: the word that means off.
    #[serde(default)]
    pub off_value: u16,
}

fn one() -> u16 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayTable {
    Coil,
    Holding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    Single,
    Multiple,
}

/// A register table holding measured values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterTable {
    /// Input registers, read with FC04.
    Input,
    /// Holding registers, read with FC03.
    Holding,
}

/// One measured value.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValueMap {
    pub table: RegisterTable,
    pub address: u16,
    pub encoding: Encoding,
    /// Physical unit of `raw * scale`.
    pub unit: Unit,
    /// The value in `unit` is the raw number times `scale`.
    #[serde(default = "unit_scale")]
    pub scale: f64,
    #[serde(default)]
    pub word_order: WordOrder,
}

/// The same measured value for each outlet: outlet n at `address + (n - 1) * stride`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockMap {
    pub table: RegisterTable,
    pub address: u16,
    /// Words between two outlets' values; defaults to the width of the encoding.
    pub stride: Option<u16>,
    pub encoding: Encoding,
    pub unit: Unit,
    #[serde(default = "unit_scale")]
    pub scale: f64,
    #[serde(default)]
    pub word_order: WordOrder,
}

fn unit_scale() -> f64 {
    1.0
}

impl BlockMap {
    pub fn stride(&self) -> u16 {
        self.stride.unwrap_or(self.encoding.words())
    }

    /// The map of one outlet's value (1-based outlet number).
    pub fn outlet(&self, outlet: u16) -> ValueMap {
        let offset = u32::from(outlet.saturating_sub(1)) * u32::from(self.stride());
        ValueMap {
            table: self.table,
            address: u16::try_from(u32::from(self.address) + offset).unwrap_or(u16::MAX),
            encoding: self.encoding,
            unit: self.unit,
            scale: self.scale,
            word_order: self.word_order,
        }
    }

    /// Registers spanned by `outlets` values, or `None` when they run past the address space.
    pub fn span(&self, outlets: u16) -> Option<u16> {
        let last = u32::from(outlets.checked_sub(1)?) * u32::from(self.stride());
        let end = u32::from(self.address) + last + u32::from(self.encoding.words());
        (end <= 0x1_0000).then(|| (end - u32::from(self.address)) as u16)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl Encoding {
    /// Number of 16-bit registers the value occupies.
    pub const fn words(self) -> u16 {
        match self {
            Encoding::U16 | Encoding::I16 => 1,
            Encoding::U32 | Encoding::I32 | Encoding::F32 => 2,
        }
    }
}

/// Order of the two words of a 32-bit value. Bytes within a word are always big-endian (Modbus).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// High word first ("ABCD").
    #[default]
    HighFirst,
    /// Low word first ("CDAB").
    LowFirst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Unit {
    W,
    #[serde(rename = "kW")]
    Kw,
    #[serde(rename = "Hz")]
    Hz,
}

impl ValueMap {
    /// Encodes `value` (in the map's unit) into the map's words. Out-of-range values saturate;
    /// NaN encodes as 0 for integer encodings.
    pub fn encode(&self, value: f64) -> [u16; 2] {
        let raw = value / self.scale;
        let (hi, lo) = match self.encoding {
            Encoding::U16 => return [raw.round().clamp(0.0, f64::from(u16::MAX)) as u16, 0],
            Encoding::I16 => {
                let v = raw.round().clamp(f64::from(i16::MIN), f64::from(i16::MAX)) as i16;
                return [v as u16, 0];
            }
            Encoding::U32 => split(raw.round().clamp(0.0, f64::from(u32::MAX)) as u32),
            Encoding::I32 => {
                split(raw.round().clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32 as u32)
            }
            Encoding::F32 => split((raw as f32).to_bits()),
        };
        match self.word_order {
            WordOrder::HighFirst => [hi, lo],
            WordOrder::LowFirst => [lo, hi],
        }
    }

    /// Decodes the value in the map's unit from its words, or `None` if `words` is too short
    /// or the value is not a finite number.
    pub fn decode(&self, words: &[u16]) -> Option<f64> {
        let raw = match self.encoding {
            Encoding::U16 => f64::from(*words.first()?),
            Encoding::I16 => f64::from(*words.first()? as i16),
            Encoding::U32 | Encoding::I32 | Encoding::F32 => {
                let (a, b) = (*words.first()?, *words.get(1)?);
                let (hi, lo) = match self.word_order {
                    WordOrder::HighFirst => (a, b),
                    WordOrder::LowFirst => (b, a),
                };
                let bits = (u32::from(hi) << 16) | u32::from(lo);
                match self.encoding {
                    Encoding::U32 => f64::from(bits),
                    Encoding::I32 => f64::from(bits as i32),
                    _ => f64::from(f32::from_bits(bits)),
                }
            }
        };
        let value = raw * self.scale;
        value.is_finite().then_some(value)
    }

    /// The value converted to watts, for power quantities.
    pub fn to_watts(&self, value: f64) -> f64 {
        match self.unit {
            Unit::Kw => value * 1000.0,
            Unit::W | Unit::Hz => value,
        }
    }

    /// The value in the map's unit for a power given in watts.
    pub fn from_watts(&self, watts: f64) -> f64 {
        match self.unit {
            Unit::Kw => watts / 1000.0,
            Unit::W | Unit::Hz => watts,
        }
    }
}

fn split(bits: u32) -> (u16, u16) {
    ((bits >> 16) as u16, bits as u16)
}

impl Profile {
    /// Parses a profile file's text. `origin` names the file in errors.
    pub fn from_toml(origin: &str, text: &str) -> Result<Profile, crate::ConfigError> {
        let profile: Profile = toml::from_str(text).map_err(|e| crate::ConfigError::Parse {
            file: origin.to_owned(),
            message: e.to_string(),
        })?;
        let mut problems = Problems::new(origin);
        profile.check(&mut problems);
        problems.finish()?;
        Ok(profile)
    }

    fn check(&self, p: &mut Problems) {
        if !crate::model::is_name(self.name()) {
            p.push("name", "must be 1-64 characters of A-Z a-z 0-9 _ - .");
        }
        match self {
            Profile::Pdu(pdu) => {
                check_block(p, "outlet_power", &pdu.outlet_power);
                if let Some(total) = &pdu.total_power {
                    check_value(p, "total_power", total, &[Unit::W, Unit::Kw]);
                }
                let r = &pdu.relays;
                if r.table == RelayTable::Holding && r.on_value == r.off_value {
                    p.push("relays.on_value", "must differ from relays.off_value");
                }
            }
            Profile::Meter(m) => {
                check_value(p, "active_power", &m.active_power, &[Unit::W, Unit::Kw]);
                if let Some(f) = &m.frequency {
                    check_value(p, "frequency", f, &[Unit::Hz]);
                }
            }
        }
    }

    /// Checks that this profile can address `outlets` outlets (PDUs) within Modbus limits.
    pub(crate) fn check_outlets(&self, outlets: u16) -> Result<(), String> {
        let Profile::Pdu(pdu) = self else {
            return Ok(());
        };
        let relay_end = u32::from(pdu.relays.address) + u32::from(outlets);
        if relay_end > 0x1_0000 {
            return Err(format!(
                "{outlets} outlets from relay address {} run past address 65535",
                pdu.relays.address
            ));
        }
        if pdu.outlet_power.span(outlets).is_none() {
            return Err(format!(
                "{outlets} outlet power values from address {} run past address 65535",
                pdu.outlet_power.address
            ));
        }
        Ok(())
    }
}

fn check_value(p: &mut Problems, path: &str, v: &ValueMap, units: &[Unit]) {
    check_scale(p, path, v.scale);
    if !units.contains(&v.unit) {
        p.push(format!("{path}.unit"), format!("must be one of {units:?}"));
    }
    if u32::from(v.address) + u32::from(v.encoding.words()) > 0x1_0000 {
        p.push(format!("{path}.address"), "value runs past address 65535");
    }
}

fn check_block(p: &mut Problems, path: &str, b: &BlockMap) {
    check_scale(p, path, b.scale);
    if !matches!(b.unit, Unit::W | Unit::Kw) {
        p.push(format!("{path}.unit"), "must be W or kW");
    }
    if b.stride() < b.encoding.words() {
        p.push(
            format!("{path}.stride"),
            format!(
                "must be at least {} for {:?} values",
                b.encoding.words(),
                b.encoding
            ),
        );
    }
}

fn check_scale(p: &mut Problems, path: &str, scale: f64) {
    if !(scale.is_finite() && scale > 0.0) {
        p.push(
            format!("{path}.scale"),
            format!("must be a finite number > 0 (got {scale})"),
        );
    }
}

/// Profiles shipped with gridshed, from `config/profiles/`.
pub const BUILTIN: &[(&str, &str)] = &[
    ("generic-pdu", include_str!("../profiles/generic-pdu.toml")),
    (
        "generic-meter",
        include_str!("../profiles/generic-meter.toml"),
    ),
    ("holding-pdu", include_str!("../profiles/holding-pdu.toml")),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn value(encoding: Encoding, word_order: WordOrder, scale: f64) -> ValueMap {
        ValueMap {
            table: RegisterTable::Input,
            address: 0,
            encoding,
            unit: Unit::W,
            scale,
            word_order,
        }
    }

    #[test]
    fn every_encoding_round_trips_in_both_word_orders() {
        for enc in [
            Encoding::U16,
            Encoding::I16,
            Encoding::U32,
            Encoding::I32,
            Encoding::F32,
        ] {
            for order in [WordOrder::HighFirst, WordOrder::LowFirst] {
                let map = value(enc, order, 0.1);
                let words = map.encode(1234.5);
                let back = map.decode(&words).unwrap();
                assert!((back - 1234.5).abs() < 0.06, "{enc:?} {order:?}: {back}");
            }
        }
    }

    #[test]
    fn word_order_swaps_the_words_of_32_bit_values() {
        let hi = value(Encoding::U32, WordOrder::HighFirst, 1.0).encode(0x0001_0002 as f64);
        let lo = value(Encoding::U32, WordOrder::LowFirst, 1.0).encode(0x0001_0002 as f64);
        assert_eq!(hi, [1, 2]);
        assert_eq!(lo, [2, 1]);
    }

    #[test]
    fn integer_encodings_saturate_instead_of_wrapping() {
        assert_eq!(
            value(Encoding::U16, WordOrder::HighFirst, 1.0).encode(1e9)[0],
            u16::MAX
        );
        assert_eq!(
            value(Encoding::U16, WordOrder::HighFirst, 1.0).encode(-5.0)[0],
            0
        );
    }

    #[test]
    fn decoding_rejects_short_input_and_non_finite_floats() {
        let f = value(Encoding::F32, WordOrder::HighFirst, 1.0);
        assert_eq!(f.decode(&[0x4000]), None);
        let nan = f32::NAN.to_bits();
        assert_eq!(f.decode(&[(nan >> 16) as u16, nan as u16]), None);
    }

    #[test]
    fn builtin_profiles_parse_and_validate() {
        for (name, text) in BUILTIN {
            let p = Profile::from_toml(name, text).unwrap();
            assert_eq!(p.name(), *name);
        }
    }

    #[test]
    fn block_span_detects_address_overflow() {
        let mut b = BlockMap {
            table: RegisterTable::Input,
            address: 65_500,
            stride: None,
            encoding: Encoding::U32,
            unit: Unit::W,
            scale: 1.0,
            word_order: WordOrder::HighFirst,
        };
        assert_eq!(b.span(18), Some(36));
        assert_eq!(b.span(19), None);
        b.address = 100;
        assert_eq!(b.outlet(3).address, 104);
    }
}
