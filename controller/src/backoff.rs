//! Exponential backoff with jitter, for reconnecting to brokers and Modbus endpoints.

use std::time::Duration;

/// Delays between failed attempts: doubling from `min`, capped at `max`, plus up to 25 %
/// jitter so that a fleet of gateways (or of endpoints) does not retry in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before attempt `failures + 1`.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = self
            .min
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let base = exp.min(self.max);
        base + base.mul_f64(rand::random_range(0.0..0.25))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_minimum_and_is_capped_with_jitter() {
        let b = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for (failures, base_ms) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1000),
            (40, 1000),
        ] {
            for _ in 0..50 {
                let d = b.delay(failures).as_secs_f64() * 1000.0;
                let base = f64::from(base_ms);
                assert!(
                    d >= base && d <= base * 1.25 + 1e-6,
                    "attempt {failures}: {d} ms"
                );
            }
        }
    }
}
