//! API key generation and digests: a service never has to store a key's plaintext.
//!
//! A key is generated once from the operating system's random number generator, shown to its
//! owner once, and from then on only its SHA-256 [`KeyDigest`] is kept. The authentication layer
//! hashes the key a request presents and looks the digest up.
//!
//! # Example
//!
//! ```
//! use tollgate::keys;
//!
//! let key = keys::generate("sk-live-");
//! assert!(key.as_str().starts_with("sk-live-"));
//! // Store only this:
//! let digest = key.digest();
//! assert_eq!(digest, keys::digest(key.as_str()));
//! assert_eq!(digest.to_hex().len(), 64);
//! // The plaintext never shows up in debug output.
//! assert!(!format!("{key:?}").contains(&key.as_str()[8..]));
//! ```

use std::{
    fmt,
    hash::{Hash, Hasher},
    str::FromStr,
};

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// The characters of a generated key after its prefix (base62).
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Random characters in a generated key: 43 base62 characters are 256 bits of entropy.
const RANDOM_CHARS: usize = 43;

/// Generate a key: `prefix` followed by 43 random base62 characters (256 bits of entropy) from the
/// operating system's random number generator.
///
/// The prefix makes keys recognizable (by people and by secret scanners); it should be short
/// visible ASCII such as `sk-live-`.
///
/// # Panics
///
/// If the operating system's random number generator fails, which a service cannot recover
/// from safely.
///
/// # Example
///
/// ```
/// let key = tollgate::keys::generate("sk-test-");
/// assert_eq!(key.as_str().len(), "sk-test-".len() + 43);
/// assert_ne!(key.as_str(), tollgate::keys::generate("sk-test-").as_str());
/// ```
pub fn generate(prefix: &str) -> ApiKey {
    let mut text = String::with_capacity(prefix.len() + RANDOM_CHARS);
    text.push_str(prefix);
    let mut buf = [0u8; 64];
    let mut produced = 0;
    while produced < RANDOM_CHARS {
        getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
        // Rejection sampling: 248 = 4 * 62, so every character is equally likely.
        for &b in buf.iter().filter(|&&b| b < 248) {
            if produced == RANDOM_CHARS {
                break;
            }
            text.push(char::from(ALPHABET[usize::from(b % 62)]));
            produced += 1;
        }
    }
    buf.fill(0);
    ApiKey {
        text,
        prefix_len: prefix.len(),
    }
}

/// The SHA-256 digest of a key's text, as stored and looked up.
///
/// # Example
///
/// ```
/// let digest = tollgate::keys::digest("sk-live-abc");
/// assert_eq!(digest.to_hex().len(), 64);
/// ```
pub fn digest(key: &str) -> KeyDigest {
    KeyDigest(Sha256::digest(key.as_bytes()).into())
}

/// A freshly generated API key. Show it to its owner once, store only its [`digest`](Self::digest).
///
/// It has no `Display`, and its `Debug` shows only the prefix, so that it is not logged by
/// accident.
///
/// # Example
///
/// ```
/// let key = tollgate::keys::generate("sk-live-");
/// assert_eq!(format!("{key:?}"), "ApiKey(\"sk-live-…\")");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    text: String,
    prefix_len: usize,
}

impl ApiKey {
    /// The key's text, to hand to its owner.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The key's text, owned.
    pub fn into_string(self) -> String {
        self.text
    }

    /// The key's digest, the only thing a store keeps.
    pub fn digest(&self) -> KeyDigest {
        digest(&self.text)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ApiKey")
            .field(&format_args!("\"{}…\"", &self.text[..self.prefix_len]))
            .finish()
    }
}

/// The SHA-256 digest of an API key.
///
/// Equality is constant time. The hex form (64 lowercase digits) is what a remote store keeps.
///
/// # Example
///
/// ```
/// use tollgate::keys::{self, KeyDigest};
///
/// let digest = keys::digest("sk-live-abc");
/// let parsed: KeyDigest = digest.to_hex().parse().unwrap();
/// assert_eq!(parsed, digest);
/// assert!("not hex".parse::<KeyDigest>().is_err());
/// ```
#[derive(Clone, Copy, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// A digest from its 32 bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyDigest(bytes)
    }

    /// The digest's 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl PartialEq for KeyDigest {
    /// Constant time: how much of two digests agree is not observable.
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl ConstantTimeEq for KeyDigest {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl FromStr for KeyDigest {
    type Err = InvalidDigest;

    /// 64 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| InvalidDigest)?;
        Ok(KeyDigest(bytes))
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Enough to tell digests apart in a log, not a lookup handle.
        write!(f, "KeyDigest({}…)", hex::encode(&self.0[..4]))
    }
}

/// A string that is not 64 hex digits.
///
/// ```
/// use tollgate::keys::{InvalidDigest, KeyDigest};
///
/// assert_eq!("abc".parse::<KeyDigest>(), Err(InvalidDigest));
/// let digest = tollgate::keys::digest("sk-test-1");
/// assert_eq!(digest.to_hex().parse::<KeyDigest>(), Ok(digest));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidDigest;

impl fmt::Display for InvalidDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key digest is 64 hex digits")
    }
}

impl std::error::Error for InvalidDigest {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            digest("abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn generated_keys_use_the_alphabet() {
        let key = generate("sk-");
        assert!(key.as_str()[3..].bytes().all(|b| ALPHABET.contains(&b)));
    }
}
