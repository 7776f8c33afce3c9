//! MQTT over WebSocket: the HTTP side of a listener with `websocket = true`.
//!
//! A connection that is not MQTT from its first byte (or whose TLS ALPN is
//! `http/1.1`) is read as one HTTP/1.1 request. `GET <websocket_path>` with
//! `Upgrade: websocket` and a `Sec-WebSocket-Protocol` offering `mqtt` (or
//! the older `mqttv3.1`) is answered `101 Switching Protocols`; from then on
//! the binary messages carry the MQTT byte stream, and [`WsIo`] turns them
//! back into a plain byte stream for the connection task, so packets may span
//! messages or share one. Anything else gets a short plain-text HTTP error and
//! the connection is closed: never a hang.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The WebSocket subprotocols that carry MQTT, in our order of preference.
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// Longest HTTP request head read before answering 431.
const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 48;

/// A stream with some bytes already read from it put back in front.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: super::Wire> super::Wire for Prefixed<S> {
    fn input_waiting(&self) -> bool {
        !self.prefix.is_empty() || self.inner.input_waiting()
    }
}

/// The MQTT byte stream inside a WebSocket: reads concatenate the payloads of
/// binary messages; each write goes out as one binary message.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    unread: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.unread.is_empty() {
                let n = self.unread.len().min(buf.remaining());
                buf.put_slice(&self.unread[..n]);
                self.unread.advance(n);
                if self.unread.is_empty() {
                    // Let go of the message's memory now, not at the next one.
                    self.unread = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None => return Poll::Ready(Ok(())),
                // The peer closed: send the Close reply the WebSocket layer
                // queued (best effort), then end of stream.
                Some(Ok(Message::Close(_))) => {
                    let _ = Sink::<Message>::poll_flush(Pin::new(&mut self.ws), cx);
                    return Poll::Ready(Ok(()));
                }
                Some(Ok(Message::Binary(b))) => self.unread = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "WebSocket text frame: MQTT over WebSocket uses binary frames only",
                    )))
                }
                // Pings are answered by the WebSocket layer itself.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl<S: super::Wire> super::Wire for WsIo<S> {
    fn input_waiting(&self) -> bool {
        !self.unread.is_empty() || self.ws.get_ref().input_waiting()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = Pin::new(&mut self.ws);
        ready!(Sink::<Message>::poll_ready(ws, cx)).map_err(ws_error)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(ws_error)?;
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Message>::poll_flush(Pin::new(&mut self.ws), cx).map_err(ws_error)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A Close frame, then the stream underneath (TLS close_notify, FIN).
        match ready!(Sink::<Message>::poll_close(Pin::new(&mut self.ws), cx)) {
            Ok(())
            // Closing twice, or after the peer's close: already done.
            | Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)
            | Err(tokio_tungstenite::tungstenite::Error::AlreadyClosed) => {}
            Err(e) => return Poll::Ready(Err(ws_error(e))),
        }
        Pin::new(self.ws.get_mut()).poll_shutdown(cx)
    }
}

fn ws_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    use tokio_tungstenite::tungstenite::Error as E;
    match e {
        E::Io(e) => e,
        E::ConnectionClosed | E::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

/// How an HTTP request on an MQTT listener ended.
#[derive(Debug)]
// Built once per connection and moved straight into the connection task.
#[allow(clippy::large_enum_variant)]
pub enum HttpOutcome<S> {
    /// Upgraded: the MQTT byte stream, and the subprotocol agreed.
    Mqtt(WsIo<S>, &'static str),
    /// Answered with an HTTP status (not an upgrade) and closed; the text says why.
    Answered(u16, String),
    /// The peer went away, sent garbage, or missed the deadline.
    Failed(String),
}

impl<S> std::fmt::Debug for WsIo<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WsIo")
    }
}

