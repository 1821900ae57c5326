//! The Modbus requests that read and switch a device, and what their answers mean: pure
//! functions of the device's profile, with no socket. The field tasks ([`super::modbus`]) send
//! these requests with tokio-modbus; the deterministic simulation answers the very same
//! requests with firmware-sim's handler, so both exercise one codec.
//!
//! Reading a PDU is a relay read, then its outlet power block in as many requests as Modbus
//! allows; reading a meter is one request. An order is one write per [`Write`]: Write Multiple
//! Coils (or Registers) for a run, or a single write where the profile says `write = "single"`.

use std::borrow::Cow;

use site_config::profile::{MAX_READ_WORDS, RegisterTable, RelayTable, ValueMap, WriteMode};
use site_config::{Meter, Pdu};
use tokio_modbus::{Request, Response};

use crate::msg::{Call, DeviceError, Function, Order};

/// One request, and how an operator would name it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub call: Call,
    pub request: Request<'static>,
}

fn step(function: Function, address: u16, count: u16, request: Request<'static>) -> Step {
    Step {
        call: Call {
            function,
            address,
            count,
        },
        request,
    }
}

fn read_words(table: RegisterTable, address: u16, count: u16) -> Step {
    match table {
        RegisterTable::Input => step(
            Function::ReadInputRegisters,
            address,
            count,
            Request::ReadInputRegisters(address, count),
        ),
        RegisterTable::Holding => step(
            Function::ReadHoldingRegisters,
            address,
            count,
            Request::ReadHoldingRegisters(address, count),
        ),
    }
}

/// Reads `count` registers from `address` in as many requests as Modbus allows.
fn read_block(table: RegisterTable, address: u16, count: u16) -> Vec<Step> {
    let mut out = Vec::new();
    let mut done: u16 = 0;
    while done < count {
        let n = (count - done).min(MAX_READ_WORDS);
        out.push(read_words(table, address.wrapping_add(done), n));
        done += n;
    }
    out
}

/// The requests that read a PDU: its relays, then its outlets' power.
pub fn pdu_read(pdu: &Pdu) -> Result<Vec<Step>, DeviceError> {
    let relays = pdu.profile.relays;
    let n = pdu.outlets;
    let mut steps = vec![match relays.table {
        RelayTable::Coil => step(
            Function::ReadCoils,
            relays.address,
            n,
            Request::ReadCoils(relays.address, n),
        ),
        RelayTable::Holding => step(
            Function::ReadHoldingRegisters,
            relays.address,
            n,
            Request::ReadHoldingRegisters(relays.address, n),
        ),
    }];
    let block = pdu.profile.outlet_power;
    let span = block.span(n).ok_or_else(|| DeviceError::Malformed {
        call: steps[0].call,
        reason: "an outlet power block beyond the register space (check the profile)".into(),
    })?;
    steps.extend(read_block(block.table, block.address, span));
    Ok(steps)
}

/// What the answers to [`pdu_read`] say: relays (outlet 1 first) and power per outlet, W.
pub fn decode_pdu(
    pdu: &Pdu,
    steps: &[Step],
    answers: &[Response],
) -> Result<(Vec<bool>, Vec<f64>), DeviceError> {
    let n = usize::from(pdu.outlets);
    let relays = pdu.profile.relays;
    let (Some(first), Some(answer)) = (steps.first(), answers.first()) else {
        return Err(DeviceError::Malformed {
            call: Call::CONNECT,
            reason: "no answer".into(),
        });
    };
    let states: Vec<bool> = match (relays.table, answer) {
        (RelayTable::Coil, Response::ReadCoils(bits)) => bits.clone(),
        (RelayTable::Holding, Response::ReadHoldingRegisters(words)) => {
            words.iter().map(|w| *w == relays.on_value).collect()
        }
        _ => return Err(wrong_response(first.call)),
    };
    if states.len() < n {
        return Err(DeviceError::Malformed {
            call: first.call,
            reason: format!("{} relay states for {n} outlets", states.len()),
        });
    }
    let mut words = Vec::new();
    for (s, a) in steps.iter().zip(answers).skip(1) {
        let chunk = match a {
            Response::ReadInputRegisters(w) | Response::ReadHoldingRegisters(w) => w,
            _ => return Err(wrong_response(s.call)),
        };
        if chunk.len() != usize::from(s.call.count) {
            return Err(DeviceError::Malformed {
                call: s.call,
                reason: format!("{} registers for {}", chunk.len(), s.call.count),
            });
        }
        words.extend_from_slice(chunk);
    }
    let block = pdu.profile.outlet_power;
    let mut power_w = Vec::with_capacity(n);
    for outlet in 1..=pdu.outlets {
        let map = block.outlet(outlet);
        let offset = usize::from(map.address.wrapping_sub(block.address));
        let w = words
            .get(offset..)
            .and_then(|w| map.decode(w))
            .map(|v| map.to_watts(v))
            .filter(|w| w.is_finite())
            .ok_or_else(|| DeviceError::Malformed {
                call: steps.get(1).map_or(first.call, |s| s.call),
                reason: format!("no readable power value for outlet {outlet}"),
            })?;
        power_w.push(w);
    }
    Ok((states[..n].to_vec(), power_w))
}

