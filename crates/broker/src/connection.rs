//! One client connection: a single task that reads packets, applies them to
//! the hub and its session, and writes what the session has queued.
//!
//! The task owns the socket, the outgoing in-flight window and the incoming
//! QoS 2 state; nothing else touches them, so none of it is locked. It sleeps
//! on the socket, its session's wake-up, the store commits it waits for, a
//! kick (takeover, revocation, shutdown) and the keep-alive deadline.
//!
//! Every wait is bounded: CONNECT must arrive by the deadline the listener
//! set, keep-alive is enforced at 1.5 times the negotiated value, and a write
//! that makes no progress for [`WRITE_STALL`] ends the connection.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::stream::{FuturesOrdered, StreamExt};
use mqtt_proto::v5::{
    self, ConnackProperties, ConnectReasonCode, DisconnectReasonCode, PubackReasonCode,
    PubrecReasonCode, SubscribeReasonCode, UnsubscribeReasonCode,
};
use mqtt_proto::{Pid, QoS, TopicName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::hub::{Hub, SubEntry};
use crate::message::Delivery;
use crate::metrics as m;
use crate::session::{Inflight, InflightState, KickReceiver, Session, SubOptions};
use fleetcore_core::message::Message;
use fleetcore_core::principal::ClientCert;
use fleetcore_core::protocol::{self, DecodeError, Packet, Version};
use fleetcore_core::service::{DisconnectCause, Event, Requester};
use fleetcore_core::time::now_ms;
use fleetcore_core::topic::{parse_filter, validate_topic_name};
use fleetcore_identity::authz::Authz;
use fleetcore_identity::token::TokenClaims;
use fleetcore_policy::Action;

/// A write that makes no progress for this long ends the connection, so a
/// client that stops reading cannot hold its task (or memory) forever.
pub const WRITE_STALL: Duration = Duration::from_secs(30);
/// Stop filling the write buffer past this; flush first.
const OUT_HIGH_WATER: usize = 64 * 1024;

/// Who is on the other end, as the listener saw it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// The client's address (from the PROXY header when the listener takes one).
    pub addr: SocketAddr,
    /// The load balancer's address, when a PROXY header named the client.
    pub proxied_by: Option<SocketAddr>,
    pub listener: &'static str,
    /// What carries MQTT: "mqtt" (TCP), "mqtts" (TLS), "ws" or "wss".
    pub transport: &'static str,
    pub allow_anonymous: bool,
    /// The verified client certificate (TLS listeners).
    pub cert: Option<ClientCert>,
    /// The policy that binds clients of this listener, if any.
    pub policy: Option<Arc<fleetcore_policy::Policy>>,
    /// Certificates must be registered and ACTIVE; their attached policies apply.
    pub uses_registry: bool,
    /// A device token is accepted as the password (user name = thing name).
    pub tokens: bool,
    /// Set when the TLS handshake resumed an earlier session from a ticket: rustls
    /// verified no certificate this time; `cert` is the one the session was
    /// authenticated with, re-checked at CONNECT.
    pub tls_resumed: Option<crate::tls_tickets::Resumed>,
}

/// Why a connection ended.
#[derive(Debug)]
enum Exit {
    /// DISCONNECT from the client; `with_will` for reason 0x04.
    ClientDisconnect { with_will: bool },
    /// The socket closed or failed without DISCONNECT.
    Lost(String),
    /// We end it, telling a v5 client why.
    Refuse(DisconnectReasonCode, String),
    /// We end it without a word: the stream is mid-packet (an interrupted
    /// write), so nothing more can be said on it.
    Abort(String),
}

impl Exit {
    /// The cause as the services see it.
    fn cause(&self) -> DisconnectCause {
        use DisconnectReasonCode as R;
        match self {
            Exit::ClientDisconnect { .. } => DisconnectCause::ClientDisconnect,
            Exit::Lost(_) => DisconnectCause::ConnectionLost,
            Exit::Abort(_) => DisconnectCause::ServerInitiated,
            Exit::Refuse(code, _) => match code {
                R::KeepAliveTimeout => DisconnectCause::KeepAliveTimeout,
                R::SessionTakenOver => DisconnectCause::Takeover,
                R::NotAuthorized | R::MaximumConnectTime => DisconnectCause::NotAuthorized,
                R::ServerShuttingDown => DisconnectCause::ServerShutdown,
                R::MalformedPacket
                | R::ProtocolError
                | R::TopicNameInvalid
                | R::TopicFilterInvalid
                | R::TopicAliasInvalid
                | R::ReceiveMaximumExceeded
                | R::PacketTooLarge
                | R::QuotaExceeded
                | R::PayloadFormatInvalid => DisconnectCause::ClientError,
                _ => DisconnectCause::ServerInitiated,
            },
        }
    }
}

type PendingAck =
    Pin<Box<dyn Future<Output = (AfterCommit, Result<(), fleetcore_store::StoreError>)> + Send>>;

/// Acknowledgements waiting for store commits, in arrival order. Made on first
/// use (and boxed: 64 bytes inline): an empty `FuturesOrdered` already holds
/// two allocations (~150 bytes), and most connections (an idle device) never
/// wait for a commit.
#[derive(Default)]
struct PendingAcks(Option<Box<FuturesOrdered<PendingAck>>>);

impl PendingAcks {
    fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|f| f.is_empty())
    }

    fn push_back(&mut self, ack: PendingAck) {
        self.0
            .get_or_insert_with(|| Box::new(FuturesOrdered::new()))
            .push_back(ack);
    }

    /// The next acknowledgement whose commit completed (`None` when none wait).
    async fn next(&mut self) -> Option<(AfterCommit, Result<(), fleetcore_store::StoreError>)> {
        match &mut self.0 {
            Some(f) => f.next().await,
            None => None,
        }
    }
}

/// What to send once a store commit completes.
enum AfterCommit {
    Puback(Pid, bool),
    Pubrec(Pid, bool),
    Suback(v5::Suback),
    /// An acknowledgement that needed no commit, queued behind ones that do,
    /// so acknowledgements leave in the order their publishes arrived.
    Ready(Box<Packet>, &'static str),
}

/// Serves one accepted (and, for TLS, handshaken) connection to the end.
pub fn serve<S>(
    hub: Arc<Hub>,
    stream: S,
    peer: Box<PeerInfo>,
    connect_deadline: Instant,
) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // An async fn keeps its arguments in its state for as long as it runs,
    // even once they are moved out: the stream (1.2 KB with TLS) goes in
    // boxed, so an idle connection does not carry a dead copy of it.
    serve_boxed(hub, Box::new(stream), peer, connect_deadline)
}

async fn serve_boxed<S>(
    hub: Arc<Hub>,
    stream: Box<S>,
    peer: Box<PeerInfo>,
    connect_deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // The box is freed here, not when this future ends.
    let stream: S = {
        let boxed = stream;
        *boxed
    };
    // The CONNECT phase runs in its own allocation, freed before the session
    // runs: its state (the decoded CONNECT, the negotiation) is large, and an
    // idle connection should not carry it. Its result is taken apart at once:
    // a named `Opened` would keep a second slot as large as the connection.
    let Some(Opened {
        mut conn,
        kick_rx,
        keep_alive,
        mut will,
    }) = Box::pin(open(&hub, stream, &peer, connect_deadline)).await
    else {
        return;
    };
    // Only the address is needed from here on.
    let peer_addr = peer.addr;
    drop(peer);
    let exit = conn.run(kick_rx, keep_alive, &mut will).await;
    // ---- end ----
    let cause = exit.cause();
    let (reason_text, will) = match &exit {
        Exit::ClientDisconnect { with_will } => (
            "client disconnected".to_string(),
            if *with_will { will } else { None },
        ),
        Exit::Lost(why) => (format!("connection lost: {why}"), will),
        Exit::Abort(why) => (why.clone(), will),
        Exit::Refuse(code, why) => {
            if conn.version.is_v5() {
                let mut d = v5::Disconnect::new(*code);
                if conn.problem_info {
                    d.properties.reason_string = Some(Arc::from(why.as_str()));
                }
                conn.send(&Packet::Disconnect(d), "disconnect");
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.flush()).await;
            }
            // A client cut off for authorization (revoked or deactivated certificate,
            // a policy that no longer allows it, an expired token) has its will
            // dropped: its last word is not trusted either.
            let will = if cause == DisconnectCause::NotAuthorized {
                None
            } else {
                will
            };
            (format!("{why} (reason 0x{:02X})", *code as u8), will)
        }
    };
    tracing::info!(client_id = %conn.session.client_id, peer = %peer_addr, reason = %reason_text, "client disconnected");
    // Let go of the session before lingering, so a takeover is not kept waiting.
    let inflight: Vec<Inflight> = std::mem::take(&mut conn.inflight).into_values().collect();
    let qos2 = std::mem::take(&mut conn.incoming_qos2);
    hub.detach(
        &conn.session,
        conn.conn_id,
        inflight,
        qos2,
        will.map(|w| *w),
    );
    if hub.has_services() {
        hub.emit(Event::Disconnected {
            client: conn.requester(),
            cause,
            version: conn.conn_id,
            at_ms: now_ms(),
        });
    }
    if matches!(exit, Exit::Refuse(..)) {
        Box::pin(linger(&mut conn.stream)).await;
    }
}

