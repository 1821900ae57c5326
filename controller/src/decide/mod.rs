//! Deciding: pure functions and state, no I/O and no clock.
pub mod mv;
pub mod openadr;
pub mod planner;
pub mod replay;
pub mod signal;
pub mod timeline;