/// The request that reads a meter's active power.
pub fn meter_read(meter: &Meter) -> Step {
    let map = meter.profile.active_power;
    read_words(map.table, map.address, map.encoding.words())
}

/// A meter's active power, kW, from its answer to [`meter_read`].
pub fn decode_meter(meter: &Meter, step: &Step, answer: &Response) -> Result<f64, DeviceError> {
    let words = match answer {
        Response::ReadInputRegisters(w) | Response::ReadHoldingRegisters(w) => w,
        _ => return Err(wrong_response(step.call)),
    };
    let map: ValueMap = meter.profile.active_power;
    let v = map.decode(words).ok_or_else(|| DeviceError::Malformed {
        call: step.call,
        reason: "a power value that is not a finite number".into(),
    })?;
    let kw = map.to_watts(v) / 1000.0;
    if !kw.is_finite() || !(-1e7..=1e7).contains(&kw) {
        return Err(DeviceError::Malformed {
            call: step.call,
            reason: format!("an absurd power of {kw} kW"),
        });
    }
    Ok(kw)
}

/// The requests that carry out `order` on `pdu`.
pub fn order_writes(pdu: &Pdu, order: &Order) -> Vec<Step> {
    let relays = pdu.profile.relays;
    let word = |on: bool| {
        if on {
            relays.on_value
        } else {
            relays.off_value
        }
    };
    order
        .writes
        .iter()
        .map(|w| {
            let address = relays
                .address
                .wrapping_add(w.first_outlet.saturating_sub(1));
            let count = w.states.len() as u16;
            match (relays.table, relays.write, w.states.as_slice()) {
                (RelayTable::Coil, WriteMode::Single, [one]) => step(
                    Function::WriteSingleCoil,
                    address,
                    1,
                    Request::WriteSingleCoil(address, *one),
                ),
                (RelayTable::Coil, _, states) => step(
                    Function::WriteMultipleCoils,
                    address,
                    count,
                    Request::WriteMultipleCoils(address, Cow::Owned(states.to_vec())),
                ),
                (RelayTable::Holding, WriteMode::Single, [one]) => step(
                    Function::WriteSingleRegister,
                    address,
                    1,
                    Request::WriteSingleRegister(address, word(*one)),
                ),
                (RelayTable::Holding, _, states) => step(
                    Function::WriteMultipleRegisters,
                    address,
                    count,
                    Request::WriteMultipleRegisters(
                        address,
                        Cow::Owned(states.iter().map(|s| word(*s)).collect()),
                    ),
                ),
            }
        })
        .collect()
}

