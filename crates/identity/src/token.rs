//! Short-lived signed device tokens: what a device presents as its MQTT password
//! (user name = thing name) where a client certificate cannot pass, e.g. behind a
//! TLS-inspecting proxy.
//!
//! # Format
//!
//! `fct1.<payload>.<signature>`, both parts base64url without padding:
//! - payload: the JSON [`TokenClaims`],
//!   `{"v":1,"kid":..,"thing":..,"cert":..,"iat":..,"exp":..,"jti":..}`;
//! - signature: Ed25519 over the ASCII bytes `fct1.<payload>`.
//!
//! A token stands for the certificate it names: whoever connects with it gets what that
//! certificate's policies allow (see `Registry::resolve_token`), for as long as the
//! certificate stays ACTIVE and attached to the thing, and until `exp`.
//!
//! # Keys
//!
//! A [`Keyring`] holds the Ed25519 keys, oldest first; the newest signs. An older key
//! ("retired") still verifies until its successor's creation time plus a grace period
//! (the longest lifetime a token may have), after which no token it signed can still be
//! unexpired and it may be pruned. Verification reads only the keyring in memory.

use fleetcore_core::encoding::{b64url_decode, b64url_decode_vec, b64url_encode, hex};
use fleetcore_core::time::utc_text;
use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

/// Short-lived signed device tokens (the MQTT password where client certificates
/// cannot pass): their lifetimes and how often the signing key changes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// The longest lifetime a token may be issued with; also how long a retired
    /// signing key keeps verifying after its successor was made.
    pub max_ttl_secs: u64,
    /// The lifetime of a token when the request names none.
    pub default_ttl_secs: u64,
    /// A signing key older than this is replaced by a new one at the next issue.
    pub key_rotation_secs: u64,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            max_ttl_secs: 24 * 3600,
            default_ttl_secs: 3600,
            key_rotation_secs: 7 * 24 * 3600,
        }
    }
}

/// The version prefix every token starts with (followed by a dot).
pub const PREFIX: &str = "fct1";
/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 4096;
/// How far in the future `iat` may be (clock steps between issuing and verifying).
pub const CLOCK_SKEW_SECS: u64 = 60;

const SIGNATURE_LEN: usize = 64;
/// Base64url characters of a 64-byte signature, without padding.
const SIGNATURE_B64_LEN: usize = 86;

/// What a token says, as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenClaims {
    /// Format version: 1.
    pub v: u32,
    /// Id of the key that signed it.
    pub kid: String,
    /// The thing the token is for (the MQTT user name).
    pub thing: String,
    /// The certificate id (SHA-256 of its DER, hex) whose policies apply.
    pub cert: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at (exclusive), seconds since the Unix epoch.
    pub exp: u64,
    /// Random id of this token (hex).
    pub jti: String,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token signed by unknown key id {0:?} (never issued here, or rotated out)")]
    UnknownKey(String),
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired at {}", utc_text(*exp))]
    Expired { exp: u64 },
    #[error("token not yet valid: issued at {}, in the future", utc_text(*iat))]
    NotYetValid { iat: u64 },
}

/// A key that cannot be made or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("token signing key: {0}")]
pub struct KeyError(pub String);

/// A token and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    pub token: String,
    pub claims: TokenClaims,
}

/// A key as it is stored: id, creation time and the PKCS#8 document (base64url).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    pub kid: String,
    pub created_ms: u64,
    pub pkcs8: String,
}

impl fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("created_ms", &self.created_ms)
            .finish_non_exhaustive()
    }
}

impl StoredKey {
    /// A new random key with a random id.
    pub fn generate(created_ms: u64) -> Result<StoredKey, KeyError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| KeyError("cannot generate an Ed25519 key".into()))?;
        Ok(StoredKey {
            kid: random_hex(&rng, 8)?,
            created_ms,
            pkcs8: b64url_encode(pkcs8.as_ref()),
        })
    }
}

/// What may be shown about a key: never its private part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenKeyInfo {
    pub kid: String,
    pub created_ms: u64,
    /// The key new tokens are signed with (the newest).
    pub signing: bool,
    /// For a retired key: tokens it signed are accepted until then (ms since the epoch).
    pub verify_until_ms: Option<u64>,
    /// The Ed25519 public key, base64url (32 bytes).
    pub public_key: String,
}

