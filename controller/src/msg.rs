//! The messages the controller's parts exchange: what the field (Modbus) tasks report, what the
//! core orders them to write, what the broker link delivers and publishes, and the shapes the
//! utility and the operator read (acknowledgements, status).
//!
//! A leaf: nothing here depends on another part of the crate, so the core, the field tasks, the
//! broker link and the metrics can all speak these types without depending on one another.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use site_config::{DeviceId, MeterId, PduId};
use tokio_modbus::ExceptionCode;

// ---------------------------------------------------------------------------------------------
// Field devices

/// A Modbus function as an operator reads it in an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Connect,
    ReadCoils,
    ReadHoldingRegisters,
    ReadInputRegisters,
    WriteSingleCoil,
    WriteMultipleCoils,
    WriteSingleRegister,
    WriteMultipleRegisters,
}

impl Function {
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Function::WriteSingleCoil
                | Function::WriteMultipleCoils
                | Function::WriteSingleRegister
                | Function::WriteMultipleRegisters
        )
    }
}

/// One Modbus request, named for errors: "read coils 0-7".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub function: Function,
    pub address: u16,
    pub count: u16,
}

impl Call {
    pub const CONNECT: Call = Call {
        function: Function::Connect,
        address: 0,
        count: 0,
    };
}

impl std::fmt::Display for Call {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.function {
            Function::Connect => return f.write_str("connect"),
            Function::ReadCoils => "read coils",
            Function::ReadHoldingRegisters => "read holding registers",
            Function::ReadInputRegisters => "read input registers",
            Function::WriteSingleCoil => "write single coil",
            Function::WriteMultipleCoils => "write multiple coils",
            Function::WriteSingleRegister => "write single register",
            Function::WriteMultipleRegisters => "write multiple registers",
        };
        let last = u32::from(self.address) + u32::from(self.count.max(1)) - 1;
        if last == u32::from(self.address) {
            write!(f, "{name} {}", self.address)
        } else {
            write!(f, "{name} {}-{last}", self.address)
        }
    }
}

/// Why a device is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// No answer in time: the connection is dropped (transaction ids may be out of step).
    #[error("no answer within {limit:?} to {call}")]
    Timeout { call: Call, limit: Duration },
    #[error("connection failed at {call}: {reason}")]
    Transport { call: Call, reason: String },
    /// The device answered, with an exception: the connection is fine.
    #[error("answered {call} with Modbus exception {:02} ({code:?})", u8::from(*.code))]
    Exception { call: Call, code: ExceptionCode },
    /// The device answered something that does not fit the request.
    #[error("answered {call} with {reason}")]
    Malformed { call: Call, reason: String },
    /// Relays that did not follow a write acknowledged by the device.
    #[error("relays disagree with what was written on outlets {outlets:?}")]
    Disagrees { outlets: Vec<u16> },
    /// Relays that read off while their outlets draw power: the relay reading cannot be believed.
    #[error("outlets {outlets:?} read off but draw power")]
    ReadsOffButDraws { outlets: Vec<u16> },
    /// A meter that keeps answering with the very same value: a stuck register or firmware.
    #[error("the very same reading ({kw} kW) read after read: the meter seems frozen")]
    Frozen { kw: f64_bits::Kw },
}

impl DeviceError {
    /// True for failures of the link rather than of the device: the connection must go.
    pub fn breaks_link(&self) -> bool {
        matches!(
            self,
            DeviceError::Timeout { .. } | DeviceError::Transport { .. }
        )
    }
}

/// A kW figure that can sit in an `Eq` error (compared by its bits).
pub mod f64_bits {
    /// kW, shown to 0.1.
    #[derive(Debug, Clone, Copy)]
    pub struct Kw(pub f64);

    impl PartialEq for Kw {
        fn eq(&self, other: &Kw) -> bool {
            self.0.to_bits() == other.0.to_bits()
        }
    }

    impl Eq for Kw {}

    impl std::fmt::Display for Kw {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:.1}", self.0)
        }
    }
}

