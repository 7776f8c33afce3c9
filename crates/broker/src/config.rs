//! The broker's configuration, as read from `fleetcore.toml`.
//!
//! Every field has a default, so an empty file (or none) is a valid
//! configuration; `config/fleetcore.toml` in the repository documents each one.
//! Unknown keys are refused so a typo is an error, not a silently ignored line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fleetcore_identity::token::TokenConfig;
use serde::Deserialize;

/// Everything `fleetcore serve` reads from its configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub data_dir: PathBuf,
    pub log: LogConfig,
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    pub limits: Limits,
    pub session: SessionConfig,
    pub admin: AdminConfig,
    pub pki: PkiConfig,
    pub tokens: TokenConfig,
    pub tls_resumption: TlsResumptionConfig,
    pub events: EventsConfig,
}

/// Lifecycle events (`$aws/events/presence/...`, `$aws/events/subscriptions/...`), as
/// IoT Core publishes them; backends subscribe to them through their policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Publish presence and subscription events (on by default, as in IoT Core).
    pub enabled: bool,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig { enabled: true }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            log: LogConfig::default(),
            listeners: Vec::new(),
            limits: Limits::default(),
            session: SessionConfig::default(),
            admin: AdminConfig::default(),
            pki: PkiConfig::default(),
            tokens: TokenConfig::default(),
            tls_resumption: TlsResumptionConfig::default(),
            events: EventsConfig::default(),
        }
    }
}

impl Config {
    /// The listeners to open: the configured ones, or the default plain-TCP
    /// listener on 127.0.0.1:1883 when none is configured.
    pub fn effective_listeners(&self) -> Vec<ListenerConfig> {
        if self.listeners.is_empty() {
            vec![ListenerConfig::default_tcp()]
        } else {
            self.listeners.clone()
        }
    }

