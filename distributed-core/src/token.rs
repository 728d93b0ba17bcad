//! A portable consistency token: a scope's read requirement as a short string, to carry in a
//! response header or cookie, a background job's payload, or a call to another service, so
//! that whoever holds it reads what the scope wrote.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{Freshness, WalPosition};

/// The longest string [`ConsistencyToken`] parsing looks at; anything longer is refused unread.
pub const MAX_TOKEN_LEN: usize = 64;

const VERSION: &str = "v1";
const LEADER_BODY: &str = "L";
/// Bytes of the HMAC kept in a signed token: 128 bits, the truncation RFC 2104 allows and
/// plenty against forgery by guessing.
const SIGNATURE_BYTES: usize = 16;
/// What the signature covers besides the token: a key shared with other uses cannot be made to
/// sign a consistency token, and the other way round.
const SIGNATURE_CONTEXT: &[u8] = b"distributed-core consistency token\0";

/// Why a string is not an acceptable consistency token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The string is empty.
    #[error("empty consistency token")]
    Empty,
    /// The string is longer than any token ([`MAX_TOKEN_LEN`]).
    #[error("consistency token of {0} bytes is longer than any valid token")]
    TooLong(usize),
    /// The string does not start with a version this library reads (`v1.`).
    #[error("not a consistency token of a supported version (expected `v1.`)")]
    UnsupportedVersion,
    /// The string has the wrong shape: missing or extra parts, or characters a token never has.
    #[error("malformed consistency token")]
    Malformed,
    /// The body is neither `L` nor a WAL position in lowercase hexadecimal.
    #[error("consistency token does not carry a valid WAL position")]
    BadPosition,
    /// The token is signed, but was parsed without a key: verify it with [`TokenSigner`].
    #[error("consistency token is signed; verify it with the signing key")]
    Signed,
    /// A signature is required and the token has none.
    #[error("consistency token is not signed")]
    Unsigned,
    /// The signature does not match: the token was forged, altered, truncated or signed with
    /// another key.
    #[error("consistency token signature does not match")]
    BadSignature,
    /// A signing key shorter than [`TokenSigner::MIN_KEY_LEN`] bytes.
    #[error("token signing key of {0} bytes is too short (at least 32 bytes)")]
    KeyTooShort(usize),
}

/// A scope's read requirement, as a portable string.
///
/// # Format
///
/// `v1.<body>` unsigned, `v1.<body>.<signature>` signed, where `<body>` is
///
/// - a WAL position as lowercase hexadecimal without leading zeros (`16b374d848`): read from a
///   follower that has replayed at least this far, or the leader; `0` means any server;
/// - `L`: read from the leader (the scope wrote, but its position is unknown);
///
/// and `<signature>` is the first 16 bytes of HMAC-SHA256 over a fixed context string and
/// `v1.<body>`, in unpadded base64url (22 characters). Every character is in
/// `[0-9A-Za-z._-]`: safe in URLs, headers and cookies without escaping. A signed token is at
/// most 42 bytes.
///
/// # Trust
///
/// An unsigned token is a request, not a proof: whoever can hand one to the application can
/// move their own reads onto the leader (a position far ahead, or `L`), which is no more than
/// writing on every request already does, but costs the leader. When tokens come from clients
/// (a cookie, a header), sign them with a [`TokenSigner`] and accept only what it verifies: a
/// forged, altered or truncated signed token is refused with [`TokenError::BadSignature`].
/// Tokens carry no secret and no expiry: a position stays true forever (once every follower has
/// replayed it, it costs nothing), and a leader token moves only its holder's reads.
///
/// ```
/// use distributed_core::{ConsistencyToken, Freshness, WalPosition};
///
/// let token = ConsistencyToken::at_least(WalPosition(0x16_B374_D848));
/// assert_eq!(token.to_string(), "v1.16b374d848");
/// let parsed: ConsistencyToken = "v1.16b374d848".parse()?;
/// assert_eq!(parsed.freshness(), Freshness::AtLeast(WalPosition(0x16_B374_D848)));
/// assert!("v1.not-hex".parse::<ConsistencyToken>().is_err());
/// # Ok::<(), distributed_core::TokenError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ConsistencyToken {
    freshness: Freshness,
}

