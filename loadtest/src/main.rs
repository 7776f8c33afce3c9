//! `fleetcore-loadtest`: a fleet simulator for any MQTT broker (plain TCP, mutual TLS,
//! WSS). See loadtest/README.md.

mod fleet;
mod fleetsim;
mod handshake;
mod mqtt;
mod net;
mod payload;
mod provision;
mod scenarios;
mod shadow;
mod stats;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::fleetsim::Ctx;
use crate::net::{BrokerUrl, TlsBase};
use crate::stats::{Probe, Report};

#[derive(Parser)]
#[command(
    name = "fleetcore-loadtest",
    version,
    about = "Fleet simulator for MQTT brokers: idle fleet, targeted push, telemetry fan-in, reconnect storm, retained config, device shadows, fleet provisioning",
    after_help = "Every run stops by itself: --devices and the message counts bound it in count, --duration/--drain/--timeout in time.\nProgress goes to stderr; the summary (or with --json one JSON document) to stdout."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Scenario 1: Idle fleet: connect N devices at --rate, each subscribed to its own
    /// account/device/#, hold them for --duration. Connect rate, broker RSS per
    /// connection, handshake failures, broker CPU per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Seconds to wait after the last connection before sampling RSS.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
    /// Scenario 2: Targeted push: with N devices connected, the backend publishes QoS 1 orders to
    /// random single devices at --msg-rate. Latency percentiles, lost, duplicated.
    Push {
        #[command(flatten)]
        common: Common,
        /// Orders per second.
        #[arg(long, default_value_t = 1000.0)]
        msg_rate: f64,
        /// Unacknowledged QoS 1 publishes the backend allows itself.
        #[arg(long, default_value_t = 100)]
        inflight: u32,
        /// Payload bytes (at least 24, the stamp).
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Upper bound on orders, whatever the rate and duration.
        #[arg(long, default_value_t = 10_000_000)]
        max_messages: u64,
    },
    /// Scenario 3: Telemetry fan-in: every device publishes to account/device/telemetry (total
    /// --msg-rate), one backend subscribes to +/+/telemetry. Delivered/s, latency, CPU.
    Fanin {
        #[command(flatten)]
        common: Common,
        /// Messages per second over the whole fleet.
        #[arg(long, default_value_t = 1000.0)]
        msg_rate: f64,
        /// QoS of the telemetry: 0, 1, or both (half the devices each).
        #[arg(long, default_value = "both")]
        qos: String,
        #[arg(long, default_value_t = 64)]
        payload: usize,
        #[arg(long, default_value_t = 10_000_000)]
        max_messages: u64,
    },
    /// Scenario 4: Reconnect storm: N devices with persistent sessions disconnect; one QoS 1 order
    /// per device is queued; --restart-cmd restarts the broker; all reconnect at once.
    /// Time to all reconnected+subscribed, time to every order delivered, lost.
    Storm {
        #[command(flatten)]
        common: Common,
        /// Shell command that restarts the broker (runs after the orders are queued). If
        /// its last stdout line is a number, it is the new broker PID.
        #[arg(long)]
        restart_cmd: Option<String>,
        /// Without --restart-cmd: wait for the broker to go down and come back.
        #[arg(long)]
        wait_restart: bool,
        /// MQTT 5 Session Expiry Interval (3.1.1: clean session off, the broker's default).
        #[arg(long, default_value_t = 3600)]
        session_expiry: u32,
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Rate of queuing the orders (0 = as fast as the in-flight window allows).
        #[arg(long, default_value_t = 0.0)]
        msg_rate: f64,
        /// Reconnections per second (0 = all at once, --max-pending at a time).
        #[arg(long, default_value_t = 0.0)]
        reconnect_rate: f64,
    },
    /// Scenario 5: Retained config on resubscribe: one retained config per device, then all
    /// devices connect with clean sessions and subscribe. Time until every device has it.
    Retained {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 256)]
        payload: usize,
        /// Rate of publishing the configs (0 = as fast as the in-flight window allows).
        #[arg(long, default_value_t = 0.0)]
        msg_rate: f64,
        /// Leave the retained configs on the broker (default: cleared at the end).
        #[arg(long)]
        keep_retained: bool,
    },
    /// Device Shadow updates (fleetcore only: mosquitto has no shadow service): each
    /// device dev<i> subscribes to $aws/things/dev<i>/shadow/update/{accepted,rejected,delta}
    /// and sends reported-state updates (QoS 1, a clientToken each) for a fleet-wide
    /// --msg-rate. Updates/s, publish -> accepted latency, rejected by code, lost,
    /// version gaps, broker CPU per update.
    Shadow {
        #[command(flatten)]
        common: Common,
        /// Updates per second over the whole fleet.
        #[arg(long, default_value_t = 1000.0)]
        msg_rate: f64,
        /// Requests a device leaves unanswered at most (fleetcore answers 429 above 10
        /// per connection).
        #[arg(long, default_value_t = 1)]
        inflight: u32,
        /// The backend sets a desired value on a random device every K device updates
        /// (0 = never), so deltas flow; devices report it back.
        #[arg(long, default_value_t = 0)]
        desired_every: u64,
        /// Upper bound on updates, whatever the rate and duration.
        #[arg(long, default_value_t = 10_000_000)]
        max_messages: u64,
    },
    /// Fleet provisioning by CSR (fleetcore only; issue #14): sets up a template (thing
    /// <--thing-prefix><serial>, the --admin-policy attached) and one claim certificate on
    /// the admin API, makes a key and CSR per agent (not timed), then every agent connects
    /// with the claim certificate, gets its certificate (CreateCertificateFromCsr),
    /// registers its thing (RegisterThing) and reconnects with its own certificate as the
    /// thing. Time until all are connected, provisions/s, latency per step, broker CPU
    /// per provisioning. Defaults here: -n 2000, --rate 0 and --max-pending = -n (all at
    /// once); needs --url mqtts://..., --ca and --admin-url.
    Provision {
        #[command(flatten)]
        common: Common,
        /// Template to create (used as it is when it exists).
        #[arg(long, default_value = "loadtest-fleet")]
        template: String,
        /// Agent i's thing (and CSR CN) is <prefix><i>.
        #[arg(long, default_value = "prov-")]
        thing_prefix: String,
        /// Times an agent sends a request again after a 429 ThrottlingException
        /// (exponential backoff with jitter: 100 ms doubling to 2 s).
        #[arg(long, default_value_t = 20)]
        max_retries: u32,
    },
    /// rustls alone: mutual-TLS server handshakes per CPU-second (in-process, one thread).
    Handshake {
        #[arg(long, default_value_t = 2000)]
        handshakes: u64,
        /// TLS 1.2 instead of 1.3.
        #[arg(long)]
        tls12: bool,
        #[arg(long)]
        json: bool,
    },
    /// A null broker (accept, TLS handshake, CONNACK, SUBACK, nothing else): run `idle`
    /// against it for the connections-per-CPU-second ceiling of this machine.
    NullBroker {
        #[arg(long, default_value = "127.0.0.1:28883")]
        bind: std::net::SocketAddr,
        /// Server certificate, key and client CA (PEM); all three for mutual TLS, none for TCP.
        #[arg(long, requires_all = ["key", "client_ca"])]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
        #[arg(long)]
        client_ca: Option<PathBuf>,
        /// Stop after this many seconds (also on SIGTERM/SIGINT).
        #[arg(long, default_value_t = 3600)]
        max_secs: u64,
    },
    /// Write a test PKI: ca.pem, ca.key (also the client CA), server.pem, server.key.
    Pki {
        #[arg(long)]
        out: PathBuf,
        /// Server certificate names (DNS names or IP addresses).
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        names: Vec<String>,
    },
    /// Mint (or fetch from the admin API) the fleet's certificates into --fleet-dir, and exit.
    Mint {
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Clone)]
struct Common {
    /// Broker: mqtt://host:port, mqtts://host:port, ws://host:port/path, wss://host:port/path.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    url: BrokerUrl,
    /// Where the backend connects (default: --url), e.g. a listener without device policy.
    #[arg(long)]
    backend_url: Option<BrokerUrl>,
    /// CA certificate(s) (PEM) the broker's server certificate chains to.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// CA certificate (PEM) to mint device certificates with (CN = device, OU = account).
    #[arg(long, requires = "client_ca_key")]
    client_ca_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "client_ca_cert")]
    client_ca_key: Option<PathBuf>,
    /// Get device certificates from fleetcore's admin API instead (http://host:port).
    #[arg(long, conflicts_with = "client_ca_cert")]
    admin_url: Option<String>,
    /// The admin bearer token file (fleetcore's <data_dir>/admin.token).
    #[arg(long, default_value = "data/admin.token")]
    admin_token_file: PathBuf,
    /// Policy the admin API attaches to device certificates (created if missing, with
    /// the seed's agent policy).
    #[arg(long, default_value = "agent")]
    admin_policy: String,
    /// Cache of minted certificates, reused by later runs.
    #[arg(long, default_value = "loadtest-fleet")]
    fleet_dir: PathBuf,
    /// Number of devices.
    #[arg(long, short = 'n', default_value_t = 1000)]
    devices: usize,
    /// Devices are spread over this many accounts (acct<i % accounts>).
    #[arg(long, default_value_t = 1000)]
    accounts: usize,
    /// New connections per second (0 = as fast as --max-pending allows).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Connections between TCP connect and ready (SUBACK) at once.
    #[arg(long, default_value_t = 500)]
    max_pending: usize,
    /// Seconds of the measured phase (hold, publishing).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait for stragglers after a phase.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Source addresses to bind before connect, round robin: 127.0.0.2-127.0.0.40 or a,b,c.
    #[arg(long)]
    source_addrs: Option<String>,
    /// The broker's PID: RSS and CPU time are read from /proc.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// One JSON document on stdout instead of the summary.
    #[arg(long)]
    json: bool,
    /// Hard bound on the whole run, seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// MQTT version: 3.1.1 or 5.
    #[arg(long, default_value = "3.1.1", value_parser = ["3.1.1", "5"])]
    mqtt: String,
    /// Keep-alive seconds (devices ping at half of it).
    #[arg(long, default_value_t = 300)]
    keep_alive: u16,
    /// Seconds a device may take from TCP connect to SUBACK.
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// ALPN protocol to offer over TLS (e.g. x-amzn-mqtt-ca, http/1.1).
    #[arg(long)]
    alpn: Option<String>,
    /// No progress bars.
    #[arg(long)]
    no_progress: bool,
    /// Each device keeps the TLS session tickets the broker gives it (a session store
    /// of its own) and offers them when it reconnects: TLS 1.3 resumption instead of a
    /// full handshake. Reports count resumed and full handshakes.
    #[arg(long)]
    tls_resume: bool,
}

