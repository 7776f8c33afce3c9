//! `[cluster]`: the broker's state on NATS JetStream instead of the local redb file.

use anyhow::Result;
use fleetcore_broker::config::ClusterConfig;
use fleetcore_core::storage::{Loaded, Storage};

/// How long the node's lease lives without a renewal (renewed every third of it): a node
/// killed with SIGKILL holds its prefix this long.
#[cfg(feature = "cluster")]
const NODE_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(6);

/// This node's hold on its prefix while it runs (one node per prefix for now).
pub struct Guard {
    #[cfg(feature = "cluster")]
    lease: fleetcore_cluster::lease::Lease,
}

impl Guard {
    /// Resolves with the reason once the node lost its hold (its lease was taken, or it
    /// could not renew it, cut off from NATS): it must stop serving.
    pub async fn lost(&self) -> String {
        #[cfg(feature = "cluster")]
        {
            let mut lost = self.lease.lost();
            let why = match lost.wait_for(|l| l.is_some()).await {
                Ok(why) => why.clone().unwrap_or_default(),
                Err(_) => "the lease's renewer stopped".into(),
            };
            why
        }
        #[cfg(not(feature = "cluster"))]
        std::future::pending().await
    }

    /// Gives the hold up at a normal stop, so the next start need not wait for it.
    pub async fn release(self) {
        #[cfg(feature = "cluster")]
        self.lease.release().await;
    }
}

/// What `[cluster]` opened: the storage (with what it holds and its name for the log)
/// and the node's hold on the prefix.
pub type Opened = (Storage, Loaded, String, Guard);

/// How long a start waits for NATS to be reachable.
#[cfg(feature = "cluster")]
const CONNECT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// This node's name: the configured one, or the host name.
#[cfg(feature = "cluster")]
pub fn node_name(c: &ClusterConfig) -> String {
    if !c.node_name.is_empty() {
        return c.node_name.clone();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fleetcore".into())
}

/// Connects to the NATS servers of `[cluster]`, takes the prefix's node lease and reads
/// the state they hold; `None` when no NATS server is configured (one node on the redb
/// file). Another live node on the same prefix is refused.
#[cfg(feature = "cluster")]
pub async fn open(c: &ClusterConfig) -> Result<Option<Opened>> {
    use anyhow::Context;
    use fleetcore_cluster::{NatsOptions, NatsStorage};
    if !c.enabled() {
        return Ok(None);
    }
    let node = node_name(c);
    let opts = NatsOptions {
        prefix: c.prefix.clone(),
        replicas: c.replicas,
        connection_name: format!("fleetcore {node}"),
        request_timeout: std::time::Duration::from_millis(c.request_timeout_ms),
        credentials_file: c.credentials_file.clone(),
        tls_ca_file: c.tls_ca_file.clone(),
        tls_client: c.tls_cert_file.clone().zip(c.tls_key_file.clone()),
    };
    let urls = c.nats_urls.join(",");
    tracing::info!(nats = %urls, node = %node, prefix = %c.prefix, "connecting to NATS JetStream for the broker's state");
    // NATS may be starting with us (one compose file, one boot): a refused or failed
    // connection is tried again for a while, and said so, before the start fails.
    let give_up = tokio::time::Instant::now() + CONNECT_PATIENCE;
    let mut told: Option<tokio::time::Instant> = None;
    let (nats, loaded) = loop {
        let attempt = tokio::time::timeout(
            std::time::Duration::from_millis(c.request_timeout_ms) * 6,
            NatsStorage::connect(&c.nats_urls, opts.clone()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no answer from NATS at {urls} in time ([cluster] nats_urls)"))
        .and_then(|r| {
            r.with_context(|| format!("cannot use NATS JetStream at {urls} ([cluster])"))
        });
        match attempt {
            Ok(opened) => break opened,
            Err(e) if tokio::time::Instant::now() < give_up => {
                if told.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(5)) {
                    tracing::warn!(error = %format!("{e:#}"), "NATS JetStream not reachable yet; trying again for up to {} s", CONNECT_PATIENCE.as_secs());
                    told = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // One node per prefix until cross-node delivery and takeover exist: the lease says
    // which. A node killed with SIGKILL is taken over after NODE_LEASE_TTL.
    let lease = nats
        .lease("node", &node, NODE_LEASE_TTL)
        .await
        .with_context(|| {
            format!(
                "prefix {:?} on NATS is in use by another fleetcore node; one node per prefix \
                 for now (cross-node delivery is not built yet): stop it, or give this node \
                 another [cluster] prefix",
                c.prefix
            )
        })?;
    tracing::warn!(
        "cluster storage: this node's state is in NATS JetStream (prefix {:?}); cross-node \
         delivery and takeover are not built yet, so this node holds the prefix alone",
        c.prefix
    );
    Ok(Some((
        nats.storage(),
        loaded,
        format!("nats JetStream at {urls}, prefix {}", c.prefix),
        Guard { lease },
    )))
}

/// Built without the `cluster` feature: `[cluster]` is refused, not ignored.
#[cfg(not(feature = "cluster"))]
pub async fn open(c: &ClusterConfig) -> Result<Option<Opened>> {
    if c.enabled() {
        anyhow::bail!(
            "[cluster] nats_urls is set, but this fleetcore was built without the `cluster` feature"
        );
    }
    Ok(None)
}

/// `fleetcore cluster status`: prints the status (text or JSON); exit 0 when healthy, 1
/// with problems, 2 when NATS cannot be asked.
pub fn print_status(c: &ClusterConfig, json: bool) -> std::process::ExitCode {
    use std::process::ExitCode;
    if !c.enabled() {
        eprintln!(
            "fleetcore: no NATS servers: give --nats-url, or --config with a [cluster] nats_urls"
        );
        return ExitCode::from(2);
    }
    #[cfg(feature = "cluster")]
    {
        let opts = fleetcore_cluster::NatsOptions {
            prefix: c.prefix.clone(),
            replicas: c.replicas,
            connection_name: "fleetcore cluster status".into(),
            request_timeout: std::time::Duration::from_millis(c.request_timeout_ms),
            credentials_file: c.credentials_file.clone(),
            tls_ca_file: c.tls_ca_file.clone(),
            tls_client: c.tls_cert_file.clone().zip(c.tls_key_file.clone()),
        };
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("fleetcore: cannot start the async runtime: {e}");
                return ExitCode::from(2);
            }
        };
        let got = runtime.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_millis(c.request_timeout_ms) * 3,
                fleetcore_cluster::status::status(&c.nats_urls, &opts),
            )
            .await
        });
        let status = match got {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                eprintln!("fleetcore: {e}");
                return ExitCode::from(2);
            }
            Err(_) => {
                eprintln!(
                    "fleetcore: no answer from NATS at {} in time",
                    c.nats_urls.join(",")
                );
                return ExitCode::from(2);
            }
        };
        if json {
            match serde_json::to_string_pretty(&status) {
                Ok(text) => println!("{text}"),
                Err(e) => {
                    eprintln!("fleetcore: {e}");
                    return ExitCode::from(2);
                }
            }
        } else {
            print!("{status}");
        }
        if status.problems().is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
    #[cfg(not(feature = "cluster"))]
    {
        let _ = json;
        eprintln!("fleetcore: this fleetcore was built without the `cluster` feature");
        ExitCode::from(2)
    }
}
