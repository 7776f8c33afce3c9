//! Certificate ownership tokens: what CreateKeysAndCertificate and
//! CreateCertificateFromCsr hand out and RegisterThing takes back.
//!
//! A token is `fc1.{certificate id}.{expiry, Unix seconds}.{MAC}`, the MAC an
//! HMAC-SHA256 under a key only this broker holds (a record of its own, made at first
//! use) over the certificate id, the expiry and the claimant (the claim certificate's
//! id, or the client id of a connection without one). So a token cannot be forged,
//! stretched, moved to another certificate, or used by another claim certificate; that
//! it is used once is the pending record's job (deleted when the thing is registered).

use fleetcore_core::encoding::{hex, hex_decode};
use ring::hmac;

const PREFIX: &str = "fc1";

/// Why a token was refused (told to the device in the errorMessage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenProblem {
    Empty,
    Malformed,
    Forged,
    Expired,
}

impl std::fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenProblem::Empty => "Certificate ownership token cannot be empty.",
            TokenProblem::Malformed => "Certificate ownership token is malformed.",
            TokenProblem::Forged => {
                "Certificate ownership token is not valid (not issued by this broker, or issued to another claim certificate)."
            }
            TokenProblem::Expired => "Certificate ownership token has expired.",
        })
    }
}

/// The key tokens are signed with.
pub struct TokenKey {
    key: hmac::Key,
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> TokenKey {
        TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    fn mac_input(cert_id: &str, exp_secs: u64, claimant: &str) -> String {
        format!("{PREFIX}\n{cert_id}\n{exp_secs}\n{claimant}")
    }

    /// A token for `cert_id`, valid until `exp_secs`, for `claimant` only.
    pub fn issue(&self, cert_id: &str, exp_secs: u64, claimant: &str) -> String {
        let tag = hmac::sign(
            &self.key,
            Self::mac_input(cert_id, exp_secs, claimant).as_bytes(),
        );
        format!("{PREFIX}.{cert_id}.{exp_secs}.{}", hex(tag.as_ref()))
    }

    /// The certificate id a token stands for, if it is this broker's, for
    /// `claimant`, and not expired at `now_secs`.
    pub fn check(
        &self,
        token: &str,
        claimant: &str,
        now_secs: u64,
    ) -> Result<String, TokenProblem> {
        if token.is_empty() {
            return Err(TokenProblem::Empty);
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [prefix, cert_id, exp, mac] = parts.as_slice() else {
            return Err(TokenProblem::Malformed);
        };
        if *prefix != PREFIX
            || cert_id.len() != 64
            || !cert_id.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(TokenProblem::Malformed);
        }
        let exp_secs: u64 = exp.parse().map_err(|_| TokenProblem::Malformed)?;
        let mac = hex_decode(mac).ok_or(TokenProblem::Malformed)?;
        hmac::verify(
            &self.key,
            Self::mac_input(cert_id, exp_secs, claimant).as_bytes(),
            &mac,
        )
        .map_err(|_| TokenProblem::Forged)?;
        if now_secs >= exp_secs {
            return Err(TokenProblem::Expired);
        }
        Ok((*cert_id).to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "ab12000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_token_is_good_for_its_certificate_and_claimant_until_it_expires() {
        let k = TokenKey::new(b"secret");
        let t = k.issue(CERT, 1_000, "claim-a");
        assert_eq!(k.check(&t, "claim-a", 999), Ok(CERT.to_owned()));
        assert_eq!(k.check(&t, "claim-a", 1_000), Err(TokenProblem::Expired));
        assert_eq!(k.check(&t, "claim-b", 10), Err(TokenProblem::Forged));
    }

    #[test]
    fn changed_forged_or_garbled_tokens_are_refused() {
        let k = TokenKey::new(b"secret");
        let t = k.issue(CERT, 1_000, "c");
        // Stretching the expiry breaks the MAC.
        let stretched = t.replace(".1000.", ".9000.");
        assert_eq!(k.check(&stretched, "c", 10), Err(TokenProblem::Forged));
        // Another certificate id.
        let moved = t.replace("ab12", "cd34");
        assert_eq!(k.check(&moved, "c", 10), Err(TokenProblem::Forged));
        // Another broker's key.
        let other = TokenKey::new(b"other").issue(CERT, 1_000, "c");
        assert_eq!(k.check(&other, "c", 10), Err(TokenProblem::Forged));
        assert_eq!(k.check("", "c", 10), Err(TokenProblem::Empty));
        for bad in ["x", "fc1.a.b.c", "fc2.ab.1.00", &t[..t.len() - 1]] {
            assert!(k.check(bad, "c", 10).is_err(), "{bad}");
        }
    }
}