/// The will of a connection (and its delay), boxed: it is kept for the
/// connection's life, most connections have none, and a `Message` is large.
type Will = Option<Box<(Message, u32)>>;

/// A connection past CONNECT: attached to its session, CONNACK queued.
struct Opened<S> {
    conn: Conn<S>,
    kick_rx: KickReceiver,
    keep_alive: u16,
    will: Will,
}

/// Reads and checks CONNECT, attaches the session and queues CONNACK (and any
/// resends); `None` when the connection was refused or went away.
async fn open<S>(
    hub: &Arc<Hub>,
    mut stream: S,
    peer: &PeerInfo,
    connect_deadline: Instant,
) -> Option<Opened<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let max_packet = hub.config.limits.max_packet_size as usize;
    let mut inbuf = BytesMut::with_capacity(512);
    // ---- CONNECT ----
    let len = loop {
        match protocol::frame_len(&inbuf, max_packet) {
            Ok(Some(n)) => break n,
            Ok(None) => {}
            Err(e) => {
                tracing::info!(peer = %peer.addr, error = %e, "refused before CONNECT");
                m::connection_refused("bad_connect");
                return None;
            }
        }
        match tokio::time::timeout_at(connect_deadline, stream.read_buf(&mut inbuf)).await {
            Err(_) => {
                tracing::info!(peer = %peer.addr, "no CONNECT within the connect timeout; closing");
                m::connection_refused("connect_timeout");
                return None;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
        }
    };
    let frame = inbuf.split_to(len);
    m::packet_in("connect", len);
    let version = match protocol::connect_version(&frame) {
        Ok(v) => v,
        Err(DecodeError::UnsupportedVersion(what)) => {
            tracing::info!(peer = %peer.addr, %what, "unsupported protocol version");
            // MQTT 3.1.1 3.1.4: answer 0x01 (unacceptable protocol version) and close.
            let _ = stream.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
            let _ = stream.flush().await;
            m::connection_refused("protocol_version");
            return None;
        }
        Err(e) => {
            tracing::info!(peer = %peer.addr, error = %e, "bad first packet; closing");
            m::connection_refused("bad_connect");
            return None;
        }
    };
    let connect = match protocol::decode(version, &frame) {
        Ok(Packet::Connect(c)) => c,
        Ok(_) => return None,
        Err(e) => {
            tracing::info!(peer = %peer.addr, error = %e, "malformed CONNECT");
            if version.is_v5() {
                let code = match e.reason() {
                    DisconnectReasonCode::TopicNameInvalid => ConnectReasonCode::TopicNameInvalid,
                    DisconnectReasonCode::ProtocolError => ConnectReasonCode::ProtocolError,
                    _ => ConnectReasonCode::MalformedPacket,
                };
                refuse_connect(&mut stream, version, code, &e.to_string()).await;
            }
            m::connection_refused("bad_connect");
            return None;
        }
    };
    let setup = negotiate(hub, peer, version, connect, &mut stream).await?;
    let conn_id = hub.next_session_id();
    let attached = hub
        .attach(
            setup.client_id.clone(),
            setup.clean_start,
            setup.expiry_secs,
            version,
            conn_id,
            setup.cert_id.clone(),
        )
        .await;
    let mut conn = Conn {
        hub: hub.clone(),
        stream,
        version,
        session: attached.session.clone(),
        conn_id,
        inbuf,
        out: BytesMut::new(),
        inflight: BTreeMap::new(),
        next_pid: 1,
        out_window: setup.out_window,
        client_max_packet: setup.client_max_packet,
        incoming_qos2: attached.incoming_qos2,
        awaiting_commit: 0,
        aliases: None,
        client_alias_max: setup.client_alias_max,
        pending: PendingAcks::default(),
        problem_info: setup.problem_info,
        connect_expiry: setup.expiry_secs,
        authz: setup.authz,
        authz_gen: setup.authz_gen,
        cert: peer.cert.clone().or(setup.token_cert).map(Box::new),
        token: setup.token.map(Box::new),
    };
    if hub.has_services() {
        hub.emit(Event::Connected {
            client: conn.requester(),
            ip: peer.addr.ip().to_string(),
            version: conn_id,
            at_ms: now_ms(),
        });
    }
    let mut props = setup.connack_props;
    props.session_expiry_interval = setup.told_expiry;
    let connack = v5::Connack {
        session_present: attached.session_present,
        reason_code: ConnectReasonCode::Success,
        properties: props,
    };
    conn.send(&Packet::Connack(connack), "connack");
    tracing::info!(
        client_id = %setup.client_id,
        peer = %peer.addr,
        via = %peer.proxied_by.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        listener = peer.listener,
        transport = peer.transport,
        protocol = version.level(),
        cn = peer.cert.as_ref().and_then(|c| c.subject_cn.as_deref()).unwrap_or("-"),
        clean_start = setup.clean_start,
        session_present = attached.session_present,
        keep_alive = setup.keep_alive,
        "client connected"
    );
    m::client_connected(
        peer.listener,
        peer.transport,
        match (&peer.cert, &conn.token) {
            (Some(_), _) => "certificate",
            (None, Some(_)) => "token",
            (None, None) => "none",
        },
    );
    // Resend what was in flight when the previous connection ended.
    for inf in attached.resend {
        match inf.state {
            InflightState::Published => {
                conn.write_publish(&inf.delivery, Some(inf.pid), true);
            }
            InflightState::Released => conn.send(
                &Packet::Pubrel(v5::Pubrel::new_success(
                    inf.pid.try_into().unwrap_or_default(),
                )),
                "pubrel",
            ),
        };
        conn.inflight.insert(inf.pid, inf);
    }
    Some(Opened {
        conn,
        kick_rx: attached.kick_rx,
        keep_alive: setup.keep_alive,
        will: setup.will.map(Box::new),
    })
}

/// Closes our side and reads (and discards) what the client still sends,
/// for a bounded time. Closing a socket with unread input makes the kernel
/// reset the connection, which can destroy the DISCONNECT just sent before
/// the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    let mut scratch = [0u8; 2048];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = stream.read(&mut scratch).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn refuse_connect<S: AsyncWrite + Unpin>(
    stream: &mut S,
    version: Version,
    code: ConnectReasonCode,
    why: &str,
) {
    let mut ack = v5::Connack::new(false, code);
    if version.is_v5() {
        ack.properties.reason_string = Some(Arc::from(why));
    }
    let mut out = BytesMut::new();
    if protocol::encode(version, &Packet::Connack(ack), &mut out).is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = stream.write_all(&out).await;
            let _ = stream.flush().await;
        })
        .await;
    }
}

