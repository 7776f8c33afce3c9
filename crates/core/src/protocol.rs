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
    #[error("payload format invalid: {0}")]
    PayloadFormat(String),
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
            DecodeError::PayloadFormat(_) => DisconnectReasonCode::PayloadFormatInvalid,
        }
    }
}

/// MQTT 5 1.5.4 (3.1.1 1.5.3): a UTF-8 string with U+0000 is a malformed packet.
fn nul_in(what: &str) -> DecodeError {
    DecodeError::Malformed(format!("U+0000 in {what}"))
}

fn from_common(e: CodecError) -> DecodeError {
    match e {
        // The codec refuses U+0000 in topics as an invalid topic; it is malformed.
        CodecError::InvalidTopicName(t) if t.contains('\0') => nul_in("a topic name"),
        CodecError::InvalidTopicFilter(t) if t.contains('\0') => nul_in("a topic filter"),
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

/// The codec's MQTT 5 errors as the spec classes them (docs/conformance.md lists the
/// mapping and where the spec leaves the choice open).
fn from_v5(e: ErrorV5) -> DecodeError {
    match e {
        ErrorV5::Common(c) => from_common(c),
        // 3.3.2.3.2: the receiver that checks answers 0x99 (Payload format invalid).
        ErrorV5::InvalidPayloadFormat => {
            DecodeError::PayloadFormat("payload is not UTF-8 although flagged so".into())
        }
        // Each property's definition: "It is a Protocol Error to include it more than once".
        ErrorV5::DuplicatedProperty(p) => DecodeError::Protocol(format!("duplicated property {p}")),
        // 2.2.2.2: an identifier not valid for the packet type is a Malformed Packet.
        ErrorV5::InvalidProperty(t, p) => {
            DecodeError::Malformed(format!("property {p} not allowed in {t:?}"))
        }
        // 3.1.2.11.6/7 and the like: a value other than 0 or 1 is a Protocol Error.
        ErrorV5::InvalidByteProperty(p, v) => {
            DecodeError::Protocol(format!("value {v} for property {p}, which takes 0 or 1"))
        }
        // 3.8.3.1: reserved bits set or QoS 3 are malformed, Retain Handling 3 is a
        // Protocol Error.
        ErrorV5::InvalidSubscriptionOption(o) if o & 0xC0 == 0 && o & 0x03 != 0x03 => {
            DecodeError::Protocol(format!("subscription options {o:#04x}: Retain Handling 3"))
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

/// The UTF-8 strings of a decoded packet that the codec does not check for U+0000
/// (it does for topic names and filters): client id, user name, and the string
/// properties. Any U+0000 makes the packet malformed.
fn check_no_nul(p: &Packet) -> Result<(), DecodeError> {
    fn users(u: &[v5::UserProperty]) -> bool {
        u.iter()
            .any(|u| u.name.contains('\0') || u.value.contains('\0'))
    }
    fn opt(s: &Option<std::sync::Arc<str>>) -> bool {
        s.as_deref().is_some_and(|s| s.contains('\0'))
    }
    let bad = match p {
        Packet::Connect(c) => {
            if c.client_id.contains('\0') {
                return Err(nul_in("the client identifier"));
            }
            if opt(&c.username) {
                return Err(nul_in("the user name"));
            }
            users(&c.properties.user_properties)
                || opt(&c.properties.auth_method)
                || c.last_will.as_ref().is_some_and(|w| {
                    users(&w.properties.user_properties) || opt(&w.properties.content_type)
                })
        }
        Packet::Publish(p) => {
            users(&p.properties.user_properties) || opt(&p.properties.content_type)
        }
        Packet::Puback(a) => {
            users(&a.properties.user_properties) || opt(&a.properties.reason_string)
        }
        Packet::Pubrec(a) => {
            users(&a.properties.user_properties) || opt(&a.properties.reason_string)
        }
        Packet::Pubrel(a) => {
            users(&a.properties.user_properties) || opt(&a.properties.reason_string)
        }
        Packet::Pubcomp(a) => {
            users(&a.properties.user_properties) || opt(&a.properties.reason_string)
        }
        Packet::Subscribe(s) => users(&s.properties.user_properties),
        Packet::Unsubscribe(u) => users(&u.properties.user_properties),
        Packet::Disconnect(d) => {
            users(&d.properties.user_properties)
                || opt(&d.properties.reason_string)
                || opt(&d.properties.server_reference)
        }
        Packet::Auth(a) => {
            users(&a.properties.user_properties)
                || opt(&a.properties.reason_string)
                || opt(&a.properties.auth_method)
        }
        _ => false,
    };
    if bad {
        return Err(nul_in("a string property"));
    }
    Ok(())
}

/// A Reason String made from `why`: MQTT 5 1.5.4 forbids U+0000 in it and advises
/// against other control characters, and `why` may quote what the client sent, so
/// these are written as `\u{..}` escapes.
pub fn reason_string(why: &str) -> std::sync::Arc<str> {
    if !why.chars().any(char::is_control) {
        return std::sync::Arc::from(why);
    }
    let mut out = String::with_capacity(why.len() + 8);
    for c in why.chars() {
        if c.is_control() {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::sync::Arc::from(out)
}

/// Walks a whole CONNECT frame as the spec lays it out, which the codec does not
/// fully do: the reserved flag is 0, the will QoS and retain are 0 without a will and
/// the QoS is not 3, a 3.1/3.1.1 password comes with a user name, and the fields
/// named by the flags end exactly where the packet does (no trailing bytes).
fn check_connect_layout(version: Version, frame: &[u8]) -> Result<(), DecodeError> {
    let bad = |why: &str| DecodeError::Malformed(format!("CONNECT: {why}"));
    let short = || bad("shorter than its fields");
    let mut i = 1;
    while frame.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    i += 1;
    let two = |i: usize| -> Result<usize, DecodeError> {
        match frame.get(i..i + 2) {
            Some(b) => Ok(usize::from(u16::from_be_bytes([b[0], b[1]]))),
            None => Err(short()),
        }
    };
    // A two-byte length and that many bytes.
    let skip_field = |i: &mut usize| -> Result<(), DecodeError> {
        *i += 2 + two(*i)?;
        Ok(())
    };
    let skip_props = |i: &mut usize| -> Result<(), DecodeError> {
        let mut len = 0usize;
        for k in 0..4 {
            let b = *frame.get(*i).ok_or_else(short)?;
            *i += 1;
            len |= usize::from(b & 0x7f) << (7 * k);
            if b & 0x80 == 0 {
                *i += len;
                return Ok(());
            }
        }
        Err(bad("property length longer than 4 bytes"))
    };
    skip_field(&mut i)?; // protocol name
    i += 1; // level
    let flags = *frame.get(i).ok_or_else(short)?;
    i += 3; // flags, keep alive
    if flags & 0x01 != 0 {
        return Err(bad("the reserved flag is set"));
    }
    let will = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    if will_qos == 3 {
        return Err(bad("will QoS 3"));
    }
    if !will && (will_qos != 0 || flags & 0x20 != 0) {
        return Err(bad("will QoS or will retain set without a will"));
    }
    let user = flags & 0x80 != 0;
    let password = flags & 0x40 != 0;
    if password && !user && !version.is_v5() {
        return Err(bad("a password without a user name"));
    }
    if version.is_v5() {
        skip_props(&mut i)?;
    }
    skip_field(&mut i)?; // client id
    if will {
        if version.is_v5() {
            skip_props(&mut i)?;
        }
        skip_field(&mut i)?; // topic
        skip_field(&mut i)?; // payload
    }
    if user {
        skip_field(&mut i)?;
    }
    if password {
        skip_field(&mut i)?;
    }
    match i.cmp(&frame.len()) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(bad("trailing bytes after its last field")),
        std::cmp::Ordering::Greater => Err(short()),
    }
}

/// What the codec lets through in the short packets and the PUBLISH flags: DUP on a
/// QoS 0 PUBLISH (3.3.1.1, MQTT-3.3.1-2; invalid fixed-header flags are malformed,
/// 2.1.3), a PINGREQ/PINGRESP with a body (3.12.1/3.13.1: Remaining Length 0), a
/// 3.1/3.1.1 PUBACK/PUBREC/PUBREL/PUBCOMP whose Remaining Length is not 2 or a
/// DISCONNECT whose is not 0 (3.4.1-3.7.1, 3.14.1), and MQTT 5 acknowledgements and
/// DISCONNECT with bytes after their properties (3.4.2.2, 3.14.2.2). All malformed.
fn check_fixed_layout(version: Version, frame: &[u8]) -> Result<(), DecodeError> {
    let Some(&hd) = frame.first() else {
        return Ok(());
    };
    let typ = hd >> 4;
    let bad = |why: &str| Err(DecodeError::Malformed(why.to_string()));
    if typ == 3 {
        if hd & 0x08 != 0 && (hd >> 1) & 0x03 == 0 {
            return bad("PUBLISH with DUP set and QoS 0");
        }
        return Ok(());
    }
    if !matches!(typ, 4..=7 | 12..=14) {
        return Ok(());
    }
    // The remaining length; `frame_len` has checked it and the frame is whole.
    let mut i = 1;
    while frame.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    let body = frame.get(i + 1..).unwrap_or_default();
    // A variable byte integer at the start of `b`: (value, its length).
    let varint = |b: &[u8]| -> Option<(usize, usize)> {
        let mut n = 0usize;
        for (k, byte) in b.iter().take(4).enumerate() {
            n |= usize::from(byte & 0x7f) << (7 * k);
            if byte & 0x80 == 0 {
                return Some((n, k + 1));
            }
        }
        None
    };
    // MQTT 5: after `fixed` bytes (and a reason code) come properties that must end
    // where the packet does.
    let props_end_the_packet = |fixed: usize| -> bool {
        if body.len() <= fixed + 1 {
            return true;
        }
        match varint(&body[fixed + 1..]) {
            Some((len, n)) => body.len() == fixed + 1 + n + len,
            None => true, // the codec reports the bad integer
        }
    };
    match (typ, version.is_v5()) {
        (12 | 13, _) if !body.is_empty() => bad("PINGREQ/PINGRESP with a body"),
        (4..=7, false) if body.len() != 2 => bad("acknowledgement whose length is not 2"),
        (14, false) if !body.is_empty() => bad("DISCONNECT with a body"),
        (4..=7, true) if !props_end_the_packet(2) => {
            bad("acknowledgement with bytes after its properties")
        }
        (14, true) if !props_end_the_packet(0) => bad("DISCONNECT with bytes after its properties"),
        _ => Ok(()),
    }
}

/// Decodes one whole frame into the common (MQTT 5 shaped) packet model.
pub fn decode(version: Version, frame: &[u8]) -> Result<Packet, DecodeError> {
    if frame.first().is_some_and(|b| b >> 4 == 1) {
        check_connect_layout(version, frame)?;
    }
    check_fixed_layout(version, frame)?;
    let p = decode_unchecked(version, frame)?;
    // PUBLISH without properties is most of the traffic; its topic was checked.
    if !matches!(&p, Packet::Publish(p) if p.properties.user_properties.is_empty() && p.properties.content_type.is_none())
    {
        check_no_nul(&p)?;
    }
    Ok(p)
}

fn decode_unchecked(version: Version, frame: &[u8]) -> Result<Packet, DecodeError> {
    if version.is_v5() {
        return match Packet::decode(frame) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => Err(DecodeError::Malformed(
                "packet shorter than its length".into(),
            )),
            Err(e) => Err(from_v5(e)),
        };
    }
    // MQTT 3.1 lets a client set DUP on a resent PUBREL (fixed header 0x6A; 3.1.1 made
    // the flags 0010 mandatory): read it as the PUBREL it is.
    let relaxed;
    let frame = if version == Version::V31 && frame.first() == Some(&0x6A) {
        relaxed = [&[0x62u8][..], &frame[1..]].concat();
        &relaxed[..]
    } else {
        frame
    };
    let p = match decode_v3_hot(frame) {
        Some(Ok(p)) => p,
        Some(Err(e)) => return Err(from_common(e)),
        None => match v3::Packet::decode(frame) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err(DecodeError::Malformed(
                    "packet shorter than its length".into(),
                ))
            }
            Err(e) => return Err(from_common(e)),
        },
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

/// Decodes the packets of the message path of a 3.1/3.1.1 connection
/// (PUBLISH, its acknowledgements and PINGREQ) with the codec's synchronous
/// pieces; `None` for the other types, which go through `v3::Packet::decode`.
/// That one runs the codec's async decoder under `block_on` (a thread-local
/// parker and a waker per packet), which cost more than the rest of handling a
/// PUBACK. The results and errors are the same; the tests compare the two.
fn decode_v3_hot(frame: &[u8]) -> Option<Result<v3::Packet, CodecError>> {
    let hd = *frame.first()?;
    // The remaining length; `frame_len` has checked it and the frame is whole.
    let mut off = 1;
    let mut remaining: u32 = 0;
    loop {
        let byte = *frame.get(off)?;
        remaining |= ((byte & 0x7f) as u32) << (7 * (off - 1));
        off += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if off > 4 {
            return None;
        }
    }
    let header = match v3::Header::new_with(hd, remaining, (off - 1) as u32) {
        Ok(h) => h,
        Err(e) => return Some(Err(e)),
    };
    let pid = |frame: &[u8]| -> Result<mqtt_proto::Pid, CodecError> {
        match frame.get(off..off + 2) {
            Some(b) => mqtt_proto::Pid::try_from(u16::from_be_bytes([b[0], b[1]])),
            None => Err(CodecError::IoError(mqtt_proto::IoErrorKind::UnexpectedEof)),
        }
    };
    Some(match header.typ {
        v3::PacketType::Publish => {
            v3::Publish::decode(frame, &mut off, header).map(v3::Packet::Publish)
        }
        v3::PacketType::Puback => pid(frame).map(v3::Packet::Puback),
        v3::PacketType::Pubrec => pid(frame).map(v3::Packet::Pubrec),
        v3::PacketType::Pubrel => pid(frame).map(v3::Packet::Pubrel),
        v3::PacketType::Pubcomp => pid(frame).map(v3::Packet::Pubcomp),
        v3::PacketType::Pingreq => Ok(v3::Packet::Pingreq),
        _ => return None,
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
            // MQTT 3.1 has no Session Present flag: the byte is reserved (0).
            session_present: c.session_present && version != Version::V31,
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
        Packet::Suback(s) => {
            // Encoded here: mqtt-proto 0.4 writes the v3 failure code as 3, not 0x80.
            let start = out.len();
            out.extend_from_slice(&[0x90]);
            put_varint(out, 2 + s.topics.len());
            out.extend_from_slice(&s.pid.value().to_be_bytes());
            for c in &s.topics {
                out.extend_from_slice(&[match c {
                    v5::SubscribeReasonCode::GrantedQoS0 => 0x00,
                    v5::SubscribeReasonCode::GrantedQoS1 => 0x01,
                    v5::SubscribeReasonCode::GrantedQoS2 => 0x02,
                    _ => 0x80,
                }]);
            }
            return Ok(out.len() - start);
        }
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

/// [`encode`] for a client whose Maximum Packet Size is `max`: a packet that would be
/// larger goes without its Reason String and User Properties, which MQTT 5 says the
/// server must not send if they would make it too large (3.2.2.3.9 and the like);
/// if it is still too large nothing is written and `Ok(None)` says so.
pub fn encode_within(
    version: Version,
    packet: &Packet,
    max: usize,
    out: &mut BytesMut,
) -> Result<Option<usize>, CodecError> {
    let start = out.len();
    let n = encode(version, packet, out)?;
    if n <= max {
        return Ok(Some(n));
    }
    out.truncate(start);
    if let Some(lean) = without_optional_properties(packet) {
        let n = encode(version, &lean, out)?;
        if n <= max {
            return Ok(Some(n));
        }
        out.truncate(start);
    }
    Ok(None)
}

/// `packet` without its Reason String and User Properties, if it has any.
fn without_optional_properties(packet: &Packet) -> Option<Packet> {
    macro_rules! strip {
        ($variant:ident, $p:expr) => {{
            if $p.properties.reason_string.is_none() && $p.properties.user_properties.is_empty() {
                return None;
            }
            let mut lean = $p.clone();
            lean.properties.reason_string = None;
            lean.properties.user_properties = Vec::new();
            Packet::$variant(lean)
        }};
    }
    Some(match packet {
        Packet::Connack(p) => strip!(Connack, p),
        Packet::Puback(p) => strip!(Puback, p),
        Packet::Pubrec(p) => strip!(Pubrec, p),
        Packet::Pubrel(p) => strip!(Pubrel, p),
        Packet::Pubcomp(p) => strip!(Pubcomp, p),
        Packet::Suback(p) => strip!(Suback, p),
        Packet::Unsuback(p) => strip!(Unsuback, p),
        Packet::Disconnect(p) => strip!(Disconnect, p),
        Packet::Auth(p) => strip!(Auth, p),
        _ => return None,
    })
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

/// An outgoing PUBLISH, borrowed from the routed message.
///
/// PUBLISH is the one packet on the hot path, so it has its own encoder:
/// it writes straight into the connection's buffer (no intermediate
/// allocation), and it can carry several Subscription Identifiers, which
/// MQTT 5 allows when overlapping subscriptions match one message.
pub struct OutPublish<'a> {
    pub dup: bool,
    pub qos: mqtt_proto::QoS,
    pub pid: u16,
    pub retain: bool,
    /// Empty when `alias` names a topic the client already knows.
    pub topic: &'a str,
    pub payload: &'a [u8],
    /// MQTT 5 only: the properties to send (ignored for v3).
    pub properties: Option<&'a v5::PublishProperties>,
    pub expiry: Option<u32>,
    pub alias: Option<u16>,
    pub subscription_ids: &'a [u32],
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn put_varint(out: &mut BytesMut, mut n: usize) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.extend_from_slice(&[byte]);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut BytesMut, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Appends one PUBLISH to `out`; returns its size in bytes.
pub fn encode_publish(version: Version, p: &OutPublish, out: &mut BytesMut) -> usize {
    let start = out.len();
    let qos = p.qos as u8;
    let mut props_len = 0;
    if version.is_v5() {
        let pr = p.properties;
        if pr.and_then(|x| x.payload_is_utf8).is_some() {
            props_len += 2;
        }
        if p.expiry.is_some() {
            props_len += 5;
        }
        if p.alias.is_some() {
            props_len += 3;
        }
        if let Some(pr) = pr {
            if let Some(t) = &pr.response_topic {
                props_len += 3 + t.len();
            }
            if let Some(c) = &pr.correlation_data {
                props_len += 3 + c.len();
            }
            if let Some(c) = &pr.content_type {
                props_len += 3 + c.len();
            }
            for u in &pr.user_properties {
                props_len += 5 + u.name.len() + u.value.len();
            }
        }
        for id in p.subscription_ids {
            props_len += 1 + varint_len(*id as usize);
        }
    }
    let mut remaining = 2 + p.topic.len() + p.payload.len();
    if qos > 0 {
        remaining += 2;
    }
    if version.is_v5() {
        remaining += varint_len(props_len) + props_len;
    }
    out.reserve(1 + varint_len(remaining) + remaining);
    let header = 0x30 | ((p.dup && qos > 0) as u8) << 3 | qos << 1 | p.retain as u8;
    out.extend_from_slice(&[header]);
    put_varint(out, remaining);
    put_str(out, p.topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&p.pid.to_be_bytes());
    }
    if version.is_v5() {
        put_varint(out, props_len);
        if let Some(utf8) = p.properties.and_then(|x| x.payload_is_utf8) {
            out.extend_from_slice(&[0x01, utf8 as u8]);
        }
        if let Some(e) = p.expiry {
            out.extend_from_slice(&[0x02]);
            out.extend_from_slice(&e.to_be_bytes());
        }
        if let Some(a) = p.alias {
            out.extend_from_slice(&[0x23]);
            out.extend_from_slice(&a.to_be_bytes());
        }
        if let Some(pr) = p.properties {
            if let Some(t) = &pr.response_topic {
                out.extend_from_slice(&[0x08]);
                put_str(out, t.as_bytes());
            }
            if let Some(c) = &pr.correlation_data {
                out.extend_from_slice(&[0x09]);
                put_str(out, c);
            }
            if let Some(c) = &pr.content_type {
                out.extend_from_slice(&[0x03]);
                put_str(out, c.as_bytes());
            }
            for u in &pr.user_properties {
                out.extend_from_slice(&[0x26]);
                put_str(out, u.name.as_bytes());
                put_str(out, u.value.as_bytes());
            }
        }
        for id in p.subscription_ids {
            out.extend_from_slice(&[0x0B]);
            put_varint(out, *id as usize);
        }
    }
    out.extend_from_slice(p.payload);
    out.len() - start
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

    /// What `v3::Packet::decode` makes of a whole frame, as `decode` reports it.
    fn v3_by_codec(frame: &[u8]) -> Result<v3::Packet, String> {
        match v3::Packet::decode(frame) {
            Ok(Some(p)) => Ok(p),
            Ok(None) => {
                Err(DecodeError::Malformed("packet shorter than its length".into()).to_string())
            }
            Err(e) => Err(from_common(e).to_string()),
        }
    }

    #[test]
    fn v3_hot_path_decodes_as_the_codec_does() {
        let frames: Vec<Vec<u8>> = vec![
            vec![0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'],
            vec![0x31, 0x03, 0x00, 0x01, b'a'],
            vec![0x32, 0x07, 0x00, 0x01, b'a', 0x00, 0x07, b'h', b'i'],
            vec![0x3C, 0x07, 0x00, 0x01, b'a', 0x00, 0x07, b'h', b'i'],
            vec![0x3A, 0x05, 0x00, 0x01, b'a', 0x00, 0x00],
            vec![0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01],
            vec![0x32, 0x03, 0x00, 0x01, b'a'],
            vec![0x30, 0x03, 0x00, 0x05, b'a'],
            vec![0x30, 0x04, 0x00, 0x02, 0xff, 0xfe],
            vec![0x30, 0x04, 0x00, 0x02, b'a', b'+'],
            vec![0x30, 0x04, 0x00, 0x02, b'a', b'#'],
            vec![0x30, 0x03, 0x00, 0x01, 0x00],
            vec![0x30, 0x02, 0x00, 0x00],
            vec![0x30, 0x00],
            vec![0x40, 0x02, 0x12, 0x34],
            vec![0x40, 0x02, 0x00, 0x00],
            vec![0x40, 0x03, 0x00, 0x01, 0x00],
            vec![0x40, 0x01, 0x01],
            vec![0x41, 0x02, 0x00, 0x01],
            vec![0x50, 0x02, 0x00, 0x09],
            vec![0x62, 0x02, 0x00, 0x09],
            vec![0x60, 0x02, 0x00, 0x09],
            vec![0x70, 0x02, 0x00, 0x09],
            vec![0xC0, 0x00],
            vec![0xC1, 0x00],
            vec![0xF0, 0x00],
            vec![0x00, 0x00],
        ];
        let mut long = vec![0x30, 0x85, 0x01, 0x00, 0x03, b'a', b'/', b'b'];
        long.extend(std::iter::repeat_n(b'x', 0x85 - 5));
        let mut frames = frames;
        frames.push(long);
        for f in &frames {
            let hot = decode_v3_hot(f).map(|r| r.map_err(|e| from_common(e).to_string()));
            if let Some(hot) = hot {
                assert_eq!(hot, v3_by_codec(f), "frame {f:02x?}");
            }
        }
        assert!(decode_v3_hot(&[0x82, 0x02, 0x00, 0x01]).is_none());
        assert!(decode_v3_hot(&[0x40, 0x02, 0x00, 0x01]).is_some());
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
    fn own_publish_encoder_matches_the_codec() {
        use std::sync::Arc;
        let props = v5::PublishProperties {
            payload_is_utf8: Some(true),
            message_expiry_interval: Some(30),
            topic_alias: None,
            response_topic: Some(mqtt_proto::TopicName::try_from("reply/here").unwrap()),
            correlation_data: Some(bytes::Bytes::from_static(b"corr")),
            user_properties: vec![v5::UserProperty {
                name: Arc::from("k"),
                value: Arc::from("v"),
            }],
            subscription_id: Some(7u32.try_into().unwrap()),
            content_type: Some(Arc::from("text/plain")),
        };
        for version in [Version::V311, Version::V5] {
            let mut ours = BytesMut::new();
            let n = encode_publish(
                version,
                &OutPublish {
                    dup: true,
                    qos: mqtt_proto::QoS::Level1,
                    pid: 9,
                    retain: true,
                    topic: "acct/dev/config",
                    payload: b"payload",
                    properties: Some(&props),
                    expiry: Some(30),
                    alias: None,
                    subscription_ids: &[7],
                },
                &mut ours,
            );
            assert_eq!(n, ours.len());
            let Packet::Publish(p) = decode(version, &ours).unwrap() else {
                panic!("not a publish")
            };
            assert!(p.dup && p.retain);
            assert_eq!(&*p.topic_name, "acct/dev/config");
            assert_eq!(&p.payload[..], b"payload");
            assert_eq!(p.qos_pid.pid().map(|x| x.value()), Some(9));
            if version.is_v5() {
                assert_eq!(p.properties, props);
            }
        }
    }

    #[test]
    fn publish_can_carry_several_subscription_ids() {
        let mut out = BytesMut::new();
        encode_publish(
            Version::V5,
            &OutPublish {
                dup: false,
                qos: mqtt_proto::QoS::Level0,
                pid: 0,
                retain: false,
                topic: "t",
                payload: b"",
                properties: None,
                expiry: None,
                alias: None,
                subscription_ids: &[2, 300],
            },
            &mut out,
        );
        // header, remaining, topic "t", props len 5, 0x0B 2, 0x0B 300 (2-byte varint)
        assert_eq!(
            &out[..],
            &[0x30, 9, 0, 1, b't', 5, 0x0B, 2, 0x0B, 0xAC, 0x02]
        );
    }

    #[test]
    fn v3_suback_failure_is_0x80() {
        let suback = v5::Suback::new(
            mqtt_proto::Pid::try_from(5).unwrap(),
            vec![
                v5::SubscribeReasonCode::GrantedQoS1,
                v5::SubscribeReasonCode::NotAuthorized,
                v5::SubscribeReasonCode::TopicFilterInvalid,
            ],
        );
        let mut out = BytesMut::new();
        encode(Version::V311, &Packet::Suback(suback), &mut out).unwrap();
        assert_eq!(&out[..], &[0x90, 5, 0, 5, 0x01, 0x80, 0x80]);
    }

    #[test]
    fn nul_in_any_string_is_malformed() {
        // PUBLISH, topic "a\0b", v3 and v5 (empty properties).
        for (version, frame) in [
            (Version::V311, vec![0x30, 5, 0, 3, b'a', 0, b'b']),
            (Version::V5, vec![0x30, 6, 0, 3, b'a', 0, b'b', 0]),
        ] {
            let e = decode(version, &frame).unwrap_err();
            assert!(matches!(e, DecodeError::Malformed(_)), "{e:?}");
            assert!(!e.to_string().contains('\0'));
        }
        // SUBSCRIBE to "a\0".
        let e = decode(Version::V311, &[0x82, 7, 0, 1, 0, 2, b'a', 0, 0]);
        assert!(matches!(e, Err(DecodeError::Malformed(_))), "{e:?}");
        // CONNECT 3.1.1 with client id "a\0".
        let connect = [
            0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 30, 0, 2, b'a', 0,
        ];
        assert!(matches!(
            decode(Version::V311, &connect),
            Err(DecodeError::Malformed(_))
        ));
        // PUBLISH v5 with a user property "k" = "\0".
        let publish = [0x30, 12, 0, 1, b't', 7, 0x26, 0, 1, b'k', 0, 1, 0, b'x'];
        assert!(matches!(
            decode(Version::V5, &publish),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn short_packets_with_extra_bytes_and_dup_on_qos0_are_malformed() {
        let malformed =
            |v: Version, f: &[u8]| matches!(decode(v, f), Err(DecodeError::Malformed(_)));
        for v in [Version::V31, Version::V311, Version::V5] {
            // DUP on QoS 0 (topic "t", payload "p"); DUP on QoS 1 is fine.
            let qos0_dup = [0x38, 4, 0, 1, b't', b'p'];
            assert!(malformed(v, &qos0_dup), "{v:?} QoS 0 DUP");
            assert!(decode(v, &[0xC0, 0]).is_ok());
            assert!(malformed(v, &[0xC0, 1, 0]), "{v:?} PINGREQ with a body");
            assert!(malformed(v, &[0xD0, 1, 0]), "{v:?} PINGRESP with a body");
        }
        let mut qos1_dup = vec![0x3A, 6, 0, 1, b't', 0, 1, b'p'];
        assert!(decode(Version::V311, &qos1_dup).is_ok());
        qos1_dup.insert(7, 0);
        qos1_dup[1] += 1;
        assert!(decode(Version::V5, &qos1_dup).is_ok());
        for v in [Version::V31, Version::V311] {
            assert!(decode(v, &[0x40, 2, 0, 1]).is_ok());
            assert!(malformed(v, &[0x40, 3, 0, 1, 0]), "{v:?} PUBACK of 3");
            assert!(malformed(v, &[0x50, 3, 0, 1, 0]), "{v:?} PUBREC of 3");
            assert!(malformed(v, &[0xE0, 1, 0]), "{v:?} DISCONNECT with a body");
        }
        // MQTT 5: reason code and properties are optional, nothing may follow them.
        for ok in [
            &[0x40, 2, 0, 1][..],
            &[0x40, 3, 0, 1, 0x10],
            &[0x40, 4, 0, 1, 0, 0],
        ] {
            assert!(decode(Version::V5, ok).is_ok(), "{ok:?}");
        }
        assert!(malformed(Version::V5, &[0x40, 5, 0, 1, 0, 0, 0]));
        assert!(malformed(Version::V5, &[0x50, 5, 0, 1, 0, 0, 0]));
        assert!(decode(Version::V5, &[0xE0, 1, 0]).is_ok());
        assert!(decode(Version::V5, &[0xE0, 2, 0, 0]).is_ok());
        assert!(malformed(Version::V5, &[0xE0, 3, 0, 0, 0]));
    }

    #[test]
    fn connect_with_trailing_bytes_or_inconsistent_flags_is_malformed() {
        // 3.1.1, clean session, keep alive 30, client id "c".
        let good = vec![
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 1, b'c',
        ];
        assert!(decode(Version::V311, &good).is_ok());
        let mut trailing = good.clone();
        trailing[1] += 2;
        trailing.extend([0, 0]);
        let with_flags = |flags: u8| {
            let mut f = good.clone();
            f[9] = flags;
            f
        };
        for (what, frame) in [
            ("trailing bytes", trailing),
            ("reserved flag", with_flags(0x03)),
            ("will QoS without will", with_flags(0x0A)),
            ("will retain without will", with_flags(0x22)),
            ("password without user name", with_flags(0x42)),
            ("user name flag without the field", with_flags(0x82)),
        ] {
            assert!(
                matches!(
                    decode(Version::V311, &frame),
                    Err(DecodeError::Malformed(_))
                ),
                "{what}: {:?}",
                decode(Version::V311, &frame)
            );
        }
        // MQTT 5 allows a password without a user name.
        let mut v5 = vec![0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x42, 0, 30, 0];
        v5.extend([0, 1, b'c', 0, 1, b'p']);
        assert!(
            decode(Version::V5, &v5).is_ok(),
            "{:?}",
            decode(Version::V5, &v5)
        );
        v5[1] += 1;
        v5.push(0);
        assert!(matches!(
            decode(Version::V5, &v5),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn packets_over_the_clients_maximum_lose_reason_string_and_user_properties() {
        let mut ack = v5::Connack::new(false, v5::ConnectReasonCode::ProtocolError);
        ack.properties.reason_string = Some("a long explanation of the refusal".into());
        let packet = Packet::Connack(ack);
        let mut out = BytesMut::new();
        let full = encode(Version::V5, &packet, &mut out).unwrap();
        out.clear();
        assert_eq!(
            encode_within(Version::V5, &packet, full, &mut out).unwrap(),
            Some(full)
        );
        out.clear();
        // Header 2, flags, code, property length 0.
        assert_eq!(
            encode_within(Version::V5, &packet, 16, &mut out).unwrap(),
            Some(5)
        );
        assert_eq!(&out[..], &[0x20, 3, 0, 0x82, 0]);
        out.clear();
        assert_eq!(
            encode_within(Version::V5, &packet, 4, &mut out).unwrap(),
            None
        );
        assert!(out.is_empty());
    }

    #[test]
    fn v5_errors_get_the_reason_codes_the_spec_gives() {
        let code = |frame: &[u8]| {
            decode(Version::V5, frame)
                .map(|_| ())
                .map_err(|e| e.reason())
        };
        use DisconnectReasonCode as R;
        // PUBLISH "t" with Session Expiry Interval (0x11), not a PUBLISH property.
        assert_eq!(
            code(&[0x30, 9, 0, 1, b't', 5, 0x11, 0, 0, 0, 1]),
            Err(R::MalformedPacket)
        );
        // PUBLISH with the Payload Format Indicator twice.
        assert_eq!(
            code(&[0x30, 8, 0, 1, b't', 4, 0x01, 0, 0x01, 0]),
            Err(R::ProtocolError)
        );
        // PUBLISH with Payload Format Indicator 2.
        assert_eq!(
            code(&[0x30, 6, 0, 1, b't', 2, 0x01, 2]),
            Err(R::ProtocolError)
        );
        // PUBLISH flagged UTF-8 with the payload 0xFF.
        assert_eq!(
            code(&[0x30, 7, 0, 1, b't', 2, 0x01, 1, 0xFF]),
            Err(R::PayloadFormatInvalid)
        );
        // SUBSCRIBE "a", options: Retain Handling 3; reserved bits; QoS 3.
        for (options, want) in [
            (0x30, R::ProtocolError),
            (0x40, R::MalformedPacket),
            (0x03, R::MalformedPacket),
        ] {
            assert_eq!(
                code(&[0x82, 7, 0, 1, 0, 0, 1, b'a', options]),
                Err(want),
                "options {options:#04x}"
            );
        }
        assert_eq!(code(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x01]), Ok(()));
    }

    #[test]
    fn reason_strings_carry_no_nul() {
        assert_eq!(&*reason_string("plain"), "plain");
        assert_eq!(&*reason_string("a\0b"), "a\\u{0}b");
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

    #[test]
    fn a_resent_mqtt_3_1_pubrel_may_carry_dup() {
        let dup = [0x6A, 0x02, 0x00, 0x07];
        match decode(Version::V31, &dup) {
            Ok(Packet::Pubrel(p)) => assert_eq!(p.pid.value(), 7),
            other => panic!("{other:?}"),
        }
        // 3.1.1 made the flags mandatory: the same bytes are malformed there.
        assert!(decode(Version::V311, &dup).is_err());
    }
}
