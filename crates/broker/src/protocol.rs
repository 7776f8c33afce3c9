//! MQTT on the wire: framing, and one packet model for both protocol versions.
//!
//! The broker is written once, against MQTT 5 packet shapes. An MQTT 3.1/3.1.1
//! connection is decoded into those shapes (with empty properties and default
//! subscription options) and encoded back from them, so the rest of the broker
//! never branches on the version except where the behaviour really differs
//! (reason codes a v3 client cannot be told, for instance).
//!
//! The codec is `mqtt-proto`; it is used only here, so it can be swapped.
//! Framing is ours: the fixed header is read first and a packet larger than
//! the configured maximum is refused before its body is buffered.

use bytes::BytesMut;
use mqtt_proto::v5::{self, DisconnectReasonCode, ErrorV5};
use mqtt_proto::{v3, Error as CodecError};

pub use mqtt_proto::v5::Packet;

/// Which MQTT protocol a connection speaks, from the level byte of CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 (protocol name `MQIsdp`, level 3).
    V31,
    /// MQTT 3.1.1 (level 4).
    V311,
    /// MQTT 5.0 (level 5).
    V5,
}

impl Version {
    /// The protocol level byte as sent in CONNECT.
    pub fn level(self) -> u8 {
        match self {
            Version::V31 => 3,
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }

    pub fn is_v5(self) -> bool {
        self == Version::V5
    }
}

/// Why a packet could not be taken, mapped to the MQTT 5 reason code the
/// broker answers with (a v3 connection is simply closed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("packet of {size} bytes exceeds the maximum packet size of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("invalid topic name: {0}")]
    TopicName(String),
    #[error("invalid topic filter: {0}")]
    TopicFilter(String),
    #[error("unsupported protocol version: {0}")]
    UnsupportedVersion(String),
}

impl DecodeError {
    /// The reason code for a v5 DISCONNECT (or CONNACK, mapped by the caller).
    pub fn reason(&self) -> DisconnectReasonCode {
        match self {
            DecodeError::Malformed(_) => DisconnectReasonCode::MalformedPacket,
            DecodeError::Protocol(_) | DecodeError::UnsupportedVersion(_) => {
                DisconnectReasonCode::ProtocolError
            }
            DecodeError::TooLarge { .. } => DisconnectReasonCode::PacketTooLarge,
            DecodeError::TopicName(_) => DisconnectReasonCode::TopicNameInvalid,
            DecodeError::TopicFilter(_) => DisconnectReasonCode::TopicFilterInvalid,
        }
    }
}

fn from_common(e: CodecError) -> DecodeError {
    match e {
        CodecError::InvalidTopicName(t) => DecodeError::TopicName(t.to_string()),
        CodecError::InvalidTopicFilter(t) => DecodeError::TopicFilter(t.to_string()),
        CodecError::InvalidProtocol(name, level) => {
            DecodeError::UnsupportedVersion(format!("protocol {name:?} level {level}"))
        }
        CodecError::UnexpectedProtocol(p) => {
            DecodeError::UnsupportedVersion(format!("unexpected protocol {p}"))
        }
        CodecError::ZeroPid => DecodeError::Protocol("packet identifier 0".into()),
        CodecError::EmptySubscription => {
            DecodeError::Protocol("SUBSCRIBE/UNSUBSCRIBE without any topic filter".into())
        }
        CodecError::IoError(_) => DecodeError::Malformed("packet shorter than its length".into()),
        other => DecodeError::Malformed(other.to_string()),
    }
}

fn from_v5(e: ErrorV5) -> DecodeError {
    match e {
        ErrorV5::Common(c) => from_common(c),
        ErrorV5::InvalidPayloadFormat => {
            DecodeError::Malformed("payload is not UTF-8 although flagged so".into())
        }
        ErrorV5::DuplicatedProperty(p) => DecodeError::Protocol(format!("duplicated property {p}")),
        ErrorV5::InvalidProperty(t, p) => {
            DecodeError::Protocol(format!("property {p} not allowed in {t:?}"))
        }
        other => DecodeError::Malformed(other.to_string()),
    }
}

/// Looks at the start of `buf` for one whole packet. Returns its total length
/// once all of it is there, `None` while more bytes are needed. A packet whose
/// declared size exceeds `max_size` is refused as soon as its header is read.
pub fn frame_len(buf: &[u8], max_size: usize) -> Result<Option<usize>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut remaining: usize = 0;
    let mut shift = 0;
    for i in 1..=4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            let total = 1 + i + remaining;
            if total > max_size {
                return Err(DecodeError::TooLarge {
                    size: total,
                    max: max_size,
                });
            }
            return Ok((buf.len() >= total).then_some(total));
        }
        shift += 7;
    }
    Err(DecodeError::Malformed(
        "remaining length longer than 4 bytes".into(),
    ))
}

