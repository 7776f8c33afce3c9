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
    pub shadow: ShadowConfig,
    pub jobs: JobsConfig,
    pub provisioning: ProvisioningConfig,
    pub cluster: ClusterConfig,
}

/// Where the durable state lives when it is not the local redb file: NATS JetStream
/// (`docs/cluster.md`). Empty `nats_urls` (the default): one node, state in
/// `data_dir/fleetcore.redb`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// NATS servers, `nats://host:port` or `tls://host:port`; any one of them is enough
    /// to find the rest.
    pub nats_urls: Vec<String>,
    /// This node's name, as NATS and the session owners show it; empty: the host name.
    pub node_name: String,
    /// Bucket names start with this (letters, digits, `_`, `-`): installations that share
    /// a NATS account keep apart.
    pub prefix: String,
    /// Replicas of each bucket when fleetcore creates it (3 on a 3-server NATS cluster;
    /// an existing bucket keeps its own).
    pub replicas: usize,
    /// A NATS credentials file (JWT and NKey seed), if the servers want one.
    pub credentials_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to verify the NATS servers' TLS certificates with; set
    /// means TLS is required.
    pub tls_ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM) for NATS servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// How long one JetStream request or acknowledgement may take before the write fails.
    pub request_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            nats_urls: Vec::new(),
            node_name: String::new(),
            prefix: "fleetcore".into(),
            replicas: 1,
            credentials_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            request_timeout_ms: 5000,
        }
    }
}

impl ClusterConfig {
    /// Whether the state lives on NATS JetStream.
    pub fn enabled(&self) -> bool {
        !self.nats_urls.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        for url in &self.nats_urls {
            let scheme_ok = ["nats://", "tls://"].iter().any(|s| url.starts_with(s));
            if !scheme_ok || url.len() <= "nats://".len() {
                return Err(format!(
                    "cluster.nats_urls: {url:?} is not a NATS URL (nats://host:port or tls://host:port)"
                ));
            }
        }
        if self.prefix.is_empty()
            || !self
                .prefix
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            return Err(format!(
                "cluster.prefix {:?} must be letters, digits, _ or -",
                self.prefix
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err("cluster.replicas must be between 1 and 5 (JetStream's limit)".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("cluster.tls_cert_file and cluster.tls_key_file go together".into());
        }
        if !(100..=60000).contains(&self.request_timeout_ms) {
            return Err("cluster.request_timeout_ms must be between 100 and 60000".into());
        }
        Ok(())
    }
}

/// Fleet provisioning (`$aws/certificates/...`, `$aws/provisioning-templates/...`) and
/// just-in-time provisioning for registered CAs with a JITP template.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvisioningConfig {
    /// Serve provisioning (on by default; without templates nothing can be registered).
    pub enabled: bool,
    /// Validity of the certificates it issues, in days.
    pub certificate_days: u32,
    /// Requests worked on at once; more are answered 429.
    pub max_in_flight: usize,
    /// Lifetime of an ownership token; an unregistered certificate is deleted after it.
    pub token_ttl_secs: u64,
    /// How long a pre-provisioning hook may take; no answer in time denies.
    pub hook_timeout_ms: u64,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        ProvisioningConfig {
            enabled: true,
            certificate_days: 365,
            max_in_flight: 4096,
            token_ttl_secs: 3600,
            hook_timeout_ms: 5000,
        }
    }
}

/// The Jobs service (`$aws/things/{thing}/jobs/...` and the admin API's `/jobs`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Serve jobs (on by default).
    pub enabled: bool,
}

impl Default for JobsConfig {
    fn default() -> Self {
        JobsConfig { enabled: true }
    }
}

