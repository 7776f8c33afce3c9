//! A minimal MQTT 3.1.1 / 5 client codec: exactly the packets a simulated device or
//! backend sends and receives. Encoders append to a `BytesMut`; the decoder takes whole
//! frames off the front of a read buffer without copying payloads.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol level byte of MQTT 3.1.1.
pub const V311: u8 = 4;
/// Protocol level byte of MQTT 5.
pub const V5: u8 = 5;

/// Largest frame accepted from a broker (guards against a corrupt length).
const MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// Remaining length is not a valid variable byte integer, or too large.
    BadLength,
    /// A packet shorter than its type requires, or an invalid field.
    Malformed(u8),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::BadLength => write!(f, "bad remaining length"),
            Error::Malformed(t) => write!(f, "malformed packet of type {t}"),
        }
    }
}

impl std::error::Error for Error {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    pub pkid: u16,
    pub topic: Bytes,
    pub payload: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// `code` is the 3.1.1 return code or the MQTT 5 reason code (0 = accepted).
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish(Publish),
    PubAck {
        pkid: u16,
    },
    /// Only the first return/reason code (every SUBSCRIBE here carries one filter).
    SubAck {
        pkid: u16,
        code: u8,
    },
    PingResp,
    /// MQTT 5 reason code (0 when absent); 3.1.1 brokers never send it.
    Disconnect {
        reason: u8,
    },
    /// CONNECT (only its protocol level: what a minimal server needs to answer).
    Connect {
        version: u8,
    },
    /// SUBSCRIBE (only its packet identifier).
    Subscribe {
        pkid: u16,
    },
    PingReq,
    /// Any other packet type (first byte of the fixed header).
    Other(u8),
}

fn put_varint(buf: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if n == 0 {
            break;
        }
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
}

/// What CONNECT carries.
#[derive(Debug, Clone, Copy)]
pub struct Connect<'a> {
    pub version: u8,
    pub client_id: &'a str,
    /// 3.1.1 clean session / MQTT 5 clean start.
    pub clean: bool,
    pub keep_alive: u16,
    /// MQTT 5 Session Expiry Interval (0 = not sent).
    pub session_expiry: u32,
}

pub fn connect(buf: &mut BytesMut, c: &Connect) {
    let props_len = if c.version == V5 {
        if c.session_expiry > 0 {
            5
        } else {
            0
        }
    } else {
        0
    };
    let mut remaining = 2 + 4 + 1 + 1 + 2 + 2 + c.client_id.len();
    if c.version == V5 {
        remaining += varint_len(props_len) + props_len;
    }
    buf.reserve(remaining + 5);
    buf.put_u8(0x10);
    put_varint(buf, remaining);
    put_str(buf, b"MQTT");
    buf.put_u8(c.version);
    buf.put_u8(if c.clean { 0x02 } else { 0x00 });
    buf.put_u16(c.keep_alive);
    if c.version == V5 {
        put_varint(buf, props_len);
        if c.session_expiry > 0 {
            buf.put_u8(0x11);
            buf.put_u32(c.session_expiry);
        }
    }
    put_str(buf, c.client_id.as_bytes());
}

pub fn subscribe(buf: &mut BytesMut, version: u8, pkid: u16, filter: &str, qos: u8) {
    let props = usize::from(version == V5);
    let remaining = 2 + props + 2 + filter.len() + 1;
    buf.reserve(remaining + 5);
    buf.put_u8(0x82);
    put_varint(buf, remaining);
    buf.put_u16(pkid);
    if version == V5 {
        buf.put_u8(0);
    }
    put_str(buf, filter.as_bytes());
    buf.put_u8(qos);
}

/// PUBLISH; `pkid` is ignored at QoS 0.
pub fn publish(
    buf: &mut BytesMut,
    version: u8,
    topic: &str,
    qos: u8,
    pkid: u16,
    retain: bool,
    payload: &[u8],
) {
    let props = usize::from(version == V5);
    let id = if qos > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + id + props + payload.len();
    buf.reserve(remaining + 5);
    buf.put_u8(0x30 | (qos << 1) | u8::from(retain));
    put_varint(buf, remaining);
    put_str(buf, topic.as_bytes());
    if qos > 0 {
        buf.put_u16(pkid);
    }
    if version == V5 {
        buf.put_u8(0);
    }
    buf.put_slice(payload);
}

