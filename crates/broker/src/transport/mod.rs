//! What a connection arrives over, up to the byte stream the connection task reads.
//!
//! - [`listener`]: accept loops, `max_connections`, EMFILE back-off; per connection,
//!   under the connect deadline: the PROXY header, the TLS handshake, the choice of MQTT
//!   or HTTP (ALPN, else the first byte).
//! - [`proxy_protocol`]: PROXY protocol v1/v2 headers and the trusted source ranges.
//! - [`websocket`]: the HTTP request on WebSocket listeners, the upgrade at `/mqtt`.
//! - [`tls`]: rustls server configuration, its [`tls::stream`] and [`tls::tickets`].

pub mod listener;
pub mod proxy_protocol;
pub mod tls;
pub mod websocket;

use tokio::io::{AsyncRead, AsyncWrite};

/// The byte stream a connection runs on: TCP, or TLS, WebSocket and a sniffed prefix
/// layered on it.
pub trait Wire: AsyncRead + AsyncWrite + Unpin + Send {
    /// Whether input is waiting that a read would return at once: bytes (or the end of
    /// the stream) in the kernel's socket buffer, or bytes a layer above the socket
    /// holds. Asked of the socket itself, because the runtime's readiness is cached: a
    /// read polled right after the client's last bytes arrived can still answer
    /// "pending" until the runtime's I/O driver next runs. A takeover uses this to take
    /// what the client sent on its old connection before it reconnected.
    fn input_waiting(&self) -> bool {
        false
    }
}

impl Wire for tokio::net::TcpStream {
    fn input_waiting(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        // The socket is non-blocking (tokio made it so): the peek never waits. One
        // byte or the end of the stream (0) are both input; an error other than
        // "would block" is one a read would return too.
        match socket2::SockRef::from(self).peek(&mut byte) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// In-memory pipes (tests): readiness is never stale there.
impl Wire for tokio::io::DuplexStream {}

#[cfg(test)]
mod tests {
    use super::Wire;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// Asks until the kernel has moved the bytes across loopback (a bounded number of
    /// tries; loopback delivers within microseconds).
    async fn settles(stream: &TcpStream, want: bool) -> bool {
        for _ in 0..200 {
            if stream.input_waiting() == want {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        false
    }

    #[tokio::test]
    async fn tcp_input_waiting_follows_the_socket_not_the_runtime() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();

        // Nothing sent: nothing waiting.
        assert!(!server.input_waiting());

        // Bytes sent, never read through the runtime: the socket says they are there,
        // and asking again does not consume them.
        client.write_all(b"\xe0\x00").await.unwrap();
        assert!(
            settles(&server, true).await,
            "two bytes sent, none seen waiting"
        );
        assert!(server.input_waiting());
        let mut buf = [0u8; 8];
        let n = server.try_read(&mut buf).unwrap_or(0);
        let n = if n == 0 {
            server.readable().await.unwrap();
            server.try_read(&mut buf).unwrap()
        } else {
            n
        };
        assert_eq!(&buf[..n], b"\xe0\x00");
        assert!(
            settles(&server, false).await,
            "all read, still seen waiting"
        );

        // The peer closed: the end of the stream is input too (a read returns 0).
        drop(client);
        assert!(settles(&server, true).await, "peer closed, not seen");
    }
}
