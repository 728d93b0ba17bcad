//! PostgreSQL write-ahead-log positions (`pg_lsn`), the currency of causal consistency.

use std::fmt;
use std::str::FromStr;

/// A position in the leader's write-ahead log, as PostgreSQL's `pg_lsn` (`"16/B374D848"`).
///
/// A follower whose replayed position has reached the position of a write can serve reads of
/// that write. Positions order like the log: a later write has a greater position.
///
/// ```
/// use distributed_core::WalPosition;
/// let p: WalPosition = "16/B374D848".parse()?;
/// assert_eq!(p.to_string(), "16/B374D848");
/// assert!(p > "16/B374D847".parse()?);
/// # Ok::<(), distributed_core::ParseWalPositionError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct WalPosition(pub u64);

impl WalPosition {
    /// PostgreSQL's WAL page size (`XLOG_BLCKSZ`), as built by default.
    const PAGE: u64 = 8192;
    /// A page's short header: the first thing on every page but a segment's first.
    const SHORT_HEADER: u64 = 24;
    /// The default WAL segment size, whose first page has the long header.
    const SEGMENT: u64 = 16 * 1024 * 1024;
    /// A segment's first page's long header.
    const LONG_HEADER: u64 = 40;

    /// The end of the last record written, from the leader's insert position
    /// (`pg_current_wal_insert_lsn()`).
    ///
    /// When the last record ends exactly at a page boundary, the insert position already points
    /// past the next page's header, which no record has reached yet: a follower replaying
    /// everything written stops at the boundary, and on an idle leader would never be seen to
    /// reach the insert position. This steps back over that header, to where replay of the
    /// last record does end. (For WAL segments other than the default 16 MiB, a segment's
    /// first page is left as is: safe, only slower to be reached.)
    ///
    /// ```
    /// use distributed_core::WalPosition;
    /// assert_eq!(WalPosition(3 * 8192 + 24).written_end(), WalPosition(3 * 8192));
    /// assert_eq!(WalPosition(16 * 1024 * 1024 + 40).written_end(), WalPosition(16 * 1024 * 1024));
    /// assert_eq!(WalPosition(3 * 8192 + 64).written_end(), WalPosition(3 * 8192 + 64));
    /// ```
    pub fn written_end(self) -> Self {
        if self.0 % Self::SEGMENT == Self::LONG_HEADER {
            Self(self.0 - Self::LONG_HEADER)
        } else if self.0 % Self::PAGE == Self::SHORT_HEADER {
            Self(self.0 - Self::SHORT_HEADER)
        } else {
            self
        }
    }
}

impl fmt::Display for WalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A string that is not a `pg_lsn`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WAL position (expected two hex numbers like `16/B374D848`)")]
pub struct ParseWalPositionError;

impl FromStr for WalPosition {
    type Err = ParseWalPositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or(ParseWalPositionError)?;
        let parse = |part: &str| {
            if part.is_empty() || part.len() > 8 {
                return Err(ParseWalPositionError);
            }
            u32::from_str_radix(part, 16).map_err(|_| ParseWalPositionError)
        };
        Ok(Self((u64::from(parse(hi)?) << 32) | u64::from(parse(lo)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_orders() {
        for s in ["0/0", "0/16B3748", "FFFFFFFF/FFFFFFFF", "1/0"] {
            let p: WalPosition = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        let a: WalPosition = "0/FFFFFFFF".parse().unwrap();
        let b: WalPosition = "1/0".parse().unwrap();
        assert!(a < b);
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "/",
            "0/",
            "/0",
            "g/0",
            "0/0/0",
            "123456789/0",
            "-1/0",
            " 0/0",
        ] {
            assert_eq!(
                s.parse::<WalPosition>(),
                Err(ParseWalPositionError),
                "{s:?}"
            );
        }
    }
}