/// PUBACK with success (the short form is valid in both versions).
pub fn puback(buf: &mut BytesMut, pkid: u16) {
    buf.put_u8(0x40);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

pub fn pingreq(buf: &mut BytesMut) {
    buf.put_slice(&[0xC0, 0x00]);
}

/// Normal disconnection (MQTT 5: reason 0 and no properties, the short form).
pub fn disconnect(buf: &mut BytesMut) {
    buf.put_slice(&[0xE0, 0x00]);
}

/// Reads the fixed header at the front of `buf`: (header length, remaining length), or
/// `None` if more bytes are needed.
fn header(buf: &[u8]) -> Result<Option<(usize, usize)>, Error> {
    let mut len = 0usize;
    let mut shift = 0;
    for i in 1..5 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7F) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            if len > MAX_FRAME {
                return Err(Error::BadLength);
            }
            return Ok(Some((i + 1, len)));
        }
    }
    Err(Error::BadLength)
}

/// Whether `buf` starts with a whole packet.
pub fn complete(buf: &[u8]) -> bool {
    matches!(header(buf), Ok(Some((hl, rl))) if buf.len() >= hl + rl)
}

/// Skips MQTT 5 properties at the front of `body`.
fn skip_props(body: &mut Bytes, t: u8) -> Result<(), Error> {
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        if !body.has_remaining() || shift > 21 {
            return Err(Error::Malformed(t));
        }
        let b = body.get_u8();
        len |= usize::from(b & 0x7F) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    if body.remaining() < len {
        return Err(Error::Malformed(t));
    }
    body.advance(len);
    Ok(())
}

/// Takes one whole packet off the front of `buf`, or returns `None` when it holds less
/// than a packet.
pub fn parse(buf: &mut BytesMut, version: u8) -> Result<Option<Packet>, Error> {
    let Some((hl, rl)) = header(buf)? else {
        return Ok(None);
    };
    if buf.len() < hl + rl {
        return Ok(None);
    }
    let first = buf[0];
    let t = first >> 4;
    let mut body = {
        let mut frame = buf.split_to(hl + rl);
        frame.advance(hl);
        frame.freeze()
    };
    let v5 = version == V5;
    let need = |body: &Bytes, n: usize| {
        if body.remaining() < n {
            Err(Error::Malformed(t))
        } else {
            Ok(())
        }
    };
    let packet = match t {
        2 => {
            need(&body, 2)?;
            Packet::ConnAck {
                session_present: body[0] & 1 == 1,
                code: body[1],
            }
        }
        3 => {
            let qos = (first >> 1) & 3;
            if qos == 3 {
                return Err(Error::Malformed(t));
            }
            need(&body, 2)?;
            let tl = usize::from(body.get_u16());
            need(&body, tl)?;
            let topic = body.split_to(tl);
            let pkid = if qos > 0 {
                need(&body, 2)?;
                body.get_u16()
            } else {
                0
            };
            if v5 {
                skip_props(&mut body, t)?;
            }
            Packet::Publish(Publish {
                qos,
                retain: first & 1 == 1,
                dup: first & 0x08 != 0,
                pkid,
                topic,
                payload: body,
            })
        }
        4 => {
            need(&body, 2)?;
            Packet::PubAck {
                pkid: body.get_u16(),
            }
        }
        9 => {
            need(&body, 2)?;
            let pkid = body.get_u16();
            if v5 {
                skip_props(&mut body, t)?;
            }
            need(&body, 1)?;
            Packet::SubAck {
                pkid,
                code: body[0],
            }
        }
        1 => {
            need(&body, 7)?;
            Packet::Connect { version: body[6] }
        }
        8 => {
            need(&body, 2)?;
            Packet::Subscribe {
                pkid: body.get_u16(),
            }
        }
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect {
            reason: body.first().copied().unwrap_or(0),
        },
        _ => Packet::Other(first),
    };
    Ok(Some(packet))
}

/// CONNACK accepted, no session (a minimal server's answer).
pub fn connack(buf: &mut BytesMut, version: u8) {
    if version == V5 {
        buf.put_slice(&[0x20, 3, 0, 0, 0]);
    } else {
        buf.put_slice(&[0x20, 2, 0, 0]);
    }
}