/// What CONNECT negotiated.
struct Setup {
    client_id: Arc<str>,
    clean_start: bool,
    expiry_secs: u32,
    told_expiry: Option<u32>,
    keep_alive: u16,
    out_window: usize,
    client_max_packet: usize,
    client_alias_max: u16,
    problem_info: bool,
    will: Option<(Message, u32)>,
    connack_props: ConnackProperties,
    authz: Authz,
    /// Registry generation the authorization was bound at (registry listeners).
    authz_gen: Option<u64>,
    cert_id: Option<Arc<str>>,
    /// The device token the client authenticated with, if it did.
    token: Option<TokenClaims>,
    /// The registered certificate the token stands for.
    token_cert: Option<ClientCert>,
}

/// Checks CONNECT and settles what the connection may do; refuses it with
/// the right CONNACK code otherwise.
async fn negotiate<S: AsyncWrite + Unpin>(
    hub: &Hub,
    peer: &PeerInfo,
    version: Version,
    c: v5::Connect,
    stream: &mut S,
) -> Option<Setup> {
    let limits = &hub.config.limits;
    let refuse = |code: ConnectReasonCode, why: String| (code, why);
    let result: Result<Setup, (ConnectReasonCode, String)> = (|| {
        // A device token as the password, where the listener takes tokens and the
        // client came without a certificate (a certificate, when presented, decides).
        let token = match (&peer.cert, &c.password) {
            (None, Some(password)) if peer.tokens => {
                let claims = std::str::from_utf8(password)
                    .map_err(|_| "the password is not a device token".to_string())
                    .and_then(|t| hub.registry.verify_token(t).map_err(|e| e.to_string()))
                    .map_err(|why| refuse(ConnectReasonCode::BadUserNameOrPassword, why))?;
                if c.username.as_deref() != Some(claims.thing.as_str()) {
                    return Err(refuse(
                        ConnectReasonCode::BadUserNameOrPassword,
                        format!(
                            "the user name must be the token's thing name {:?}",
                            claims.thing
                        ),
                    ));
                }
                Some(claims)
            }
            _ => None,
        };
        // A resumed TLS session carries the certificate verified at its full
        // handshake; the registry check below applies to it as to any, and its
        // validity period is checked here (rustls did not look at it this time).
        if let Some(refusal) = peer
            .tls_resumed
            .and_then(|r| r.refusal(fleetcore_core::time::now_secs() as i64))
        {
            return Err(refuse(ConnectReasonCode::NotAuthorized, refusal));
        }
        // On a registry listener every client is someone in the registry: a
        // certificate or a token, never anonymous (whatever allow_anonymous says).
        if peer.cert.is_none() && token.is_none() && (!peer.allow_anonymous || peer.uses_registry) {
            return Err(refuse(
                ConnectReasonCode::NotAuthorized,
                if peer.tokens {
                    "this listener requires a client certificate or a device token (MQTT password, thing name as user name)".into()
                } else {
                    "this listener requires a client certificate".into()
                },
            ));
        }
        let mut assigned = None;
        let client_id: Arc<str> = if c.client_id.is_empty() {
            if !version.is_v5() && !c.clean_start {
                return Err(refuse(
                    ConnectReasonCode::ClientIdentifierNotValid,
                    "an empty client id needs clean session".into(),
                ));
            }
            let id: Arc<str> = Arc::from(format!("fc-{:016x}", rand::random::<u64>()));
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.clone()
        };
        if client_id.len() > limits.max_client_id_len {
            return Err(refuse(
                ConnectReasonCode::ClientIdentifierNotValid,
                format!(
                    "client id is {} bytes; the limit is {}",
                    client_id.len(),
                    limits.max_client_id_len
                ),
            ));
        }
        let mut authz_gen = None;
        let mut cert_id = None;
        let mut token_cert = None;
        let authz = match (&peer.cert, &peer.policy) {
            (None, _) if token.is_some() => {
                let claims = token.as_ref().expect("checked");
                authz_gen = Some(hub.registry.generation());
                cert_id = Some(Arc::from(claims.cert.as_str()));
                let (authz, cert) = hub
                    .registry
                    .resolve_token(claims, &client_id)
                    .map_err(|why| refuse(ConnectReasonCode::NotAuthorized, why))?;
                token_cert = Some(cert);
                authz
            }
            (Some(cert), _) if peer.uses_registry => {
                // Read the generation first, so a change racing with this
                // connect is seen at the first check.
                authz_gen = Some(hub.registry.generation());
                cert_id = Some(Arc::from(cert.fingerprint.as_str()));
                hub.registry
                    .resolve(cert, &client_id)
                    .map_err(|why| refuse(ConnectReasonCode::NotAuthorized, why))?
            }
            (_, Some(policy)) => Authz::bind(&[policy], &client_id, peer.cert.as_ref()),
            _ => Authz::AllowAll,
        };
        if !authz.allows(Action::Connect, &client_id) {
            return Err(refuse(
                ConnectReasonCode::NotAuthorized,
                format!("not authorized to connect as client id {client_id:?}"),
            ));
        }
        let p = &c.properties;
        if p.receive_max == Some(0) || p.max_packet_size == Some(0) {
            return Err(refuse(
                ConnectReasonCode::ProtocolError,
                "receive maximum and maximum packet size may not be 0".into(),
            ));
        }
        if p.auth_method.is_some() {
            return Err(refuse(
                ConnectReasonCode::BadAuthMethod,
                "enhanced authentication is not supported".into(),
            ));
        }
        let session_cfg = &hub.config.session;
        let (expiry_secs, told_expiry) = if version.is_v5() {
            let asked = p.session_expiry_interval.unwrap_or(0);
            let granted = asked.min(session_cfg.max_expiry_secs);
            (granted, (granted != asked).then_some(granted))
        } else if c.clean_start {
            (0, None)
        } else {
            (session_cfg.default_expiry_secs, None)
        };
        let mut connack_props = ConnackProperties::default();
        let max_ka = limits.max_keep_alive_secs;
        let keep_alive =
            if version.is_v5() && max_ka > 0 && (c.keep_alive > max_ka || c.keep_alive == 0) {
                connack_props.server_keep_alive = Some(max_ka);
                max_ka
            } else {
                c.keep_alive
            };
        if version.is_v5() {
            connack_props.receive_max = Some(limits.receive_maximum);
            connack_props.max_packet_size = Some(limits.max_packet_size);
            connack_props.topic_alias_max = Some(limits.topic_alias_maximum);
            connack_props.assigned_client_id = assigned;
        }
        let will = match c.last_will {
            None => None,
            Some(w) => {
                if let Err(e) = validate_topic_name(&w.topic_name, &hub.topic_limits) {
                    return Err(refuse(
                        ConnectReasonCode::TopicNameInvalid,
                        format!("will topic: {e}"),
                    ));
                }
                if !authz.allows(Action::Publish, &w.topic_name)
                    || (w.retain && !authz.allows(Action::RetainPublish, &w.topic_name))
                {
                    return Err(refuse(
                        ConnectReasonCode::NotAuthorized,
                        format!("not authorized to publish the will to {:?}", &*w.topic_name),
                    ));
                }
                let props = v5::PublishProperties {
                    payload_is_utf8: w.properties.payload_is_utf8,
                    message_expiry_interval: w.properties.message_expiry_interval,
                    topic_alias: None,
                    response_topic: w.properties.response_topic.clone(),
                    correlation_data: w.properties.correlation_data.clone(),
                    user_properties: w.properties.user_properties.clone(),
                    subscription_id: None,
                    content_type: w.properties.content_type.clone(),
                };
                // The origin is fixed when the will fires; 0 means "the broker".
                let msg = Message::from_publish(w.topic_name, w.payload, w.qos, w.retain, props, 0);
                Some((msg, w.properties.delay_interval.unwrap_or(0)))
            }
        };
        Ok(Setup {
            client_id,
            clean_start: c.clean_start,
            expiry_secs,
            told_expiry,
            keep_alive,
            out_window: (limits.max_inflight_out as usize)
                .min(p.receive_max.unwrap_or(u16::MAX) as usize),
            client_max_packet: p.max_packet_size.unwrap_or(u32::MAX) as usize,
            client_alias_max: p.topic_alias_max.unwrap_or(0),
            problem_info: p.request_problem_info.unwrap_or(true),
            will,
            connack_props,
            authz,
            authz_gen,
            cert_id,
            token,
            token_cert,
        })
    })();
    match result {
        Ok(s) => Some(s),
        Err((code, why)) => {
            tracing::info!(peer = %peer.addr, client_id = %c.client_id, reason = %why, "CONNECT refused");
            m::connection_refused("connect_refused");
            refuse_connect(stream, version, code, &why).await;
            None
        }
    }
}

