//! Raw MQTT bytes for tests that must send what no well-behaved client would, or
//! read exactly what the broker wrote: packet builders and a bounded packet reader.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::time::Instant;

/// MQTT variable byte integer.
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

/// A whole packet: first byte, remaining length, body.
pub fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    out.extend(varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// An MQTT UTF-8 string: two-byte length, then the bytes.
pub fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

/// What came back from the broker within a deadline.
pub enum Incoming {
    Packet(u8, Vec<u8>),
    Closed,
    TimedOut,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incoming::Packet(t, body) => write!(f, "packet {t:#04x} {body:02x?}"),
            Incoming::Closed => f.write_str("closed"),
            Incoming::TimedOut => f.write_str("nothing (timed out)"),
        }
    }
}

pub fn read_exact_by(
    stream: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), Incoming> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Incoming::TimedOut);
        }
        stream
            .set_read_timeout(Some(left))
            .expect("set_read_timeout");
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(Incoming::Closed),
            Ok(n) => filled += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Incoming::TimedOut)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(Incoming::Closed), // reset counts as closed
        }
    }
    Ok(())
}

pub fn read_packet(stream: &mut TcpStream, deadline: Instant) -> Incoming {
    let mut first = [0u8; 1];
    if let Err(r) = read_exact_by(stream, &mut first, deadline) {
        return r;
    }
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let mut b = [0u8; 1];
        if let Err(r) = read_exact_by(stream, &mut b, deadline) {
            return r;
        }
        len |= usize::from(b[0] & 0x7F) << shift;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    match read_exact_by(stream, &mut body, deadline) {
        Ok(()) => Incoming::Packet(first[0], body),
        Err(r) => r,
    }
}

impl Incoming {
    /// The packet as (first byte, body), if one came.
    pub fn packet(self) -> Option<(u8, Vec<u8>)> {
        match self {
            Incoming::Packet(t, b) => Some((t, b)),
            _ => None,
        }
    }
}
