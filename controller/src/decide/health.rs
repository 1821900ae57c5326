//! One health record per device: can it be read, can it be switched, and what is shown.
//!
//! Reading and writing fail apart. A PDU that answers reads but refuses writes is readable and
//! not writable; a good read does not make it writable again, only a write that succeeds does.
//! Until then it is asked again after a backoff that grows with every failure (2 s doubling to
//! 60 s, never forgotten: a relay that stuck once is given longer next time), and meanwhile its
//! outlets count as they read and other ASICs are shed instead.
//!
//! ```text
//!   write refused ──▶ faulted, not switchable ── backoff ──▶ switchable on trial ──┐
//!        ▲                                                                          │
//!        └──────────────── the trial write refused again (backoff doubles) ◀───────┤
//!                          the trial write succeeds ──▶ healthy ◀──────────────────┘
//! ```

use std::time::Duration;

use crate::decide::time::Mono;
use crate::msg::DeviceError;

/// How long a PDU whose writes failed is left alone: doubling with each failure.
const WRITE_BACKOFF_MIN: Duration = Duration::from_secs(2);
const WRITE_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The delay after `strikes` write failures (1 → 2 s, 2 → 4 s, ... up to 60 s).
pub fn write_backoff(strikes: u32) -> Duration {
    WRITE_BACKOFF_MIN
        .saturating_mul(1u32 << strikes.saturating_sub(1).min(16))
        .min(WRITE_BACKOFF_MAX)
}

#[derive(Debug, Clone, PartialEq)]
struct WriteFault {
    error: DeviceError,
    /// From then on a write may be tried again.
    retry_at: Mono,
}

/// What is known of one device's health.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    /// Why it cannot be read now; `None` once a read succeeded.
    read: Option<DeviceError>,
    /// Why its writes are not trusted, until a write succeeds.
    write: Option<WriteFault>,
    /// It has answered a read since start-up.
    answered: bool,
    /// It has answered or failed since start-up.
    heard: bool,
    /// Write failures, ever.
    strikes: u32,
    /// The fault as shown, formatted once when it changes (status shows it at every plan).
    shown: Option<String>,
}

/// What a report did to the fault shown for a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    None,
    /// It shows this fault now (it showed none, or another).
    Faulted(DeviceError),
    /// It shows no fault any more.
    Recovered,
}

impl Health {
    /// [`Health::fault`] as text.
    pub fn fault_text(&self) -> Option<&str> {
        self.shown.as_deref()
    }

    /// The fault to show: why it cannot be read, else why it cannot be switched.
    pub fn fault(&self) -> Option<&DeviceError> {
        self.read.as_ref().or(self.write.as_ref().map(|w| &w.error))
    }

    /// Its last read succeeded: its figures are measured, not assumed.
    pub fn readable(&self) -> bool {
        self.answered && self.read.is_none()
    }

    /// It has answered or failed at least once.
    pub fn heard(&self) -> bool {
        self.heard
    }

    /// A write may be tried at `now`: none failed, or the backoff after the failure is over.
    pub fn writable(&self, now: Mono) -> bool {
        self.write.as_ref().is_none_or(|w| now >= w.retry_at)
    }

    /// Its writes failed and a trial is due at `now` (or was due).
    pub fn on_trial(&self, now: Mono) -> bool {
        self.write.as_ref().is_some_and(|w| now >= w.retry_at)
    }

    /// When a write may next be tried, while it is waiting.
    pub fn retry_at(&self, now: Mono) -> Option<Mono> {
        self.write.as_ref().map(|w| w.retry_at).filter(|t| *t > now)
    }

    /// When a write may be tried again, while its writes are not trusted.
    pub fn retry_time(&self) -> Option<Mono> {
        self.write.as_ref().map(|w| w.retry_at)
    }

    /// Readable and switchable at `now`.
    pub fn controllable(&self, now: Mono) -> bool {
        self.readable() && self.writable(now)
    }

    pub fn read_ok(&mut self) -> Change {
        self.update(|h| {
            h.read = None;
            h.answered = true;
        })
    }