/// A connection's MQTT 5 topic aliases, both ways.
#[derive(Default)]
struct Aliases {
    /// Set by the client.
    incoming: HashMap<u16, TopicName>,
    /// Assigned by us towards the client.
    outgoing: HashMap<TopicName, u16>,
}

struct Conn<S> {
    hub: Arc<Hub>,
    stream: S,
    version: Version,
    session: Arc<Session>,
    conn_id: u64,
    inbuf: BytesMut,
    out: BytesMut,
    /// Outgoing QoS 1/2 messages awaiting acknowledgement, by packet id.
    inflight: BTreeMap<u16, Inflight>,
    next_pid: u16,
    out_window: usize,
    client_max_packet: usize,
    /// Incoming QoS 2 packet ids awaiting PUBREL.
    incoming_qos2: crate::session::PidSet,
    /// Incoming QoS 1 publishes whose durable copies are still being written.
    awaiting_commit: usize,
    /// Topic aliases, made when first used (few clients use them).
    aliases: Option<Box<Aliases>>,
    client_alias_max: u16,
    pending: PendingAcks,
    problem_info: bool,
    connect_expiry: u32,
    authz: Authz,
    authz_gen: Option<u64>,
    /// The certificate authorization is bound to: the client's own, or the
    /// registered one its device token stands for. Boxed, like `token`: every
    /// connection carries the field, most need only the pointer.
    cert: Option<Box<ClientCert>>,
    /// A token session: its claims, re-checked when the registry changes, and
    /// when it expires.
    token: Option<Box<TokenClaims>>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    async fn run(&mut self, mut kick_rx: KickReceiver, keep_alive: u16, will: &mut Will) -> Exit {
        // Keep-alive 0: no deadline (the timer is armed a year out, never
        // polled). Computed where needed rather than kept: every byte of this
        // future is kept by every connection.
        let ka_on = keep_alive > 0;
        let ka = move || {
            if ka_on {
                Duration::from_millis(keep_alive as u64 * 1500)
            } else {
                Duration::from_secs(86400 * 365)
            }
        };
        let mut last_in = Instant::now();
        let max_packet = self.hub.config.limits.max_packet_size as usize;
        // Packets the client sent right behind its CONNECT arrived with it.
        if let Err(exit) = self.handle_buffered(will, max_packet) {
            return exit;
        }
        // The session's wake-up and the kick are `Signal`s: polling one is an
        // atomic load, and nothing is kept for them between turns. The
        // keep-alive timer lives as long as the loop: made afresh on every
        // turn, it was inserted into and removed from the timer wheel for
        // every packet in or out.
        let session = self.session.clone();
        // The keep-alive timer is armed for the deadline as it stood when it
        // was (re)armed; input moves the deadline later without touching the
        // timer, which is re-armed for the new deadline only when it fires.
        let mut ka_timer = std::pin::pin!(tokio::time::sleep_until(last_in + ka()));
        // Boxed and only for token sessions: a timer is 112 bytes that every
        // other connection would carry for nothing.
        let mut token_timer = self.token.as_ref().map(|t| {
            let left = t.exp.saturating_mul(1000).saturating_sub(now_ms());
            Box::pin(tokio::time::sleep(Duration::from_millis(left)))
        });
        loop {
            if let Err(exit) = self.refresh_authz() {
                return exit;
            }
            self.pump();
            if self.out.is_empty() && self.out.capacity() > 0 {
                // Taken for a packet that was then not sent (over the client's
                // maximum packet size, or with no 3.1.1 form): give it back.
                spare::put_out(std::mem::take(&mut self.out));
            }
            if !self.out.is_empty() {
                // A takeover or revocation must not wait behind a client that
                // stopped reading.
                let flushed = tokio::select! {
                    r = self.flush() => r,
                    k = std::future::poll_fn(|cx| kick_rx.poll_recv(cx)) => {
                        return Exit::Abort(format!("{} (while a write was stalled)", k.message));
                    }
                };
                if let Err(e) = flushed {
                    return Exit::Lost(e);
                }
            }
            // A 3.1.1 publisher at the Receive Maximum waits for its commits.
            let read_open = self.version.is_v5()
                || self.awaiting_commit < self.hub.config.limits.receive_maximum as usize;
            tokio::select! {
                biased;
                // Polled first, so a kick (a takeover, a revocation, the
                // server shutting down) that came while this turn ran wins
                // over whatever else is ready.
                k = std::future::poll_fn(|cx| kick_rx.poll_recv(cx)) => {
                    return Exit::Refuse(k.reason, k.message);
                }
                Some((after, res)) = self.pending.next(), if !self.pending.is_empty() => {
                    if let Err(exit) = self.after_commit(after, res) {
                        return exit;
                    }
                }
                _ = std::future::poll_fn(|cx| session.wake.poll_notified(cx)) => {}
                r = ReadInto::new(&mut self.stream, &mut self.inbuf), if read_open => {
                    match r {
                        Ok(0) => return Exit::Lost("closed by peer".into()),
                        Err(e) => return Exit::Lost(e.to_string()),
                        Ok(_) => {
                            last_in = Instant::now();
                            if let Err(exit) = self.handle_buffered(will, max_packet) {
                                return exit;
                            }
                        }
                    }
                }
                _ = &mut ka_timer, if ka_on => {
                    let due = last_in + ka();
                    if due <= ka_timer.deadline() {
                        return Exit::Refuse(DisconnectReasonCode::KeepAliveTimeout, "keep-alive timeout".into());
                    }
                    ka_timer.as_mut().reset(due);
                }
                _ = fire(&mut token_timer), if token_timer.is_some() => {
                    return Exit::Refuse(
                        DisconnectReasonCode::MaximumConnectTime,
                        "device token expired: connect again with a new one".into(),
                    );
                }
            }
        }
    }

    /// Rebinds this connection's policies when the registry changed since
    /// they were bound; ends it if its certificate is no longer ACTIVE.
    /// Handles every whole packet in the input buffer.
    fn handle_buffered(&mut self, will: &mut Will, max_packet: usize) -> Result<(), Exit> {
        loop {
            match protocol::frame_len(&self.inbuf, max_packet) {
                Ok(Some(n)) => {
                    // Decoded in place (the packet owns copies of what it
                    // needs): splitting the frame off made the buffer shared,
                    // an allocation per read.
                    let packet = protocol::decode(self.version, &self.inbuf[..n])
                        .map_err(|e| Exit::Refuse(e.reason(), e.to_string()))?;
                    self.inbuf.advance(n);
                    m::packet_in(packet_name(&packet), n);
                    tracing::trace!(client_id = %self.session.client_id, packet = packet_name(&packet), bytes = n, "packet received");
                    self.handle(packet, will)?;
                }
                Ok(None) => break,
                Err(e) => return Err(Exit::Refuse(e.reason(), e.to_string())),
            }
        }
        if self.inbuf.is_empty() && self.inbuf.capacity() > 0 {
            // An idle connection holds no input buffer (see ReadInto); the
            // buffer goes to this thread's spare for the next read.
            spare::put_in(std::mem::take(&mut self.inbuf));
        }
        Ok(())
    }

