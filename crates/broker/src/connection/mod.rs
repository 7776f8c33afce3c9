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

use crate::engine::hub::{Hub, SubEntry};
use crate::message::Delivery;
use crate::metrics as m;
use crate::session::{Inflight, InflightState, KickReceiver, Session, SubOptions};
use crate::transport::Wire;
use fleetcore_core::message::Message;
use fleetcore_core::principal::ClientCert;
use fleetcore_core::protocol::{self, DecodeError, Packet, Version};
use fleetcore_core::service::{DisconnectCause, Event, Requester};
use fleetcore_core::time::now_ms;
use fleetcore_core::topic::{parse_filter, validate_topic_name};
use fleetcore_identity::authz::Authz;
use fleetcore_identity::token::TokenClaims;
use fleetcore_policy::Action;

mod connect;
mod inbound;
mod io;
mod outbound;
#[cfg(test)]
mod qos_tests;

use connect::{linger, open, Opened};
use inbound::Aliases;
use io::{spare, ReadInto};
use outbound::{AfterCommit, PendingAcks};

/// A write that makes no progress for this long ends the connection, so a
/// client that stops reading cannot hold its task (or memory) forever.
pub const WRITE_STALL: Duration = Duration::from_secs(30);
/// Stop filling the write buffer past this; flush first.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// At most this much input is read and handled from a connection being taken over.
const DRAIN_BUDGET: usize = 256 * 1024;
/// How long a connection being taken over waits for input its socket says is there
/// (the runtime had not yet been told of it), or for the rest of a packet or TLS
/// record it started.
const DRAIN_WAIT: Duration = Duration::from_millis(500);

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
    pub tls_resumed: Option<crate::transport::tls::tickets::Resumed>,
    /// The client certificate's DER, kept only when the registry did not know it at
    /// the handshake and a just-in-time provisioner is installed (see
    /// [`fleetcore_identity::jit`]).
    pub unregistered_cert_der: Option<Box<[u8]>>,
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

/// Serves one accepted (and, for TLS, handshaken) connection to the end.
pub fn serve<S>(
    hub: Arc<Hub>,
    stream: S,
    peer: Box<PeerInfo>,
    connect_deadline: Instant,
) -> impl Future<Output = ()> + Send
where
    S: Wire,
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
    S: Wire,
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
                    d.properties.reason_string = Some(protocol::reason_string(why));
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
    if let Some(cert) = &conn.cert {
        hub.untrack_certificate(&cert.fingerprint, conn.conn_id);
    }
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

impl<S: Wire> Conn<S> {
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
                        if let Some(exit) = self.drain_before_takeover(&k, will, max_packet).await {
                            // The output stopped mid-packet: nothing more can be said.
                            return match exit {
                                Exit::Refuse(_, why) => Exit::Abort(why),
                                other => other,
                            };
                        }
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
                    if let Some(exit) = self.drain_before_takeover(&k, will, max_packet).await {
                        return exit;
                    }
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

    /// On a takeover, handles what the client sent on this connection before it
    /// reconnected: the packets already in the socket (a bounded amount). A client that
    /// sends DISCONNECT and reconnects at once has its DISCONNECT (its session expiry,
    /// the end of its will) taken before the new connection attaches, which waits for
    /// this one to detach. Returns how the connection ended if those packets ended it
    /// (DISCONNECT, a protocol error, end of stream).
    ///
    /// A read that would wait is not the end of the input: the runtime may not have
    /// been told yet of bytes the kernel already holds (its readiness is cached), so the
    /// socket itself is asked ([`Wire::input_waiting`]), and while it says there is
    /// input, the read waits for it, at most [`DRAIN_WAIT`] in all. A connection that
    /// sent nothing more is let go at once.
    ///
    /// Only for a takeover: a connection kicked for authorization or at shutdown is not
    /// served further.
    async fn drain_before_takeover(
        &mut self,
        kick: &crate::session::Kick,
        will: &mut Will,
        max_packet: usize,
    ) -> Option<Exit> {
        use futures_util::FutureExt;
        if kick.reason != DisconnectReasonCode::SessionTakenOver {
            return None;
        }
        let mut budget = DRAIN_BUDGET;
        let give_up = Instant::now() + DRAIN_WAIT;
        while budget > 0 {
            let read = match ReadInto::new(&mut self.stream, &mut self.inbuf).now_or_never() {
                Some(read) => read,
                None if self.stream.input_waiting() => {
                    m::takeover_drain_waited();
                    match tokio::time::timeout_at(
                        give_up,
                        ReadInto::new(&mut self.stream, &mut self.inbuf),
                    )
                    .await
                    {
                        Ok(read) => read,
                        Err(_) => return None,
                    }
                }
                // Nothing more is in the socket: what the client sent before is in.
                None => return None,
            };
            match read {
                Ok(0) => return Some(Exit::Lost("closed by peer during takeover".into())),
                Err(e) => return Some(Exit::Lost(e.to_string())),
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    if let Err(exit) = self.handle_buffered(will, max_packet) {
                        return Some(exit);
                    }
                }
            }
        }
        None
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
            Err(why) => Err(Exit::Refuse(
                DisconnectReasonCode::NotAuthorized,
                why.to_string(),
            )),
        }
    }
}

/// Waits for the write-stall timer, if there is one; never completes otherwise. The
/// timer is made only when a write has to wait (see `poll_flush_out`): a clock read and
/// a timer-wheel entry per write cost as much as the bookkeeping of the write itself.
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
            store.storage(),
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
            unregistered_cert_der: None,
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