    /// Checks values that parse but cannot work, with a message naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.max_packet_size < 64 {
            return Err("limits.max_packet_size must be at least 64 bytes".into());
        }
        if l.receive_maximum == 0 {
            return Err("limits.receive_maximum must be at least 1".into());
        }
        if l.max_inflight_out == 0 {
            return Err("limits.max_inflight_out must be at least 1".into());
        }
        if l.connect_timeout_secs == 0 {
            return Err("limits.connect_timeout_secs must be at least 1".into());
        }
        if self.session.default_expiry_secs > self.session.max_expiry_secs {
            return Err(
                "session.default_expiry_secs may not exceed session.max_expiry_secs".into(),
            );
        }
        for l in &self.listeners {
            if l.allow_anonymous && l.uses_registry() {
                return Err(format!(
                    "listener {}: allow_anonymous cannot be combined with tokens or registry = true (clients are checked against the registry)",
                    l.bind
                ));
            }
            if l.tokens_enabled() && l.registry == Some(false) {
                return Err(format!(
                    "listener {}: tokens are checked against the registry; they need registry = true",
                    l.bind
                ));
            }
            for range in &l.proxy_protocol_from {
                crate::transport::proxy_protocol::Cidr::parse(range)
                    .map_err(|e| format!("listener {}: proxy_protocol_from: {e}", l.bind))?;
            }
            if !l.proxy_protocol_from.is_empty() && !l.proxy_protocol {
                return Err(format!(
                    "listener {}: proxy_protocol_from needs proxy_protocol = true",
                    l.bind
                ));
            }
            if l.websocket
                && (!l.websocket_path.starts_with('/')
                    || l.websocket_path
                        .contains(|c: char| c == '?' || c == '#' || c.is_whitespace()))
            {
                return Err(format!(
                    "listener {}: websocket_path must start with '/' and hold no '?', '#' or spaces (got {:?})",
                    l.bind, l.websocket_path
                ));
            }
            match l.kind {
                ListenerKind::Tls => {
                    // cert_file, key_file and client_ca_file may be omitted: `fleetcore
                    // serve` fills them in from [pki] before starting (see `tls_files`).
                    if l.registry == Some(true) && l.policy_file.is_some() {
                        return Err(format!(
                            "listener {} (tls): use either the registry's policies or policy_file, not both",
                            l.bind
                        ));
                    }
                    if l.allow_anonymous {
                        return Err(format!(
                            "listener {} (tls): allow_anonymous is only for kind = \"tcp\"",
                            l.bind
                        ));
                    }
                }
                ListenerKind::Tcp => {
                    if l.registry == Some(true) && !l.tokens_enabled() {
                        return Err(format!(
                            "listener {} (tcp): registry = true needs client certificates (kind = \"tls\") or tokens = true",
                            l.bind
                        ));
                    }
                    if l.cert_file.is_some() || l.key_file.is_some() || l.client_ca_file.is_some() {
                        return Err(format!(
                            "listener {} (tcp): cert_file/key_file/client_ca_file belong to kind = \"tls\"",
                            l.bind
                        ));
                    }
                }
            }
        }
        if self.admin.tls && self.admin.client_cert_cn.trim().is_empty() {
            return Err("admin.client_cert_cn may not be empty".into());
        }
        let t = &self.tokens;
        if t.max_ttl_secs == 0 {
            return Err("tokens.max_ttl_secs must be at least 1".into());
        }
        if t.default_ttl_secs == 0 || t.default_ttl_secs > t.max_ttl_secs {
            return Err(
                "tokens.default_ttl_secs must be at least 1 and at most tokens.max_ttl_secs".into(),
            );
        }
        if t.key_rotation_secs == 0 {
            return Err("tokens.key_rotation_secs must be at least 1".into());
        }
        let r = &self.tls_resumption;
        if r.ticket_lifetime_secs == 0 || r.ticket_lifetime_secs > 7 * 24 * 3600 {
            return Err(
                "tls_resumption.ticket_lifetime_secs must be at least 1 and at most 604800 (7 days, RFC 8446)"
                    .into(),
            );
        }
        if r.key_rotation_secs < r.ticket_lifetime_secs {
            return Err(
                "tls_resumption.key_rotation_secs may not be shorter than tls_resumption.ticket_lifetime_secs"
                    .into(),
            );
        }
        if self.pki.server_names.is_empty() {
            return Err("pki.server_names needs at least one DNS name or IP address".into());
        }
        Ok(())
    }
}

/// The admin HTTP API (things, certificates, policies, CRL, metrics).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub enabled: bool,
    /// Plain HTTP unless `tls`; keep plain HTTP on loopback.
    pub bind: SocketAddr,
    /// Serve the API over TLS with the PKI's server certificate; clients may then
    /// authenticate with an admin client certificate instead of the token.
    pub tls: bool,
    /// With `tls`: the subject CN a client certificate (issued by the fleetcore CA) must
    /// have to be let in without the token.
    pub client_cert_cn: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: true,
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: false,
            client_cert_cn: "fleetcore-admin".into(),
        }
    }
}

/// TLS 1.3 session resumption on the TLS listeners: a reconnecting client presents
/// the ticket it was given and skips the certificate exchange (its certificate is then
/// re-checked at CONNECT: registry state, validity period). Ticket keys live in
/// `<data_dir>/tls-ticket-keys` (mode 0600), so tickets survive a restart.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsResumptionConfig {
    /// Issue one ticket after each full handshake and accept tickets.
    pub enabled: bool,
    /// How long a ticket resumes after it was issued.
    pub ticket_lifetime_secs: u64,
    /// The ticket key is replaced when older than this; the previous key keeps
    /// opening tickets for one ticket lifetime. At least `ticket_lifetime_secs`.
    pub key_rotation_secs: u64,
}

impl Default for TlsResumptionConfig {
    fn default() -> Self {
        TlsResumptionConfig {
            enabled: true,
            ticket_lifetime_secs: 4 * 3600,
            key_rotation_secs: 4 * 3600,
        }
    }
}

