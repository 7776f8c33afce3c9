//! What `fleetcore cluster status` shows: the NATS server reached, which node holds the
//! prefix, and each bucket's size, replicas and Raft health.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use fleetcore_core::storage::StoreError;
use serde::Serialize;

use crate::{connect_client, NatsOptions};

/// The buckets of one installation (`<prefix>_<suffix>`).
const SUFFIXES: [&str; 5] = ["sessions", "queue", "retained", "records", "meta"];

#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// The server this connection reached, and its version.
    pub server: String,
    pub server_version: String,
    /// Servers of its NATS cluster it told of (empty: a single server).
    pub cluster_urls: Vec<String>,
    pub prefix: String,
    /// The node holding the prefix (`lease.node`), if any.
    pub node: Option<NodeHold>,
    pub buckets: Vec<BucketStatus>,
    /// How long one JetStream request took (a stream info), milliseconds.
    pub round_trip_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeHold {
    pub name: String,
    /// Seconds since the holder last renewed, by this host's clock against the server's
    /// timestamp (a node renews every 2 s; above 6 s it is being taken over).
    pub renewed_secs_ago: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BucketStatus {
    pub name: String,
    /// Messages in the bucket's stream: one per key, delete markers included.
    pub entries: u64,
    pub bytes: u64,
    pub replicas: usize,
    /// The Raft leader, for a replicated bucket.
    pub leader: Option<String>,
    /// Replicas that are not current (behind or offline), by name.
    pub lagging: Vec<String>,
}

impl ClusterStatus {
    /// Problems an operator must look at (empty: healthy).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for b in &self.buckets {
            if b.replicas > 1 && b.leader.is_none() {
                out.push(format!("bucket {} has no leader", b.name));
            }
            for r in &b.lagging {
                out.push(format!("bucket {}: replica {r} is not current", b.name));
            }
        }
        match &self.node {
            None => out.push(format!("no node holds prefix {}", self.prefix)),
            Some(n) if n.renewed_secs_ago > 6.0 => out.push(format!(
                "node {} has not renewed its hold for {:.0} s",
                n.name, n.renewed_secs_ago
            )),
            Some(_) => {}
        }
        out
    }
}

/// Reads the status of installation `opts.prefix` on the servers `urls`; creates nothing.
pub async fn status(urls: &[String], opts: &NatsOptions) -> Result<ClusterStatus, StoreError> {
    let servers = urls.join(",");
    let err = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Io(format!("NATS JetStream at {servers}: {what}: {e}"))
    };
    let client = connect_client(urls, opts).await?;
    let info = client.server_info();
    let mut js = jetstream::new(client.clone());
    js.set_timeout(opts.request_timeout);
    let mut buckets = Vec::new();
    let mut round_trip = Duration::MAX;
    for suffix in SUFFIXES {
        let name = format!("{}_{suffix}", opts.prefix);
        let started = std::time::Instant::now();
        let mut stream = match js.get_stream(format!("KV_{name}")).await {
            Ok(stream) => stream,
            Err(e) if e.to_string().contains("not found") => continue,
            Err(e) => return Err(err(&format!("bucket {name}"), &e)),
        };
        let si = stream
            .info()
            .await
            .map_err(|e| err(&format!("bucket {name}"), &e))?;
        round_trip = round_trip.min(started.elapsed());
        let (leader, lagging) = match &si.cluster {
            Some(c) => (
                c.leader.clone(),
                c.replicas
                    .iter()
                    .filter(|p| !p.current || p.offline)
                    .map(|p| p.name.clone())
                    .collect(),
            ),
            None => (None, Vec::new()),
        };
        buckets.push(BucketStatus {
            name,
            entries: si.state.messages,
            bytes: si.state.bytes,
            replicas: si.config.num_replicas,
            leader,
            lagging,
        });
    }
    let node = match js.get_key_value(format!("{}_meta", opts.prefix)).await {
        Ok(meta) => match meta.entry("lease.node").await {
            Ok(Some(e)) if e.operation == jetstream::kv::Operation::Put => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as i128;
                let ago = (now - e.created.unix_timestamp_nanos()).max(0) as f64 / 1e9;
                Some(NodeHold {
                    name: String::from_utf8_lossy(&e.value).into_owned(),
                    renewed_secs_ago: ago,
                })
            }
            Ok(_) => None,
            Err(e) => return Err(err("read lease.node", &e)),
        },
        Err(_) => None,
    };
    Ok(ClusterStatus {
        server: format!("{} ({}:{})", info.server_name, info.host, info.port),
        server_version: info.version,
        cluster_urls: info.connect_urls,
        prefix: opts.prefix.clone(),
        node,
        buckets,
        round_trip_ms: if round_trip == Duration::MAX {
            0.0
        } else {
            round_trip.as_secs_f64() * 1000.0
        },
    })
}

impl std::fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "NATS server   {} (nats-server {})",
            self.server, self.server_version
        )?;
        if !self.cluster_urls.is_empty() {
            writeln!(f, "NATS cluster  {}", self.cluster_urls.join(", "))?;
        }
        writeln!(f, "JetStream     round trip {:.1} ms", self.round_trip_ms)?;
        writeln!(f, "prefix        {}", self.prefix)?;
        match &self.node {
            Some(n) => writeln!(
                f,
                "node          {} (renewed {:.1} s ago)",
                n.name, n.renewed_secs_ago
            )?,
            None => writeln!(f, "node          none holds the prefix")?,
        }
        if self.buckets.is_empty() {
            writeln!(
                f,
                "buckets       none (no fleetcore has run on this prefix)"
            )?;
        } else {
            writeln!(
                f,
                "{:<28} {:>10} {:>12} {:>8}  leader",
                "bucket", "entries", "bytes", "replicas"
            )?;
            for b in &self.buckets {
                writeln!(
                    f,
                    "{:<28} {:>10} {:>12} {:>8}  {}{}",
                    b.name,
                    b.entries,
                    b.bytes,
                    b.replicas,
                    b.leader.as_deref().unwrap_or("-"),
                    if b.lagging.is_empty() {
                        String::new()
                    } else {
                        format!("  (not current: {})", b.lagging.join(", "))
                    }
                )?;
            }
        }
        let problems = self.problems();
        if problems.is_empty() {
            writeln!(f, "health        ok")
        } else {
            for p in problems {
                writeln!(f, "problem       {p}")?;
            }
            Ok(())
        }
    }
}