/// Reads the protocol version from a whole CONNECT frame, before it is decoded.
pub fn connect_version(frame: &[u8]) -> Result<Version, DecodeError> {
    if frame.first().map(|b| b >> 4) != Some(1) {
        return Err(DecodeError::Protocol(
            "the first packet on a connection must be CONNECT".into(),
        ));
    }
    if frame[0] & 0x0f != 0 {
        return Err(DecodeError::Malformed(
            "CONNECT with reserved flags set".into(),
        ));
    }
    let mut i = 1;
    while frame.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    let body = frame.get(i + 1..).unwrap_or_default();
    if body.len() < 2 {
        return Err(DecodeError::Malformed("CONNECT too short".into()));
    }
    let name_len = u16::from_be_bytes([body[0], body[1]]) as usize;
    let name = body.get(2..2 + name_len);
    let level = body.get(2 + name_len).copied();
    match (name, level) {
        (Some(b"MQTT"), Some(4)) => Ok(Version::V311),
        (Some(b"MQTT"), Some(5)) => Ok(Version::V5),
        (Some(b"MQIsdp"), Some(3)) => Ok(Version::V31),
        (Some(n), Some(l)) => Err(DecodeError::UnsupportedVersion(format!(
            "protocol name {:?} level {l}",
            String::from_utf8_lossy(n)
        ))),
        _ => Err(DecodeError::Malformed("CONNECT too short".into())),
    }
}

/// Decodes one whole frame into the common (MQTT 5 shaped) packet model.
pub fn decode(version: Version, frame: &[u8]) -> Result<Packet, DecodeError> {
    if version.is_v5() {
        return match Packet::decode(frame) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(DecodeError::Malformed(
                "packet shorter than its length".into(),
            )),
            Err(e) => Err(from_v5(e)),
        };
    }
    let p = match v3::Packet::decode(frame) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(DecodeError::Malformed(
                "packet shorter than its length".into(),
            ))
        }
        Err(e) => return Err(from_common(e)),
    };
    Ok(match p {
        v3::Packet::Connect(c) => Packet::Connect(v5::Connect {
            protocol: c.protocol,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            properties: Default::default(),
            client_id: c.client_id,
            last_will: c.last_will.map(|w| v5::LastWill {
                qos: w.qos,
                retain: w.retain,
                topic_name: w.topic_name,
                payload: w.message,
                properties: Default::default(),
            }),
            username: c.username,
            password: c.password,
        }),
        v3::Packet::Publish(p) => Packet::Publish(v5::Publish {
            dup: p.dup,
            retain: p.retain,
            qos_pid: p.qos_pid,
            topic_name: p.topic_name,
            payload: p.payload,
            properties: Default::default(),
        }),
        v3::Packet::Puback(pid) => Packet::Puback(v5::Puback::new_success(pid)),
        v3::Packet::Pubrec(pid) => Packet::Pubrec(v5::Pubrec::new_success(pid)),
        v3::Packet::Pubrel(pid) => Packet::Pubrel(v5::Pubrel::new_success(pid)),
        v3::Packet::Pubcomp(pid) => Packet::Pubcomp(v5::Pubcomp::new_success(pid)),
        v3::Packet::Subscribe(s) => Packet::Subscribe(v5::Subscribe {
            pid: s.pid,
            properties: Default::default(),
            topics: s
                .topics
                .into_iter()
                .map(|(f, qos)| {
                    (
                        f,
                        v5::SubscriptionOptions {
                            max_qos: qos,
                            no_local: false,
                            retain_as_published: false,
                            retain_handling: v5::RetainHandling::SendAtSubscribe,
                        },
                    )
                })
                .collect(),
        }),
        v3::Packet::Unsubscribe(u) => Packet::Unsubscribe(v5::Unsubscribe {
            pid: u.pid,
            properties: Default::default(),
            topics: u.topics,
        }),
        v3::Packet::Pingreq => Packet::Pingreq,
        v3::Packet::Disconnect => Packet::Disconnect(v5::Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnect,
            properties: Default::default(),
        }),
        v3::Packet::Connack(_)
        | v3::Packet::Suback(_)
        | v3::Packet::Unsuback(_)
        | v3::Packet::Pingresp => {
            return Err(DecodeError::Protocol(
                "a client may not send CONNACK, SUBACK, UNSUBACK or PINGRESP".into(),
            ))
        }
    })
}

