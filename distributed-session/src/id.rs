//! Session ids: 128 bits from a cryptographically secure generator, as URL-safe text.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;

use crate::SessionError;

/// A session id: 16 random bytes, written as 22 characters of unpadded URL-safe base64.
///
/// The bytes come from `rand::rng()`, a ChaCha-based generator seeded (and periodically
/// reseeded) from the operating system: 128 bits of entropy, so ids cannot be guessed and do
/// not collide in practice. The text form is the one `tower-sessions` puts in its cookie, so a
/// cookie value, a scope key and a database key are the same string.
///
/// An id is a credential: its `Debug` form is redacted. `Display` writes the real text (for
/// cookies and storage keys); never log it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId([u8; 16]);

impl SessionId {
    /// The length of the text form.
    pub const TEXT_LEN: usize = 22;

    /// A fresh random id.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// Parses the text form, checking length and alphabet before decoding, so that garbage
    /// is rejected cheaply and before any I/O.
    ///
    /// # Errors
    /// [`SessionError::InvalidId`] for anything but 22 characters of `A-Z a-z 0-9 - _` that
    /// decode to 16 bytes with no stray bits (so every id has exactly one text form).
    pub fn parse(text: &str) -> Result<Self, SessionError> {
        let valid_alphabet = text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if text.len() != Self::TEXT_LEN || !valid_alphabet {
            return Err(SessionError::InvalidId);
        }
        let mut bytes = [0u8; 16];
        match URL_SAFE_NO_PAD.decode_slice(text, &mut bytes) {
            Ok(16) => Ok(Self(bytes)),
            _ => Err(SessionError::InvalidId),
        }
    }

    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The id as `tower-sessions` holds it (an `i128` of the same bytes, little-endian), so
    /// both crates write the same text.
    pub fn to_i128(self) -> i128 {
        i128::from_le_bytes(self.0)
    }

    /// The id from `tower-sessions`' `i128`.
    pub fn from_i128(id: i128) -> Self {
        Self(id.to_le_bytes())
    }

    /// Which of `n` stripes this id falls in (the id is random, so stripes are even).
    pub(crate) fn stripe(&self, n: usize) -> usize {
        usize::from(u16::from_le_bytes([self.0[0], self.0[1]])) % n
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; 24];
        let written = URL_SAFE_NO_PAD
            .encode_slice(self.0, &mut text)
            .map_err(|_| fmt::Error)?;
        let text = std::str::from_utf8(&text[..written]).map_err(|_| fmt::Error)?;
        f.write_str(text)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

impl FromStr for SessionId {
    type Err = SessionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn text_round_trips_and_is_url_safe() {
        for _ in 0..1000 {
            let id = SessionId::generate();
            let text = id.to_string();
            assert_eq!(text.len(), SessionId::TEXT_LEN);
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(SessionId::parse(&text).unwrap(), id);
        }
    }

    #[test]
    fn ids_are_distinct_and_use_every_bit() {
        let ids: Vec<SessionId> = (0..2000).map(|_| SessionId::generate()).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());
        // Every bit position is set in some id and clear in another: all 128 bits are random.
        let (mut any, mut all) = ([0u8; 16], [0xffu8; 16]);
        for id in &ids {
            for (i, b) in id.as_bytes().iter().enumerate() {
                any[i] |= b;
                all[i] &= b;
            }
        }
        assert_eq!(any, [0xff; 16]);
        assert_eq!(all, [0; 16]);
    }

    #[test]
    fn rejects_garbage() {
        let good = SessionId::generate().to_string();
        let mut stray_bits = good.clone();
        // The last character carries 2 bits; 'B' sets one of the 4 unused bits below them.
        stray_bits.replace_range(21.., "B");
        let too_long = format!("{good}A");
        let bad = [
            "",
            "a",
            &good[..21],
            &too_long,
            "../../../../etc/passwd..",
            "AAAAAAAAAAAAAAAAAAAAA=",
            "AAAAAAAAAAAAAAAAAAAAA+",
            "AAAAAAAAAAAAAAAAAAAA\u{e9}",
            "AAAAAAAAAAAAAAAAAAAA\0A",
            &stray_bits,
        ];
        for text in bad {
            assert!(
                matches!(SessionId::parse(text), Err(SessionError::InvalidId)),
                "{text:?}"
            );
        }
    }

    #[test]
    fn matches_the_tower_sessions_text() {
        // tower-sessions writes `URL_SAFE_NO_PAD(i128::to_le_bytes)`; so do we.
        let id = SessionId::generate();
        let theirs = URL_SAFE_NO_PAD.encode(id.to_i128().to_le_bytes());
        assert_eq!(id.to_string(), theirs);
        assert_eq!(SessionId::from_i128(id.to_i128()), id);
    }

    #[test]
    fn debug_is_redacted() {
        let id = SessionId::generate();
        assert!(!format!("{id:?}").contains(&id.to_string()));
    }
}