/// Checks a write's answer echoes the request.
pub fn check_written(step: &Step, answer: &Response) -> Result<(), DeviceError> {
    let ok = match (&step.request, answer) {
        (Request::WriteSingleCoil(a, v), Response::WriteSingleCoil(b, w)) => a == b && v == w,
        (Request::WriteMultipleCoils(a, v), Response::WriteMultipleCoils(b, n)) => {
            a == b && v.len() == usize::from(*n)
        }
        (Request::WriteSingleRegister(a, v), Response::WriteSingleRegister(b, w)) => {
            a == b && v == w
        }
        (Request::WriteMultipleRegisters(a, v), Response::WriteMultipleRegisters(b, n)) => {
            a == b && v.len() == usize::from(*n)
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(DeviceError::Malformed {
            call: step.call,
            reason: format!("an answer that does not echo the write ({answer:?})"),
        })
    }
}

fn wrong_response(call: Call) -> DeviceError {
    DeviceError::Malformed {
        call,
        reason: "the answer to another function".into(),
    }
}

/// Sorts tokio-modbus's outcome of one request: the link's failure, the device's exception,
/// or its answer.
pub fn outcome(
    call: Call,
    result: tokio_modbus::Result<Response>,
) -> Result<Response, DeviceError> {
    match result {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(code)) => Err(DeviceError::Exception { call, code }),
        // An answer whose header or function does not fit the request: the device answered,
        // wrongly (a wrong function code is not a broken connection).
        Err(tokio_modbus::Error::Protocol(e)) => Err(DeviceError::Malformed {
            call,
            reason: format!("an answer that does not fit the request ({e})"),
        }),
        Err(tokio_modbus::Error::Transport(e)) => Err(DeviceError::Transport {
            call,
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::Write;

    fn small() -> site_config::Site {
        site_config::load(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/sites/small.toml"
        ))
        .unwrap()
    }

    fn pdu<'a>(site: &'a site_config::Site, name: &str) -> &'a Pdu {
        site.pdus.iter().find(|p| p.name == name).unwrap()
    }

    #[test]
    fn an_order_is_one_write_multiple_per_run_or_single_writes_as_the_profile_says() {
        let site = small();
        let order = Order {
            id: 1,
            writes: vec![Write {
                first_outlet: 3,
                states: vec![false, true],
            }],
        };
        let coils = order_writes(pdu(&site, "pdu-1"), &order);
        assert_eq!(coils.len(), 1);
        assert_eq!(coils[0].call.to_string(), "write multiple coils 2-3");
        let single = Order {
            id: 2,
            writes: vec![Write {
                first_outlet: 2,
                states: vec![false],
            }],
        };
        let legacy = pdu(&site, "pdu-legacy");
        let words = order_writes(legacy, &single);
        let relays = legacy.profile.relays;
        assert_eq!(
            words[0].request,
            Request::WriteSingleRegister(relays.address + 1, relays.off_value)
        );
    }

    #[test]
    fn a_pdu_reading_decodes_relays_and_power_and_refuses_short_answers() {
        let site = small();
        let p = pdu(&site, "pdu-1");
        let steps = pdu_read(p).unwrap();
        assert_eq!(steps[0].call.to_string(), "read coils 0-7");
        let block = p.profile.outlet_power;
        let mut words = vec![0u16; usize::from(block.span(8).unwrap())];
        for o in 1..=8u16 {
            let map = block.outlet(o);
            let at = usize::from(map.address - block.address);
            let n = usize::from(map.encoding.words());
            words[at..at + n]
                .copy_from_slice(&map.encode(map.from_watts(f64::from(o) * 100.0))[..n]);
        }
        let answers = vec![
            Response::ReadCoils(vec![true, false, true, true, true, true, true, true]),
            Response::ReadInputRegisters(words),
        ];
        let (relays, power) = decode_pdu(p, &steps, &answers).unwrap();
        assert!(!relays[1] && relays[0]);
        assert!((power[7] - 800.0).abs() < 1e-6, "{power:?}");
        let short = vec![Response::ReadCoils(vec![true; 3]), answers[1].clone()];
        let e = decode_pdu(p, &steps, &short).unwrap_err();
        assert_eq!(
            e.to_string(),
            "answered read coils 0-7 with 3 relay states for 8 outlets"
        );
        let wrong = vec![
            Response::ReadHoldingRegisters(vec![1; 8]),
            answers[1].clone(),
        ];
        assert!(
            decode_pdu(p, &steps, &wrong)
                .unwrap_err()
                .to_string()
                .contains("the answer to another function")
        );
    }

    #[test]
    fn a_write_must_be_echoed() {
        let s = step(
            Function::WriteSingleCoil,
            4,
            1,
            Request::WriteSingleCoil(4, false),
        );
        assert!(check_written(&s, &Response::WriteSingleCoil(4, false)).is_ok());
        assert!(check_written(&s, &Response::WriteSingleCoil(5, false)).is_err());
    }
}
