//! The session record and how it is encoded for the cache and the database.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{SessionError, SessionId};

/// A session's data: a JSON object.
pub type SessionData = serde_json::Map<String, serde_json::Value>;

/// A session: its id, its data and when it expires.
///
/// `Debug` shows neither the id nor the data.
#[derive(Clone, PartialEq)]
pub struct SessionRecord {
    /// The id.
    pub id: SessionId,
    /// The data.
    pub data: SessionData,
    /// When the session stops being valid; loads after it find nothing.
    pub expires_at: SystemTime,
}

impl SessionRecord {
    /// An empty session with a fresh id, valid for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        let now = SystemTime::now();
        Self {
            id: SessionId::generate(),
            data: SessionData::new(),
            expires_at: now.checked_add(ttl).unwrap_or(now),
        }
    }

    /// Whether the session has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at <= now
    }
}

impl fmt::Debug for SessionRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionRecord")
            .field("id", &self.id)
            .field("keys", &self.data.len())
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A session's data encoded once at save time, shared by the cache write, the outbox and
/// the database write.
#[derive(Clone)]
pub(crate) struct Encoded {
    /// The data as JSON.
    pub(crate) json: Arc<[u8]>,
    pub(crate) expires_at: SystemTime,
}

impl Encoded {
    pub(crate) fn new(record: &SessionRecord, limit: usize) -> Result<Self, SessionError> {
        let json = serde_json::to_vec(&record.data).map_err(SessionError::Codec)?;
        if json.len() > limit {
            return Err(SessionError::TooLarge {
                size: json.len(),
                limit,
            });
        }
        Ok(Self {
            json: json.into(),
            expires_at: record.expires_at,
        })
    }

    pub(crate) fn decode(&self, id: SessionId) -> Result<SessionRecord, SessionError> {
        Ok(SessionRecord {
            id,
            data: serde_json::from_slice(&self.json).map_err(SessionError::Codec)?,
            expires_at: self.expires_at,
        })
    }
}

/// A versioned session as the cache holds it:
/// `"S1" | version: u64 BE | expires_at: i64 ms BE | JSON data`.
pub(crate) fn cache_value(version: u64, encoded: &Encoded) -> Vec<u8> {
    let mut value = Vec::with_capacity(18 + encoded.json.len());
    value.extend_from_slice(CACHE_MAGIC);
    value.extend_from_slice(&version.to_be_bytes());
    value.extend_from_slice(&to_unix_ms(encoded.expires_at).to_be_bytes());
    value.extend_from_slice(&encoded.json);
    value
}

const CACHE_MAGIC: &[u8; 2] = b"S1";

/// The version and data of a cache value; `None` if it is not one of ours.
pub(crate) fn parse_cache_value(value: &[u8]) -> Option<(u64, Encoded)> {
    let rest = value.strip_prefix(CACHE_MAGIC)?;
    let (version, rest) = rest.split_first_chunk::<8>()?;
    let (expires, json) = rest.split_first_chunk::<8>()?;
    Some((
        u64::from_be_bytes(*version),
        Encoded {
            json: json.into(),
            expires_at: from_unix_ms(i64::from_be_bytes(*expires)),
        },
    ))
}

/// Milliseconds since the Unix epoch, saturating.
pub(crate) fn to_unix_ms(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// The time `ms` milliseconds after the Unix epoch, saturating.
pub(crate) fn from_unix_ms(ms: i64) -> SystemTime {
    let magnitude = Duration::from_millis(ms.unsigned_abs());
    let at = if ms >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    at.unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_values_round_trip_and_reject_foreign_bytes() {
        let mut record = SessionRecord::new(Duration::from_secs(60));
        record
            .data
            .insert("k\u{0}\n".into(), serde_json::json!({"a": [1, 2]}));
        let encoded = Encoded::new(&record, 1 << 20).unwrap();
        let value = cache_value(42, &encoded);
        let (version, parsed) = parse_cache_value(&value).unwrap();
        assert_eq!(version, 42);
        let back = parsed.decode(record.id).unwrap();
        assert_eq!(back.data, record.data);
        assert_eq!(
            to_unix_ms(back.expires_at),
            to_unix_ms(record.expires_at),
            "millisecond precision"
        );
        for foreign in [&b""[..], b"S1", b"S1\0\0\0", b"{\"json\": 1}"] {
            assert!(parse_cache_value(foreign).is_none());
        }
    }

    #[test]
    fn size_limit_is_enforced() {
        let mut record = SessionRecord::new(Duration::from_secs(60));
        record.data.insert("big".into(), "x".repeat(100).into());
        assert!(matches!(
            Encoded::new(&record, 50),
            Err(SessionError::TooLarge { limit: 50, .. })
        ));
    }

    #[test]
    fn unix_ms_round_trips_and_saturates() {
        for ms in [0, 1, 1_700_000_000_123, -5] {
            assert_eq!(to_unix_ms(from_unix_ms(ms)), ms);
        }
        assert_eq!(from_unix_ms(i64::MIN), from_unix_ms(i64::MIN));
    }

    #[test]
    fn debug_hides_id_and_data() {
        let mut record = SessionRecord::new(Duration::from_secs(60));
        record.data.insert("secret".into(), "hunter2".into());
        let shown = format!("{record:?}");
        assert!(!shown.contains("hunter2") && !shown.contains(&record.id.to_string()));
    }
}
