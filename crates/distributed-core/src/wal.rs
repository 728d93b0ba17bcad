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