/// Reads one HTTP request from `stream` (which may start with bytes already
/// read, in `head`) and either upgrades it to MQTT over WebSocket or answers
/// it with an error status. Everything happens before `deadline`.
pub async fn serve_http<S>(
    mut stream: S,
    mut head: BytesMut,
    path: &str,
    max_message: usize,
    deadline: Instant,
) -> HttpOutcome<Prefixed<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Read until the blank line that ends the head.
    let mut scanned: usize = 0;
    let head_len = loop {
        // Only the new bytes (and the three before them) can complete "\r\n\r\n".
        if let Some(i) = find_head_end(&head[scanned.saturating_sub(3)..]) {
            break scanned.saturating_sub(3) + i;
        }
        scanned = head.len();
        if head.len() >= MAX_HEAD {
            let why = format!("request head longer than {MAX_HEAD} bytes");
            respond(
                &mut stream,
                431,
                "Request Header Fields Too Large",
                &why,
                &[],
            )
            .await;
            return HttpOutcome::Answered(431, why);
        }
        head.reserve(1024);
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut head)).await {
            Err(_) => {
                return HttpOutcome::Failed(
                    "no complete HTTP request within the connect timeout".into(),
                )
            }
            Ok(Ok(0)) => {
                return HttpOutcome::Failed("closed before a complete HTTP request".into())
            }
            Ok(Err(e)) => return HttpOutcome::Failed(e.to_string()),
            Ok(Ok(_)) => {}
        }
    };
    let rest = head.split_off(head_len).freeze();
    let decision = match Request::parse(&head) {
        Err(why) => Decision::Refuse(400, "Bad Request", why),
        Ok(req) => decide(&req, path),
    };
    match decision {
        Decision::Refuse(code, reason, why) => {
            let extra: &[(&str, &str)] = if code == 426 {
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Protocol", "mqtt")]
            } else {
                &[]
            };
            respond(&mut stream, code, reason, &why, extra).await;
            HttpOutcome::Answered(code, why)
        }
        Decision::Upgrade { accept, protocol } => {
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n"
            );
            let sent = tokio::time::timeout_at(deadline, async {
                stream.write_all(response.as_bytes()).await?;
                stream.flush().await
            })
            .await;
            match sent {
                Err(_) => return HttpOutcome::Failed("101 response not written in time".into()),
                Ok(Err(e)) => return HttpOutcome::Failed(e.to_string()),
                Ok(Ok(())) => {}
            }
            let config = WebSocketConfig::default()
                // Small per-connection buffers: a fleet is mostly idle.
                .read_buffer_size(4096)
                .write_buffer_size(0)
                .max_message_size(Some(max_message))
                .max_frame_size(Some(max_message));
            let ws = WebSocketStream::from_raw_socket(
                Prefixed::new(rest, stream),
                Role::Server,
                Some(config),
            )
            .await;
            HttpOutcome::Mqtt(
                WsIo {
                    ws,
                    unread: Bytes::new(),
                },
                protocol,
            )
        }
    }
}

enum Decision {
    Refuse(u16, &'static str, String),
    Upgrade {
        accept: String,
        protocol: &'static str,
    },
}

/// The parts of an HTTP request the upgrade looks at.
#[derive(Debug, Default)]
struct Request {
    method: String,
    path: String,
    version_11: bool,
    upgrade: Option<String>,
    connection: Option<String>,
    ws_version: Option<String>,
    ws_key: Option<String>,
    ws_protocols: Vec<String>,
}

impl Request {
    fn parse(head: &[u8]) -> Result<Request, String> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err("incomplete HTTP request".into()),
            Err(e) => return Err(format!("not an HTTP/1.1 request (nor MQTT): {e}")),
        }
        let mut out = Request {
            method: req.method.unwrap_or("").to_string(),
            path: req.path.unwrap_or("").to_string(),
            version_11: req.version == Some(1),
            ..Request::default()
        };
        for h in req.headers.iter() {
            let value = || String::from_utf8_lossy(h.value).trim().to_string();
            if h.name.eq_ignore_ascii_case("upgrade") {
                out.upgrade = Some(value());
            } else if h.name.eq_ignore_ascii_case("connection") {
                out.connection = Some(value());
            } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
                out.ws_version = Some(value());
            } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
                out.ws_key = Some(value());
            } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
                out.ws_protocols.extend(
                    value()
                        .split(',')
                        .map(|p| p.trim().to_string())
                        .filter(|p| !p.is_empty()),
                );
            }
        }
        Ok(out)
    }
}

