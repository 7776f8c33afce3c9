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