    fn refresh_authz(&mut self) -> Result<(), Exit> {
        let (Some(bound_at), Some(cert)) = (self.authz_gen, &self.cert) else {
            return Ok(());
        };
        let now = self.hub.registry.generation();
        if now == bound_at {
            return Ok(());
        }
        self.authz_gen = Some(now);
        let resolved = match &self.token {
            // A token session also ends when its thing is deleted or detached.
            Some(claims) => self
                .hub
                .registry
                .resolve_token(claims, &self.session.client_id)
                .map(|(authz, _)| authz),
            None => self.hub.registry.resolve(cert, &self.session.client_id),
        };
        match resolved {
            Ok(a) => {
                self.authz = a;
                Ok(())
            }
            Err(why) => Err(Exit::Refuse(DisconnectReasonCode::NotAuthorized, why)),
        }
    }

    /// Sends an acknowledgement, after any still waiting for a commit.
    fn send_ack(&mut self, packet: Packet, name: &'static str) {
        if self.pending.is_empty() {
            self.send(&packet, name);
        } else {
            self.pending.push_back(Box::pin(async move {
                (AfterCommit::Ready(Box::new(packet), name), Ok(()))
            }));
        }
    }

    /// The output buffer, taken from this thread's spare when the connection
    /// has none (it gives it back after each flush).
    fn out_buf(&mut self) -> &mut BytesMut {
        if self.out.capacity() == 0 {
            self.out = spare::take_out();
        }
        &mut self.out
    }

    fn send(&mut self, packet: &Packet, name: &'static str) {
        let version = self.version;
        match protocol::encode(version, packet, self.out_buf()) {
            Ok(0) => {}
            Ok(_) => m::packet_out(name),
            Err(e) => {
                tracing::error!(error = %e, packet = name, "could not encode an outgoing packet")
            }
        }
    }

    /// Writes the buffer out. Each write call must make progress within
    /// [`WRITE_STALL`]: a slow client that keeps reading is not cut off, one
    /// that stopped reading is.
    /// Writes the output buffer out. A write that makes no progress for
    /// [`WRITE_STALL`] fails.
    async fn flush(&mut self) -> Result<(), String> {
        let (mut written, mut stall) = (0, None);
        std::future::poll_fn(|cx| self.poll_flush_out(cx, &mut written, &mut stall)).await
    }