/// One loaded key.
pub struct TokenKey {
    kid: String,
    created_ms: u64,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKey")
            .field("kid", &self.kid)
            .field("created_ms", &self.created_ms)
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Loads a stored key; fails on an unreadable or invalid PKCS#8 document.
    pub fn load(stored: &StoredKey) -> Result<TokenKey, KeyError> {
        if stored.kid.is_empty() || stored.kid.len() > 64 {
            return Err(KeyError(format!(
                "key id {:?} is not 1-64 bytes",
                stored.kid
            )));
        }
        let der = b64url_decode_vec(stored.pkcs8.as_bytes()).ok_or_else(|| {
            KeyError(format!(
                "key {}: PKCS#8 document is not base64url",
                stored.kid
            ))
        })?;
        let pair = Ed25519KeyPair::from_pkcs8(&der).map_err(|e| {
            KeyError(format!(
                "key {}: not an Ed25519 PKCS#8 key: {e}",
                stored.kid
            ))
        })?;
        Ok(TokenKey {
            kid: stored.kid.clone(),
            created_ms: stored.created_ms,
            pair,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn created_ms(&self) -> u64 {
        self.created_ms
    }
}

/// The token keys, oldest first; the newest signs, older ones only verify.
#[derive(Debug)]
pub struct Keyring {
    keys: Vec<TokenKey>,
    grace_ms: u64,
}

impl Keyring {
    /// An empty keyring whose retired keys verify for `grace_secs` after their
    /// successor was created (the longest lifetime a token may have).
    pub fn new(grace_secs: u64) -> Keyring {
        Keyring {
            keys: Vec::new(),
            grace_ms: grace_secs.saturating_mul(1000),
        }
    }

    /// Adds a key, keeping the keys ordered by creation time (then id). A key with the
    /// id of one already present replaces it.
    pub fn add(&mut self, key: TokenKey) {
        self.keys.retain(|k| k.kid != key.kid);
        let at = self
            .keys
            .partition_point(|k| (k.created_ms, k.kid.as_str()) < (key.created_ms, &key.kid));
        self.keys.insert(at, key);
    }

    /// Removes a key; true if it was there.
    pub fn remove(&mut self, kid: &str) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| k.kid != kid);
        self.keys.len() != before
    }

    /// The key new tokens are signed with.
    pub fn signing_key(&self) -> Option<&TokenKey> {
        self.keys.last()
    }

    /// Until when (ms) the key at `index` verifies: `None` for the signing key.
    fn verify_until_ms(&self, index: usize) -> Option<u64> {
        self.keys
            .get(index + 1)
            .map(|next| next.created_ms.saturating_add(self.grace_ms))
    }

    /// Every key, oldest first, without private material.
    pub fn infos(&self) -> Vec<TokenKeyInfo> {
        let last = self.keys.len().saturating_sub(1);
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| TokenKeyInfo {
                kid: k.kid.clone(),
                created_ms: k.created_ms,
                signing: i == last,
                verify_until_ms: self.verify_until_ms(i),
                public_key: b64url_encode(k.pair.public_key().as_ref()),
            })
            .collect()
    }

    /// Ids of retired keys whose grace period has passed at `now_ms`.
    pub fn expired_keys(&self, now_ms: u64) -> Vec<String> {
        (0..self.keys.len())
            .filter(|&i| self.verify_until_ms(i).is_some_and(|until| until <= now_ms))
            .map(|i| self.keys[i].kid.clone())
            .collect()
    }

    /// Signs a token for `thing` and certificate `cert`, valid from `iat` to `exp`
    /// (seconds), with the signing key.
    pub fn issue(
        &self,
        thing: &str,
        cert: &str,
        iat: u64,
        exp: u64,
    ) -> Result<IssuedToken, KeyError> {
        let key = self
            .signing_key()
            .ok_or_else(|| KeyError("no signing key".into()))?;
        let rng = SystemRandom::new();
        let claims = TokenClaims {
            v: 1,
            kid: key.kid.clone(),
            thing: thing.to_owned(),
            cert: cert.to_owned(),
            iat,
            exp,
            jti: random_hex(&rng, 16)?,
        };
        let json = serde_json::to_vec(&claims)
            .map_err(|e| KeyError(format!("cannot encode the claims: {e}")))?;
        let mut token = format!("{PREFIX}.{}", b64url_encode(&json));
        let signature = key.pair.sign(token.as_bytes());
        token.push('.');
        token.push_str(&b64url_encode(signature.as_ref()));
        Ok(IssuedToken { token, claims })
    }

