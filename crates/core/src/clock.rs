//! Time as payrail's rules see it.
//!
//! Every expiry rule (OTPs, tokens, reservations) reads a [`Clock`] rather than
//! the system time, so the sandbox can move time forward for all of them at once.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Timestamp {
        Timestamp(ms)
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    pub fn minus(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-22T10:00:00.000Z`.
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
            Ok(t) => {
                let ms = t.millisecond();
                let t = t.replace_nanosecond(0).unwrap_or(t);
                let base = t
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                // `Rfc3339` prints `...:00Z`; add the milliseconds before the `Z`.
                format!("{}.{ms:03}Z", base.trim_end_matches('Z'))
            }
            Err(_) => String::from("invalid-time"),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The machine's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_with_millis() {
        assert_eq!(Timestamp(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Timestamp(1_440_071_245_123).to_rfc3339(),
            "2015-08-20T11:47:25.123Z"
        );
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp(i64::MAX - 1);
        assert_eq!(t.plus(Duration::from_secs(10)), Timestamp(i64::MAX));
        assert_eq!(Timestamp(1000).minus(Duration::from_secs(1)), Timestamp(0));
    }
}