/// Where the CA and the server certificate live, and what the server certificate names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PkiConfig {
    /// Relative paths are under `data_dir`.
    pub dir: PathBuf,
    /// Subject alternative names of the server certificate made with the CA.
    pub server_names: Vec<String>,
}

impl Default for PkiConfig {
    fn default() -> Self {
        PkiConfig {
            dir: PathBuf::from("pki"),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
        }
    }
}

impl Config {
    /// The PKI directory: `pki.dir`, under `data_dir` when relative.
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join(&self.pki.dir)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// "human" or "json".
    pub format: LogFormat,
    /// A tracing filter directive; RUST_LOG wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// One socket the broker accepts MQTT connections on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub kind: ListenerKind,
    pub bind: SocketAddr,
    /// Plain TCP only: let in clients that present no identity.
    #[serde(default)]
    pub allow_anonymous: bool,
    /// TLS: server certificate chain (PEM).
    pub cert_file: Option<PathBuf>,
    /// TLS: server private key (PEM).
    pub key_file: Option<PathBuf>,
    /// TLS: CA certificate(s) client certificates must chain to (PEM).
    pub client_ca_file: Option<PathBuf>,
    /// An AWS IoT Core policy document (JSON) that binds every client on this
    /// listener. Without it, clients that get in may do anything.
    pub policy_file: Option<PathBuf>,
    /// TLS: client certificates must be registered and ACTIVE in the registry,
    /// and the policies attached to them apply (AWS IoT Core's model).
    /// Default true for kind = "tls", and for any listener with `tokens = true`.
    pub registry: Option<bool>,
    /// Also serve MQTT over WebSocket (HTTP upgrade at `websocket_path`,
    /// subprotocol `mqtt` or `mqttv3.1`). On kind = "tls" the listener then
    /// dispatches on ALPN (`x-amzn-mqtt-ca`/`mqtt` → MQTT, `http/1.1` → HTTP)
    /// and, without ALPN, on the first byte; client certificates become
    /// optional (a client without one must present a token).
    #[serde(default)]
    pub websocket: bool,
    /// The HTTP path MQTT over WebSocket is served at.
    #[serde(default = "default_ws_path")]
    pub websocket_path: String,
    /// Accept device tokens (`fleetcore token issue`) as the MQTT password, with
    /// the thing name as user name. Default true for kind = "tls" with websocket.
    pub tokens: Option<bool>,
    /// Every connection starts with a PROXY protocol header (v2 or v1) from a
    /// load balancer, naming the real client address.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// With proxy_protocol: the balancers' addresses (IPs or CIDR ranges) that
    /// may send the header; connections from elsewhere are refused. Empty: any.
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
}

fn default_ws_path() -> String {
    "/mqtt".into()
}

impl ListenerConfig {
    pub fn default_tcp() -> Self {
        ListenerConfig {
            kind: ListenerKind::Tcp,
            bind: SocketAddr::from(([127, 0, 0, 1], 1883)),
            allow_anonymous: true,
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            policy_file: None,
            registry: None,
            websocket: false,
            websocket_path: default_ws_path(),
            tokens: None,
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
        }
    }

    /// Whether clients on this listener are checked against the registry
    /// (registered certificates, or tokens signed by the registry's keys).
    pub fn uses_registry(&self) -> bool {
        self.registry
            .unwrap_or(self.kind == ListenerKind::Tls || self.tokens_enabled())
    }

    /// Whether a device token is accepted as the MQTT password.
    pub fn tokens_enabled(&self) -> bool {
        self.tokens
            .unwrap_or(self.kind == ListenerKind::Tls && self.websocket)
    }

