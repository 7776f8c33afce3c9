//! Leases on a JetStream KV key: one holder at a time, kept by renewing, taken over when
//! the holder stops renewing, without trusting any clock but the contender's own.
//!
//! The key's value is the holder's name; every renewal is a compare-and-set on the
//! revision of the holder's last write, so the revision moves while the holder lives. A
//! contender that finds the key held by another name watches it: if the revision has not
//! moved for the lease's time to live, the holder is taken as dead and the contender
//! takes the key by compare-and-set on the revision it saw (two contenders: one wins).
//! The holder that finds its renewal refused (someone took the key) or cannot renew for
//! the time to live (cut off from NATS) has lost the lease, and is told so through
//! [`Lease::lost`]: it must stop acting as the holder (fail closed).
//!
//! A name that finds the key held by itself (a restart of the same node) takes it at once.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

/// Why a lease could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// Another holder is alive: it renewed within the time to live.
    #[error("lease {name} is held by {by}, which renewed it within the last {ttl_secs} s")]
    Held {
        name: String,
        by: String,
        ttl_secs: u64,
    },
    /// NATS could not be asked.
    #[error("lease {name}: {reason}")]
    Nats { name: String, reason: String },
}

/// A lease held: renewed in the background until released, dropped or lost.
pub struct Lease {
    name: String,
    lost: watch::Receiver<Option<String>>,
    renewer: tokio::task::JoinHandle<()>,
    kv: kv::Store,
    rev: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("name", &self.name).finish()
    }
}

impl Lease {
    /// Takes lease `name` (a KV key) for `owner`. Waits up to `ttl` (plus a little)
    /// when another holder might be dead; fails with [`LeaseError::Held`] when it is not.
    pub async fn acquire(
        kv: kv::Store,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Lease, LeaseError> {
        let nats = |e: &dyn std::fmt::Display| LeaseError::Nats {
            name: name.to_owned(),
            reason: e.to_string(),
        };
        let value = Bytes::copy_from_slice(owner.as_bytes());
        let mut watched: Option<(u64, Instant)> = None;
        loop {
            let entry = kv.entry(name).await.map_err(|e| nats(&e))?;
            let taken = match entry {
                None => kv
                    .create(name, value.clone())
                    .await
                    .map_err(|e| e.to_string()),
                Some(e) if e.operation != kv::Operation::Put || e.value == value => kv
                    .update(name, value.clone(), e.revision)
                    .await
                    .map_err(|e| e.to_string()),
                Some(e) => {
                    let by = String::from_utf8_lossy(&e.value).into_owned();
                    match watched {
                        Some((rev, since)) if rev == e.revision => {
                            if since.elapsed() >= ttl {
                                // Not renewed for a whole time to live: the holder is gone.
                                tracing::warn!(lease = name, holder = %by, "lease not renewed for {} ms; taking it over", ttl.as_millis());
                                kv.update(name, value.clone(), e.revision)
                                    .await
                                    .map_err(|e| e.to_string())
                            } else {
                                tokio::time::sleep(ttl / 10).await;
                                continue;
                            }
                        }
                        Some(_) => {
                            return Err(LeaseError::Held {
                                name: name.to_owned(),
                                by,
                                ttl_secs: ttl.as_secs().max(1),
                            })
                        }
                        None => {
                            watched = Some((e.revision, Instant::now()));
                            tokio::time::sleep(ttl / 10).await;
                            continue;
                        }
                    }
                }
            };
            match taken {
                Ok(rev) => return Ok(Lease::hold(kv, name, value, rev, ttl)),
                // Someone wrote the key in between: look again.
                Err(_) => {
                    watched = None;
                    tokio::time::sleep(ttl / 20).await;
                }
            }
        }
    }

    fn hold(kv: kv::Store, name: &str, value: Bytes, rev: u64, ttl: Duration) -> Lease {
        let (tx, lost) = watch::channel(None);
        let rev = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rev));
        let task_kv = kv.clone();
        let task_rev = rev.clone();
        let key = name.to_owned();
        metrics::counter!("fleetcore_lease_changes_total", "lease" => key.clone(), "change" => "acquired").increment(1);
        let renewer = tokio::spawn(async move {
            let mut last_ok = Instant::now();
            loop {
                tokio::time::sleep(ttl / 3).await;
                let current = task_rev.load(std::sync::atomic::Ordering::Acquire);
                let sent = Instant::now();
                let attempt =
                    tokio::time::timeout(ttl / 3, task_kv.update(&key, value.clone(), current))
                        .await;
                let why = match attempt {
                    Ok(Ok(new)) => {
                        // One compare-and-set on a KV key, stored and acknowledged: the
                        // JetStream round trip this node sees, every ttl/3.
                        metrics::histogram!("fleetcore_jetstream_rtt_seconds")
                            .record(sent.elapsed().as_secs_f64());
                        task_rev.store(new, std::sync::atomic::Ordering::Release);
                        last_ok = Instant::now();
                        continue;
                    }
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        format!("lease {key} was taken by another holder")
                    }
                    Ok(Err(e)) if last_ok.elapsed() >= ttl => {
                        format!(
                            "lease {key} could not be renewed for {} ms: {e}",
                            ttl.as_millis()
                        )
                    }
                    Err(_) if last_ok.elapsed() >= ttl => {
                        format!(
                            "lease {key} could not be renewed for {} ms: no answer",
                            ttl.as_millis()
                        )
                    }
                    // Not renewed this time; still within the time to live.
                    _ => continue,
                };
                metrics::counter!("fleetcore_lease_changes_total", "lease" => key.clone(), "change" => "lost").increment(1);
                tracing::error!(lease = %key, "{why}");
                let _ = tx.send(Some(why));
                return;
            }
        });
        Lease {
            name: name.to_owned(),
            lost,
            renewer,
            kv,
            rev,
        }
    }

    /// Changes to `Some(why)` once the lease is lost.
    pub fn lost(&self) -> watch::Receiver<Option<String>> {
        self.lost.clone()
    }

    /// Stops renewing and gives the lease up, so the next holder need not wait.
    pub async fn release(self) {
        self.renewer.abort();
        let rev = self.rev.load(std::sync::atomic::Ordering::Acquire);
        if self.lost.borrow().is_none() {
            let _ = self.kv.delete_expect_revision(&self.name, Some(rev)).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Dropped without release (a crash is the same): it expires after its time to live.
        self.renewer.abort();
    }
}