    /// [`Conn::flush`] by hand: an awaited write under a timeout kept a
    /// future of some 240 bytes in every connection's state; the stall timer
    /// is made only when a write has to wait, which most never do.
    fn poll_flush_out(
        &mut self,
        cx: &mut std::task::Context<'_>,
        written: &mut usize,
        stall: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    ) -> std::task::Poll<Result<(), String>> {
        use std::task::Poll;
        loop {
            let stream = Pin::new(&mut self.stream);
            let r = if *written < self.out.len() {
                stream.poll_write(cx, &self.out[*written..]).map_ok(Some)
            } else {
                stream.poll_flush(cx).map_ok(|()| None)
            };
            match r {
                Poll::Ready(Ok(Some(0))) => {
                    return Poll::Ready(Err("connection closed while writing".into()))
                }
                Poll::Ready(Ok(Some(w))) => {
                    *written += w;
                    // Progress: the stall is measured from the next wait.
                    *stall = None;
                }
                Poll::Ready(Ok(None)) => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                Poll::Pending => {
                    let timer =
                        stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_STALL)));
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err("write stalled: the client is not reading".into()));
                    }
                    return Poll::Pending;
                }
            }
        }
        m::bytes_out(self.out.len());
        // An idle connection keeps no output buffer either; it is left to the
        // next connection this thread writes for, instead of freed here and
        // allocated again (and grown) for the next packet.
        spare::put_out(std::mem::take(&mut self.out));
        Poll::Ready(Ok(()))
    }

    fn alloc_pid(&mut self) -> u16 {
        loop {
            let pid = self.next_pid;
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&pid) {
                return pid;
            }
        }
    }

    /// Encodes one outgoing PUBLISH. Returns false if the client's maximum
    /// packet size forbids it (the message is then dropped, as MQTT 5 says).
    fn write_publish(&mut self, d: &Delivery, pid: Option<u16>, dup: bool) -> bool {
        let v5 = self.version.is_v5();
        // Outgoing topic aliases, when the client allows them: the first
        // copy on a topic names it, later ones send only the alias.
        let mut alias = None;
        let mut new_alias = false;
        let mut topic: &str = &d.msg.topic;
        if v5 && self.client_alias_max > 0 {
            let assigned = &mut self.aliases.get_or_insert_with(Default::default).outgoing;
            if let Some(&a) = assigned.get(&d.msg.topic) {
                alias = Some(a);
                topic = "";
            } else if assigned.len() < self.client_alias_max as usize {
                let a = assigned.len() as u16 + 1;
                assigned.insert(d.msg.topic.clone(), a);
                alias = Some(a);
                new_alias = true;
            }
        }
        let out = protocol::OutPublish {
            dup,
            qos: d.qos,
            pid: pid.unwrap_or(0),
            retain: d.retain,
            topic,
            payload: &d.msg.payload,
            properties: v5.then_some(&d.msg.properties),
            expiry: if v5 && d.msg.expires_at_ms.is_some() {
                d.msg.remaining_expiry(now_ms())
            } else {
                None
            },
            alias,
            subscription_ids: if v5 { &d.subscription_ids } else { &[] },
        };
        let version = self.version;
        if self.out.capacity() == 0 {
            self.out = spare::take_out();
        }
        let mark = self.out.len();
        let n = protocol::encode_publish(version, &out, &mut self.out);
        if n > self.client_max_packet {
            self.out.truncate(mark);
            if new_alias {
                // The client never learnt this alias.
                if let Some(a) = &mut self.aliases {
                    a.outgoing.remove(&d.msg.topic);
                }
            }
            m::dropped("client_max_packet_size");
            return false;
        }
        m::packet_out("publish");
        m::message_out(d.qos as u8);
        true
    }

    /// Moves queued deliveries into the write buffer while the in-flight
    /// window and the buffer allow.
    fn pump(&mut self) {
        while self.inflight.len() < self.out_window && self.out.len() < OUT_HIGH_WATER {
            let next = {
                let mut st = self.session.state.lock();
                // Only the connection attached to the session takes from its queue.
                if st.conn.as_ref().map(|l| l.conn_id) != Some(self.conn_id) {
                    break;
                }
                st.queue.pop_front()
            };
            let Some(d) = next else { break };
            // The clock is read only for messages that can expire.
            if d.msg.expires_at_ms.is_some() && d.msg.is_expired(now_ms()) {
                m::dropped("expired");
                self.forget_stored(&d);
                continue;
            }
            if !self.authz.allows(Action::Receive, &d.msg.topic) {
                m::dropped("not_authorized");
                self.forget_stored(&d);
                continue;
            }
            if d.qos == QoS::Level0 {
                self.write_publish(&d, None, false);
                self.forget_stored(&d);
                continue;
            }
            let pid = self.alloc_pid();
            if self.write_publish(&d, Some(pid), false) {
                self.inflight.insert(
                    pid,
                    Inflight {
                        pid,
                        delivery: d,
                        state: InflightState::Published,
                    },
                );
            } else {
                self.forget_stored(&d);
            }
        }
    }

    /// Deletes the durable copy of a delivery that is done with.
    fn forget_stored(&self, d: &Delivery) {
        if let Some(seq) = d.seq {
            self.hub
                .store
                .submit_nowait(vec![fleetcore_store::Op::DeleteQueued {
                    client_id: self.session.client_id.to_string(),
                    seq,
                }]);
        }
    }

    fn after_commit(
        &mut self,
        after: AfterCommit,
        res: Result<(), fleetcore_store::StoreError>,
    ) -> Result<(), Exit> {
        if let Err(e) = &res {
            tracing::error!(client_id = %self.session.client_id, error = %e, "store commit failed");
            if !self.version.is_v5() {
                // MQTT 3.1.1 has no negative acknowledgement: close, so the
                // client retries on a new connection instead of believing it.
                return Err(Exit::Refuse(
                    DisconnectReasonCode::UnspecifiedError,
                    format!("message could not be stored: {e}"),
                ));
            }
        }
        let reason = res
            .as_ref()
            .err()
            .map(|e| Arc::from(format!("message could not be stored: {e}")));
        match after {
            AfterCommit::Puback(pid, matched) => {
                self.awaiting_commit -= 1;
                let mut ack = v5::Puback::new(
                    pid,
                    match (&res, matched) {
                        (Err(_), _) => PubackReasonCode::UnspecifiedError,
                        (Ok(_), true) => PubackReasonCode::Success,
                        (Ok(_), false) => PubackReasonCode::NoMatchingSubscribers,
                    },
                );
                ack.properties.reason_string = reason.filter(|_| self.problem_info);
                self.send(&Packet::Puback(ack), "puback");
            }
            AfterCommit::Pubrec(pid, matched) => {
                let mut rec = v5::Pubrec::new(
                    pid,
                    match (&res, matched) {
                        (Err(_), _) => PubrecReasonCode::UnspecifiedError,
                        (Ok(_), true) => PubrecReasonCode::Success,
                        (Ok(_), false) => PubrecReasonCode::NoMatchingSubscribers,
                    },
                );
                if res.is_err() {
                    self.incoming_qos2.remove(&pid.value());
                }
                rec.properties.reason_string = reason.filter(|_| self.problem_info);
                self.send(&Packet::Pubrec(rec), "pubrec");
            }
            AfterCommit::Ready(packet, name) => self.send(&packet, name),
            AfterCommit::Suback(mut suback) => {
                if res.is_err() {
                    for code in suback.topics.iter_mut() {
                        *code = SubscribeReasonCode::UnspecifiedError;
                    }
                    suback.properties.reason_string = reason.filter(|_| self.problem_info);
                }
                self.send(&Packet::Suback(suback), "suback");
            }
        }
        Ok(())
    }

    fn queue_retained(&self, retained: Vec<Delivery>) {
        let max = self.hub.config.limits.max_queued_messages;
        for d in retained {
            if let crate::session::Enqueued::Dropped(r) =
                self.session.enqueue(d, max, &self.hub.store)
            {
                m::dropped(r);
            }
        }
    }

    fn handle(&mut self, packet: Packet, will: &mut Will) -> Result<(), Exit> {
        match packet {
            Packet::Publish(p) => self.on_publish(p),
            Packet::Puback(a) => {
                let pid = a.pid.value();
                if let Some(inf) = self.inflight.get(&pid) {
                    if inf.delivery.qos == QoS::Level1 {
                        let inf = self.inflight.remove(&pid);
                        if let Some(inf) = inf {
                            self.forget_stored(&inf.delivery);
                        }
                    }
                }
                Ok(())
            }
            Packet::Pubrec(r) => {
                let pid = r.pid.value();
                let known = self
                    .inflight
                    .get(&pid)
                    .is_some_and(|i| i.delivery.qos == QoS::Level2);
                if !known {
                    self.send(
                        &Packet::Pubrel(v5::Pubrel::new(
                            r.pid,
                            v5::PubrelReasonCode::PacketIdentifierNotFound,
                        )),
                        "pubrel",
                    );
                    return Ok(());
                }
                if (r.reason_code as u8) >= 0x80 {
                    // The receiver refused it: the exchange ends here.
                    if let Some(inf) = self.inflight.remove(&pid) {
                        self.forget_stored(&inf.delivery);
                    }
                    return Ok(());
                }
                if let Some(inf) = self.inflight.get_mut(&pid) {
                    inf.state = InflightState::Released;
                }
                self.send(&Packet::Pubrel(v5::Pubrel::new_success(r.pid)), "pubrel");
                Ok(())
            }
            Packet::Pubcomp(c) => {
                let pid = c.pid.value();
                if self
                    .inflight
                    .get(&pid)
                    .is_some_and(|i| i.state == InflightState::Released)
                {
                    if let Some(inf) = self.inflight.remove(&pid) {
                        self.forget_stored(&inf.delivery);
                    }
                }
                Ok(())
            }
            Packet::Pubrel(r) => {
                let code = if self.incoming_qos2.remove(&r.pid.value()) {
                    v5::PubcompReasonCode::Success
                } else {
                    v5::PubcompReasonCode::PacketIdentifierNotFound
                };
                self.send(&Packet::Pubcomp(v5::Pubcomp::new(r.pid, code)), "pubcomp");
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => {
                self.on_unsubscribe(u);
                Ok(())
            }
            Packet::Pingreq => {
                self.send(&Packet::Pingresp, "pingresp");
                Ok(())
            }
            Packet::Disconnect(d) => {
                if let Some(new_expiry) = d.properties.session_expiry_interval {
                    if self.connect_expiry == 0 && new_expiry != 0 {
                        return Err(Exit::Refuse(
                            DisconnectReasonCode::ProtocolError,
                            "session expiry may not be set on DISCONNECT when CONNECT had 0".into(),
                        ));
                    }
                    let max = self.hub.config.session.max_expiry_secs;
                    self.session.state.lock().expiry_secs = new_expiry.min(max);
                }
                let with_will = d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage;
                if !with_will {
                    *will = None;
                }
                Err(Exit::ClientDisconnect { with_will })
            }
            Packet::Connect(_) => Err(Exit::Refuse(
                DisconnectReasonCode::ProtocolError,
                "a second CONNECT on one connection".into(),
            )),
            Packet::Auth(_) => Err(Exit::Refuse(
                DisconnectReasonCode::ProtocolError,
                "AUTH without enhanced authentication".into(),
            )),
            Packet::Connack(_) | Packet::Suback(_) | Packet::Unsuback(_) | Packet::Pingresp => {
                Err(Exit::Refuse(
                    DisconnectReasonCode::ProtocolError,
                    "a client may not send CONNACK, SUBACK, UNSUBACK or PINGRESP".into(),
                ))
            }
        }
    }

    fn on_publish(&mut self, p: v5::Publish) -> Result<(), Exit> {
        let qos = p.qos_pid.qos();
        let pid = p.qos_pid.pid();
        let limits = &self.hub.config.limits;
        let topic = match p.properties.topic_alias {
            Some(alias) => {
                if alias == 0 || alias > limits.topic_alias_maximum {
                    return Err(Exit::Refuse(
                        DisconnectReasonCode::TopicAliasInvalid,
                        format!(
                            "topic alias {alias} is outside 1..={}",
                            limits.topic_alias_maximum
                        ),
                    ));
                }
                if p.topic_name.is_empty() {
                    match self.aliases.as_ref().and_then(|a| a.incoming.get(&alias)) {
                        Some(t) => t.clone(),
                        None => {
                            return Err(Exit::Refuse(
                                DisconnectReasonCode::ProtocolError,
                                format!("topic alias {alias} was never set"),
                            ))
                        }
                    }
                } else {
                    self.aliases
                        .get_or_insert_with(Default::default)
                        .incoming
                        .insert(alias, p.topic_name.clone());
                    p.topic_name
                }
            }
            None => p.topic_name,
        };
        if topic.is_empty() {
            return Err(Exit::Refuse(
                DisconnectReasonCode::ProtocolError,
                "PUBLISH with an empty topic name and no topic alias".into(),
            ));
        }
        if let Err(e) = validate_topic_name(&topic, &self.hub.topic_limits) {
            return match (pid, self.version.is_v5()) {
                (Some(pid), true) => {
                    self.nack(qos, pid, 0x90, format!("topic name: {e}"));
                    Ok(())
                }
                _ => Err(Exit::Refuse(
                    DisconnectReasonCode::TopicNameInvalid,
                    format!("topic name: {e}"),
                )),
            };
        }
        let allowed = self.authz.allows(Action::Publish, &topic)
            && (!p.retain || self.authz.allows(Action::RetainPublish, &topic));
        if !allowed {
            let why = format!(
                "not authorized to {} to {:?}",
                if p.retain {
                    "publish a retained message"
                } else {
                    "publish"
                },
                &*topic
            );
            tracing::info!(client_id = %self.session.client_id, reason = %why, "PUBLISH refused");
            return match (pid, self.version.is_v5()) {
                (Some(pid), true) => {
                    self.nack(qos, pid, 0x87, why);
                    Ok(())
                }
                // MQTT 3.1.1 cannot refuse a publish; like IoT Core, disconnect.
                _ => Err(Exit::Refuse(DisconnectReasonCode::NotAuthorized, why)),
            };
        }
        m::message_in(qos as u8);
        if let Some(pid) = pid {
            if qos == QoS::Level2 && self.incoming_qos2.contains(&pid.value()) {
                // A resend of a QoS 2 message already taken: acknowledge, don't route again.
                self.send_ack(Packet::Pubrec(v5::Pubrec::new_success(pid)), "pubrec");
                return Ok(());
            }
            // MQTT 5 clients were told the Receive Maximum and break it at their
            // peril; 3.1.1 clients cannot be told, so they are slowed down
            // instead (the read loop stops reading while commits are pending).
            if self.version.is_v5()
                && self.awaiting_commit + self.incoming_qos2.len()
                    >= limits.receive_maximum as usize
            {
                return Err(Exit::Refuse(
                    DisconnectReasonCode::ReceiveMaximumExceeded,
                    format!(
                        "more than {} unacknowledged QoS 1/2 publishes",
                        limits.receive_maximum
                    ),
                ));
            }
        }
        let msg = Message::from_publish(
            topic,
            p.payload,
            qos,
            p.retain,
            p.properties,
            self.session.id,
        );
        let routed = self.hub.publish_from(msg, || self.requester());
        let matched = routed.matched > 0;
        match (qos, pid) {
            (QoS::Level1, Some(pid)) => match routed.commit {
                Some(commit) => {
                    self.awaiting_commit += 1;
                    self.pending.push_back(Box::pin(async move {
                        (AfterCommit::Puback(pid, matched), commit.await)
                    }));
                }
                None => {
                    let code = if matched {
                        PubackReasonCode::Success
                    } else {
                        PubackReasonCode::NoMatchingSubscribers
                    };
                    self.send_ack(Packet::Puback(v5::Puback::new(pid, code)), "puback");
                }
            },
            (QoS::Level2, Some(pid)) => {
                self.incoming_qos2.insert(pid.value());
                match routed.commit {
                    Some(commit) => self.pending.push_back(Box::pin(async move {
                        (AfterCommit::Pubrec(pid, matched), commit.await)
                    })),
                    None => {
                        let code = if matched {
                            PubrecReasonCode::Success
                        } else {
                            PubrecReasonCode::NoMatchingSubscribers
                        };
                        self.send_ack(Packet::Pubrec(v5::Pubrec::new(pid, code)), "pubrec");
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Who this connection is, for the services: the client id, the certificate id
    /// (the registered one a token stands for, with tokens), and the thing: the token's,
    /// or the certificate's CN when the client id is that name (IoT Core's
    /// `iot:Connection.Thing.ThingName`, which the registry checked at CONNECT).
    fn requester(&self) -> Requester {
        let client_id = self.session.client_id.clone();
        let thing = match (&self.token, &self.cert) {
            (Some(t), _) => Some(Arc::from(t.thing.as_str())),
            (None, Some(c)) if c.subject_cn.as_deref() == Some(&*client_id) => {
                Some(client_id.clone())
            }
            _ => None,
        };
        Requester {
            client_id,
            thing,
            cert_id: self
                .cert
                .as_ref()
                .map(|c| Arc::from(c.fingerprint.as_str())),
        }
    }

    /// Refuses one QoS 1/2 publish with a reason code, keeping the connection.
    fn nack(&mut self, qos: QoS, pid: Pid, code: u8, why: String) {
        let reason = self.problem_info.then(|| Arc::from(why.as_str()));
        if qos == QoS::Level1 {
            let mut ack = v5::Puback::new(
                pid,
                PubackReasonCode::from_u8(code).unwrap_or(PubackReasonCode::UnspecifiedError),
            );
            ack.properties.reason_string = reason;
            self.send_ack(Packet::Puback(ack), "puback");
        } else {
            let mut rec = v5::Pubrec::new(
                pid,
                PubrecReasonCode::from_u8(code).unwrap_or(PubrecReasonCode::UnspecifiedError),
            );
            rec.properties.reason_string = reason;
            self.send_ack(Packet::Pubrec(rec), "pubrec");
        }
    }

    fn on_subscribe(&mut self, s: v5::Subscribe) -> Result<(), Exit> {
        let limits = &self.hub.config.limits;
        let sub_id = s.properties.subscription_id.map(|v| v.value());
        if sub_id == Some(0) {
            return Err(Exit::Refuse(
                DisconnectReasonCode::ProtocolError,
                "subscription identifier 0".into(),
            ));
        }
        let mut codes = Vec::with_capacity(s.topics.len());
        let mut retained = Vec::new();
        let mut granted = Vec::new();
        for (i, (filter, o)) in s.topics.iter().enumerate() {
            if i >= limits.max_filters_per_subscribe {
                codes.push(SubscribeReasonCode::QuotaExceeded);
                continue;
            }
            let raw = filter.to_string();
            let parsed = match parse_filter(&raw, &self.hub.topic_limits) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(client_id = %self.session.client_id, filter = %raw, error = %e, "filter refused");
                    codes.push(SubscribeReasonCode::TopicFilterInvalid);
                    continue;
                }
            };
            if !self.authz.allows(Action::Subscribe, &raw) {
                tracing::info!(client_id = %self.session.client_id, filter = %raw, "SUBSCRIBE refused: not authorized");
                codes.push(SubscribeReasonCode::NotAuthorized);
                continue;
            }
            if parsed.group.is_some() && o.no_local {
                return Err(Exit::Refuse(
                    DisconnectReasonCode::ProtocolError,
                    "No Local on a shared subscription".into(),
                ));
            }
            let opts = SubOptions {
                qos: o.max_qos,
                no_local: o.no_local,
                retain_as_published: o.retain_as_published,
                retain_handling: o.retain_handling,
                subscription_id: sub_id,
            };
            let existed = {
                let mut st = self.session.state.lock();
                if !st.subscriptions.contains_key(&raw)
                    && st.subscriptions.len() >= limits.max_subscriptions_per_connection
                {
                    codes.push(SubscribeReasonCode::QuotaExceeded);
                    continue;
                }
                st.subscribe(raw.clone(), opts.clone())
            };
            self.hub.router.subscribe(
                &parsed.filter,
                parsed.group.as_deref(),
                self.session.id,
                SubEntry {
                    session: self.session.clone(),
                    opts: opts.clone(),
                    filter: parsed
                        .group
                        .is_some()
                        .then(|| Arc::from(parsed.filter.as_str())),
                },
            );
            if self.hub.has_services() {
                granted.push(raw.clone());
            }
            codes.push(match o.max_qos {
                QoS::Level0 => SubscribeReasonCode::GrantedQoS0,
                QoS::Level1 => SubscribeReasonCode::GrantedQoS1,
                QoS::Level2 => SubscribeReasonCode::GrantedQoS2,
            });
            let send_retained = parsed.group.is_none()
                && match o.retain_handling {
                    v5::RetainHandling::SendAtSubscribe => true,
                    v5::RetainHandling::SendAtSubscribeIfNotExist => !existed,
                    v5::RetainHandling::DoNotSend => false,
                };
            if send_retained {
                for msg in self.hub.retained_for(&parsed.filter) {
                    retained.push(Delivery {
                        qos: msg.qos.min(o.max_qos),
                        msg,
                        retain: true,
                        subscription_ids: sub_id.into_iter().collect(),
                        seq: None,
                    });
                }
            }
        }
        if self.hub.has_services() && !granted.is_empty() {
            self.hub.emit(Event::Subscribed {
                client: self.requester(),
                filters: granted,
                connection: self.conn_id,
                at_ms: now_ms(),
            });
        }
        let suback = v5::Suback::new(s.pid, codes);
        match self.hub.persist_session(&self.session) {
            Some(commit) => self.pending.push_back(Box::pin(async move {
                (AfterCommit::Suback(suback), commit.await)
            })),
            None => self.send(&Packet::Suback(suback), "suback"),
        }
        // Queued now, not after the SUBACK's commit: a newer retained message
        // published meanwhile must arrive after this snapshot, never before it.
        self.queue_retained(retained);
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: v5::Unsubscribe) {
        let mut codes = Vec::with_capacity(u.topics.len());
        let mut removed_filters = Vec::new();
        for filter in &u.topics {
            let raw = filter.to_string();
            let removed = self.session.state.lock().unsubscribe(&raw);
            if removed {
                if let Ok(p) = parse_filter(&raw, &self.hub.topic_limits) {
                    self.hub
                        .router
                        .unsubscribe(&p.filter, p.group.as_deref(), self.session.id);
                }
                if self.hub.has_services() {
                    removed_filters.push(raw);
                }
                codes.push(UnsubscribeReasonCode::Success);
            } else {
                codes.push(UnsubscribeReasonCode::NoSubscriptionExisted);
            }
        }
        if !removed_filters.is_empty() {
            self.hub.emit(Event::Unsubscribed {
                client: self.requester(),
                filters: removed_filters,
                connection: self.conn_id,
                at_ms: now_ms(),
            });
        }
        // Durability of an unsubscribe is not waited for: at worst a crash
        // brings back a subscription the client had dropped.
        drop(self.hub.persist_session(&self.session));
        self.send(
            &Packet::Unsuback(v5::Unsuback::new(u.pid, codes)),
            "unsuback",
        );
    }
}

/// `tokio::time::timeout(WRITE_STALL, f)`, except that no timer is made when
/// `f` is ready on its first poll, as a write to a socket with room is: the
/// timer (a clock read, and a timer wheel entry once polled) cost as much as
/// the bookkeeping of the write itself. A write that has to wait gets the
/// whole [`WRITE_STALL`] from then on.
/// Waits for the timer, if there is one; never completes otherwise.
async fn fire(timer: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(_) => "connect",
        Packet::Connack(_) => "connack",
        Packet::Publish(_) => "publish",
        Packet::Puback(_) => "puback",
        Packet::Pubrec(_) => "pubrec",
        Packet::Pubrel(_) => "pubrel",
        Packet::Pubcomp(_) => "pubcomp",
        Packet::Subscribe(_) => "subscribe",
        Packet::Suback(_) => "suback",
        Packet::Unsubscribe(_) => "unsubscribe",
        Packet::Unsuback(_) => "unsuback",
        Packet::Pingreq => "pingreq",
        Packet::Pingresp => "pingresp",
        Packet::Disconnect(_) => "disconnect",
        Packet::Auth(_) => "auth",
    }
}

/// Reads what the stream has into `buf`, through a buffer on the stack, so an
/// idle connection waiting to read holds no heap buffer: with a fleet of mostly
/// idle devices that is most of the broker's memory. A packet in progress that
/// left room in `buf` is read straight into it.
struct ReadInto<'a, S> {
    stream: &'a mut S,
    buf: &'a mut BytesMut,
}

impl<'a, S> ReadInto<'a, S> {
    fn new(stream: &'a mut S, buf: &'a mut BytesMut) -> Self {
        ReadInto { stream, buf }
    }
}

impl<S: AsyncRead + Unpin> Future for ReadInto<'_, S> {
    type Output = std::io::Result<usize>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        use std::task::Poll;
        let this = &mut *self;
        if this.buf.capacity() - this.buf.len() >= 1024 {
            return read_spare(this.stream, this.buf, cx);
        }
        // Uninitialised: this runs on every poll, most of which find nothing
        // to read, and zeroing 4 KB each time showed in profiles.
        let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut rb = tokio::io::ReadBuf::uninit(&mut scratch);
        match Pin::new(&mut *this.stream).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                if n > 0 && this.buf.capacity() == 0 {
                    *this.buf = spare::take_in();
                }
                this.buf.extend_from_slice(rb.filled());
                Poll::Ready(Ok(n))
            }
        }
    }
}