    /// Short name for logs and metrics labels: tcp, tls, ws (plain TCP with
    /// WebSocket) or wss (TLS with ALPN dispatch and WebSocket).
    pub fn kind_name(&self) -> &'static str {
        match (self.kind, self.websocket) {
            (ListenerKind::Tcp, false) => "tcp",
            (ListenerKind::Tls, false) => "tls",
            (ListenerKind::Tcp, true) => "ws",
            (ListenerKind::Tls, true) => "wss",
        }
    }

    /// The TLS files, all three required for kind = "tls" by the time the server starts
    /// (`fleetcore serve` fills omitted ones in with the PKI's files).
    pub fn tls_files(&self) -> Result<(&Path, &Path, &Path), String> {
        match (&self.cert_file, &self.key_file, &self.client_ca_file) {
            (Some(c), Some(k), Some(ca)) => Ok((c, k, ca)),
            _ => Err(format!(
                "listener {} (tls) needs cert_file, key_file and client_ca_file",
                self.bind
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// MQTT over plain TCP.
    Tcp,
    /// MQTT over TLS with a required client certificate.
    Tls,
}

/// Bounds on what one client may ask of the broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub connect_timeout_secs: u64,
    pub max_packet_size: u32,
    pub max_client_id_len: usize,
    pub max_topic_len: usize,
    pub max_topic_levels: usize,
    pub max_keep_alive_secs: u16,
    pub receive_maximum: u16,
    pub max_inflight_out: u16,
    pub max_queued_messages: usize,
    pub max_subscriptions_per_connection: usize,
    pub max_filters_per_subscribe: usize,
    pub topic_alias_maximum: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            connect_timeout_secs: 10,
            max_packet_size: 131_072 + 4_096,
            max_client_id_len: 128,
            max_topic_len: 256,
            max_topic_levels: 8,
            max_keep_alive_secs: 1200,
            receive_maximum: 100,
            max_inflight_out: 100,
            max_queued_messages: 1000,
            max_subscriptions_per_connection: 50,
            max_filters_per_subscribe: 8,
            topic_alias_maximum: 16,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub default_expiry_secs: u32,
    pub max_expiry_secs: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            default_expiry_secs: 3600,
            max_expiry_secs: 7 * 24 * 3600,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumption_settings_that_cannot_work_are_refused_by_name() {
        let with = |lifetime, rotation| {
            Config {
                tls_resumption: TlsResumptionConfig {
                    enabled: true,
                    ticket_lifetime_secs: lifetime,
                    key_rotation_secs: rotation,
                },
                ..Config::default()
            }
            .validate()
        };
        assert_eq!(with(60, 60), Ok(()));
        assert_eq!(with(60, 3600), Ok(()));
        assert!(with(0, 60).unwrap_err().contains("ticket_lifetime_secs"));
        assert!(with(604_801, 700_000)
            .unwrap_err()
            .contains("ticket_lifetime_secs"));
        assert!(with(61, 60).unwrap_err().contains("key_rotation_secs"));
        let parsed: Config =
            toml::from_str("[tls_resumption]\nenabled = false\nticket_lifetime_secs = 600\n")
                .unwrap();
        assert!(!parsed.tls_resumption.enabled);
        assert_eq!(parsed.tls_resumption.ticket_lifetime_secs, 600);
        assert_eq!(parsed.tls_resumption.key_rotation_secs, 4 * 3600);
    }

    #[test]
    fn token_settings_that_cannot_work_are_refused_by_name() {
        assert_eq!(Config::default().validate(), Ok(()));
        let with = |max, default, rotation| {
            Config {
                tokens: TokenConfig {
                    max_ttl_secs: max,
                    default_ttl_secs: default,
                    key_rotation_secs: rotation,
                },
                ..Config::default()
            }
            .validate()
        };
        assert_eq!(with(60, 60, 1), Ok(()));
        assert!(with(0, 1, 1).unwrap_err().contains("tokens.max_ttl_secs"));
        assert!(with(60, 0, 1)
            .unwrap_err()
            .contains("tokens.default_ttl_secs"));
        assert!(with(60, 61, 1)
            .unwrap_err()
            .contains("tokens.default_ttl_secs"));
        assert!(with(60, 60, 0)
            .unwrap_err()
            .contains("tokens.key_rotation_secs"));
    }
}