/// The Device Shadow service (`$aws/things/{thing}/shadow/...`, classic and named, and
/// the admin API's `/things/{thing}/shadow`). The limits default to IoT Core's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowConfig {
    /// Serve shadows (on by default).
    pub enabled: bool,
    /// Bytes of `desired` + `reported` in one document (metadata not counted).
    pub max_state_bytes: usize,
    /// Levels of objects under `desired` / `reported`.
    pub max_depth: usize,
    /// Requests of one connection waiting for an answer; one more is answered 429.
    pub max_in_flight: usize,
    pub max_thing_name: usize,
    pub max_shadow_name: usize,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            enabled: true,
            max_state_bytes: 8 * 1024,
            max_depth: 6,
            max_in_flight: 10,
            max_thing_name: 128,
            max_shadow_name: 64,
        }
    }
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
            shadow: ShadowConfig::default(),
            jobs: JobsConfig::default(),
            provisioning: ProvisioningConfig::default(),
            cluster: ClusterConfig::default(),
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
        check_log_level(&self.log.level)?;
        self.cluster.validate()?;
        let sh = &self.shadow;
        if sh.max_state_bytes == 0 || sh.max_state_bytes > 1024 * 1024 {
            return Err("shadow.max_state_bytes must be between 1 and 1048576".into());
        }
        if !(1..=32).contains(&sh.max_depth) {
            return Err("shadow.max_depth must be between 1 and 32".into());
        }
        if sh.max_in_flight == 0 {
            return Err("shadow.max_in_flight must be at least 1".into());
        }
        if !(1..=256).contains(&sh.max_thing_name) || !(1..=256).contains(&sh.max_shadow_name) {
            return Err(
                "shadow.max_thing_name and shadow.max_shadow_name must be between 1 and 256".into(),
            );
        }
        let pv = &self.provisioning;
        if !(1..=3650).contains(&pv.certificate_days) {
            return Err("provisioning.certificate_days must be between 1 and 3650".into());
        }
        if pv.max_in_flight == 0 {
            return Err("provisioning.max_in_flight must be at least 1".into());
        }
        if !(1..=86400).contains(&pv.token_ttl_secs) {
            return Err("provisioning.token_ttl_secs must be between 1 and 86400".into());
        }
        if !(100..=30000).contains(&pv.hook_timeout_ms) {
            return Err("provisioning.hook_timeout_ms must be between 100 and 30000".into());
        }
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
        let mut names = std::collections::BTreeSet::new();
        for l in &self.listeners {
            if let Some(name) = &l.name {
                if name.is_empty() || name.len() > 64 || name.contains(['"', '\\']) {
                    return Err(format!(
                        "listener {}: name must be 1-64 characters without quotes or backslashes",
                        l.bind
                    ));
                }
                if !names.insert(name.as_str()) {
                    return Err(format!(
                        "two listeners are named {name:?}; names must differ"
                    ));
                }
            }
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
    #[serde(deserialize_with = "deserialize_bind")]
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

/// The level names `[log] level` accepts, alone or after `TARGET=`.
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Checks `[log] level`: comma-separated directives, each a level (`info`) or
/// `TARGET=LEVEL` (`fleetcore_broker=debug`). tracing itself takes a bare word as a
/// target name, so a misspelt level (`inof`) would turn off every log line without a
/// word; here it is refused.
pub fn check_log_level(text: &str) -> Result<(), String> {
    let allowed = LOG_LEVELS.join(", ");
    let hint = format!(
        "use one of {allowed}, optionally followed by comma-separated TARGET=LEVEL directives (e.g. \"info,fleetcore_broker=debug\")"
    );
    if text.trim().is_empty() {
        return Err(format!("log.level is empty: {hint}"));
    }
    for directive in text.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level.trim(),
            Some(_) => {
                return Err(format!(
                    "log.level: {directive:?} names no target before '=': {hint}"
                ))
            }
            None => directive,
        };
        if !LOG_LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
            return Err(format!(
                "log.level: unknown level {level:?} in {text:?}: {hint}"
            ));
        }
    }
    Ok(())
}

/// Reads a `bind` value: an IP address and a port. A host name (`localhost:1883`) is
/// refused with what to write instead, rather than serde's bare "invalid socket address
/// syntax": which addresses a name stands for depends on the resolver, and a listener
/// must know exactly which interface it opens.
fn deserialize_bind<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_bind(&text).map_err(serde::de::Error::custom)
}

