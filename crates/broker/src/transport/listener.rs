//! Accepting connections: one task per listener socket.
//!
//! The accept loop never blocks on a client: the TLS handshake and the wait
//! for CONNECT happen in the connection's own task, under one deadline
//! (`limits.connect_timeout_secs`). When the process runs out of file
//! descriptors (EMFILE/ENFILE) the loop logs, counts, and backs off instead of
//! spinning; connections already open keep working.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::config::ListenerConfig;
use crate::connection::{self, PeerInfo};
use crate::engine::hub::Hub;
use crate::metrics as m;
use crate::transport::proxy_protocol::{self, Proxied};
use crate::transport::tls::ALPN_MQTT;
use crate::transport::websocket::{self, HttpOutcome, Prefixed};
use crate::transport::Wire;
use fleetcore_core::principal::ClientCert;

/// A bound listener socket and how to serve what it accepts.
pub struct Listener {
    pub config: ListenerConfig,
    pub socket: TcpListener,
    pub tls: Option<Arc<crate::transport::tls::TlsSource>>,
    /// The policy every client on this listener is bound by, if any.
    pub policy: Option<Arc<fleetcore_policy::Policy>>,
    /// The label in logs and metrics ([`crate::config::ListenerConfig::label`]).
    pub label: &'static str,
}

/// Decrements the open-connection count when a connection task ends.
struct ConnGuard(Arc<Hub>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
        m::connection_closed();
        self.0.connection_gone.notify_waiters();
    }
}

/// What every connection of one listener needs to know about it.
struct Dispatch {
    websocket: bool,
    websocket_path: String,
    proxy_protocol: bool,
    /// Who may send PROXY headers (empty: anyone).
    proxy_from: Vec<proxy_protocol::Cidr>,
}

/// Runs the accept loop until shutdown.
pub async fn run(hub: Arc<Hub>, listener: Listener) {
    let kind = listener.label;
    let dispatch = Arc::new(Dispatch {
        websocket: listener.config.websocket,
        websocket_path: listener.config.websocket_path.clone(),
        proxy_protocol: listener.config.proxy_protocol,
        // Validated with the configuration.
        proxy_from: listener
            .config
            .proxy_protocol_from
            .iter()
            .filter_map(|r| proxy_protocol::Cidr::parse(r).ok())
            .collect(),
    });
    let mut shutdown = hub.shutdown_signal();
    let mut backoff = Duration::from_millis(10);
    let mut logged_exhaustion = false;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            r = listener.socket.accept() => r,
        };
        let (sock, addr) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                logged_exhaustion = false;
                x
            }
            Err(e) if is_resource_exhaustion(&e) => {
                m::accept_error("resource_exhaustion");
                if !logged_exhaustion {
                    tracing::warn!(
                        listener = kind,
                        error = %e,
                        open = hub.connections.load(Ordering::Relaxed),
                        "cannot accept: out of file descriptors or memory; backing off (existing clients unaffected)"
                    );
                    logged_exhaustion = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => {
                // Per-connection failures (e.g. ECONNABORTED) say nothing about the listener.
                m::accept_error("other");
                tracing::debug!(listener = kind, error = %e, "accept failed");
                continue;
            }
        };
        let open = hub.connections.fetch_add(1, Ordering::AcqRel) + 1;
        if open > hub.config.limits.max_connections {
            hub.connections.fetch_sub(1, Ordering::AcqRel);
            m::connection_refused("max_connections");
            tracing::warn!(peer = %addr, max = hub.config.limits.max_connections, "connection refused: limits.max_connections reached");
            drop(sock);
            continue;
        }
        m::connection_opened(kind);
        let guard = ConnGuard(hub.clone());
        let _ = sock.set_nodelay(true);
        let deadline = Instant::now() + Duration::from_secs(hub.config.limits.connect_timeout_secs);
        // Boxed: every stage keeps a pointer, not a copy, for the connection's life.
        let peer = Box::new(PeerInfo {
            addr,
            proxied_by: None,
            listener: kind,
            transport: if listener.tls.is_some() {
                "mqtts"
            } else {
                "mqtt"
            },
            allow_anonymous: listener.config.allow_anonymous,
            cert: None,
            policy: listener.policy.clone(),
            uses_registry: listener.config.uses_registry(),
            tokens: listener.config.tokens_enabled(),
            tls_resumed: None,
            unregistered_cert_der: None,
        });
        let hub = hub.clone();
        let tls = listener.tls.clone();
        let dispatch = dispatch.clone();
        tokio::spawn(serve_socket(
            guard, hub, sock, peer, tls, dispatch, deadline,
        ));
    }
    tracing::info!(listener = kind, "listener stopped");
}

