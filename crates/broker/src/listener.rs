//! Accepting connections: one task per listener socket.
//!
//! The accept loop never blocks on a client: the TLS handshake and the wait
//! for CONNECT happen in the connection's own task, under one deadline
//! (`limits.connect_timeout_secs`). When the process runs out of file
//! descriptors (EMFILE/ENFILE) the loop logs, counts, and backs off instead of
//! spinning; connections already open keep working.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::config::ListenerConfig;
use crate::connection::{self, PeerInfo};
use crate::hub::Hub;
use crate::metrics as m;
use crate::tls::ClientCert;

/// A bound listener socket and how to serve what it accepts.
pub struct Listener {
    pub config: ListenerConfig,
    pub socket: TcpListener,
    pub tls: Option<Arc<crate::tls::TlsSource>>,
    /// The policy every client on this listener is bound by, if any.
    pub policy: Option<Arc<fleetcore_policy::Policy>>,
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

/// Runs the accept loop until shutdown.
pub async fn run(hub: Arc<Hub>, listener: Listener) {
    let kind = listener.config.kind_name();
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
        let peer = PeerInfo {
            addr,
            listener: kind,
            allow_anonymous: listener.config.allow_anonymous,
            cert: None,
            policy: listener.policy.clone(),
            uses_registry: listener.config.uses_registry(),
        };
        let hub = hub.clone();
        let tls = listener.tls.clone();
        tokio::spawn(async move {
            let _guard = guard;
            match tls {
                None => connection::serve(hub, sock, peer, deadline).await,
                Some(source) => serve_tls(hub, source.acceptor(), sock, peer, deadline).await,
            }
        });
    }
    tracing::info!(listener = kind, "listener stopped");
}

async fn serve_tls(
    hub: Arc<Hub>,
    acceptor: TlsAcceptor,
    sock: TcpStream,
    mut peer: PeerInfo,
    deadline: Instant,
) {
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(sock)).await {
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
    peer.cert = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| ClientCert::from_der(der));
    connection::serve(hub, stream, peer, deadline).await
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(24) | Some(23) | Some(105) | Some(12))
}
