//! The pure Modbus request handler: a device's state and a request in, a response or the exact
//! Modbus exception out. No sockets, no clock, no panics.
//!
//! Checks follow the order of the Modbus Application Protocol's state diagrams: a function the
//! device does not implement is 01 (Illegal Function); a quantity out of range is 03 (Illegal
//! Data Value); an address range not fully mapped is 02 (Illegal Data Address); a value the
//! register cannot take is 03.

use site_config::profile::{
    MAX_READ_BITS, MAX_READ_WORDS, MAX_WRITE_BITS, MAX_WRITE_WORDS, RegisterTable, RelayTable,
    ValueMap, WriteMode,
};
use tokio_modbus::{ExceptionCode, Request, Response};

use crate::device::{MeterDevice, PduDevice};

/// A simulated device: what one Modbus unit id answers as.
// A PDU's outlets are stored inline (fixed capacity, as in firmware); devices are built once
// and live behind a lock, so the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Device {
    Pdu(PduDevice),
    Meter(MeterDevice),
}

/// Which register table a read addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Holding,
    Input,
}

impl From<RegisterTable> for Table {
    fn from(t: RegisterTable) -> Self {
        match t {
            RegisterTable::Input => Table::Input,
            RegisterTable::Holding => Table::Holding,
        }
    }
}

/// True for requests that would change a device: what the write counters count.
pub fn is_write(req: &Request<'_>) -> bool {
    matches!(
        req,
        Request::WriteSingleCoil(..)
            | Request::WriteMultipleCoils(..)
            | Request::WriteSingleRegister(..)
            | Request::WriteMultipleRegisters(..)
            | Request::MaskWriteRegister(..)
            | Request::ReadWriteMultipleRegisters(..)
    )
}

/// Answers one request against a device's present state.
pub fn handle(device: &mut Device, req: &Request<'_>) -> Result<Response, ExceptionCode> {
    match device {
        Device::Pdu(pdu) => handle_pdu(pdu, req),
        Device::Meter(meter) => handle_meter(meter, req),
    }
}