impl ConsistencyToken {
    /// A token requiring `freshness`. [`Freshness::AtLeast`] of position zero is the same as
    /// [`Freshness::Any`]: every position is at least zero.
    pub fn new(freshness: Freshness) -> Self {
        let freshness = match freshness {
            Freshness::AtLeast(WalPosition(0)) => Freshness::Any,
            other => other,
        };
        Self { freshness }
    }

    /// A token requiring a follower that has replayed `position`.
    pub fn at_least(position: WalPosition) -> Self {
        Self::new(Freshness::AtLeast(position))
    }

    /// A token requiring the leader.
    pub fn leader() -> Self {
        Self::new(Freshness::Leader)
    }

    /// What a read made with this token needs.
    pub fn freshness(&self) -> Freshness {
        self.freshness
    }

    /// The stronger of two tokens' requirements.
    #[must_use]
    pub fn max(self, other: Self) -> Self {
        Self::new(self.freshness.max(other.freshness))
    }

    /// Parses an unsigned token.
    ///
    /// # Errors
    /// [`TokenError`] for anything but a well-formed unsigned `v1` token;
    /// [`TokenError::Signed`] for a signed one (verify those with [`TokenSigner::verify`]).
    pub fn parse(token: &str) -> Result<Self, TokenError> {
        match split(token)? {
            (body, None) => parse_body(body),
            (_, Some(_)) => Err(TokenError::Signed),
        }
    }

    fn body(&self) -> String {
        match self.freshness {
            Freshness::Any => "0".to_owned(),
            Freshness::AtLeast(position) => format!("{:x}", position.0),
            Freshness::Leader => LEADER_BODY.to_owned(),
        }
    }
}

impl From<Freshness> for ConsistencyToken {
    fn from(freshness: Freshness) -> Self {
        Self::new(freshness)
    }
}

impl fmt::Display for ConsistencyToken {
    /// The unsigned form, `v1.<body>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{VERSION}.{}", self.body())
    }
}

impl FromStr for ConsistencyToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Splits a token into its body and optional signature, checking everything but their content.
fn split(token: &str) -> Result<(&str, Option<&str>), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong(token.len()));
    }
    let mut parts = token.split('.');
    if parts.next() != Some(VERSION) {
        return Err(TokenError::UnsupportedVersion);
    }
    let body = parts.next().ok_or(TokenError::Malformed)?;
    let signature = parts.next();
    if parts.next().is_some() || body.is_empty() || signature.is_some_and(str::is_empty) {
        return Err(TokenError::Malformed);
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if !body.chars().all(allowed) || !signature.unwrap_or("").chars().all(allowed) {
        return Err(TokenError::Malformed);
    }
    Ok((body, signature))
}

fn parse_body(body: &str) -> Result<ConsistencyToken, TokenError> {
    if body == LEADER_BODY {
        return Ok(ConsistencyToken::leader());
    }
    // One spelling per position: lowercase, no leading zeros, at most 64 bits.
    let canonical = body.len() <= 16
        && body.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && (body == "0" || !body.starts_with('0'));
    if !canonical {
        return Err(TokenError::BadPosition);
    }
    let position = u64::from_str_radix(body, 16).map_err(|_| TokenError::BadPosition)?;
    Ok(ConsistencyToken::at_least(WalPosition(position)))
}

type HmacSha256 = Hmac<Sha256>;

/// Signs consistency tokens with an HMAC-SHA256 key and verifies them, so that clients cannot
/// forge one. Keys can be rotated: sign with the new key while still
/// [accepting](TokenSigner::also_accept) the old one until tokens signed with it are gone.
///
/// Its `Debug` form never shows a key.
///
/// ```
/// use distributed_core::{ConsistencyToken, TokenError, TokenSigner, WalPosition};
///
/// let signer = TokenSigner::new(b"a secret of at least thirty-two bytes!")?;
/// let token = ConsistencyToken::at_least(WalPosition(0x2A));
/// let signed = signer.sign(&token);
/// assert!(signed.starts_with("v1.2a."));
/// assert_eq!(signer.verify(&signed)?, token);
///
/// let forged = signed.replace("v1.2a.", "v1.2b.");
/// assert_eq!(signer.verify(&forged), Err(TokenError::BadSignature));
/// assert_eq!(signer.verify("v1.2a"), Err(TokenError::Unsigned));
/// # Ok::<(), TokenError>(())
/// ```
#[derive(Clone)]
pub struct TokenSigner {
    /// Signs, and verifies first.
    current: HmacSha256,
    /// Verify only.
    previous: Vec<HmacSha256>,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("keys", &(1 + self.previous.len()))
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// The shortest key accepted: 32 bytes, SHA-256's output size. Generate it randomly; do not
    /// reuse a password.
    pub const MIN_KEY_LEN: usize = 32;

