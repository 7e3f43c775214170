use serde::{Deserialize, Serialize};

/// A point in time, in microseconds since the Unix epoch (UTC). The domain never reads a clock:
/// callers pass `now` in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Seconds and nanoseconds, as `google.protobuf.Timestamp` wants them.
    pub fn to_seconds_nanos(self) -> (i64, i32) {
        let seconds = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        // `micros` < 1_000_000, so the product fits an i32.
        (seconds, (micros * 1000) as i32)
    }

    /// From seconds and nanoseconds; `None` when out of the representable range.
    pub fn from_seconds_nanos(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        seconds
            .checked_mul(1_000_000)?
            .checked_add(i64::from(nanos / 1000))
            .map(Self)
    }

    pub fn saturating_add_micros(self, micros: i64) -> Self {
        Self(self.0.saturating_add(micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_nanos_round_trip_truncates_to_micros() {
        let t = Timestamp::from_seconds_nanos(1_700_000_000, 123_456_789).expect("in range");
        assert_eq!(t.to_seconds_nanos(), (1_700_000_000, 123_456_000));
        let before_epoch = Timestamp::from_micros(-1);
        assert_eq!(before_epoch.to_seconds_nanos(), (-1, 999_999_000));
        assert_eq!(Timestamp::from_seconds_nanos(0, -1), None);
        assert_eq!(Timestamp::from_seconds_nanos(i64::MAX, 0), None);
    }
}
