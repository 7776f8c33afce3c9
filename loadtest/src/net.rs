//! Getting a byte stream to the broker: broker URLs, source addresses, TCP, TLS with a
//! client certificate, and MQTT over WebSocket (subprotocol `mqtt`), behind one type.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{anyhow, bail, Context as _};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::mqtt::{self, Packet};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    /// `mqtt://`: plain TCP.
    Tcp,
    /// `mqtts://`: TLS (with a client certificate when the fleet has them).
    Tls,
    /// `ws://host:port/path`: WebSocket over plain TCP.
    Ws,
    /// `wss://host:port/path`: WebSocket over TLS.
    Wss,
}

/// A broker address as given on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// WebSocket path (`/mqtt` by default).
    pub path: String,
}

impl std::str::FromStr for BrokerUrl {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| anyhow!("{s}: expected mqtt://, mqtts://, ws:// or wss://"))?;
        let (scheme, default_port) = match scheme {
            "mqtt" | "tcp" => (Scheme::Tcp, 1883),
            "mqtts" | "ssl" | "tls" => (Scheme::Tls, 8883),
            "ws" => (Scheme::Ws, 80),
            "wss" => (Scheme::Wss, 443),
            other => bail!("{s}: unknown scheme {other}://"),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if !path.is_empty() && matches!(scheme, Scheme::Tcp | Scheme::Tls) {
            bail!("{s}: an MQTT URL has no path");
        }
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let (h, p) = h
                .split_once(']')
                .ok_or_else(|| anyhow!("{s}: unclosed ["))?;
            (h, p.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            bail!("{s}: no host");
        }
        let port = match port {
            Some(p) => p.parse().with_context(|| format!("{s}: bad port {p}"))?,
            None => default_port,
        };
        Ok(BrokerUrl {
            scheme,
            host: host.to_owned(),
            port,
            path: if path.is_empty() {
                "/mqtt".into()
            } else {
                path.into()
            },
        })
    }
}

impl BrokerUrl {
    pub fn uses_tls(&self) -> bool {
        matches!(self.scheme, Scheme::Tls | Scheme::Wss)
    }

    pub fn resolve(&self) -> anyhow::Result<SocketAddr> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", self.host))?
            .next()
            .ok_or_else(|| anyhow!("{} resolves to no address", self.host))
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (s, path) = match self.scheme {
            Scheme::Tcp => ("mqtt", ""),
            Scheme::Tls => ("mqtts", ""),
            Scheme::Ws => ("ws", self.path.as_str()),
            Scheme::Wss => ("wss", self.path.as_str()),
        };
        write!(f, "{s}://{}:{}{path}", self.host, self.port)
    }
}

/// `127.0.0.2-127.0.0.40`, `127.0.0.2,127.0.0.3`, or a mix of both.
pub fn parse_source_addrs(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad address {a}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad address {b}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_536 {
                bail!("bad address range {part}");
            }
            out.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            out.push(
                part.parse()
                    .with_context(|| format!("bad address {part}"))?,
            );
        }
    }
    if out.is_empty() {
        bail!("no source address in {s:?}");
    }
    Ok(out)
}

/// The TLS material shared by every connection.
pub struct TlsBase {
    pub roots: Arc<RootCertStore>,
    pub server_name: ServerName<'static>,
}