    /// A signer with `key`.
    ///
    /// # Errors
    /// [`TokenError::KeyTooShort`] for a key shorter than [`MIN_KEY_LEN`](Self::MIN_KEY_LEN).
    pub fn new(key: impl AsRef<[u8]>) -> Result<Self, TokenError> {
        Ok(Self {
            current: keyed(key.as_ref())?,
            previous: Vec::new(),
        })
    }

    /// Also accepts tokens signed with `key` (a previous key, during a rotation).
    ///
    /// # Errors
    /// [`TokenError::KeyTooShort`], as for [`new`](Self::new).
    pub fn also_accept(mut self, key: impl AsRef<[u8]>) -> Result<Self, TokenError> {
        self.previous.push(keyed(key.as_ref())?);
        Ok(self)
    }

    /// `token`, signed: `v1.<body>.<signature>`.
    pub fn sign(&self, token: &ConsistencyToken) -> String {
        let unsigned = token.to_string();
        let tag = tag(self.current.clone(), &unsigned).finalize().into_bytes();
        let signature = URL_SAFE_NO_PAD.encode(&tag[..SIGNATURE_BYTES]);
        format!("{unsigned}.{signature}")
    }

    /// Parses a signed token and checks its signature in constant time.
    ///
    /// # Errors
    /// [`TokenError::Unsigned`] when it has no signature, [`TokenError::BadSignature`] when the
    /// signature does not match any accepted key, and the parse errors of
    /// [`ConsistencyToken::parse`].
    pub fn verify(&self, token: &str) -> Result<ConsistencyToken, TokenError> {
        let (body, signature) = split(token)?;
        let signature = signature.ok_or(TokenError::Unsigned)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::BadSignature)?;
        if signature.len() != SIGNATURE_BYTES {
            return Err(TokenError::BadSignature);
        }
        let unsigned = &token[..VERSION.len() + 1 + body.len()];
        let matches = std::iter::once(&self.current)
            .chain(&self.previous)
            .any(|key| {
                tag(key.clone(), unsigned)
                    .verify_truncated_left(&signature)
                    .is_ok()
            });
        if !matches {
            return Err(TokenError::BadSignature);
        }
        // Only a token we signed gets this far, and we only sign well-formed bodies.
        parse_body(body)
    }
}

fn keyed(key: &[u8]) -> Result<HmacSha256, TokenError> {
    if key.len() < TokenSigner::MIN_KEY_LEN {
        return Err(TokenError::KeyTooShort(key.len()));
    }
    HmacSha256::new_from_slice(key).map_err(|_| TokenError::KeyTooShort(key.len()))
}

