//! Reversible encoding of client ids, topics and record keys into NATS KV key tokens.
//!
//! A KV key may hold only `[-/_=.a-zA-Z0-9]`, with `.` separating tokens that must not be
//! empty, while a client id, a topic or a record key may be any UTF-8 (`.`, `*`, `>`,
//! spaces, `/`, empty levels). Each part is encoded on its own as base64url without padding
//! (`fleetcore_core::encoding`; alphabet `[A-Za-z0-9_-]`, so never a `.`), and the empty string as `=` (not in that
//! alphabet), so every part is one non-empty token and decoding is exact.

use fleetcore_core::encoding::{b64url_decode_vec, b64url_encode};

/// The token for the empty string.
const EMPTY: &str = "=";

/// Encodes one key part as a single KV key token.
pub fn encode_part(part: &str) -> String {
    if part.is_empty() {
        return EMPTY.to_string();
    }
    b64url_encode(part.as_bytes())
}

/// Decodes a token made by [`encode_part`]; `None` for anything it cannot have made.
pub fn decode_part(token: &str) -> Option<String> {
    if token == EMPTY {
        return Some(String::new());
    }
    if token.is_empty() {
        return None;
    }
    String::from_utf8(b64url_decode_vec(token.as_bytes())?).ok()
}

/// The sequence number part of a queue key: fixed-width hex, so key order is seq order.
pub fn encode_seq(seq: u64) -> String {
    format!("{seq:016x}")
}

pub fn decode_seq(token: &str) -> Option<u64> {
    if token.len() != 16 {
        return None;
    }
    u64::from_str_radix(token, 16).ok()
}

/// Splits a two-token key `a.b` into its decoded parts.
pub fn split2(key: &str) -> Option<(&str, &str)> {
    let (a, b) = key.split_once('.')?;
    if b.contains('.') {
        return None;
    }
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What NATS KV accepts as a key token.
    fn valid_token(t: &str) -> bool {
        !t.is_empty()
            && t.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-/_=".contains(&c))
    }

    #[test]
    fn nasty_parts_round_trip_as_one_valid_token() {
        let nasty = [
            "",
            ".",
            "..",
            "*",
            ">",
            "a.b",
            "a b",
            " ",
            "/",
            "//",
            "/leading",
            "trailing/",
            "a//b",
            "$aws/things/x/shadow/update",
            "sensor/+/#",
            "ünïcødé/温度/🚀",
            "\u{0}",
            "tab\tnew\nline",
            "=",
            "==",
            "x",
            "xy",
            "xyz",
            "wxyz",
            "-_",
        ];
        for part in nasty {
            let token = encode_part(part);
            assert!(valid_token(&token), "{part:?} -> {token:?}");
            assert!(!token.contains('.'), "{part:?} -> {token:?}");
            assert_eq!(decode_part(&token).as_deref(), Some(part), "{token:?}");
        }
        let long = "é.*> /".repeat(500);
        assert_eq!(decode_part(&encode_part(&long)), Some(long));
    }

    #[test]
    fn distinct_parts_get_distinct_tokens() {
        let parts = ["", "a", "a.", ".a", "a b", "a_b", "a-b", "a/b", "=", "ab"];
        let mut tokens: Vec<String> = parts.iter().map(|p| encode_part(p)).collect();
        tokens.sort();
        tokens.dedup();
        assert_eq!(tokens.len(), parts.len());
    }

    #[test]
    fn foreign_tokens_are_refused() {
        for token in ["", "a", "a.b", "ab*", "abcde", "YR", "=="] {
            assert_eq!(decode_part(token), None, "{token:?}");
        }
        // Invalid UTF-8 (0xff) is refused.
        assert_eq!(decode_part("_w"), None);
    }

    #[test]
    fn seq_tokens_sort_like_numbers() {
        let seqs = [0u64, 1, 9, 10, 255, 256, u64::MAX - 1, u64::MAX];
        let tokens: Vec<String> = seqs.iter().map(|s| encode_seq(*s)).collect();
        let mut sorted = tokens.clone();
        sorted.sort();
        assert_eq!(tokens, sorted);
        for (s, t) in seqs.iter().zip(&tokens) {
            assert_eq!(decode_seq(t), Some(*s));
        }
        assert_eq!(decode_seq("12"), None);
    }
}
