//! Small helpers over time series of readings: forgetting what is too old, and rounding what is
//! shown or sent (the meters are not more precise than this).

use std::collections::VecDeque;

use jiff::{SignedDuration, Timestamp};

/// Drops the oldest entries while they are more than `window` older than `now`.
pub fn keep_recent<T>(
    series: &mut VecDeque<T>,
    at: impl Fn(&T) -> Timestamp,
    now: Timestamp,
    window: SignedDuration,
) {
    while series
        .front()
        .is_some_and(|oldest| now.duration_since(at(oldest)) > window)
    {
        series.pop_front();
    }
}

/// `window` as a signed duration; a window too long to say is forever.
pub fn window(d: std::time::Duration) -> SignedDuration {
    SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX)
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_recent_drops_only_what_is_older_than_the_window() {
        let t = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let mut q: VecDeque<Timestamp> = [0, 5, 10, 15].map(t).into();
        keep_recent(&mut q, |x| *x, t(15), SignedDuration::from_secs(10));
        assert_eq!(q, [t(5), t(10), t(15)]);
    }
}