fn tag(mut mac: HmacSha256, unsigned: &str) -> HmacSha256 {
    mac.update(SIGNATURE_CONTEXT);
    mac.update(unsigned.as_bytes());
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trips_every_kind() {
        for token in [
            ConsistencyToken::default(),
            ConsistencyToken::leader(),
            ConsistencyToken::at_least(WalPosition(1)),
            ConsistencyToken::at_least(WalPosition(0x16_B374_D848)),
            ConsistencyToken::at_least(WalPosition(u64::MAX)),
        ] {
            let s = token.to_string();
            assert_eq!(s.parse::<ConsistencyToken>(), Ok(token), "{s}");
            let signer = TokenSigner::new(KEY).unwrap();
            let signed = signer.sign(&token);
            assert!(signed.len() <= 42, "{signed}");
            assert_eq!(signer.verify(&signed), Ok(token), "{signed}");
        }
        assert_eq!(ConsistencyToken::default().to_string(), "v1.0");
        assert_eq!(ConsistencyToken::leader().to_string(), "v1.L");
        assert_eq!(
            ConsistencyToken::at_least(WalPosition(0)),
            ConsistencyToken::default()
        );
    }

    #[test]
    fn garbage_is_refused_with_a_typed_error() {
        use TokenError::*;
        let long = format!("v1.{}", "1".repeat(MAX_TOKEN_LEN));
        for (input, error) in [
            ("", Empty),
            (long.as_str(), TooLong(long.len())),
            ("v2.10", UnsupportedVersion),
            ("V1.10", UnsupportedVersion),
            ("1.10", UnsupportedVersion),
            ("v1", Malformed),
            ("v1.", Malformed),
            ("v1..", Malformed),
            ("v1.10.", Malformed),
            ("v1.10.abc.def", Malformed),
            ("v1.1 0", Malformed),
            ("v1.10=", Malformed),
            ("v1.é", Malformed),
            ("v1.G", BadPosition),
            ("v1.l", BadPosition),
            ("v1.10A", BadPosition),
            ("v1.010", BadPosition),
            ("v1.00", BadPosition),
            ("v1.-1", BadPosition),
            ("v1.10000000000000000", BadPosition),
            ("v1.10.c2lnbmF0dXJl", Signed),
        ] {
            assert_eq!(input.parse::<ConsistencyToken>(), Err(error), "{input:?}");
        }
    }

    #[test]
    fn forged_truncated_and_foreign_tokens_are_refused() {
        let signer = TokenSigner::new(KEY).unwrap();
        let token = ConsistencyToken::at_least(WalPosition(0xABCDEF));
        let signed = signer.sign(&token);
        let (unsigned, signature) = signed.rsplit_once('.').unwrap();

        assert_eq!(signer.verify(unsigned), Err(TokenError::Unsigned));
        // Every truncation that keeps a signature fails; none verifies.
        for cut in 1..signed.len() {
            assert!(signer.verify(&signed[..cut]).is_err(), "{}", &signed[..cut]);
        }
        // Another body under the same signature.
        for body in ["abcdee", "L", "0", "abcdef0"] {
            let forged = format!("v1.{body}.{signature}");
            assert_eq!(signer.verify(&forged), Err(TokenError::BadSignature));
        }
        // A signature of the right length but wrong bytes; and one of the wrong length.
        let mut flipped = signature.as_bytes().to_vec();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        let flipped = format!("{unsigned}.{}", String::from_utf8(flipped).unwrap());
        assert_eq!(signer.verify(&flipped), Err(TokenError::BadSignature));
        let short = format!("{unsigned}.{}", &signature[..20]);
        assert_eq!(signer.verify(&short), Err(TokenError::BadSignature));
        // Another key.
        let other = TokenSigner::new(b"another key, also thirty-two bytes").unwrap();
        assert_eq!(other.verify(&signed), Err(TokenError::BadSignature));
    }

    #[test]
    fn rotation_accepts_the_previous_key() {
        let old = TokenSigner::new(KEY).unwrap();
        let new_key = b"the new key, thirty-two bytes long!";
        let rotated = TokenSigner::new(new_key).unwrap().also_accept(KEY).unwrap();
        let token = ConsistencyToken::leader();
        assert_eq!(rotated.verify(&old.sign(&token)), Ok(token));
        assert_eq!(
            old.verify(&rotated.sign(&token)),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn short_keys_are_refused_and_keys_never_shown() {
        assert_eq!(
            TokenSigner::new(b"short").unwrap_err(),
            TokenError::KeyTooShort(5)
        );
        let signer = TokenSigner::new(KEY).unwrap();
        assert!(!format!("{signer:?}").contains("0123"));
    }

    #[test]
    fn tokens_are_url_header_and_cookie_safe() {
        let signer = TokenSigner::new(KEY).unwrap();
        for p in [0u64, 1, 0xFFFF_FFFF, u64::MAX] {
            let s = signer.sign(&ConsistencyToken::at_least(WalPosition(p)));
            assert!(
                s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
                "{s}"
            );
        }
    }
}