/// The task of one accepted socket, boxed: the task itself then holds a
/// pointer (tokio's smallest task, 128 bytes, where one holding a future of
/// this function's size took 384). Plain MQTT over TCP goes straight to the
/// connection, in one allocation with the guard; the rest (PROXY header, TLS,
/// WebSocket) through [`prepare_socket`].
fn serve_socket(
    guard: ConnGuard,
    hub: Arc<Hub>,
    sock: TcpStream,
    peer: Box<PeerInfo>,
    tls: Option<Arc<crate::transport::tls::TlsSource>>,
    dispatch: Arc<Dispatch>,
    deadline: Instant,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    if tls.is_none() && !dispatch.proxy_protocol && !dispatch.websocket {
        // The guard rides along in the closure: dropped when the connection
        // ends, or with the task.
        return Box::pin(connection::serve(hub, sock, peer, deadline).map(move |()| drop(guard)));
    }
    Box::pin(prepare_socket(
        guard, hub, sock, peer, tls, dispatch, deadline,
    ))
}

/// Everything between accept and the MQTT connection: the PROXY header, the
/// TLS handshake, and on WebSocket listeners the choice between MQTT and HTTP.
async fn prepare_socket(
    _guard: ConnGuard,
    hub: Arc<Hub>,
    mut sock: TcpStream,
    mut peer: Box<PeerInfo>,
    tls: Option<Arc<crate::transport::tls::TlsSource>>,
    dispatch: Arc<Dispatch>,
    deadline: Instant,
) {
    if dispatch.proxy_protocol {
        let ip = peer.addr.ip();
        if !dispatch.proxy_from.is_empty() && !dispatch.proxy_from.iter().any(|c| c.contains(ip)) {
            m::connection_refused("proxy_protocol");
            tracing::info!(peer = %peer.addr, listener = peer.listener, "connection refused: not from a balancer in proxy_protocol_from");
            return;
        }
        match Box::pin(proxy_protocol::read_header(&mut sock, deadline)).await {
            Ok(Proxied::Client(client)) => {
                peer.proxied_by = Some(peer.addr);
                peer.addr = client;
            }
            Ok(Proxied::Local) => {}
            Err(why) => {
                m::connection_refused("proxy_protocol");
                tracing::info!(peer = %peer.addr, listener = peer.listener, reason = %why, "connection refused: bad PROXY protocol header");
                return;
            }
        }
    }
    match tls {
        None => {
            if dispatch.websocket {
                Box::pin(sniff_and_serve(hub, sock, peer, &dispatch, deadline)).await
            } else {
                Box::pin(connection::serve(hub, sock, peer, deadline)).await
            }
        }
        Some(source) => {
            Box::pin(serve_tls(
                hub,
                source.config(),
                sock,
                peer,
                &dispatch,
                deadline,
            ))
            .await
        }
    }
}

/// A stream the WebSocket layer runs on, whatever is under it.
trait Io: Wire {}
impl<T: Wire> Io for T {}

impl Wire for Box<dyn Io> {
    fn input_waiting(&self) -> bool {
        (**self).input_waiting()
    }
}

/// On a WebSocket listener without ALPN to go by: MQTT starts with a CONNECT
/// packet (first byte 0x10); anything else is read as HTTP.
async fn sniff_and_serve<S>(
    hub: Arc<Hub>,
    mut stream: S,
    peer: Box<PeerInfo>,
    dispatch: &Dispatch,
    deadline: Instant,
) where
    S: Wire + 'static,
{
    let mut first = BytesMut::with_capacity(1024);
    match tokio::time::timeout_at(deadline, stream.read_buf(&mut first)).await {
        Err(_) => {
            m::connection_refused("connect_timeout");
            tracing::info!(peer = %peer.addr, "nothing received within the connect timeout; closing");
        }
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(_)) if first[0] == 0x10 => {
            Box::pin(connection::serve(
                hub,
                Prefixed::new(first.freeze(), stream),
                peer,
                deadline,
            ))
            .await
        }
        Ok(Ok(_)) => {
            Box::pin(serve_http(
                hub,
                Box::new(stream),
                first,
                peer,
                dispatch,
                deadline,
            ))
            .await
        }
    }
}