    /// Checks a token at `now_ms` (ms since the epoch): its form, its key (known, and
    /// for a retired key still within its grace period), its signature, then its times.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<TokenClaims, TokenError> {
        use TokenError::Malformed;
        if token.len() > MAX_TOKEN_LEN {
            return Err(Malformed("longer than 4096 bytes"));
        }
        let rest = token
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or(Malformed("does not start with \"fct1.\""))?;
        let (payload, signature) = rest
            .split_once('.')
            .ok_or(Malformed("expected fct1.<payload>.<signature>"))?;
        let signed = &token[..PREFIX.len() + 1 + payload.len()];
        if signature.len() != SIGNATURE_B64_LEN {
            return Err(Malformed("the signature is not 64 bytes of base64url"));
        }
        let mut sig = [0u8; SIGNATURE_LEN];
        if b64url_decode(signature.as_bytes(), &mut sig) != Some(SIGNATURE_LEN) {
            return Err(Malformed("the signature is not 64 bytes of base64url"));
        }
        let json = b64url_decode_vec(payload.as_bytes())
            .ok_or(Malformed("the payload is not base64url"))?;
        let claims: TokenClaims = serde_json::from_slice(&json)
            .map_err(|_| Malformed("the payload is not the claims JSON"))?;
        if claims.v != 1 {
            return Err(Malformed("unsupported version (v is not 1)"));
        }
        let index = self
            .keys
            .iter()
            .position(|k| k.kid == claims.kid)
            .filter(|&i| self.verify_until_ms(i).is_none_or(|until| now_ms < until))
            .ok_or_else(|| TokenError::UnknownKey(claims.kid.clone()))?;
        UnparsedPublicKey::new(&ED25519, self.keys[index].pair.public_key().as_ref())
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        if now_ms >= claims.exp.saturating_mul(1000) {
            return Err(TokenError::Expired { exp: claims.exp });
        }
        if claims
            .iat
            .saturating_sub(CLOCK_SKEW_SECS)
            .saturating_mul(1000)
            > now_ms
        {
            return Err(TokenError::NotYetValid { iat: claims.iat });
        }
        Ok(claims)
    }
}