/// One spare input and one spare output buffer per runtime thread. A
/// connection holds its buffers only while it has something in them (idle
/// connections are most of a fleet); between turns they wait here, so a busy
/// broker does not free and allocate (and regrow) two buffers per message.
mod spare {
    use std::cell::Cell;

    use bytes::BytesMut;

    /// Larger buffers (after a big packet) are freed, not kept.
    const KEEP_MAX: usize = 16 * 1024;
    const OUT_INITIAL: usize = 1024;

    thread_local! {
        static IN: Cell<Option<BytesMut>> = const { Cell::new(None) };
        static OUT: Cell<Option<BytesMut>> = const { Cell::new(None) };
    }

    pub fn take_in() -> BytesMut {
        IN.with(|c| c.take()).unwrap_or_default()
    }

    pub fn take_out() -> BytesMut {
        OUT.with(|c| c.take())
            .unwrap_or_else(|| BytesMut::with_capacity(OUT_INITIAL))
    }

    pub fn put_in(buf: BytesMut) {
        keep(&IN, buf);
    }

    pub fn put_out(buf: BytesMut) {
        keep(&OUT, buf);
    }

    fn keep(slot: &'static std::thread::LocalKey<Cell<Option<BytesMut>>>, mut buf: BytesMut) {
        if buf.capacity() == 0 || buf.capacity() > KEEP_MAX {
            return;
        }
        buf.clear();
        // `try_with`: a connection dropped while its thread's locals are being
        // torn down just frees its buffer.
        let _ = slot.try_with(|c| c.set(Some(buf)));
    }
}

