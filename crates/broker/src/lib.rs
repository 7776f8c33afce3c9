//! fleetcore's MQTT data plane.
//!
//! # Layout
//! - [`transport`]: what a connection arrives over: [`transport::listener`] (accept loops,
//!   connection limits, EMFILE back-off, the connect deadline), [`transport::proxy_protocol`],
//!   [`transport::websocket`], and [`transport::tls`] (server configuration, the
//!   [`transport::tls::stream`] over rustls's unbuffered API, [`transport::tls::tickets`]).
//! - [`connection`]: one task per client connection: CONNECT, the packet state machines,
//!   keep-alive, flow control, the outbound pump.
//! - [`engine`]: the shared state connections call on ([`engine::hub::Hub`]: publish and
//!   fan-out, the session lifecycle, wills, kicks) and the `$aws/...` service host
//!   ([`engine::services`]).
//! - [`session`]: per-client state that outlives connections.
//! - [`router`]: the subscription index every publish is matched against.
//! - [`retained`]: the retained-message index walked on subscribe.
//! - [`message`]: a message on its way to one session (`Delivery`).
//! - [`config`]: the configuration file's schema and defaults.
//! - [`metrics`]: the metric names the broker records.
//!
//! The codec, topic rules and messages are in `fleetcore-core`; who a client is and what
//! it may do in `fleetcore-identity`; the broker knows no database, no HTTP.
//!
//! [`Server`] assembles these: it opens the store, restores retained
//! messages and sessions, binds the listeners and runs until shut down.
#![forbid(unsafe_code)]

pub mod config;
pub mod connection;
pub mod engine;
pub mod message;
pub mod metrics;
pub mod retained;
pub mod router;
pub mod session;
pub mod transport;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fleetcore_store::{Store, StoreOptions};
use tokio::net::TcpSocket;
use tokio::task::JoinHandle;

pub use config::Config;
use config::ListenerKind;
use engine::hub::Hub;
use transport::{listener, tls, tls::tickets as tls_tickets};

/// Why the server could not start; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot create data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] fleetcore_core::storage::StoreError),
    #[error("listener {bind} ({kind}): {reason}")]
    Listener {
        bind: SocketAddr,
        kind: &'static str,
        reason: String,
    },
}

/// A running broker.
pub struct Server {
    hub: Arc<Hub>,
    addrs: Vec<(&'static str, SocketAddr)>,
    tasks: Vec<JoinHandle<()>>,
}

/// Where a node's state lives when it is not `data_dir/fleetcore.redb` alone (cluster
/// mode): storage the caller opened, with what it held, and the fabric to other nodes.
pub struct Backend {
    pub storage: fleetcore_core::storage::Storage,
    pub loaded: fleetcore_core::storage::Loaded,
    /// Where the state is, for the log (`store opened`).
    pub place: String,
    /// The other nodes ([`fleetcore_core::fabric::Standalone`] for none).
    pub fabric: Arc<dyn fleetcore_core::fabric::Fabric>,
}

impl Server {
    /// Opens the store, restores state, binds every listener and starts
    /// accepting. Fails without side effects on the network if any listener
    /// cannot be bound.
    pub async fn start(config: Config) -> Result<Server, StartError> {
        Server::start_with_services(config, Vec::new()).await
    }

    /// As [`Server::start`], with `$aws/...` services installed: publishes to the
    /// topics they claim go to them, and they hear the engine's events.
    pub async fn start_with_services(
        config: Config,
        services: Vec<Arc<dyn fleetcore_core::service::TopicService>>,
    ) -> Result<Server, StartError> {
        Server::start_with_setup(config, services, |_| {}).await
    }

    /// As [`Server::start_with_services`], calling `setup` with the hub once it is
    /// built and before any listener accepts (to hand services the registry, or
    /// install a just-in-time provisioner).
    pub async fn start_with_setup(
        config: Config,
        services: Vec<Arc<dyn fleetcore_core::service::TopicService>>,
        setup: impl FnOnce(&Arc<Hub>) + Send,
    ) -> Result<Server, StartError> {
        Server::start_on(config, None, services, setup).await
    }