/// What a field task tells the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Reading {
    /// A PDU's relays (outlet 1 first) and the active power of every outlet, W.
    Pdu {
        pdu: PduId,
        relays: Vec<bool>,
        power_w: Vec<f64>,
    },
    Meter {
        meter: MeterId,
        kw: f64,
    },
    /// A read failed (or the connection behind the device did).
    ReadFailed {
        device: DeviceId,
        error: DeviceError,
    },
    /// Every write of order `order` was acknowledged by the PDU.
    Written {
        pdu: PduId,
        order: u64,
    },
    /// A write of order `order` failed; later writes of the order were not sent.
    WriteFailed {
        pdu: PduId,
        order: u64,
        error: DeviceError,
    },
}

/// One write: relay states for consecutive outlets from `first_outlet` (1-based). A single
/// state is written with a single-write function when the profile says `write = "single"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub first_outlet: u16,
    pub states: Vec<bool>,
}

/// What the core wants written to one PDU. Absolute relay states, so writing an order twice
/// does no harm; a newer order replaces an older one that has not been written yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Grows with every order the core issues, over all PDUs.
    pub id: u64,
    pub writes: Vec<Write>,
}

/// The newest order for every PDU (indexed by [`PduId`]); `None`: nothing to write.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Orders {
    pub pdus: Arc<[Option<Arc<Order>>]>,
}

impl Orders {
    pub fn get(&self, pdu: PduId) -> Option<&Arc<Order>> {
        self.pdus.get(pdu.0 as usize)?.as_ref()
    }
}

// ---------------------------------------------------------------------------------------------
// The broker

/// What the broker link delivers.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// A message on a subscribed topic, as it arrived.
    Signal { topic: String, payload: Vec<u8> },
    /// The link to the broker is (re)established: status must be published again, since the
    /// broker may have published our last will meanwhile.
    Connected,
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// What became of a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Malformed, out of range, expired or a replay.
    Rejected,
    /// On a topic the site file does not name.
    Ignored,
}

/// What holds a restore back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    /// They would not fit under the budget (with the deadband to spare).
    NoRoom,
    /// They have not been off for `min_off_s` yet.
    MinOff,
    /// The last switch was less than `restore_interval_s` ago.
    Interval,
    /// The other-load estimate is too young (or too uncertain) to restore on.
    EstimateWarmingUp,
    /// The site meter cannot be read: nothing comes back until it can.
    SiteMeterSilent,
}

/// The retained status message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub site: String,
    pub online: bool,
    pub at: String,
    pub site_kw: Option<f64>,
    /// The ASICs' power: measured where their PDU answers, assumed where it does not (see
    /// `estimated`).
    pub asic_kw: Option<f64>,
    pub gpu_kw: Option<f64>,
    pub limit_kw: f64,
    /// Rated kW of ASICs switched off by gridshed.
    pub shed_kw: f64,
    /// Rated kW of ASICs still on that could be switched off.
    pub sheddable_kw: f64,
    /// What switching them off would take off the meter now: their measured kW (OpenADR's
    /// LOAD_SHED_DELTA_AVAILABLE).
    pub load_shed_delta_available_kw: f64,
    /// How far the site is planned above the limit because the load that can be shed is not
    /// enough (faulted PDUs, minimum on-times, GPU and other load alone above it).
    pub shortfall_kw: f64,
    /// Why ASICs that are off are not coming back yet (none when nothing is held).
    pub restore_held: Option<Hold>,
    pub asics_on: usize,
    pub asics_off: usize,
    pub directives: Vec<String>,
    pub faulted: Vec<Fault>,
    /// Devices whose figures are assumed, not read (README, "What it assumes of a device it
    /// cannot read").
    pub estimated: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Fault {
    pub device: String,
    pub reason: String,
}

/// The status payload published as last will: the controller is gone.
pub fn offline_status(site_id: &str) -> Vec<u8> {
    serde_json::json!({ "site": site_id, "online": false })
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_name_the_function_and_the_register_range() {
        let call = |function, address, count| Call {
            function,
            address,
            count,
        };
        assert_eq!(
            call(Function::ReadCoils, 0, 8).to_string(),
            "read coils 0-7"
        );
        assert_eq!(
            call(Function::WriteSingleRegister, 4002, 1).to_string(),
            "write single register 4002"
        );
        let e = DeviceError::Exception {
            call: call(Function::WriteMultipleCoils, 8, 4),
            code: ExceptionCode::IllegalDataValue,
        };
        assert_eq!(
            e.to_string(),
            "answered write multiple coils 8-11 with Modbus exception 03 (IllegalDataValue)"
        );
        assert_eq!(Call::CONNECT.to_string(), "connect");
    }
}