fn handle_pdu(pdu: &mut PduDevice, req: &Request<'_>) -> Result<Response, ExceptionCode> {
    let relays = pdu.profile.relays;
    let outlets = pdu.outlet_count();
    let coil_relays = relays.table == RelayTable::Coil;
    let multiple = relays.write == WriteMode::Multiple;
    match req {
        Request::ReadCoils(addr, qty) if coil_relays => {
            check_qty(*qty, MAX_READ_BITS)?;
            let first = relay_index(relays.address, outlets, *addr, *qty)?;
            let states = (first..first + qty)
                .map(|i| pdu.outlet(i).is_some_and(|o| o.relay_on))
                .collect();
            Ok(Response::ReadCoils(states))
        }
        Request::WriteSingleCoil(addr, on) if coil_relays => {
            let i = relay_index(relays.address, outlets, *addr, 1)?;
            pdu.command(i, *on);
            pdu.step(0.0, &[]);
            Ok(Response::WriteSingleCoil(*addr, *on))
        }
        Request::WriteMultipleCoils(addr, states) if coil_relays && multiple => {
            let qty = u16::try_from(states.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
            check_qty(qty, MAX_WRITE_BITS)?;
            let first = relay_index(relays.address, outlets, *addr, qty)?;
            for (i, on) in (first..).zip(states.iter()) {
                pdu.command(i, *on);
            }
            pdu.step(0.0, &[]);
            Ok(Response::WriteMultipleCoils(*addr, qty))
        }
        Request::WriteSingleRegister(addr, word) if !coil_relays => {
            let i = relay_index(relays.address, outlets, *addr, 1)?;
            let on = relay_word(relays.on_value, relays.off_value, *word)?;
            pdu.command(i, on);
            pdu.step(0.0, &[]);
            Ok(Response::WriteSingleRegister(*addr, *word))
        }
        Request::WriteMultipleRegisters(addr, words) if !coil_relays && multiple => {
            let qty = u16::try_from(words.len()).map_err(|_| ExceptionCode::IllegalDataValue)?;
            check_qty(qty, MAX_WRITE_WORDS)?;
            let first = relay_index(relays.address, outlets, *addr, qty)?;
            // Validate every word before moving any relay: a bad request changes nothing.
            let states = words
                .iter()
                .map(|w| relay_word(relays.on_value, relays.off_value, *w))
                .collect::<Result<Vec<_>, _>>()?;
            for (i, on) in (first..).zip(states) {
                pdu.command(i, on);
            }
            pdu.step(0.0, &[]);
            Ok(Response::WriteMultipleRegisters(*addr, qty))
        }
        Request::ReadHoldingRegisters(addr, qty) if pdu_has_table(pdu, Table::Holding) => Ok(
            Response::ReadHoldingRegisters(read_pdu_words(pdu, Table::Holding, *addr, *qty)?),
        ),
        Request::ReadInputRegisters(addr, qty) if pdu_has_table(pdu, Table::Input) => Ok(
            Response::ReadInputRegisters(read_pdu_words(pdu, Table::Input, *addr, *qty)?),
        ),
        _ => Err(ExceptionCode::IllegalFunction),
    }
}

fn pdu_has_table(pdu: &PduDevice, table: Table) -> bool {
    let p = &pdu.profile;
    (table == Table::Holding && p.relays.table == RelayTable::Holding)
        || Table::from(p.outlet_power.table) == table
        || p.total_power.is_some_and(|t| Table::from(t.table) == table)
}

fn handle_meter(meter: &MeterDevice, req: &Request<'_>) -> Result<Response, ExceptionCode> {
    let p = &meter.profile;
    let has = |t: Table| {
        Table::from(p.active_power.table) == t
            || p.frequency.is_some_and(|f| Table::from(f.table) == t)
    };
    match req {
        Request::ReadHoldingRegisters(addr, qty) if has(Table::Holding) => Ok(
            Response::ReadHoldingRegisters(read_meter_words(meter, Table::Holding, *addr, *qty)?),
        ),
        Request::ReadInputRegisters(addr, qty) if has(Table::Input) => Ok(
            Response::ReadInputRegisters(read_meter_words(meter, Table::Input, *addr, *qty)?),
        ),
        _ => Err(ExceptionCode::IllegalFunction),
    }
}

fn check_qty(qty: u16, max: u16) -> Result<(), ExceptionCode> {
    if qty == 0 || qty > max {
        Err(ExceptionCode::IllegalDataValue)
    } else {
        Ok(())
    }
}

/// The 0-based outlet index of `addr`, if `[addr, addr + qty)` lies within the relay block.
fn relay_index(base: u16, outlets: u16, addr: u16, qty: u16) -> Result<u16, ExceptionCode> {
    let start = u32::from(addr);
    let end = start + u32::from(qty);
    let block_end = u32::from(base) + u32::from(outlets);
    if start < u32::from(base) || end > block_end {
        return Err(ExceptionCode::IllegalDataAddress);
    }
    Ok(addr - base)
}

fn relay_word(on: u16, off: u16, word: u16) -> Result<bool, ExceptionCode> {
    match word {
        w if w == on => Ok(true),
        w if w == off => Ok(false),
        _ => Err(ExceptionCode::IllegalDataValue),
    }
}

/// A register image being filled for one read: every word must be claimed by some value.
struct Image {
    start: u32,
    words: Vec<u16>,
    mapped: Vec<bool>,
}

impl Image {
    fn new(addr: u16, qty: u16) -> Result<Self, ExceptionCode> {
        check_qty(qty, MAX_READ_WORDS)?;
        if u32::from(addr) + u32::from(qty) > 0x1_0000 {
            return Err(ExceptionCode::IllegalDataAddress);
        }
        Ok(Image {
            start: u32::from(addr),
            words: vec![0; usize::from(qty)],
            mapped: vec![false; usize::from(qty)],
        })
    }

    fn end(&self) -> u32 {
        self.start + self.words.len() as u32
    }

    /// Writes `src` at register `addr`, clipped to the image.
    fn put(&mut self, addr: u16, src: &[u16]) {
        for (k, w) in src.iter().enumerate() {
            let a = u32::from(addr) + k as u32;
            if a >= self.start && a < self.end() {
                let i = (a - self.start) as usize;
                self.words[i] = *w;
                self.mapped[i] = true;
            }
        }
    }

    fn put_value(&mut self, map: &ValueMap, value: f64) {
        let words = map.encode(value);
        let n = usize::from(map.encoding.words());
        self.put(map.address, &words[..n]);
    }

    fn finish(self) -> Result<Vec<u16>, ExceptionCode> {
        if self.mapped.iter().all(|m| *m) {
            Ok(self.words)
        } else {
            Err(ExceptionCode::IllegalDataAddress)
        }
    }
}

fn read_pdu_words(
    pdu: &PduDevice,
    table: Table,
    addr: u16,
    qty: u16,
) -> Result<Vec<u16>, ExceptionCode> {
    let mut img = Image::new(addr, qty)?;
    let p = &pdu.profile;
    if table == Table::Holding && p.relays.table == RelayTable::Holding {
        for (i, o) in pdu.outlets().iter().enumerate() {
            let word = if o.relay_on {
                p.relays.on_value
            } else {
                p.relays.off_value
            };
            let a = u32::from(p.relays.address) + i as u32;
            if let Ok(a) = u16::try_from(a) {
                img.put(a, &[word]);
            }
        }
    }
    if Table::from(p.outlet_power.table) == table {
        for (i, o) in pdu.outlets().iter().enumerate() {
            let map = p.outlet_power.outlet(i as u16 + 1);
            img.put_value(&map, map.from_watts(o.power_w));
        }
    }
    if let Some(total) = p.total_power
        && Table::from(total.table) == table
    {
        img.put_value(&total, total.from_watts(pdu.total_w()));
    }
    img.finish()
}

fn read_meter_words(
    meter: &MeterDevice,
    table: Table,
    addr: u16,
    qty: u16,
) -> Result<Vec<u16>, ExceptionCode> {
    let mut img = Image::new(addr, qty)?;
    let p = &meter.profile;
    if Table::from(p.active_power.table) == table {
        let map = p.active_power;
        img.put_value(&map, map.from_watts(meter.power_kw() * 1000.0));
    }
    if let Some(f) = p.frequency
        && Table::from(f.table) == table
    {
        img.put_value(&f, meter.frequency_hz());
    }
    img.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Load, MeterRole, Physics};
    use site_config::profile::{BUILTIN, Profile};
    use std::borrow::Cow;
    use std::sync::Arc;

    fn profile(name: &str) -> Profile {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name).unwrap();
        Profile::from_toml(name, text).unwrap()
    }

    fn pdu(name: &str, outlets: usize) -> Device {
        let Profile::Pdu(p) = profile(name) else {
            unreachable!()
        };
        let physics = Physics {
            relay_delay_s: 0.0,
            sequence_step_s: None,
            boot_ramp_s: 0.0,
            noise: 0.0,
        };
        let loads = vec![Load::Asic { rated_w: 3250.0 }; outlets];
        Device::Pdu(PduDevice::new(Arc::new(p), &loads, physics, 1).unwrap())
    }

    fn meter() -> Device {
        let Profile::Meter(p) = profile("generic-meter") else {
            unreachable!()
        };
        let mut m = MeterDevice::new(Arc::new(p), MeterRole::Site, 50.0, 0.0, 1);
        m.set_measured_kw(1234.5);
        Device::Meter(m)
    }

    #[test]
    fn reads_and_writes_coil_relays() {
        let mut d = pdu("generic-pdu", 8);
        let r = handle(
            &mut d,
            &Request::WriteMultipleCoils(2, Cow::Owned(vec![false, false])),
        )
        .unwrap();
        assert_eq!(r, Response::WriteMultipleCoils(2, 2));
        let Response::ReadCoils(c) = handle(&mut d, &Request::ReadCoils(0, 8)).unwrap() else {
            panic!()
        };
        assert_eq!(&c[..8], &[true, true, false, false, true, true, true, true]);
        handle(&mut d, &Request::WriteSingleCoil(7, false)).unwrap();
        let Response::ReadCoils(c) = handle(&mut d, &Request::ReadCoils(7, 1)).unwrap() else {
            panic!()
        };
        assert!(!c[0]);
    }

    #[test]
    fn outlet_power_and_total_follow_the_relays() {
        let mut d = pdu("generic-pdu", 4);
        handle(&mut d, &Request::WriteSingleCoil(0, false)).unwrap();
        let r = handle(&mut d, &Request::ReadInputRegisters(100, 4)).unwrap();
        assert_eq!(r, Response::ReadInputRegisters(vec![0, 3250, 3250, 3250]));
        let r = handle(&mut d, &Request::ReadInputRegisters(200, 2)).unwrap();
        assert_eq!(r, Response::ReadInputRegisters(vec![0, 9750]));
    }

    #[test]
    fn unmapped_addresses_are_exception_02() {
        let mut d = pdu("generic-pdu", 8);
        let bad = [
            Request::ReadCoils(8, 1),
            Request::ReadCoils(5, 4),
            Request::WriteSingleCoil(100, true),
            Request::ReadInputRegisters(0, 1),
            Request::ReadInputRegisters(100, 9),
            Request::ReadInputRegisters(201, 2),
            Request::ReadInputRegisters(65_535, 2),
        ];
        for req in bad {
            assert_eq!(
                handle(&mut d, &req),
                Err(ExceptionCode::IllegalDataAddress),
                "{req:?}"
            );
        }
    }

    #[test]
    fn unimplemented_functions_are_exception_01() {
        let mut d = pdu("generic-pdu", 8);
        let bad = [
            Request::ReadDiscreteInputs(0, 1),
            Request::ReadHoldingRegisters(100, 1),
            Request::WriteSingleRegister(0, 1),
            Request::MaskWriteRegister(0, 0, 0),
            Request::Custom(0x41, Cow::Owned(vec![1, 2])),
            Request::ReportServerId,
        ];
        for req in bad {
            assert_eq!(
                handle(&mut d, &req),
                Err(ExceptionCode::IllegalFunction),
                "{req:?}"
            );
        }
        let mut m = meter();
        assert_eq!(
            handle(&mut m, &Request::WriteSingleCoil(0, true)),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            handle(&mut m, &Request::ReadCoils(0, 1)),
            Err(ExceptionCode::IllegalFunction)
        );
    }

    #[test]
    fn bad_quantities_and_values_are_exception_03() {
        let mut d = pdu("generic-pdu", 8);
        for req in [
            Request::ReadCoils(0, 0),
            Request::ReadCoils(0, 2001),
            Request::ReadInputRegisters(100, 126),
            Request::WriteMultipleCoils(0, Cow::Owned(vec![])),
        ] {
            assert_eq!(
                handle(&mut d, &req),
                Err(ExceptionCode::IllegalDataValue),
                "{req:?}"
            );
        }
        let mut h = pdu("holding-pdu", 4);
        assert_eq!(
            handle(&mut h, &Request::WriteSingleRegister(1000, 7)),
            Err(ExceptionCode::IllegalDataValue)
        );
    }

    #[test]
    fn holding_register_pdu_switches_singly_and_refuses_multiple_writes() {
        let mut h = pdu("holding-pdu", 4);
        handle(&mut h, &Request::WriteSingleRegister(1001, 0)).unwrap();
        let r = handle(&mut h, &Request::ReadHoldingRegisters(1000, 4)).unwrap();
        assert_eq!(r, Response::ReadHoldingRegisters(vec![1, 0, 1, 1]));
        // Outlet 2 power, 0.1 W per count, u32 low word first, stride 2.
        let r = handle(&mut h, &Request::ReadHoldingRegisters(2000, 4)).unwrap();
        assert_eq!(r, Response::ReadHoldingRegisters(vec![32_500, 0, 0, 0]));
        assert_eq!(
            handle(
                &mut h,
                &Request::WriteMultipleRegisters(1000, Cow::Owned(vec![0, 0]))
            ),
            Err(ExceptionCode::IllegalFunction)
        );
    }

    #[test]
    fn meter_reports_power_and_frequency_as_floats() {
        let mut m = meter();
        let Response::ReadInputRegisters(w) =
            handle(&mut m, &Request::ReadInputRegisters(0, 4)).unwrap()
        else {
            panic!()
        };
        let Device::Meter(md) = &m else {
            unreachable!()
        };
        let kw = md.profile.active_power.decode(&w[0..2]).unwrap();
        let hz = md.profile.frequency.unwrap().decode(&w[2..4]).unwrap();
        assert!((kw - 1234.5).abs() < 1e-3);
        assert!((hz - 50.0).abs() <= 0.011);
        assert_eq!(
            handle(&mut m, &Request::ReadInputRegisters(4, 1)),
            Err(ExceptionCode::IllegalDataAddress)
        );
    }

    #[test]
    fn no_request_panics_the_handler() {
        // Every function, edge addresses and quantities, on every kind of device.
        let addrs = [
            0u16, 1, 99, 100, 199, 200, 999, 1000, 1999, 2000, 65_534, 65_535,
        ];
        let qtys = [0u16, 1, 2, 8, 125, 126, 2000, 2001, 65_535];
        let mut devices = [pdu("generic-pdu", 64), pdu("holding-pdu", 1), meter()];
        for d in devices.iter_mut() {
            for &a in &addrs {
                for &q in &qtys {
                    let words: Vec<u16> = vec![1; usize::from(q.min(300))];
                    let bits: Vec<bool> = vec![true; usize::from(q.min(3000))];
                    for req in [
                        Request::ReadCoils(a, q),
                        Request::ReadDiscreteInputs(a, q),
                        Request::ReadHoldingRegisters(a, q),
                        Request::ReadInputRegisters(a, q),
                        Request::WriteSingleCoil(a, q % 2 == 0),
                        Request::WriteSingleRegister(a, q),
                        Request::WriteMultipleCoils(a, Cow::Owned(bits.clone())),
                        Request::WriteMultipleRegisters(a, Cow::Owned(words.clone())),
                        Request::ReadWriteMultipleRegisters(a, q, a, Cow::Owned(words.clone())),
                    ] {
                        let _ = handle(d, &req);
                    }
                }
            }
        }
    }
}