    pub fn read_failed(&mut self, error: DeviceError) -> Change {
        self.update(|h| h.read = Some(error))
    }

    pub fn write_ok(&mut self) -> Change {
        self.update(|h| h.write = None)
    }

    /// A write failed (or its relays did not follow) at `now`: not switchable for a backoff.
    pub fn write_failed(&mut self, error: DeviceError, now: Mono) -> Change {
        self.update(|h| {
            h.strikes = h.strikes.saturating_add(1);
            h.write = Some(WriteFault {
                error,
                retry_at: now + write_backoff(h.strikes),
            });
        })
    }

    fn update(&mut self, f: impl FnOnce(&mut Health)) -> Change {
        let before = self.fault().cloned();
        f(self);
        self.heard = true;
        let change = match (before, self.fault()) {
            (Some(_), None) => Change::Recovered,
            (before, Some(now)) if before.as_ref() != Some(now) => Change::Faulted(now.clone()),
            _ => Change::None,
        };
        if change != Change::None {
            self.shown = self.fault().map(ToString::to_string);
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Call, Function};
    use tokio_modbus::ExceptionCode;

    fn s(secs: i64) -> Mono {
        Mono::from_nanos(secs * 1_000_000_000)
    }

    fn refused() -> DeviceError {
        DeviceError::Exception {
            call: Call {
                function: Function::WriteMultipleCoils,
                address: 0,
                count: 8,
            },
            code: ExceptionCode::IllegalDataValue,
        }
    }

    fn silent() -> DeviceError {
        DeviceError::Timeout {
            call: Call {
                function: Function::ReadCoils,
                address: 0,
                count: 8,
            },
            limit: Duration::from_millis(500),
        }
    }

    #[test]
    fn a_device_that_refuses_writes_stays_faulted_through_good_reads_until_a_write_succeeds() {
        let mut h = Health::default();
        assert_eq!(h.read_ok(), Change::None);
        assert!(h.controllable(s(0)));
        assert_eq!(h.write_failed(refused(), s(0)), Change::Faulted(refused()));
        // Table over time: (event, shown fault, switchable)
        for t in [0, 1] {
            assert_eq!(h.read_ok(), Change::None, "a good read changes nothing");
            assert_eq!(h.fault(), Some(&refused()));
            assert!(!h.controllable(s(t)), "at {t} s");
        }
        assert!(h.controllable(s(2)), "tried again after 2 s");
        assert!(h.on_trial(s(2)));
        assert_eq!(h.write_failed(refused(), s(2)), Change::None);
        assert!(!h.controllable(s(5)), "then after 4 s");
        assert!(h.controllable(s(6)));
        assert_eq!(h.write_ok(), Change::Recovered);
        assert_eq!(h.fault(), None);
        assert!(h.controllable(s(6)));
    }

    #[test]
    fn backoff_doubles_to_a_minute_and_is_never_forgotten() {
        let secs: Vec<u64> = (1..=8).map(|k| write_backoff(k).as_secs()).collect();
        assert_eq!(secs, [2, 4, 8, 16, 32, 60, 60, 60]);
        let mut h = Health::default();
        h.read_ok();
        h.write_failed(refused(), s(0));
        h.write_ok();
        h.write_failed(refused(), s(10));
        assert_eq!(
            h.retry_at(s(10)),
            Some(s(14)),
            "the second strike waits 4 s"
        );
    }

    #[test]
    fn a_read_fault_shows_first_and_clears_on_the_next_good_read() {
        let mut h = Health::default();
        assert!(!h.heard() && !h.readable());
        assert_eq!(h.read_failed(silent()), Change::Faulted(silent()));
        assert!(h.heard() && !h.readable());
        assert_eq!(
            h.read_failed(silent()),
            Change::None,
            "the same fault again"
        );
        h.write_failed(refused(), s(0));
        assert_eq!(h.fault(), Some(&silent()));
        assert_eq!(
            h.read_ok(),
            Change::Faulted(refused()),
            "the write fault shows now"
        );
        assert_eq!(h.write_ok(), Change::Recovered);
    }
}