/// See [`deserialize_bind`].
pub fn parse_bind(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.trim().parse::<SocketAddr>() {
        return Ok(addr);
    }
    let example = |port: &str| {
        format!(
            "write an IP address and a port: \"127.0.0.1:{port}\" (this machine only), \"0.0.0.0:{port}\" (every IPv4 interface) or \"[::]:{port}\" (every interface); host names are not resolved"
        )
    };
    match text.trim().rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => {
            let host = host.trim_matches(|c| c == '[' || c == ']');
            if host.eq_ignore_ascii_case("localhost") {
                Err(format!(
                    "invalid bind address {text:?}: {} (for localhost: \"127.0.0.1:{port}\")",
                    example(port)
                ))
            } else {
                Err(format!("invalid bind address {text:?}: {}", example(port)))
            }
        }
        Some((_, port)) => Err(format!(
            "invalid bind address {text:?}: the port {port:?} is not a number from 0 to 65535; {}",
            example("1883")
        )),
        None => Err(format!(
            "invalid bind address {text:?}: no port; {}",
            example("1883")
        )),
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
    /// The listener's label in logs and metrics (`listener="..."`); by default its kind
    /// and address, e.g. `wss/0.0.0.0:443`, so two listeners of one kind stay apart.
    #[serde(default)]
    pub name: Option<String>,
    pub kind: ListenerKind,
    #[serde(deserialize_with = "deserialize_bind")]
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
            name: None,
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

    /// The listener's label in logs and metrics once bound to `addr`: its `name`, or
    /// `kind/address`. Made once per listener at start (and kept for the process's
    /// life: metric labels are static strings).
    pub fn label(&self, addr: SocketAddr) -> &'static str {
        let label = match &self.name {
            Some(n) => n.clone(),
            None => format!("{}/{addr}", self.kind_name()),
        };
        Box::leak(label.into_boxed_str())
    }

    /// Short name of the kind: tcp, tls, ws (plain TCP with WebSocket) or wss (TLS
    /// with ALPN dispatch and WebSocket).
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

    /// A misspelt level is refused with the allowed names (tracing would take it as a
    /// target name and log nothing at all); real filter directives still pass.
    #[test]
    fn unknown_log_levels_are_refused_with_the_allowed_names() {
        let with = |level: &str| {
            Config {
                log: LogConfig {
                    level: level.into(),
                    ..LogConfig::default()
                },
                ..Config::default()
            }
            .validate()
        };
        for ok in [
            "info",
            "WARN",
            "off",
            "info,fleetcore_broker=debug",
            "fleetcore_broker::connection=trace, warn",
        ] {
            assert_eq!(with(ok), Ok(()), "{ok}");
        }
        for bad in ["inof", "", "info,fleetcore_broker", "info,=debug", "debgu"] {
            let err = with(bad).unwrap_err();
            assert!(
                err.starts_with("log.level")
                    && err.contains("trace, debug, info, warn, error, off"),
                "{bad:?}: {err}"
            );
        }
        assert!(with("inof").unwrap_err().contains("\"inof\""));
    }

    /// `bind = "localhost:1883"` says what to write instead.
    #[test]
    fn listener_names_must_be_sane_and_differ() {
        let two = |a: &str, b: &str| {
            toml::from_str::<Config>(&format!(
                "[[listener]]\nname = {a:?}\nkind = \"tcp\"\nbind = \"127.0.0.1:1\"\n\
                 [[listener]]\nname = {b:?}\nkind = \"tcp\"\nbind = \"127.0.0.1:2\"\n"
            ))
            .unwrap()
            .validate()
        };
        assert_eq!(two("a", "b"), Ok(()));
        assert!(two("a", "a").unwrap_err().contains("names must differ"));
        assert!(two("", "b").unwrap_err().contains("1-64 characters"));
        let l = ListenerConfig::default_tcp();
        assert_eq!(
            l.label("127.0.0.1:1883".parse().unwrap()),
            "tcp/127.0.0.1:1883"
        );
    }

    #[test]
    fn a_host_name_as_bind_address_says_what_to_write() {
        let err =
            toml::from_str::<Config>("[[listener]]\nkind = \"tcp\"\nbind = \"localhost:1883\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("\"localhost:1883\"")
                && err.contains("\"127.0.0.1:1883\"")
                && err.contains("host names are not resolved"),
            "{err}"
        );
        let err = toml::from_str::<Config>("[admin]\nbind = \"admin.example:8080\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"0.0.0.0:8080\""), "{err}");
        assert!(parse_bind("127.0.0.1").unwrap_err().contains("no port"));
        assert!(parse_bind("127.0.0.1:http")
            .unwrap_err()
            .contains("not a number"));
        let c: Config =
            toml::from_str("[[listener]]\nkind = \"tcp\"\nbind = \"[::1]:1883\"\n").unwrap();
        assert_eq!(c.listeners[0].bind, "[::1]:1883".parse().unwrap());
    }

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