    /// As [`Server::start_with_setup`], on `backend` (storage opened by the caller and a
    /// fabric to other nodes) instead of `data_dir/fleetcore.redb` alone: how cluster mode
    /// hands in NATS JetStream, which this crate does not know.
    pub async fn start_on(
        config: Config,
        backend: Option<Backend>,
        services: Vec<Arc<dyn fleetcore_core::service::TopicService>>,
        setup: impl FnOnce(&Arc<Hub>) + Send,
    ) -> Result<Server, StartError> {
        let topic_limits = fleetcore_core::topic::TopicLimits {
            max_len: config.limits.max_topic_len,
            max_levels: config.limits.max_topic_levels,
        };
        let services = engine::services::ServiceHost::new(services, &topic_limits)
            .map_err(|e| StartError::Config(e.to_string()))?;
        config.validate().map_err(StartError::Config)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| StartError::DataDir {
            path: config.data_dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let ticket_keys = if config.tls_resumption.enabled
            && config
                .effective_listeners()
                .iter()
                .any(|l| l.kind == ListenerKind::Tls)
        {
            let path = config.data_dir.join(tls_tickets::KEY_FILE);
            let r = &config.tls_resumption;
            let keys =
                tls_tickets::TicketKeys::open(&path, r.ticket_lifetime_secs, r.key_rotation_secs)
                    .map_err(|e| StartError::Config(e.to_string()))?;
            Some(Arc::new(keys))
        } else {
            None
        };
        let mut bound = Vec::new();
        for lc in config.effective_listeners() {
            let kind = lc.kind_name();
            let err = |reason: String| StartError::Listener {
                bind: lc.bind,
                kind,
                reason,
            };
            let tls = match lc.kind {
                ListenerKind::Tcp => None,
                ListenerKind::Tls => {
                    let (cert_file, key_file, client_ca_file) = lc.tls_files().map_err(err)?;
                    let mut opts = tls::TlsOptions {
                        client_cert_optional: lc.tokens_enabled(),
                        resumption: ticket_keys.as_ref().map(|keys| tls::Resumption {
                            keys: keys.clone(),
                            listener: format!("{kind} {}", lc.bind),
                        }),
                        ..Default::default()
                    };
                    if lc.websocket {
                        opts.alpn = tls::ALPN_MQTT
                            .iter()
                            .chain([&tls::ALPN_HTTP])
                            .map(|p| p.to_vec())
                            .collect();
                    }
                    let src = tls::TlsSource::new(cert_file, key_file, client_ca_file, opts)
                        .map_err(|e| err(e.to_string()))?;
                    Some(Arc::new(src))
                }
            };
            let policy = match &lc.policy_file {
                None => None,
                Some(path) => {
                    let text = std::fs::read_to_string(path).map_err(|e| {
                        err(format!("cannot read policy_file {}: {e}", path.display()))
                    })?;
                    let p = fleetcore_policy::Policy::parse(&text)
                        .map_err(|e| err(format!("policy_file {}: {e}", path.display())))?;
                    Some(Arc::new(p))
                }
            };
            if lc.kind == ListenerKind::Tcp && lc.tokens_enabled() && !lc.bind.ip().is_loopback() {
                tracing::warn!(
                    bind = %lc.bind,
                    "device tokens on a plain-TCP listener that is not on loopback travel in clear text; keep it behind a TLS-terminating proxy on a private network"
                );
            }
            let socket = bind(lc.bind).map_err(|e| err(e.to_string()))?;
            bound.push(listener::Listener {
                config: lc,
                socket,
                tls,
                policy,
                label: kind,
            });
        }
        let (storage, loaded, place, fabric) = match backend {
            Some(b) => (b.storage, b.loaded, b.place, b.fabric),
            None => {
                let path = config.data_dir.join("fleetcore.redb");
                let store_path = path.clone();
                let (store, loaded) = tokio::task::spawn_blocking(move || {
                    Store::open(&store_path, StoreOptions::default())
                })
                .await
                .map_err(|e| StartError::Config(format!("store open task failed: {e}")))??;
                let fabric: Arc<dyn fleetcore_core::fabric::Fabric> =
                    Arc::new(fleetcore_core::fabric::Standalone);
                (store.storage(), loaded, path.display().to_string(), fabric)
            }
        };
        tracing::info!(
            store = %place,
            retained = loaded.retained.len(),
            sessions = loaded.sessions.len(),
            records = loaded.records.len(),
            "store opened"
        );
        if !services.is_empty() {
            tracing::info!(services = ?services.names(), "device services installed");
        }
        let hub = Hub::with_fabric(config, storage, loaded, services, fabric);
        // Records other writers store (other nodes of a cluster) reach this node's
        // registry (a certificate revoked elsewhere is cut off here too) and services
        // (a shadow updated elsewhere is read here as it is there).
        if let Some(mut changes) = hub.storage.records.watch_records() {
            let weak = Arc::downgrade(&hub);
            tokio::spawn(async move {
                while let Some(c) = changes.recv().await {
                    let Some(hub) = weak.upgrade() else { return };
                    hub.apply_stored_record(&c.kind, &c.key, c.value.as_deref(), c.revision);
                }
            });
        }
        // Retained messages other nodes store reach this node's tree.
        if let Some(mut changes) = hub.storage.retained.watch_retained() {
            let weak = Arc::downgrade(&hub);
            tokio::spawn(async move {
                while let Some(c) = changes.recv().await {
                    let Some(hub) = weak.upgrade() else { return };
                    hub.apply_stored_retained(c);
                }
            });
        }
        setup(&hub);
        for l in &bound {
            if let (Some(src), true) = (&l.tls, l.config.uses_registry()) {
                hub.tls_sources.lock().push(src.clone());
            }
        }
        hub.reload_trust().map_err(|e| {
            StartError::Config(format!("rebuilding TLS trust with registered CAs: {e}"))
        })?;
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for mut l in bound {
            let addr = l.socket.local_addr().map_err(|e| StartError::Listener {
                bind: l.config.bind,
                kind: l.config.kind_name(),
                reason: e.to_string(),
            })?;
            l.label = l.config.label(addr);
            tracing::info!(
                listener = l.label,
                kind = l.config.kind_name(),
                addr = %addr,
                anonymous = l.config.allow_anonymous,
                "listening"
            );
            addrs.push((l.config.kind_name(), addr));
            tasks.push(tokio::spawn(listener::run(hub.clone(), l)));
        }
        let reaper_hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            let mut shutdown = reaper_hub.shutdown_signal();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tick.tick() => { reaper_hub.expire_sessions(); }
                }
            }
        }));
        Ok(Server { hub, addrs, tasks })
    }

    /// The addresses actually bound, by listener kind (useful with port 0).
    pub fn local_addrs(&self) -> &[(&'static str, SocketAddr)] {
        &self.addrs
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Stops accepting, tells every client the server is shutting down
    /// (MQTT 5: DISCONNECT 0x8B), waits up to `grace` for connections to end
    /// and flushes the store.
    pub async fn shutdown(
        self,
        grace: Duration,
    ) -> Result<(), fleetcore_core::storage::StoreError> {
        let open = self.hub.connections.load(Ordering::Acquire);
        tracing::info!(connections = open, "shutting down");
        self.hub.begin_shutdown();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let gone = self.hub.connection_gone.notified();
            if self.hub.connections.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                tracing::warn!(
                    connections = self.hub.connections.load(Ordering::Acquire),
                    "connections still open after the grace period"
                );
                break;
            }
        }
        for t in self.tasks {
            t.abort();
        }
        self.hub.storage.flush().await?;
        tracing::info!("store flushed; stopped");
        Ok(())
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // A deep backlog absorbs reconnect storms.
    socket.listen(4096)
}