/// `read_buf` as a poll function: reads into the spare capacity of `buf`.
fn read_spare<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<usize>> {
    use std::task::Poll;
    let len = buf.len();
    buf.resize(buf.capacity(), 0);
    let mut rb = tokio::io::ReadBuf::new(&mut buf[len..]);
    let r = Pin::new(stream).poll_read(cx, &mut rb);
    let n = match &r {
        Poll::Ready(Ok(())) => rb.filled().len(),
        _ => 0,
    };
    buf.truncate(len + n);
    r.map(|r| r.map(|()| n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcore_store::{Store, StoreOptions};
    use tokio::io::AsyncWriteExt;

    /// A client that sends but stops reading: once the socket's buffer is
    /// full, the connection ends after `WRITE_STALL` without progress, and
    /// not before.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_dropped_after_the_write_stall() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) =
            Store::open(&dir.path().join("fleetcore.redb"), StoreOptions::default()).unwrap();
        let hub = Hub::new(
            crate::config::Config::default(),
            store,
            loaded,
            Default::default(),
        );
        let (server, mut client) = tokio::io::duplex(64);
        let peer = Box::new(PeerInfo {
            addr: "127.0.0.1:5000".parse().unwrap(),
            proxied_by: None,
            listener: "test",
            transport: "mqtt",
            allow_anonymous: true,
            cert: None,
            policy: None,
            uses_registry: false,
            tokens: false,
            tls_resumed: None,
        });
        let start = Instant::now();
        let served = tokio::spawn(serve(hub, server, peer, start + Duration::from_secs(10)));
        // CONNECT, MQTT 3.1.1, clean session, keep-alive 0, client id "c".
        let connect = [
            0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0, 0, 1, b'c',
        ];
        // Then PINGREQs, whose PINGRESPs (and the CONNACK) fill the 64-byte pipe.
        let writer = tokio::spawn(async move {
            client.write_all(&connect).await.unwrap();
            for _ in 0..200 {
                if client.write_all(&[0xC0, 0]).await.is_err() {
                    break;
                }
            }
            // Never reads; keeps its end open until the test ends.
            std::future::pending::<()>().await;
            drop(client);
        });
        tokio::time::timeout(WRITE_STALL * 3, served)
            .await
            .expect("the connection was not dropped while its client did not read")
            .unwrap();
        assert!(
            start.elapsed() >= WRITE_STALL,
            "dropped after {:?}, before the write stall",
            start.elapsed()
        );
        writer.abort();
    }
}
