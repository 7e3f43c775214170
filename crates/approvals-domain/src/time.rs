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

    /// From seconds and nanoseconds, as `google.protobuf.Timestamp` documents them: `None` with
    /// seconds outside [`TIMESTAMP_SECONDS`] (0001-01-01T00:00:00Z to
    /// 9999-12-31T23:59:59.999999999Z) or nanos outside 0..=999,999,999. Kept to the microsecond.
    pub fn from_seconds_nanos(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..1_000_000_000).contains(&nanos) || !TIMESTAMP_SECONDS.contains(&seconds) {
            return None;
        }
        // In range, seconds * 10^6 is at most 2.6e17: no overflow.
        Some(Self(seconds * 1_000_000 + i64::from(nanos / 1000)))
    }

    /// The last instant a `google.protobuf.Timestamp` can hold, to the microsecond.
    pub const MAX: Self = Self(*TIMESTAMP_SECONDS.end() * 1_000_000 + 999_999);

    pub fn saturating_add_micros(self, micros: i64) -> Self {
        Self(self.0.saturating_add(micros))
    }
}

/// The seconds of a `google.protobuf.Timestamp`: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
pub const TIMESTAMP_SECONDS: std::ops::RangeInclusive<i64> = -62_135_596_800..=253_402_300_799;

/// How a refused Timestamp is described.
pub const TIMESTAMP_RANGE: &str = "must be a valid google.protobuf.Timestamp: from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z (seconds -62135596800 to 253402300799, nanos 0 to 999999999)";

/// The seconds of a `google.protobuf.Duration`: about ±10,000 years.
pub const DURATION_SECONDS: std::ops::RangeInclusive<i64> = -315_576_000_000..=315_576_000_000;

/// How a refused Duration is described.
pub const DURATION_RANGE: &str = "must be a valid google.protobuf.Duration: seconds -315576000000 to 315576000000, nanos -999999999 to 999999999 with the sign of seconds";

/// A `google.protobuf.Duration` in microseconds (truncated toward zero); `None` outside its
/// documented range: seconds within [`DURATION_SECONDS`], |nanos| below 10^9, and nanos of the
/// same sign as seconds (or either zero).
pub fn duration_micros(seconds: i64, nanos: i32) -> Option<i64> {
    let sign_agrees = match seconds.signum() {
        1 => nanos >= 0,
        -1 => nanos <= 0,
        _ => true,
    };
    if !DURATION_SECONDS.contains(&seconds) || nanos.unsigned_abs() >= 1_000_000_000 || !sign_agrees
    {
        return None;
    }
    // In range, seconds * 10^6 is at most 3.2e17: no overflow.
    Some(seconds * 1_000_000 + i64::from(nanos / 1000))
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

    #[test]
    fn timestamps_hold_the_protobuf_range_only() {
        let max = Timestamp::from_seconds_nanos(253_402_300_799, 999_999_999);
        assert_eq!(max, Some(Timestamp::MAX));
        assert_eq!(
            Timestamp::MAX.to_seconds_nanos(),
            (253_402_300_799, 999_999_000)
        );
        assert_eq!(Timestamp::from_seconds_nanos(253_402_300_800, 0), None);
        let min = Timestamp::from_seconds_nanos(-62_135_596_800, 0).expect("year 1");
        assert_eq!(min.to_seconds_nanos(), (-62_135_596_800, 0));
        assert_eq!(
            Timestamp::from_seconds_nanos(-62_135_596_801, 999_999_999),
            None
        );
        assert_eq!(Timestamp::from_seconds_nanos(0, 1_000_000_000), None);
    }

    #[test]
    fn durations_hold_the_protobuf_range_with_one_sign() {
        assert_eq!(duration_micros(1, 500_000_000), Some(1_500_000));
        assert_eq!(duration_micros(-1, -500_000_000), Some(-1_500_000));
        assert_eq!(duration_micros(0, -5_000), Some(-5));
        assert_eq!(duration_micros(0, 5_000), Some(5));
        assert_eq!(
            duration_micros(315_576_000_000, 999_999_999),
            Some(315_576_000_000_999_999)
        );
        assert_eq!(duration_micros(315_576_000_001, 0), None);
        assert_eq!(duration_micros(-315_576_000_001, 0), None);
        assert_eq!(duration_micros(1, -1), None);
        assert_eq!(duration_micros(-1, 1), None);
        assert_eq!(duration_micros(0, 1_000_000_000), None);
        assert_eq!(duration_micros(0, -1_000_000_000), None);
    }
}
