//! Time as the core sees it: two clocks, both given to it, never read by it.
//!
//! - **Wall time** ([`Timestamp`]) is what the utility speaks: when a directive starts and ends,
//!   when a record was written. It can jump (NTP correcting a gateway that booted with a wrong
//!   clock).
//! - **Monotonic time** ([`Mono`]) never jumps. Everything that is a *duration* runs on it:
//!   minimum on and off times, restore intervals, reading windows, retries, the stale-signal
//!   timer. So a clock that jumps an hour neither restores ASICs early nor holds them off an
//!   hour longer; it only moves when the utility's directives start and end, as it must.
//!
//! ```text
//!   wall  10:00:00 ── 10:00:05 ──┐ 11:00:06 ── 11:00:07      (NTP jumped +1 h)
//!   mono  0 s ─────── 5 s ───────┴ 6 s ─────── 7 s          (steady)
//! ```

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

/// An instant on the monotonic clock, in nanoseconds from an arbitrary origin (the shell's
/// start, or a simulation's). Instants before the origin are negative: a switch the journal
/// recorded before a restart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(i64);

impl Mono {
    pub const ZERO: Mono = Mono(0);

    pub const fn from_nanos(nanos: i64) -> Mono {
        Mono(nanos)
    }

    pub fn from_duration(d: Duration) -> Mono {
        Mono(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    pub const fn as_nanos(self) -> i64 {
        self.0
    }

    /// Time from `earlier` to `self`; zero if `earlier` is later.
    pub fn since(self, earlier: Mono) -> Duration {
        Duration::from_nanos(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }

    /// True once `d` has passed since `since` (at `self`).
    pub fn elapsed(self, since: Mono, d: Duration) -> bool {
        self >= since + d
    }

    pub fn signed_since(self, earlier: Mono) -> SignedDuration {
        SignedDuration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl std::ops::Add<Duration> for Mono {
    type Output = Mono;
    fn add(self, d: Duration) -> Mono {
        Mono(
            self.0
                .saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        )
    }
}

impl std::ops::Sub<Duration> for Mono {
    type Output = Mono;
    fn sub(self, d: Duration) -> Mono {
        Mono(
            self.0
                .saturating_sub(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        )
    }
}

impl std::ops::Add<SignedDuration> for Mono {
    type Output = Mono;
    fn add(self, d: SignedDuration) -> Mono {
        Mono(
            self.0
                .saturating_add(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
        )
    }
}

/// The present, on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall: Timestamp,
    pub mono: Mono,
}

impl Now {
    /// The monotonic instant at which the wall clock read `wall`, if it did not jump since.
    pub fn mono_of(&self, wall: Timestamp) -> Mono {
        self.mono + wall.duration_since(self.wall)
    }

    /// What the wall clock read at `mono`, if it did not jump since.
    pub fn wall_of(&self, mono: Mono) -> Timestamp {
        let back = self.mono.signed_since(mono);
        self.wall.checked_sub(back).unwrap_or(self.wall)
    }

    /// `d` later, on both clocks.
    pub fn after(&self, d: Duration) -> Now {
        Now {
            wall: self
                .wall
                .checked_add(SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX))
                .unwrap_or(Timestamp::MAX),
            mono: self.mono + d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_clocks_convert_while_the_wall_clock_does_not_jump() {
        let now = Now {
            wall: "2026-11-22T10:00:00Z".parse().unwrap(),
            mono: Mono::from_duration(Duration::from_secs(100)),
        };
        let earlier: Timestamp = "2026-11-22T09:58:20Z".parse().unwrap();
        assert_eq!(now.mono_of(earlier), Mono::ZERO);
        assert_eq!(now.wall_of(Mono::ZERO), earlier);
        let before_origin: Timestamp = "2026-11-22T09:58:00Z".parse().unwrap();
        assert_eq!(now.mono_of(before_origin).as_nanos(), -20_000_000_000);
        assert_eq!(now.mono.since(Mono::ZERO), Duration::from_secs(100));
        assert_eq!(Mono::ZERO.since(now.mono), Duration::ZERO, "never negative");
        let later = now.after(Duration::from_millis(1500));
        assert_eq!(later.mono.since(now.mono), Duration::from_millis(1500));
        assert_eq!(later.wall.duration_since(now.wall).as_millis(), 1500);
    }
}
