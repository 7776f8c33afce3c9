//! The `fleetcore` command: `serve` runs the broker; further subcommands
//! (certificates, things, policies) will talk to a running server's admin API.

mod client;
mod cluster;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fleetcore_admin::api::AdminState;
use fleetcore_broker::config::{AdminConfig, Config, ListenerKind, LogFormat};
use fleetcore_broker::Server;
use fleetcore_identity::ca::{Ca, CaFiles};
use fleetcore_services::provisioning::{Config as ProvisioningConfig, ProvisioningService};
use fleetcore_services::shadow::document::Limits as ShadowLimits;
use fleetcore_services::shadow::ShadowService;

#[derive(Parser)]
#[command(
    name = "fleetcore",
    version,
    about = "A self-hosted MQTT broker for fleets of agents: a replacement for AWS IoT Core.",
    long_about = "A self-hosted MQTT broker for fleets of agents: a replacement for AWS IoT Core.\n\n\
                  Run `fleetcore serve` to start a broker on the embedded defaults \
                  (plain MQTT on 127.0.0.1:1883, data in ./data), or \
                  `fleetcore serve --config config/fleetcore.toml` for a configured one."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Global: accepted before or after any subcommand.
    #[command(flatten)]
    opts: client::ClientOpts,
}

/// The options of [`client::ClientOpts`] that mean nothing to `serve` and
/// `default-config` (all but `--data-dir`).
const ADMIN_ONLY_OPTIONS: [(&str, &str); 6] = [
    ("admin_url", "--admin-url"),
    ("token", "--token"),
    ("cacert", "--cacert"),
    ("client_cert", "--client-cert"),
    ("client_key", "--client-key"),
    ("json", "--json"),
];

/// Parses the command line. An admin-only option given on the command line to `serve`
/// or `default-config` is refused rather than silently ignored (from the environment,
/// e.g. FLEETCORE_ADMIN_URL, it is ignored there).
fn parse_cli() -> Cli {
    use clap::{CommandFactory, FromArgMatches};
    let mut cmd = Cli::command();
    let matches = cmd.clone().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut cmd).exit());
    let name = match &cli.command {
        Command::Serve(_) => "serve",
        Command::DefaultConfig => "default-config",
        Command::Client(_) | Command::Cluster(_) => return cli,
    };
    for (id, flag) in ADMIN_ONLY_OPTIONS {
        if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            cmd.error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "{flag} is an option of the admin commands (thing, group, cert, policy, ca, token, template, shadow, job, retained), not of `{name}`"
                ),
            )
            .exit();
        }
    }
    cli
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Print the embedded default configuration (documented) and exit.
    DefaultConfig,
    /// Cluster mode (`[cluster]`, NATS JetStream): see docs/cluster.md.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    #[command(flatten)]
    Client(Box<client::ClientCommand>),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML). Without it the embedded defaults are used.
    #[arg(short, long, env = "FLEETCORE_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `log.format` ("human" or "json").
    #[arg(long, value_parser = ["human", "json"])]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Show the NATS server reached, the node holding the prefix, and each bucket's
    /// entries, bytes, replicas and Raft leader. Exits 1 when it reports a problem (a
    /// bucket without leader, a replica not current, no node or a stale one), 2 when NATS
    /// cannot be reached. `--json` prints the same as JSON.
    Status {
        /// The broker's configuration file; its `[cluster]` section says where NATS is.
        #[arg(short, long, env = "FLEETCORE_CONFIG")]
        config: Option<PathBuf>,
        /// NATS servers to ask instead of the configuration's `nats_urls` (repeatable).
        #[arg(long = "nats-url")]
        nats_urls: Vec<String>,
    },
}

const DOCUMENTED_CONFIG: &str = include_str!("../../../config/fleetcore.toml");