/// Raises the soft open-file limit to the hard one; returns (soft, hard) after.
fn raise_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return (0, 0);
        }
        let old = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                eprintln!("open-file limit raised from {old} to {}", lim.rlim_cur);
            } else {
                lim.rlim_cur = old;
                eprintln!("warning: could not raise the open-file limit above {old}");
            }
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

fn ephemeral_ports() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|v| v.parse::<u64>().ok());
            Some(it.next_back()? - it.next()? + 1)
        })
        .unwrap_or(28_232)
}

/// `mint_only`: certificates only, no connections; `no_fleet`: no device certificates
/// (the provisioning agents get theirs during the run).
async fn build_ctx(c: &Common, mint_only: bool, no_fleet: bool) -> anyhow::Result<Arc<Ctx>> {
    let (soft, hard) = raise_nofile();
    let need = c.devices as u64 + 64;
    if need > soft {
        eprintln!(
            "warning: {} devices need about {need} open files; this process may have {soft} (hard limit {hard}): about {} will connect",
            c.devices,
            soft.saturating_sub(64)
        );
    }
    let sources = match &c.source_addrs {
        Some(s) => net::parse_source_addrs(s)?,
        None => Vec::new(),
    };
    let ports = ephemeral_ports();
    let per_source = c.devices as u64 / sources.len().max(1) as u64;
    if per_source > ports {
        eprintln!(
            "warning: {per_source} connections per source address exceed the {ports} ephemeral ports: pass (more) --source-addrs, e.g. 127.0.0.2-127.0.0.40"
        );
    }
    let backend_url = c.backend_url.clone().unwrap_or_else(|| c.url.clone());
    let any_tls = c.url.uses_tls() || backend_url.uses_tls();
    let tls_base = |u: &BrokerUrl| -> anyhow::Result<Option<TlsBase>> {
        if !u.uses_tls() {
            return Ok(None);
        }
        let ca =
            c.ca.as_ref()
                .with_context(|| format!("{u} needs --ca (the broker's CA certificate)"))?;
        Ok(Some(TlsBase::new(ca, &u.host)?))
    };
    if mint_only && c.client_ca_cert.is_none() && c.admin_url.is_none() {
        bail!("mint needs --client-ca-cert and --client-ca-key, or --admin-url");
    }
    let fleet = if no_fleet || (!any_tls && !mint_only) {
        None
    } else {
        let source = if let (Some(cert), Some(key)) = (&c.client_ca_cert, &c.client_ca_key) {
            Some(fleet::Source::Ca {
                cert: cert.clone(),
                key: key.clone(),
            })
        } else if let Some(url) = &c.admin_url {
            let token = std::fs::read_to_string(&c.admin_token_file).with_context(|| {
                format!("reading the admin token {}", c.admin_token_file.display())
            })?;
            Some(fleet::Source::Admin {
                url: url.clone(),
                token,
                policy: c.admin_policy.clone(),
            })
        } else {
            eprintln!("note: TLS without client certificates (no --client-ca-cert or --admin-url)");
            None
        };
        match source {
            Some(source) => {
                let (dir, devices, accounts) = (c.fleet_dir.clone(), c.devices, c.accounts);
                let (f, _) = tokio::task::spawn_blocking(move || {
                    fleet::Fleet::prepare(&dir, &source, devices, accounts)
                })
                .await??;
                Some(f)
            }
            None => None,
        }
    };
    let addr = c.url.resolve()?;
    let backend_addr = backend_url.resolve()?;
    let tls = tls_base(&c.url)?;
    // Key parsing and configuration building stay out of the measured phases.
    let mut device_tls = Vec::new();
    if let (Some(base), false) = (&tls, mint_only || no_fleet) {
        let started = std::time::Instant::now();
        let alpn = c.alpn.as_ref().map(|a| a.as_bytes());
        for i in 0..c.devices {
            let identity = match &fleet {
                Some(f) => Some(f.load(&fleet::device_name(i))?),
                None => None,
            };
            device_tls.push(base.client_config(identity, alpn, c.tls_resume)?);
        }
        eprintln!(
            "prepared {} TLS client configurations in {:.1} s",
            c.devices,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(Arc::new(Ctx {
        tls,
        device_tls,
        backend_tls: tls_base(&backend_url)?,
        url: c.url.clone(),
        addr,
        backend_url,
        backend_addr,
        alpn: c.alpn.as_ref().map(|a| a.as_bytes().to_vec()),
        fleet,
        version: if c.mqtt == "5" { mqtt::V5 } else { mqtt::V311 },
        accounts: c.accounts.max(1),
        keep_alive: c.keep_alive,
        connect_timeout: Duration::from_secs_f64(c.connect_timeout),
        sources,
        probe: Probe::new(c.broker_pid),
        bars: fleetsim::multi_progress(!c.no_progress),
        deadline: tokio::time::Instant::now() + Duration::from_secs_f64(c.timeout),
    }))
}

fn common_params(r: &mut Report, c: &Common, ctx: &Ctx) {
    r.param("url", c.url.to_string());
    if let Some(b) = &c.backend_url {
        r.param("backend_url", b.to_string());
    }
    r.param("mqtt", c.mqtt.clone());
    r.param("devices", c.devices);
    r.param("accounts", c.accounts);
    r.param("connect_rate", c.rate);
    r.param("max_pending", c.max_pending);
    r.param("duration_s", c.duration);
    r.param("client_certificates", ctx.fleet.is_some());
    if ctx.tls.is_some() {
        r.param("tls_resume", c.tls_resume);
    }
    r.param("source_addrs", ctx.sources.len());
    r.param(
        "generator_threads",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    if let Some(pid) = c.broker_pid {
        r.param("broker_pid", pid);
    }
}

fn output(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(&r.json()).expect("json"));
    } else {
        print!("{}", r.human());
    }
}

fn shared(c: &Common) -> scenarios::Common {
    scenarios::Common {
        devices: c.devices,
        accounts: c.accounts.max(1),
        rate: c.rate,
        max_pending: c.max_pending,
        duration: Duration::from_secs_f64(c.duration),
        drain: Duration::from_secs_f64(c.drain),
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<()> {
    let c = match &cmd {
        Cmd::Idle { common, .. }
        | Cmd::Push { common, .. }
        | Cmd::Fanin { common, .. }
        | Cmd::Storm { common, .. }
        | Cmd::Retained { common, .. }
        | Cmd::Shadow { common, .. }
        | Cmd::Provision { common, .. }
        | Cmd::Mint { common } => common.clone(),
        Cmd::Handshake {
            handshakes,
            tls12,
            json,
        } => {
            let (n, t) = (*handshakes, *tls12);
            let r = tokio::task::spawn_blocking(move || handshake::bench(n, t)).await??;
            output(&r, *json);
            return Ok(());
        }
        Cmd::NullBroker {
            bind,
            cert,
            key,
            client_ca,
            max_secs,
        } => {
            let tls = match (cert, key, client_ca) {
                (Some(c), Some(k), Some(ca)) => Some((c.clone(), k.clone(), ca.clone())),
                _ => None,
            };
            return handshake::null_broker(*bind, tls, *max_secs).await;
        }
        Cmd::Pki { out, names } => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let (ca, ca_key, server, server_key) = fleet::make_test_pki(&names)?;
            std::fs::create_dir_all(out)?;
            for (f, pem) in [
                ("ca.pem", ca),
                ("ca.key", ca_key),
                ("server.pem", server),
                ("server.key", server_key),
            ] {
                std::fs::write(out.join(f), pem)?;
            }
            eprintln!(
                "wrote ca.pem, ca.key, server.pem, server.key to {}",
                out.display()
            );
            return Ok(());
        }
    };
    if c.devices > 10_000_000 {
        bail!(
            "--devices {} is beyond what this tool bounds runs to",
            c.devices
        );
    }
    let provisioning = matches!(cmd, Cmd::Provision { .. });
    if provisioning && (!c.url.uses_tls() || c.admin_url.is_none()) {
        bail!("provision needs --url mqtts://... (a registry TLS listener), --ca and --admin-url");
    }
    let ctx = build_ctx(&c, matches!(cmd, Cmd::Mint { .. }), provisioning).await?;
    if let Cmd::Mint { .. } = cmd {
        eprintln!("fleet ready in {}", c.fleet_dir.display());
        return Ok(());
    }
    let s = shared(&c);
    let hard = Duration::from_secs_f64(c.timeout + 30.0);
    let fut = async {
        Ok::<Report, anyhow::Error>(match cmd {
            Cmd::Idle { settle, .. } => {
                scenarios::idle(ctx.clone(), &s, Duration::from_secs_f64(settle)).await
            }
            Cmd::Push {
                msg_rate,
                inflight,
                payload,
                max_messages,
                ..
            } => {
                scenarios::push(
                    ctx.clone(),
                    &s,
                    &scenarios::PushOpts {
                        msg_rate,
                        inflight,
                        payload,
                        max_messages,
                    },
                )
                .await?
            }
            Cmd::Fanin {
                msg_rate,
                qos,
                payload,
                max_messages,
                ..
            } => {
                scenarios::fanin(
                    ctx.clone(),
                    &s,
                    &scenarios::FaninOpts {
                        msg_rate,
                        qos,
                        payload,
                        max_messages,
                    },
                )
                .await?
            }
            Cmd::Storm {
                restart_cmd,
                wait_restart,
                session_expiry,
                payload,
                msg_rate,
                reconnect_rate,
                ..
            } => {
                scenarios::storm(
                    ctx.clone(),
                    &s,
                    &scenarios::StormOpts {
                        restart_cmd,
                        wait_restart,
                        session_expiry,
                        payload,
                        msg_rate,
                        reconnect_rate,
                    },
                )
                .await?
            }
            Cmd::Retained {
                payload,
                msg_rate,
                keep_retained,
                ..
            } => {
                scenarios::retained(
                    ctx.clone(),
                    &s,
                    &scenarios::RetainedOpts {
                        payload,
                        msg_rate,
                        keep: keep_retained,
                    },
                )
                .await?
            }
            Cmd::Shadow {
                msg_rate,
                inflight,
                desired_every,
                max_messages,
                ..
            } => {
                shadow::shadow(
                    ctx.clone(),
                    &s,
                    &shadow::ShadowOpts {
                        msg_rate,
                        inflight,
                        desired_every,
                        max_messages,
                    },
                )
                .await?
            }
            Cmd::Provision {
                template,
                thing_prefix,
                max_retries,
                ..
            } => {
                let admin_token =
                    std::fs::read_to_string(&c.admin_token_file).with_context(|| {
                        format!("reading the admin token {}", c.admin_token_file.display())
                    })?;
                provision::provision(
                    ctx.clone(),
                    &s,
                    &provision::ProvisionOpts {
                        admin_url: c.admin_url.clone().unwrap_or_default(),
                        admin_token: admin_token.trim().to_owned(),
                        policy: c.admin_policy.clone(),
                        template,
                        thing_prefix,
                        max_retries,
                    },
                )
                .await?
            }
            Cmd::Mint { .. } | Cmd::Handshake { .. } | Cmd::Pki { .. } | Cmd::NullBroker { .. } => {
                unreachable!()
            }
        })
    };
    let mut r = match tokio::time::timeout(hard, fut).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("the run exceeded --timeout {} s (+30 s grace)", c.timeout),
    };
    common_params(&mut r, &c, &ctx);
    output(&r, c.json);
    Ok(())
}

/// Parses the command line; `provision` has its own defaults for -n (2000), --rate (0)
/// and --max-pending (= -n): every agent at once.
fn parse() -> Cli {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Some(("provision", sub)), Cmd::Provision { common, .. }) =
        (matches.subcommand(), &mut cli.cmd)
    {
        let default = |id: &str| sub.value_source(id) == Some(ValueSource::DefaultValue);
        if default("devices") {
            common.devices = 2000;
        }
        if default("rate") {
            common.rate = 0.0;
        }
        if default("max_pending") {
            common.max_pending = common.devices;
        }
    }
    cli
}

fn main() {
    let cli = parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let res = rt.block_on(run(cli.cmd));
    // Device tasks still blocked on sockets must not delay the exit.
    rt.shutdown_timeout(Duration::from_secs(2));
    if let Err(e) = res {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