fn random_hex(rng: &SystemRandom, bytes: usize) -> Result<String, KeyError> {
    let mut buf = vec![0u8; bytes];
    rng.fill(&mut buf)
        .map_err(|_| KeyError("the system random generator failed".into()))?;
    Ok(hex(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;
    const T0: u64 = 1_750_000_000; // seconds

    fn ring_with(keys: &[(&str, u64)], grace_secs: u64) -> Keyring {
        let mut ring = Keyring::new(grace_secs);
        for (kid, created_ms) in keys {
            let mut k = StoredKey::generate(*created_ms).unwrap();
            k.kid = kid.to_string();
            ring.add(TokenKey::load(&k).unwrap());
        }
        ring
    }

    fn parts(token: &str) -> (String, String) {
        let mut it = token.splitn(3, '.');
        assert_eq!(it.next(), Some("fct1"));
        (it.next().unwrap().into(), it.next().unwrap().into())
    }

    #[test]
    fn issued_token_verifies_and_says_what_was_issued() {
        let ring = ring_with(&[("k1", 1)], 86_400);
        let t = ring.issue("computer-a", "ab12", T0, T0 + 3600).unwrap();
        assert!(t.token.starts_with("fct1."));
        assert_eq!(t.token.split('.').count(), 3);
        let c = ring.verify(&t.token, T0 * 1000).unwrap();
        assert_eq!(c, t.claims);
        assert_eq!(
            (c.v, c.kid.as_str(), c.thing.as_str(), c.cert.as_str()),
            (1, "k1", "computer-a", "ab12")
        );
        assert_eq!((c.iat, c.exp), (T0, T0 + 3600));
        assert_eq!(c.jti.len(), 32);
        // Two tokens for the same thing differ (jti).
        let t2 = ring.issue("computer-a", "ab12", T0, T0 + 3600).unwrap();
        assert_ne!(t.token, t2.token);
        assert_ne!(t.claims.jti, t2.claims.jti);
    }

    #[test]
    fn every_tampering_is_refused() {
        let ring = ring_with(
            &[("k1", T0 * 1000 - 2000), ("k2", T0 * 1000 - 1000)],
            86_400,
        );
        let t = ring.issue("computer-a", "ab12", T0, T0 + 3600).unwrap();
        let now = T0 * 1000;
        let (payload, sig) = parts(&t.token);
        let reencode = |f: &dyn Fn(&mut TokenClaims)| {
            let mut c = t.claims.clone();
            f(&mut c);
            b64url_encode(&serde_json::to_vec(&c).unwrap())
        };
        // Payload: another thing, certificate, expiry, or key id, with the old signature.
        for p in [
            reencode(&|c| c.thing = "computer-b".into()),
            reencode(&|c| c.cert = "ff00".into()),
            reencode(&|c| c.exp += 3600),
            reencode(&|c| c.kid = "k1".into()),
        ] {
            let forged = format!("fct1.{p}.{sig}");
            assert_eq!(ring.verify(&forged, now), Err(TokenError::BadSignature));
        }
        // A key id no key has.
        let p = reencode(&|c| c.kid = "nope".into());
        assert_eq!(
            ring.verify(&format!("fct1.{p}.{sig}"), now),
            Err(TokenError::UnknownKey("nope".into()))
        );
        // Every character of the signature.
        for i in 0..sig.len() {
            let mut s = sig.clone().into_bytes();
            s[i] = if s[i] == b'A' { b'B' } else { b'A' };
            let forged = format!("fct1.{payload}.{}", String::from_utf8(s).unwrap());
            let e = ring.verify(&forged, now).unwrap_err();
            assert!(
                matches!(e, TokenError::BadSignature | TokenError::Malformed(_)),
                "signature char {i}: {e}"
            );
        }
        // A payload character changed (which breaks the JSON or the signature).
        let mut p = payload.clone().into_bytes();
        p[10] = if p[10] == b'A' { b'B' } else { b'A' };
        let forged = format!("fct1.{}.{sig}", String::from_utf8(p).unwrap());
        assert!(ring.verify(&forged, now).is_err());
        // Signed by another key of the same ring, claiming the first.
        let other = ring_with(&[("k2", 2)], 86_400)
            .issue("computer-a", "ab12", T0, T0 + 3600)
            .unwrap();
        let (_, other_sig) = parts(&other.token);
        let forged = format!("fct1.{payload}.{other_sig}");
        assert_eq!(ring.verify(&forged, now), Err(TokenError::BadSignature));
    }

    #[test]
    fn malformed_tokens_say_what_is_wrong() {
        let ring = ring_with(&[("k1", 1)], 86_400);
        let t = ring.issue("computer-a", "ab12", T0, T0 + 3600).unwrap();
        let (payload, sig) = parts(&t.token);
        let now = T0 * 1000;
        let cases = [
            (String::new(), "start with"),
            (format!("fct2.{payload}.{sig}"), "start with"),
            (
                format!("fct1.{payload}"),
                "expected fct1.<payload>.<signature>",
            ),
            (
                format!("fct1.{payload}.{sig}.x"),
                "signature is not 64 bytes",
            ),
            (
                format!("fct1.{payload}.{sig}A"),
                "signature is not 64 bytes",
            ),
            (
                format!("fct1.{payload}.{}", &sig[..85]),
                "signature is not 64 bytes",
            ),
            (format!("fct1.{payload}!.{sig}"), "payload is not base64url"),
            (
                format!("fct1.{}.{sig}", b64url_encode(b"{}")),
                "not the claims JSON",
            ),
            (
                format!("fct1.{payload}.{sig}{}", "A".repeat(4096)),
                "longer than 4096",
            ),
        ];
        for (token, want) in cases {
            let e = ring.verify(&token, now).unwrap_err();
            assert!(matches!(e, TokenError::Malformed(_)), "{token}: {e}");
            assert!(e.to_string().contains(want), "{token}: {e}");
        }
        // Version 2 claims, validly signed, are still refused.
        let mut c = t.claims.clone();
        c.v = 2;
        let signed = format!("fct1.{}", b64url_encode(&serde_json::to_vec(&c).unwrap()));
        let sig = ring.keys[0].pair.sign(signed.as_bytes());
        let token = format!("{signed}.{}", b64url_encode(sig.as_ref()));
        assert_eq!(
            ring.verify(&token, now),
            Err(TokenError::Malformed("unsupported version (v is not 1)"))
        );
    }

    #[test]
    fn expiry_is_exclusive_and_named_in_utc() {
        let ring = ring_with(&[("k1", 1)], 86_400);
        let t = ring.issue("computer-a", "ab12", T0, T0 + 60).unwrap();
        assert!(ring.verify(&t.token, (T0 + 60) * 1000 - 1).is_ok());
        let e = ring.verify(&t.token, (T0 + 60) * 1000).unwrap_err();
        assert_eq!(e, TokenError::Expired { exp: T0 + 60 });
        assert_eq!(e.to_string(), "token expired at 2025-06-15T15:07:40Z");
        // Issued in the future beyond the allowed clock skew.
        assert!(ring.verify(&t.token, (T0 - CLOCK_SKEW_SECS) * 1000).is_ok());
        let e = ring
            .verify(&t.token, (T0 - CLOCK_SKEW_SECS) * 1000 - 1)
            .unwrap_err();
        assert_eq!(e, TokenError::NotYetValid { iat: T0 });
        assert!(e.to_string().contains("2025-06-15T15:06:40Z"), "{e}");
    }

    #[test]
    fn unknown_key_id_is_named() {
        let a = ring_with(&[("k1", 1)], 86_400);
        let b = ring_with(&[("k9", 1)], 86_400);
        let t = b.issue("computer-a", "ab12", T0, T0 + 60).unwrap();
        let e = a.verify(&t.token, T0 * 1000).unwrap_err();
        assert_eq!(e, TokenError::UnknownKey("k9".into()));
        assert!(e.to_string().contains("\"k9\""), "{e}");
        assert!(matches!(
            Keyring::new(1).verify(&t.token, T0 * 1000),
            Err(TokenError::UnknownKey(_))
        ));
    }

    #[test]
    fn rotation_keeps_old_tokens_valid_until_their_key_is_pruned() {
        let grace_secs = 24 * 3600;
        let created = T0 * 1000 - 10 * HOUR_MS;
        let mut ring = ring_with(&[("old", created)], grace_secs);
        let old = ring
            .issue("computer-a", "ab12", T0 - 3600, T0 + 20 * 3600)
            .unwrap();
        // Rotate: a newer key signs from now on.
        let mut k = StoredKey::generate(T0 * 1000).unwrap();
        k.kid = "new".into();
        ring.add(TokenKey::load(&k).unwrap());
        assert_eq!(ring.signing_key().unwrap().kid(), "new");
        let new = ring.issue("computer-a", "ab12", T0, T0 + 3600).unwrap();
        assert_eq!(new.claims.kid, "new");
        assert!(ring.verify(&old.token, T0 * 1000).is_ok());
        assert!(ring.verify(&new.token, T0 * 1000).is_ok());

        let infos = ring.infos();
        assert_eq!(infos.len(), 2);
        assert_eq!((infos[0].kid.as_str(), infos[0].signing), ("old", false));
        let until = T0 * 1000 + grace_secs * 1000;
        assert_eq!(infos[0].verify_until_ms, Some(until));
        assert_eq!((infos[1].kid.as_str(), infos[1].signing), ("new", true));
        assert_eq!(infos[1].verify_until_ms, None);
        assert_eq!(infos[0].public_key.len(), 43);

        // Nothing to prune within the grace period; the old key is prunable after it,
        // and no longer verifies even before it is removed.
        assert!(ring.expired_keys(until - 1).is_empty());
        assert_eq!(ring.expired_keys(until), vec!["old".to_string()]);
        assert_eq!(
            ring.verify(&old.token, until),
            Err(TokenError::UnknownKey("old".into()))
        );
        assert!(ring.remove("old"));
        assert!(!ring.remove("old"));
        assert_eq!(
            ring.verify(&old.token, T0 * 1000),
            Err(TokenError::UnknownKey("old".into()))
        );
        assert!(ring.verify(&new.token, T0 * 1000).is_ok());
    }

    #[test]
    fn stored_keys_reload_to_the_same_key_and_never_print_their_secret() {
        let k = StoredKey::generate(5).unwrap();
        let mut a = Keyring::new(1);
        a.add(TokenKey::load(&k).unwrap());
        let mut b = Keyring::new(1);
        b.add(TokenKey::load(&k).unwrap());
        let t = a.issue("t", "c", T0, T0 + 1).unwrap();
        assert!(b.verify(&t.token, T0 * 1000).is_ok());
        assert!(!format!("{k:?}").contains(&k.pkcs8));
        assert!(!format!("{a:?}").contains(&k.pkcs8));
        let mut bad = k.clone();
        bad.pkcs8 = "AAAA".into();
        assert!(TokenKey::load(&bad).is_err());
    }
}