/// Appends the encoding of `packet` for a `version` connection to `out`.
/// Returns the number of bytes written (0 for packets a v3 client has no
/// form for, such as a server DISCONNECT).
pub fn encode(version: Version, packet: &Packet, out: &mut BytesMut) -> Result<usize, CodecError> {
    if version.is_v5() {
        let bytes = packet.encode()?;
        out.extend_from_slice(bytes.as_ref());
        return Ok(bytes.as_ref().len());
    }
    let v3p = match packet {
        Packet::Connack(c) => v3::Packet::Connack(v3::Connack {
            session_present: c.session_present,
            code: connack_v3(c.reason_code),
        }),
        Packet::Publish(p) => v3::Packet::Publish(v3::Publish {
            dup: p.dup,
            retain: p.retain,
            qos_pid: p.qos_pid,
            topic_name: p.topic_name.clone(),
            payload: p.payload.clone(),
        }),
        Packet::Puback(p) => v3::Packet::Puback(p.pid),
        Packet::Pubrec(p) => v3::Packet::Pubrec(p.pid),
        Packet::Pubrel(p) => v3::Packet::Pubrel(p.pid),
        Packet::Pubcomp(p) => v3::Packet::Pubcomp(p.pid),
        Packet::Suback(s) => v3::Packet::Suback(v3::Suback {
            pid: s.pid,
            topics: s
                .topics
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::GrantedQoS0 => v3::SubscribeReturnCode::MaxLevel0,
                    v5::SubscribeReasonCode::GrantedQoS1 => v3::SubscribeReturnCode::MaxLevel1,
                    v5::SubscribeReasonCode::GrantedQoS2 => v3::SubscribeReturnCode::MaxLevel2,
                    _ => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        }),
        Packet::Unsuback(u) => v3::Packet::Unsuback(u.pid),
        Packet::Pingresp => v3::Packet::Pingresp,
        Packet::Pingreq => v3::Packet::Pingreq,
        Packet::Disconnect(_) | Packet::Auth(_) => return Ok(0),
        Packet::Connect(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => return Ok(0),
    };
    let bytes = v3p.encode()?;
    out.extend_from_slice(bytes.as_ref());
    Ok(bytes.as_ref().len())
}

fn connack_v3(code: v5::ConnectReasonCode) -> v3::ConnectReturnCode {
    use v3::ConnectReturnCode as R;
    use v5::ConnectReasonCode as C;
    match code {
        C::Success => R::Accepted,
        C::UnsupportedProtocolVersion => R::UnacceptableProtocolVersion,
        C::ClientIdentifierNotValid => R::IdentifierRejected,
        C::BadUserNameOrPassword => R::BadUserNameOrPassword,
        C::NotAuthorized | C::Banned | C::BadAuthMethod => R::NotAuthorized,
        _ => R::ServerUnavailable,
    }
}

/// Size a packet would take on the wire, for checking a client's Maximum Packet Size.
pub fn encoded_len(version: Version, packet: &Packet) -> usize {
    let mut buf = BytesMut::new();
    encode(version, packet, &mut buf).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_len_waits_for_whole_packet_and_refuses_oversize_early() {
        assert_eq!(frame_len(&[], 100), Ok(None));
        assert_eq!(frame_len(&[0x30], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 3, 0], 100), Ok(None));
        assert_eq!(frame_len(&[0x30, 3, 0, 1, 2], 100), Ok(Some(5)));
        assert_eq!(frame_len(&[0xC0, 0], 100), Ok(Some(2)));
        // 16383 bytes declared: refused from the header alone.
        assert!(matches!(
            frame_len(&[0x30, 0xff, 0x7f], 1000),
            Err(DecodeError::TooLarge {
                size: 16386,
                max: 1000
            })
        ));
        assert!(matches!(
            frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn connect_version_reads_level() {
        let v4 = [0x10, 10, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert_eq!(connect_version(&v4), Ok(Version::V311));
        let mut v5 = v4;
        v5[8] = 5;
        assert_eq!(connect_version(&v5), Ok(Version::V5));
        let mut bad = v4;
        bad[8] = 9;
        assert!(matches!(
            connect_version(&bad),
            Err(DecodeError::UnsupportedVersion(_))
        ));
        let publish = [0x30, 0];
        assert!(matches!(
            connect_version(&publish),
            Err(DecodeError::Protocol(_))
        ));
    }

    #[test]
    fn v3_publish_round_trips_through_the_common_model() {
        let p = v3::Packet::Publish(v3::Publish {
            dup: false,
            retain: true,
            qos_pid: mqtt_proto::QosPid::Level1(mqtt_proto::Pid::try_from(7).unwrap()),
            topic_name: mqtt_proto::TopicName::try_from("a/b").unwrap(),
            payload: bytes::Bytes::from_static(b"hi"),
        });
        let wire = p.encode().unwrap();
        let common = decode(Version::V311, wire.as_ref()).unwrap();
        let mut out = BytesMut::new();
        encode(Version::V311, &common, &mut out).unwrap();
        assert_eq!(&out[..], wire.as_ref());
    }

    #[test]
    fn qos3_publish_is_malformed() {
        let frame = [0x36, 5, 0, 1, b'a', 0, 1];
        assert!(matches!(
            decode(Version::V5, &frame),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(
            decode(Version::V311, &frame),
            Err(DecodeError::Malformed(_))
        ));
    }
}
