pub mod modbus;
pub mod protocol;