async fn serve_http(
    hub: Arc<Hub>,
    stream: Box<dyn Io>,
    head: BytesMut,
    mut peer: Box<PeerInfo>,
    dispatch: &Dispatch,
    deadline: Instant,
) {
    // One WebSocket message may hold one packet (and the start of the next):
    // no more memory per message than a packet may take on plain MQTT.
    let max_message = (hub.config.limits.max_packet_size as usize).saturating_add(16 * 1024);
    match websocket::serve_http(
        stream,
        head,
        &dispatch.websocket_path,
        max_message,
        deadline,
    )
    .await
    {
        HttpOutcome::Mqtt(ws, subprotocol) => {
            peer.transport = if peer.transport == "mqtts" {
                "wss"
            } else {
                "ws"
            };
            m::websocket_upgraded(peer.listener, subprotocol);
            tracing::debug!(peer = %peer.addr, subprotocol, "WebSocket upgrade");
            Box::pin(connection::serve(hub, ws, peer, deadline)).await
        }
        HttpOutcome::Answered(code, why) => {
            m::connection_refused("http_request");
            tracing::info!(peer = %peer.addr, listener = peer.listener, status = code, reason = %why, "HTTP request answered without upgrade");
        }
        HttpOutcome::Failed(why) => {
            m::connection_refused("http_request");
            tracing::info!(peer = %peer.addr, listener = peer.listener, reason = %why, "HTTP request failed");
        }
    }
}

async fn serve_tls(
    hub: Arc<Hub>,
    config: Arc<rustls::ServerConfig>,
    sock: TcpStream,
    mut peer: Box<PeerInfo>,
    dispatch: &Dispatch,
    deadline: Instant,
) {
    // The handshake's state (a whole TLS connection in flight) is boxed so that
    // this future, which lives as long as the connection, does not keep its size.
    let handshake = Box::pin(tokio::time::timeout_at(
        deadline,
        crate::transport::tls::stream::accept(config, sock),
    ));
    let stream = match handshake.await {
        Err(_) => {
            m::connection_refused("tls_handshake_timeout");
            tracing::info!(peer = %peer.addr, "TLS handshake did not finish within the connect timeout");
            return;
        }
        Ok(Err(e)) => {
            m::connection_refused("tls_handshake");
            tracing::info!(peer = %peer.addr, error = %e, "TLS handshake failed");
            return;
        }
        Ok(Ok(s)) => s,
    };
    // Borrowed only inside this block: a borrowed local keeps its slot in
    // this (connection-long) future even after it is moved out.
    let (stream, alpn) = {
        let s = stream;
        let leaf = s.peer_certificates().and_then(|chain| chain.first());
        peer.cert = leaf.and_then(|der| ClientCert::from_der(der));
        if let (Some(der), Some(cert)) = (leaf, &peer.cert) {
            if peer.uses_registry
                && hub.jit.get().is_some()
                && hub.registry.certificate_state(&cert.fingerprint).is_none()
            {
                peer.unregistered_cert_der = Some(der.as_ref().into());
            }
        }
        peer.tls_resumed = crate::transport::tls::tickets::resumed(s.connection());
        let alpn = s.alpn_protocol().map(|p| p.to_vec());
        (s, alpn)
    };
    if !dispatch.websocket {
        return Box::pin(connection::serve(hub, stream, peer, deadline)).await;
    }
    // ALPN decides where it can; a client that sent none is sniffed.
    m::tls_alpn(peer.listener, alpn.as_deref());
    match alpn.as_deref() {
        // Boxed like every branch: this future lives as long as the
        // connection and must not be sized for a connection inline.
        Some(p) if ALPN_MQTT.contains(&p) => {
            Box::pin(connection::serve(
                hub,
                Prefixed::new(bytes::Bytes::new(), stream),
                peer,
                deadline,
            ))
            .await
        }
        // http/1.1 (or no ALPN): HTTP, unless the client starts with a CONNECT
        // anyway (libraries that always offer http/1.1).
        _ => Box::pin(sniff_and_serve(hub, stream, peer, dispatch, deadline)).await,
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(24) | Some(23) | Some(105) | Some(12))
}