/// SUBACK granting QoS 1 to one filter.
pub fn suback(buf: &mut BytesMut, version: u8, pkid: u16) {
    let v5 = version == V5;
    buf.put_u8(0x90);
    buf.put_u8(if v5 { 4 } else { 3 });
    buf.put_u16(pkid);
    if v5 {
        buf.put_u8(0);
    }
    buf.put_u8(1);
}

pub fn pingresp(buf: &mut BytesMut) {
    buf.put_slice(&[0xD0, 0x00]);
}

/// Whether a SUBACK code grants the subscription.
pub fn suback_ok(code: u8) -> bool {
    code < 0x80
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trip_both_versions() {
        for version in [V311, V5] {
            let mut buf = BytesMut::new();
            publish(&mut buf, version, "acct1/dev1/orders", 1, 7, true, b"hello");
            publish(&mut buf, version, "a/b", 0, 0, false, &[0u8; 300]);
            let Some(Packet::Publish(p)) = parse(&mut buf, version).unwrap() else {
                panic!("not a publish");
            };
            assert_eq!(
                (p.qos, p.pkid, p.retain, &p.topic[..], &p.payload[..]),
                (1, 7, true, &b"acct1/dev1/orders"[..], &b"hello"[..])
            );
            let Some(Packet::Publish(p)) = parse(&mut buf, version).unwrap() else {
                panic!("not a publish");
            };
            assert_eq!((p.qos, p.payload.len()), (0, 300));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let mut whole = BytesMut::new();
        publish(&mut whole, V311, "t", 1, 1, false, &[1u8; 200]);
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(parse(&mut part, V311).unwrap(), None, "cut at {cut}");
            assert_eq!(part.len(), cut);
        }
    }

    #[test]
    fn connack_suback_and_bad_length() {
        let mut buf = BytesMut::from(&[0x20, 2, 1, 0, 0x90, 3, 0, 5, 1][..]);
        assert_eq!(
            parse(&mut buf, V311).unwrap(),
            Some(Packet::ConnAck {
                session_present: true,
                code: 0
            })
        );
        assert_eq!(
            parse(&mut buf, V311).unwrap(),
            Some(Packet::SubAck { pkid: 5, code: 1 })
        );
        // v5 SUBACK with an empty property block, then a failure code.
        let mut buf = BytesMut::from(&[0x90, 4, 0, 9, 0, 0x87][..]);
        assert_eq!(
            parse(&mut buf, V5).unwrap(),
            Some(Packet::SubAck {
                pkid: 9,
                code: 0x87
            })
        );
        let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert_eq!(parse(&mut buf, V311), Err(Error::BadLength));
    }

    #[test]
    fn server_side_packets_round_trip() {
        for version in [V311, V5] {
            let mut buf = BytesMut::new();
            connect(
                &mut buf,
                &Connect {
                    version,
                    client_id: "d",
                    clean: true,
                    keep_alive: 0,
                    session_expiry: 0,
                },
            );
            subscribe(&mut buf, version, 42, "a/b/#", 1);
            assert_eq!(
                parse(&mut buf, version).unwrap(),
                Some(Packet::Connect { version })
            );
            assert_eq!(
                parse(&mut buf, version).unwrap(),
                Some(Packet::Subscribe { pkid: 42 })
            );
            connack(&mut buf, version);
            suback(&mut buf, version, 42);
            assert_eq!(
                parse(&mut buf, version).unwrap(),
                Some(Packet::ConnAck {
                    session_present: false,
                    code: 0
                })
            );
            assert_eq!(
                parse(&mut buf, version).unwrap(),
                Some(Packet::SubAck { pkid: 42, code: 1 })
            );
        }
    }

    #[test]
    fn connect_encodes_session_expiry_for_v5() {
        let mut buf = BytesMut::new();
        connect(
            &mut buf,
            &Connect {
                version: V5,
                client_id: "dev1",
                clean: false,
                keep_alive: 60,
                session_expiry: 3600,
            },
        );
        // fixed header, "MQTT", level 5, flags 0, keep-alive 60, props: 5 bytes expiry.
        assert_eq!(
            &buf[..],
            &[
                0x10, 22, 0, 4, b'M', b'Q', b'T', b'T', 5, 0, 0, 60, 5, 0x11, 0, 0, 0x0E, 0x10, 0,
                4, b'd', b'e', b'v', b'1'
            ][..]
        );
    }
}