fn decide(req: &Request, path: &str) -> Decision {
    let req_path = req.path.split('?').next().unwrap_or("");
    if req_path != path {
        return Decision::Refuse(
            404,
            "Not Found",
            format!("nothing at {req_path:?}; MQTT over WebSocket is served at {path:?}"),
        );
    }
    if req.method != "GET" {
        return Decision::Refuse(
            405,
            "Method Not Allowed",
            format!("{} {path}: only GET upgrades to a WebSocket", req.method),
        );
    }
    let has_token = |v: &Option<String>, token: &str| {
        v.as_deref()
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !req.version_11
        || !has_token(&req.upgrade, "websocket")
        || !has_token(&req.connection, "upgrade")
    {
        return Decision::Refuse(
            426,
            "Upgrade Required",
            format!("{path} speaks MQTT over WebSocket only: send Upgrade: websocket"),
        );
    }
    if req.ws_version.as_deref() != Some("13") {
        return Decision::Refuse(
            400,
            "Bad Request",
            "Sec-WebSocket-Version must be 13".into(),
        );
    }
    let Some(key) = req.ws_key.as_deref().filter(|k| !k.is_empty()) else {
        return Decision::Refuse(400, "Bad Request", "Sec-WebSocket-Key is missing".into());
    };
    let protocol = req.ws_protocols.iter().find_map(|offered| {
        SUBPROTOCOLS
            .iter()
            .find(|p| p.eq_ignore_ascii_case(offered))
            .copied()
    });
    let Some(protocol) = protocol else {
        return Decision::Refuse(
            400,
            "Bad Request",
            format!(
                "Sec-WebSocket-Protocol must offer \"mqtt\" (or \"mqttv3.1\"); offered: {:?}",
                req.ws_protocols
            ),
        );
    };
    Decision::Upgrade {
        accept: derive_accept_key(key.as_bytes()),
        protocol,
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: u16,
    reason: &str,
    body: &str,
    extra: &[(&str, &str)],
) {
    let mut text = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len() + 1
    );
    for (k, v) in extra {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    text.push('\n');
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        stream.write_all(text.as_bytes()).await?;
        stream.flush().await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Request {
        Request::parse(text.replace('\n', "\r\n").as_bytes()).unwrap()
    }

    const GOOD: &str = "GET /mqtt HTTP/1.1\nHost: x\nUpgrade: websocket\nConnection: keep-alive, Upgrade\n\
        Sec-WebSocket-Version: 13\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Protocol: mqttv3.1, mqtt\n\n";

    #[test]
    fn upgrade_picks_our_preferred_subprotocol_and_the_rfc_accept_key() {
        match decide(&request(GOOD), "/mqtt") {
            // RFC 6455 section 1.3's worked example.
            Decision::Upgrade { accept, protocol } => {
                assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
                assert_eq!(protocol, "mqttv3.1", "first offered that we support");
            }
            Decision::Refuse(c, _, why) => panic!("refused {c}: {why}"),
        }
    }

    #[test]
    fn wrong_path_method_upgrade_or_subprotocol_get_their_status() {
        let cases = [
            (GOOD.replace("/mqtt", "/other"), 404),
            (GOOD.replace("GET", "POST"), 405),
            (GOOD.replace("Upgrade: websocket\n", ""), 426),
            (
                GOOD.replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                400,
            ),
            (GOOD.replace("mqttv3.1, mqtt", "wamp"), 400),
            (
                GOOD.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\n", ""),
                400,
            ),
        ];
        for (text, want) in cases {
            match decide(&request(&text), "/mqtt") {
                Decision::Refuse(code, _, _) => assert_eq!(code, want, "{text}"),
                Decision::Upgrade { .. } => panic!("upgraded: {text}"),
            }
        }
    }

    #[test]
    fn query_string_is_ignored_for_the_path() {
        let text = GOOD.replace("GET /mqtt ", "GET /mqtt?x-amz-customauthorizer-name=a ");
        assert!(matches!(
            decide(&request(&text), "/mqtt"),
            Decision::Upgrade { .. }
        ));
    }

    #[tokio::test]
    async fn prefixed_stream_replays_its_prefix_first() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut p = Prefixed::new(Bytes::from_static(b"hello"), a);
        let mut s = String::new();
        p.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