fn main() -> ExitCode {
    let cli = parse_cli();
    match cli.command {
        Command::DefaultConfig => {
            print!("{DOCUMENTED_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Client(cmd) => client::run(*cmd, &cli.opts),
        Command::Cluster(ClusterCommand::Status { config, nats_urls }) => {
            let json = cli.opts.json();
            let loaded = match &config {
                Some(path) => load_config(path),
                None => Ok(Config::default()),
            };
            match loaded {
                Ok(mut c) => {
                    if !nats_urls.is_empty() {
                        c.cluster.nats_urls = nats_urls;
                    }
                    cluster::print_status(&c.cluster, json)
                }
                Err(e) => {
                    eprintln!("fleetcore: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve(args) => match serve(args, cli.opts.data_dir_override()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fleetcore: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Reads and checks a configuration file.
fn load_config(path: &std::path::Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read configuration file {}", path.display()))?;
    let config: Config = toml::from_str(&text)
        .with_context(|| format!("invalid configuration file {}", path.display()))?;
    Ok(config)
}

/// The configured level, plus a quieter default for rustls's handshake parser: it
/// warns once per connection for a client that sends an IP address as SNI (mosquitto
/// and paho do when told to connect to an IP), which is legal for clients to do and
/// harmless. A level that names rustls itself is left as written.
fn log_directives(level: &str) -> String {
    if level.contains("rustls") {
        level.to_string()
    } else {
        format!("{level},rustls::msgs::handshake=error")
    }
}

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(log_directives(&config.log.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal; a log file gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn serve(args: ServeArgs, data_dir: Option<&Path>) -> Result<()> {
    let (mut config, source) = match &args.config {
        Some(path) => (
            load_config(path)?,
            format!("configuration {}", path.display()),
        ),
        None => (
            Config::default(),
            "embedded defaults (no --config given)".to_string(),
        ),
    };
    if let Some(dir) = data_dir {
        config.data_dir = dir.to_path_buf();
    }
    match args.log_format.as_deref() {
        Some("json") => config.log.format = LogFormat::Json,
        Some("human") => config.log.format = LogFormat::Human,
        _ => {}
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    init_logging(&config);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        source = %source,
        data_dir = %config.data_dir.display(),
        "fleetcore starting"
    );
    if args.config.is_none() {
        tracing::info!("running on embedded defaults: plain MQTT on 127.0.0.1:1883 with anonymous clients allowed; see `fleetcore default-config` for every option");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        // Handlers first: a SIGTERM that arrives while the listeners are being
        // bound must still mean a graceful stop, not the default kill.
        let signals = Signals::install()?;
        let metrics = fleetcore_admin::api::install_metrics()
            .context("cannot install the metrics recorder")?;
        let (ca, pki_created) = load_pki(&mut config)?;
        let admin = config.admin.clone();
        let token_path = config.data_dir.join("admin.token");
        let pki_files = CaFiles::in_dir(&config.pki_dir());
        let mut services: Vec<Arc<dyn fleetcore_core::service::TopicService>> = Vec::new();
        if config.events.enabled {
            services.push(Arc::new(fleetcore_services::events::EventsService));
        }
        let shadows = config.shadow.enabled.then(|| {
            let c = &config.shadow;
            Arc::new(ShadowService::new(ShadowLimits {
                max_state_bytes: c.max_state_bytes,
                max_depth: c.max_depth,
                max_in_flight: c.max_in_flight,
                max_thing_name: c.max_thing_name,
                max_shadow_name: c.max_shadow_name,
            }))
        });
        if let Some(s) = &shadows {
            services.push(s.clone());
        }
        let jobs = config
            .jobs
            .enabled
            .then(|| Arc::new(fleetcore_services::jobs::JobsService::new()));
        if let Some(j) = &jobs {
            services.push(j.clone());
        }
        let provisioning = config.provisioning.enabled.then(|| {
            let c = &config.provisioning;
            let mut reserved_cns = vec!["fleetcore-admin".to_owned()];
            if !reserved_cns.contains(&config.admin.client_cert_cn) {
                reserved_cns.push(config.admin.client_cert_cn.clone());
            }
            ProvisioningService::new(
                ProvisioningConfig {
                    certificate_days: c.certificate_days,
                    max_in_flight: c.max_in_flight,
                    token_ttl: Duration::from_secs(c.token_ttl_secs),
                    hook_timeout: Duration::from_millis(c.hook_timeout_ms),
                    reserved_cns,
                },
                ca.clone(),
            )
        });
        if let Some(p) = &provisioning {
            services.push(Arc::new(p.clone()));
        }
        let setup_provisioning = provisioning.clone();
        let setup = move |hub: &Arc<fleetcore_broker::engine::hub::Hub>| {
            if let Some(p) = setup_provisioning {
                p.bind_registry(hub.registry.clone());
                let _ = hub.jit.set(Arc::new(p));
            }
        };
        let storage = match cluster::open(&config.cluster).await {
            Ok(storage) => storage,
            Err(e) => {
                if pki_created {
                    remove_new_pki(&pki_files);
                }
                return Err(e);
            }
        };
        let (storage, guard) = match storage {
            Some((storage, loaded, place, guard)) => (
                Some(fleetcore_broker::Backend {
                    storage,
                    loaded,
                    place,
                    fabric: Arc::new(fleetcore_core::fabric::Standalone),
                }),
                Some(guard),
            ),
            None => (None, None),
        };
        let server = match Server::start_on(config, storage, services, setup).await {
            Ok(server) => server,
            Err(e) => {
                if pki_created {
                    remove_new_pki(&pki_files);
                }
                return Err(e.into());
            }
        };
        if let Some(j) = &jobs {
            follow_group_changes(server.hub(), j.clone());
        }
        let admin_task = if admin.enabled {
            let hub = server.hub().clone();
            match start_admin(&admin, &token_path, &pki_files, hub, ca, metrics, DeviceServices { shadows, jobs, provisioning }).await {
                Ok(task) => Some(task),
                Err(e) => {
                    let _ = server.shutdown(Duration::from_secs(2)).await;
                    if pki_created {
                        remove_new_pki(&pki_files);
                    }
                    return Err(e);
                }
            }
        } else {
            tracing::info!("admin API disabled ([admin] enabled = false)");
            None
        };
        if let Some(admin_task) = &admin_task {
            tracing::info!(
                "ready. Provision a first device with: fleetcore cert create --thing NAME --out DIR (admin API on {}, token in {})",
                admin_task.url,
                token_path.display()
            );
        }
        // Fail closed: a node that lost its hold on the cluster prefix stops serving.
        let lost = async {
            match &guard {
                Some(g) => g.lost().await,
                None => std::future::pending().await,
            }
        };
        let failed = tokio::select! {
            () = signals.wait() => None,
            why = lost => Some(why),
        };
        if let Some(why) = &failed {
            tracing::error!(reason = %why, "stopping: this node no longer holds its cluster prefix");
        }
        if let Some(admin_task) = admin_task {
            admin_task.stop().await;
        }
        server
            .shutdown(Duration::from_secs(10))
            .await
            .context("store flush at shutdown failed")?;
        match (failed, guard) {
            (Some(why), _) => anyhow::bail!("stopped: {why}"),
            (None, Some(g)) => g.release().await,
            (None, None) => {}
        }
        Ok(())
    })
}

/// After a failed first start: removes the CA and server certificate this start
/// created, so the next start makes them from the configuration as it is then (with
/// the `[pki] server_names` fixed, say), and says so. Nothing was issued by that CA.
fn remove_new_pki(files: &CaFiles) {
    for path in [
        &files.ca_cert,
        &files.ca_key,
        &files.server_cert,
        &files.server_key,
    ] {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a PKI file this failed start created");
        }
    }
    let dir = files.ca_cert.parent().unwrap_or(Path::new("."));
    // Only when empty: anything else in it is not ours.
    let _ = std::fs::remove_dir(dir);
    tracing::warn!(
        dir = %dir.display(),
        "start failed: removed the CA and server certificate this start had created; the next start creates them afresh"
    );
}

/// Loads the CA (or creates it at first start) and points TLS listeners that name no
/// files of their own at the PKI's server certificate and CA. Returns the CA and
/// whether it was created just now.
fn load_pki(config: &mut Config) -> Result<(Arc<Ca>, bool)> {
    let dir = config.pki_dir();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let files = CaFiles::in_dir(&dir);
    let (ca, created) = Ca::load_or_init(&files, &config.pki.server_names)
        .with_context(|| format!("cannot load or create the CA in {}", dir.display()))?;
    if created {
        tracing::info!(
            dir = %dir.display(),
            server_names = ?config.pki.server_names,
            "created a new CA and server certificate; devices and clients trust {}",
            files.ca_cert.display()
        );
    } else {
        tracing::info!(dir = %dir.display(), subject = %ca.ca_info().subject, "loaded the CA");
    }
    for l in &mut config.listeners {
        if l.kind == ListenerKind::Tls {
            l.cert_file.get_or_insert_with(|| files.server_cert.clone());
            l.key_file.get_or_insert_with(|| files.server_key.clone());
            l.client_ca_file
                .get_or_insert_with(|| files.ca_cert.clone());
        }
    }
    Ok((Arc::new(ca), created))
}

/// The running admin API.
struct AdminTask {
    /// `http://` or `https://` and the bound address.
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl AdminTask {
    async fn stop(self) {
        let _ = self.stop.send(());
        // In-flight requests get a moment to finish; the broker's own shutdown follows.
        if tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .is_err()
        {
            tracing::warn!("admin API still busy after 5 s; stopping anyway");
        }
    }
}

/// Continuous jobs follow thing-group membership: a thing that joins a group (or a
/// group below it) gets the continuous jobs targeting it; one that leaves loses them.
fn follow_group_changes(
    hub: &Arc<fleetcore_broker::engine::hub::Hub>,
    jobs: Arc<fleetcore_services::jobs::JobsService>,
) {
    let weak = Arc::downgrade(hub);
    hub.registry.on_event(move |ev| {
        let fleetcore_identity::registry::RegistryEvent::GroupMembershipChanged {
            group,
            thing,
            added,
        } = ev
        else {
            return;
        };
        let (Some(hub), Ok(rt)) = (weak.upgrade(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        let (group, thing, added, jobs) = (group.clone(), thing.clone(), *added, jobs.clone());
        rt.spawn(async move {
            let reg = &hub.registry;
            // The group and its ancestors: a job on a parent group covers its children.
            let path = reg
                .group_path(&group)
                .unwrap_or_else(|| vec![group.clone()]);
            if added {
                jobs.thing_joined(&thing, &path).await;
            } else {
                let still: Vec<String> = reg
                    .thing_groups(&thing)
                    .iter()
                    .flat_map(|g| reg.group_path(g).unwrap_or_default())
                    .collect();
                jobs.thing_left(&thing, &path, &still).await;
            }
        });
    });
}

/// The device services whose HTTP side the admin API serves (`None`: disabled).
struct DeviceServices {
    shadows: Option<Arc<ShadowService>>,
    jobs: Option<Arc<fleetcore_services::jobs::JobsService>>,
    provisioning: Option<ProvisioningService>,
}

async fn start_admin(
    admin: &AdminConfig,
    token_path: &Path,
    pki: &CaFiles,
    hub: Arc<fleetcore_broker::engine::hub::Hub>,
    ca: Arc<Ca>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    services: DeviceServices,
) -> Result<AdminTask> {
    let (token, created) =
        fleetcore_admin::token::load_or_create(token_path).with_context(|| {
            format!(
                "cannot read or create the admin token {}",
                token_path.display()
            )
        })?;
    if created {
        tracing::info!(path = %token_path.display(), "created the admin API token (mode 0600)");
    } else {
        tracing::info!(path = %token_path.display(), "using the admin API token");
    }
    // TLS: the PKI's server certificate; client certificates are optional and must
    // chain to the fleetcore CA when sent.
    let tls = if admin.tls {
        let cfg =
            fleetcore_admin::tls::server_config(&pki.server_cert, &pki.server_key, &pki.ca_cert)
                .context("admin API: [admin] tls = true")?;
        Some(cfg)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(admin.bind)
        .await
        .with_context(|| format!("admin API: cannot bind [admin] bind = {}", admin.bind))?;
    let addr = listener.local_addr().context("admin API: local address")?;
    let state = AdminState {
        hub,
        ca,
        token,
        client_cert_cn: admin.tls.then(|| admin.client_cert_cn.clone()),
        metrics: Some(metrics),
        shadows: services.shadows,
        jobs: services.jobs,
        provisioning: services.provisioning,
    };
    let url = match tls {
        Some(_) => format!("https://{addr}"),
        None => format!("http://{addr}"),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        let served = match tls {
            Some(tls) => fleetcore_admin::api::serve_tls(listener, tls, state, shutdown).await,
            None => fleetcore_admin::api::serve(listener, state, shutdown).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    if admin.tls {
        tracing::info!(
            addr = %addr,
            client_cert_cn = %admin.client_cert_cn,
            "admin API listening (TLS; bearer token or an admin client certificate)"
        );
    } else {
        tracing::info!(addr = %addr, "admin API listening (plain HTTP)");
    }
    Ok(AdminTask { url, stop, task })
}

/// SIGTERM and SIGINT, listened for from before the server starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented file must parse and say exactly what the code defaults are.
    #[test]
    fn documented_config_matches_the_embedded_defaults() {
        let doc: Config = toml::from_str(DOCUMENTED_CONFIG).expect("config/fleetcore.toml parses");
        let def = Config::default();
        assert_eq!(format!("{:?}", doc.limits), format!("{:?}", def.limits));
        assert_eq!(format!("{:?}", doc.session), format!("{:?}", def.session));
        assert_eq!(format!("{:?}", doc.log), format!("{:?}", def.log));
        assert_eq!(doc.data_dir, def.data_dir);
        assert_eq!(format!("{:?}", doc.admin), format!("{:?}", def.admin));
        assert_eq!(format!("{:?}", doc.pki), format!("{:?}", def.pki));
        assert_eq!(doc.tokens, def.tokens);
        assert_eq!(doc.cluster, def.cluster);
        assert_eq!(
            format!("{:?}", doc.effective_listeners()),
            format!("{:?}", def.effective_listeners())
        );
    }

    /// Every configuration the repository ships parses and validates.
    #[test]
    fn shipped_example_configs_are_valid() {
        for (name, text) in [
            (
                "config/docker.toml",
                include_str!("../../../config/docker.toml"),
            ),
            (
                "config/examples/paho-interop.toml",
                include_str!("../../../config/examples/paho-interop.toml"),
            ),
        ] {
            let c: Config = toml::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = toml::from_str::<Config>("[limits]\nmax_conections = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn tls_listener_parses() {
        let c: Config = toml::from_str(
            "[[listener]]\nkind = \"tls\"\nbind = \"0.0.0.0:8883\"\ncert_file = \"a\"\nkey_file = \"b\"\nclient_ca_file = \"c\"\n",
        )
        .unwrap();
        assert_eq!(c.listeners[0].kind_name(), "tls");
    }

    /// A TLS listener may leave its files out: the PKI under data_dir supplies them.
    #[test]
    fn tls_listener_without_files_uses_the_pki() {
        let dir = tempfile::tempdir().unwrap();
        let mut c: Config = toml::from_str(&format!(
            "data_dir = {:?}\n[[listener]]\nkind = \"tls\"\nbind = \"127.0.0.1:0\"\nkey_file = \"own.key\"\n",
            dir.path().join("data")
        ))
        .unwrap();
        c.validate().unwrap();
        load_pki(&mut c).unwrap();
        let l = &c.listeners[0];
        let pki = dir.path().join("data").join("pki");
        assert_eq!(
            l.cert_file.as_deref(),
            Some(pki.join("server.pem").as_path())
        );
        assert_eq!(l.key_file.as_deref(), Some(Path::new("own.key")));
        assert_eq!(
            l.client_ca_file.as_deref(),
            Some(pki.join("ca.pem").as_path())
        );
        assert!(pki.join("ca.key").exists());
    }

    #[test]
    fn port_443_and_plain_websocket_listeners_take_their_defaults() {
        let c: Config = toml::from_str(
            "[[listener]]\nkind = \"tls\"\nbind = \"0.0.0.0:443\"\nwebsocket = true\n\
             [[listener]]\nkind = \"tcp\"\nbind = \"127.0.0.1:8083\"\nwebsocket = true\ntokens = true\nproxy_protocol = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        let (wss, ws) = (&c.listeners[0], &c.listeners[1]);
        assert_eq!((wss.kind_name(), ws.kind_name()), ("wss", "ws"));
        assert_eq!(wss.websocket_path, "/mqtt");
        assert!(wss.tokens_enabled() && wss.uses_registry() && !wss.proxy_protocol);
        assert!(ws.tokens_enabled() && ws.uses_registry() && ws.proxy_protocol);

        let bad: Config = toml::from_str(
            "[[listener]]\nkind = \"tls\"\nbind = \"0.0.0.0:443\"\nwebsocket = true\nregistry = false\n",
        )
        .unwrap();
        let err = bad.validate().unwrap_err();
        assert!(err.contains("tokens") && err.contains("registry"), "{err}");
        let bad: Config = toml::from_str(
            "[[listener]]\nkind = \"tcp\"\nbind = \"0.0.0.0:80\"\nwebsocket = true\nwebsocket_path = \"mqtt\"\n",
        )
        .unwrap();
        assert!(bad.validate().unwrap_err().contains("websocket_path"));
        // Tokens and anonymous clients do not mix: the token would be decoration.
        let bad: Config = toml::from_str(
            "[[listener]]\nkind = \"tcp\"\nbind = \"0.0.0.0:80\"\nwebsocket = true\ntokens = true\nallow_anonymous = true\n",
        )
        .unwrap();
        assert!(bad.validate().unwrap_err().contains("allow_anonymous"));
    }
}
