//! TLS for the admin API (`[admin] tls = true`): the PKI's server certificate, and an
//! optional client certificate that, when it chains to the fleetcore CA and names the
//! admin CN, stands in for the bearer token.
//!
//! [`TlsListener`] is an [`axum::serve::Listener`]: a task accepts TCP connections and
//! runs each TLS handshake in its own task under [`HANDSHAKE_TIMEOUT`], so a slow or
//! silent client holds up nobody else. Each finished connection comes with an
//! [`AdminPeer`] (its address and the verified client certificate's CN, if any), which
//! `axum` hands to every request on it as `ConnectInfo<AdminPeer>`.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use fleetcore_broker::transport::tls::{
    read_certs, read_key, read_roots, verifying_config, TlsError,
};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a new connection may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// Why the admin API's TLS configuration could not be made: the broker's TLS errors,
/// as the files are read the same way.
pub type AdminTlsError = TlsError;

/// The admin API's rustls configuration: `cert_file`/`key_file` as the server's identity;
/// client certificates are optional, and verified against `client_ca_file` when sent (a
/// certificate that does not chain to it ends the handshake).
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: &Path,
) -> Result<Arc<ServerConfig>, AdminTlsError> {
    let chain = read_certs(cert_file, "a server certificate")?;
    let key = read_key(key_file)?;
    let (roots, _) = read_roots(client_ca_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = verifying_config(provider, roots, true, chain, key)?;
    // The API speaks HTTP/1.1 only.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Who is at the other end of an admin API connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminPeer {
    pub addr: SocketAddr,
    /// The subject CN of the client certificate the peer presented, verified by rustls
    /// against the fleetcore CA; `None` without a certificate (or without a CN).
    pub client_cn: Option<String>,
}

/// The subject's first CN of a DER certificate.
fn subject_cn(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// A TLS listener for `axum::serve`: yields connections whose handshake is done.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, AdminPeer)>,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    /// Starts accepting on `listener` (needs a Tokio runtime).
    pub fn new(listener: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
        Ok(TlsListener {
            local,
            ready,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        // Stops accepting (and drops the listening socket) when axum is done with us.
        self.acceptor.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, AdminPeer)>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // As axum does for plain TCP: a full file table or the like passes.
                tracing::warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let acceptor = acceptor.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %addr, error = %e, "admin API: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "admin API: TLS handshake timed out");
                    return;
                }
            };
            let client_cn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| subject_cn(leaf.as_ref()));
            let _ = ready.send((tls, AdminPeer { addr, client_cn })).await;
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = AdminPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop only ends when aborted, which happens on drop: never
            // while we are being polled. Wait forever rather than spin.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(AdminPeer {
            addr: self.local,
            client_cn: None,
        })
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for AdminPeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
