//! Byte encodings, one copy each: lower-case hex, the SHA-256 certificate id,
//! unpadded base64url (device tokens and their keys, the retained-message page token)
//! and padded standard base64 (the blobs of IoT Core's JSON APIs: a retained message's
//! payload and user properties).
//!
//! The certificate id is computed when a certificate is registered and again at every
//! CONNECT; both go through [`sha256_hex`], so the two can never drift apart.

/// SHA-256 of `bytes`, lower-case hex: the certificate id (as IoT Core's
/// `certificateId`) when `bytes` is a certificate's DER.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Lower-case hex of `bytes`, two digits each (one allocation, no formatting machinery:
/// it runs on every TLS connection).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0x0f) as usize] as char);
    }
    out
}

/// Decodes hex (either case); `None` for an odd length or a non-hex digit.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Base64url without padding (RFC 4648 §5).
pub fn b64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64_value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

/// Decodes canonical unpadded base64url into `out`; the number of bytes written, or
/// `None` for a bad character, an impossible length, unused bits that are not zero (so
/// one byte string has exactly one text) or an `out` too small.
pub fn b64url_decode(text: &[u8], out: &mut [u8]) -> Option<usize> {
    if text.len() % 4 == 1 {
        return None;
    }
    let mut len = 0;
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= b64_value(*c)? << (18 - 6 * i);
        }
        let bytes = chunk.len() - 1;
        // Bits below the last whole byte must be zero.
        if n & (0xFF_FFFF >> (8 * bytes)) != 0 {
            return None;
        }
        for i in 0..bytes {
            *out.get_mut(len)? = (n >> (16 - 8 * i)) as u8;
            len += 1;
        }
    }
    Some(len)
}

pub fn b64url_decode_vec(text: &[u8]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; text.len() * 3 / 4];
    let len = b64url_decode(text, &mut out)?;
    out.truncate(len);
    Some(out)
}

/// Standard base64 with padding (RFC 4648 §4), as AWS JSON APIs encode blobs.
pub fn b64_encode(bytes: &[u8]) -> String {
    let mut out: String = b64url_encode(bytes)
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

/// Decodes canonical padded standard base64; `None` for the url alphabet, missing or
/// extra padding, or unused bits that are not zero.
pub fn b64_decode_vec(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let body = text
        .strip_suffix(b"==")
        .or_else(|| text.strip_suffix(b"="))
        .unwrap_or(text);
    if body.iter().any(|c| matches!(c, b'-' | b'_' | b'=')) {
        return None;
    }
    let url: Vec<u8> = body
        .iter()
        .map(|&c| match c {
            b'+' => b'-',
            b'/' => b'_',
            c => c,
        })
        .collect();
    b64url_decode_vec(&url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_and_round_trips() {
        assert_eq!(hex(&[0x00, 0xab, 0x0f, 0xff]), "00ab0fff");
        assert_eq!(hex_decode("00AB0fff"), Some(vec![0x00, 0xab, 0x0f, 0xff]));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
    }

    #[test]
    fn sha256_hex_is_the_digest_in_lower_case_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn base64url_round_trips_and_is_canonical() {
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            let text = b64url_encode(&bytes);
            assert!(!text.contains('='));
            assert_eq!(b64url_decode_vec(text.as_bytes()), Some(bytes));
        }
        assert_eq!(b64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(b64url_decode_vec(b"-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(b64url_decode_vec(b"-_9"), None, "unused bits set");
        assert_eq!(b64url_decode_vec(b"QQ"), Some(b"A".to_vec()));
        assert_eq!(b64url_decode_vec(b"QR"), None, "unused bits set");
        assert_eq!(b64url_decode_vec(b"Q"), None, "impossible length");
        assert_eq!(b64url_decode_vec(b"QQ=="), None, "padding");
        assert_eq!(b64url_decode_vec(b"Q+Q/"), None, "standard alphabet");
    }

    #[test]
    fn standard_base64_is_padded_and_round_trips() {
        assert_eq!(b64_encode(b""), "");
        assert_eq!(b64_encode(b"f"), "Zg==");
        assert_eq!(b64_encode(b"fo"), "Zm8=");
        assert_eq!(b64_encode(b"foo"), "Zm9v");
        assert_eq!(b64_encode(b"\xfb\xff\xfe"), "+//+");
        for n in 0..40u8 {
            let bytes: Vec<u8> = (0..n).map(|i| i.wrapping_mul(91).wrapping_add(n)).collect();
            assert_eq!(b64_decode_vec(b64_encode(&bytes).as_bytes()), Some(bytes));
        }
        assert_eq!(b64_decode_vec(b"Zg=="), Some(b"f".to_vec()));
        assert_eq!(b64_decode_vec(b"Zg"), None, "padding missing");
        assert_eq!(b64_decode_vec(b"Zg="), None, "padding short");
        assert_eq!(b64_decode_vec(b"Z==="), None, "too much padding");
        assert_eq!(b64_decode_vec(b"-_-_"), None, "url alphabet");
        assert_eq!(b64_decode_vec(b"Zh=="), None, "unused bits set");
    }
}