impl TlsBase {
    pub fn new(ca_pem_file: &std::path::Path, host: &str) -> anyhow::Result<TlsBase> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem_file)
            .with_context(|| format!("reading {}", ca_pem_file.display()))?
        {
            roots
                .add(cert.with_context(|| format!("parsing {}", ca_pem_file.display()))?)
                .with_context(|| format!("CA in {}", ca_pem_file.display()))?;
        }
        if roots.is_empty() {
            bail!("no certificate in {}", ca_pem_file.display());
        }
        Ok(TlsBase {
            roots: Arc::new(roots),
            server_name: ServerName::try_from(host.to_owned())
                .with_context(|| format!("{host} is not a valid TLS server name"))?,
        })
    }

    /// A client configuration presenting `identity` (or no certificate). Without
    /// `resume` every connection is a full handshake, as a fleet's first connect is;
    /// with it, the configuration keeps the session tickets it is given in a store of
    /// its own (one device's) and offers them on its next connections (TLS 1.3
    /// resumption), as a device library with a session cache does.
    pub fn client_config(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
        alpn: Option<&[u8]>,
        resume: bool,
    ) -> anyhow::Result<Arc<ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone());
        let mut cfg = match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        cfg.resumption = if resume {
            // A few tickets: a server may send more than one per handshake.
            rustls::client::Resumption::store(Arc::new(
                rustls::client::ClientSessionMemoryCache::new(4),
            ))
        } else {
            rustls::client::Resumption::disabled()
        };
        if let Some(p) = alpn {
            cfg.alpn_protocols = vec![p.to_vec()];
        }
        Ok(Arc::new(cfg))
    }
}

/// Why a connection attempt failed, as counted in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    Tcp,
    Tls,
    WebSocket,
    /// CONNACK with a non-zero code, or SUBACK refusing the filter.
    Refused,
    /// The broker closed the connection or sent garbage.
    Protocol,
    Timeout,
}

#[derive(Debug)]
pub struct Fail {
    pub kind: FailKind,
    pub detail: String,
}

impl Fail {
    pub fn new(kind: FailKind, detail: impl ToString) -> Fail {
        Fail {
            kind,
            detail: detail.to_string(),
        }
    }
}

/// TCP or TLS, the layer under MQTT or under WebSocket.
pub enum Io {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// The server side, for the null broker.
    ServerTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::ServerTls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::ServerTls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::ServerTls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::ServerTls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub enum Stream {
    Raw(Io),
    Ws(Box<WebSocketStream<Io>>),
}

impl Stream {
    /// On TLS: whether the handshake resumed a session (`None` without TLS).
    pub fn tls_resumed(&self) -> Option<bool> {
        let io = match self {
            Stream::Raw(io) => io,
            Stream::Ws(ws) => ws.get_ref(),
        };
        match io {
            Io::Tls(s) => {
                Some(s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
            }
            Io::Tcp(_) | Io::ServerTls(_) => None,
        }
    }

    /// Opens TCP (from `source` when given), then TLS and WebSocket as the URL says.
    pub async fn open(
        url: &BrokerUrl,
        addr: SocketAddr,
        source: Option<IpAddr>,
        tls: Option<(&TlsBase, Arc<ClientConfig>)>,
    ) -> Result<Stream, Fail> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| Fail::new(FailKind::Tcp, e))?;
        if let Some(src) = source {
            // Let connect() pick the port, so each source address has the whole ephemeral
            // range per destination rather than one range shared by every destination.
            let one: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own with a pointer to a c_int.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| Fail::new(FailKind::Tcp, format!("bind {src}: {e}")))?;
        }
        let tcp = socket
            .connect(addr)
            .await
            .map_err(|e| Fail::new(FailKind::Tcp, e))?;
        let _ = tcp.set_nodelay(true);
        let io = match (url.uses_tls(), tls) {
            (true, Some((base, cfg))) => Io::Tls(Box::new(
                TlsConnector::from(cfg)
                    .connect(base.server_name.clone(), tcp)
                    .await
                    .map_err(|e| Fail::new(FailKind::Tls, e))?,
            )),
            (true, None) => return Err(Fail::new(FailKind::Tls, "no TLS configuration")),
            (false, _) => Io::Tcp(tcp),
        };
        match url.scheme {
            Scheme::Tcp | Scheme::Tls => Ok(Stream::Raw(io)),
            Scheme::Ws | Scheme::Wss => {
                let ws_scheme = if url.scheme == Scheme::Wss {
                    "wss"
                } else {
                    "ws"
                };
                let mut req = format!("{ws_scheme}://{}:{}{}", url.host, url.port, url.path)
                    .into_client_request()
                    .map_err(|e| Fail::new(FailKind::WebSocket, e))?;
                req.headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
                let (ws, _resp) = tokio_tungstenite::client_async(req, io)
                    .await
                    .map_err(|e| Fail::new(FailKind::WebSocket, e))?;
                Ok(Stream::Ws(Box::new(ws)))
            }
        }
    }

    /// Appends what arrives to `buf`; 0 means the connection ended. Cancel-safe.
    pub async fn read_into(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Stream::Raw(io) => {
                if buf.capacity() - buf.len() < 512 {
                    buf.reserve(2048);
                }
                io.read_buf(buf).await
            }
            Stream::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(Message::Close(_))) | None => return Ok(0),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(io::Error::other(e)),
                }
            },
        }
    }

    /// Writes and flushes `data` (one WebSocket message).
    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Stream::Raw(io) => {
                io.write_all(data).await?;
                io.flush().await
            }
            Stream::Ws(ws) => ws
                .send(Message::Binary(Bytes::copy_from_slice(data)))
                .await
                .map_err(io::Error::other),
        }
    }
}

