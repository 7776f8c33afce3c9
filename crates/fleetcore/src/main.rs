//! The `fleetcore` command: `serve` runs the broker; further subcommands
//! (certificates, things, policies) will talk to a running server's admin API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fleetcore_broker::config::{Config, LogFormat};
use fleetcore_broker::Server;

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
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Print the embedded default configuration (documented) and exit.
    DefaultConfig,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML). Without it the embedded defaults are used.
    #[arg(short, long, env = "FLEETCORE_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides `data_dir` from the configuration.
    #[arg(long, env = "FLEETCORE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides `log.format` ("human" or "json").
    #[arg(long, value_parser = ["human", "json"])]
    log_format: Option<String>,
}

const DOCUMENTED_CONFIG: &str = include_str!("../../../config/fleetcore.toml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DefaultConfig => {
            print!("{DOCUMENTED_CONFIG}");
            ExitCode::SUCCESS
        }
        Command::Serve(args) => match serve(args) {
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

fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
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
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
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
        let server = Server::start(config).await?;
        signals.wait().await;
        server
            .shutdown(Duration::from_secs(10))
            .await
            .context("store flush at shutdown failed")?;
        Ok(())
    })
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
}