/// One MQTT connection: a stream, its read buffer, and a buffer of packets to send.
pub struct Mqtt {
    pub stream: Stream,
    pub version: u8,
    rbuf: BytesMut,
    pub wbuf: BytesMut,
}

impl Mqtt {
    pub fn new(stream: Stream, version: u8) -> Mqtt {
        Mqtt {
            stream,
            version,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
        }
    }

    /// Sends whatever the encoders put in `wbuf`.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let res = self.stream.write_all(&self.wbuf).await;
        self.wbuf.clear();
        if self.wbuf.capacity() > 64 * 1024 {
            self.wbuf = BytesMut::new();
        }
        res
    }

    /// Whether a whole packet is already buffered (so `recv` will not read).
    pub fn has_buffered(&self) -> bool {
        mqtt::complete(&self.rbuf)
    }

    /// The next packet. Cancel-safe: a partial packet stays in the buffer.
    pub async fn recv(&mut self) -> io::Result<Packet> {
        loop {
            match mqtt::parse(&mut self.rbuf, self.version) {
                Ok(Some(p)) => return Ok(p),
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            if self.stream.read_into(&mut self.rbuf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Sends DISCONNECT and closes, ignoring errors.
    pub async fn close(mut self) {
        mqtt::disconnect(&mut self.wbuf);
        let _ = self.flush().await;
        match &mut self.stream {
            Stream::Raw(io) => {
                let _ = io.shutdown().await;
            }
            Stream::Ws(ws) => {
                // On the stream, not the Box: with futures' `alloc` feature on (as the
                // NATS client turns it on) `Box<S>` is a Sink too, and its `close` would
                // be picked.
                let _ = (**ws).close(None).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: BrokerUrl = "wss://localhost:8443/mqtt".parse().unwrap();
        assert_eq!(
            (u.scheme.clone(), u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Wss, "localhost", 8443, "/mqtt")
        );
        let u: BrokerUrl = "mqtts://127.0.0.1".parse().unwrap();
        assert_eq!((u.scheme.clone(), u.port), (Scheme::Tls, 8883));
        let u: BrokerUrl = "wss://h".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (443, "/mqtt"));
        assert_eq!(u.to_string(), "wss://h:443/mqtt");
        assert!("http://x".parse::<BrokerUrl>().is_err());
        assert!("mqtt://x:99999".parse::<BrokerUrl>().is_err());
        assert!("mqtt://x:1883/path".parse::<BrokerUrl>().is_err());
    }

    #[test]
    fn source_address_ranges() {
        let v = parse_source_addrs("127.0.0.2-127.0.0.4, 127.0.1.1").unwrap();
        let s: Vec<String> = v.iter().map(|a| a.to_string()).collect();
        assert_eq!(s, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.1.1"]);
        assert_eq!(
            parse_source_addrs("127.0.0.255-127.0.1.0").unwrap().len(),
            2
        );
        assert!(parse_source_addrs("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_addrs("").is_err());
        assert!(parse_source_addrs("127.0.0.x").is_err());
    }
}
