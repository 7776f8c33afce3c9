//! What a run measures: the broker process (RSS, CPU time from /proc), the connections
//! (attempts, failures by kind, connect latency), and the messages (per-sequence delivery
//! counts for loss and duplicates, latency histograms). Counters are atomics so device
//! tasks never wait on each other.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};

use crate::net::FailKind;
use crate::payload;

/// One look at a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub rss_kib: u64,
    /// utime + stime, seconds.
    pub cpu_s: f64,
}

/// Reads /proc/<pid>/status (VmRSS) and /proc/<pid>/stat (utime, stime).
pub fn sample_pid(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(ProcSample {
        rss_kib,
        cpu_s: cpu_from_stat(&stat)?,
    })
}

/// utime + stime (fields 14 and 15) in seconds; the command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
pub fn cpu_from_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // rest starts at field 3 (state); utime is field 14 -> index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) as f64 / tck)
}

/// The broker (when `--broker-pid` is given; the PID may change across a restart) and this
/// process, sampled on demand and every 500 ms for peaks.
pub struct Probe {
    pub broker_pid: AtomicU32,
    pub peak_rss_kib: AtomicU64,
}

impl Probe {
    pub fn new(pid: Option<u32>) -> Arc<Probe> {
        let probe = Arc::new(Probe {
            broker_pid: AtomicU32::new(pid.unwrap_or(0)),
            peak_rss_kib: AtomicU64::new(0),
        });
        let p = probe.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
            loop {
                tick.tick().await;
                if let Some(s) = p.broker() {
                    p.peak_rss_kib.fetch_max(s.rss_kib, Relaxed);
                }
            }
        });
        probe
    }

    pub fn broker(&self) -> Option<ProcSample> {
        match self.broker_pid.load(Relaxed) {
            0 => None,
            pid => sample_pid(pid),
        }
    }

    pub fn me(&self) -> Option<ProcSample> {
        sample_pid(std::process::id())
    }
}

/// Broker and generator CPU between two points, for "CPU per message" and "CPU %".
#[derive(Clone, Copy)]
pub struct Window {
    broker: Option<ProcSample>,
    me: Option<ProcSample>,
    start_ns: u64,
}

impl Window {
    pub fn start(probe: &Probe) -> Window {
        Window {
            broker: probe.broker(),
            me: probe.me(),
            start_ns: payload::now_ns(),
        }
    }

    /// (wall seconds, broker CPU seconds, generator CPU seconds).
    pub fn end(&self, probe: &Probe) -> (f64, Option<f64>, Option<f64>) {
        let wall = (payload::now_ns() - self.start_ns) as f64 / 1e9;
        let b = match (self.broker, probe.broker()) {
            (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
            _ => None,
        };
        let m = match (self.me, probe.me()) {
            (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
            _ => None,
        };
        (wall, b, m)
    }
}

pub fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

/// Latency percentiles in milliseconds, as a JSON object.
pub fn hist_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0});
    }
    let ms = |v: u64| (v as f64 / 1000.0 * 1000.0).round() / 1000.0;
    json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.50)),
        "p90_ms": ms(h.value_at_quantile(0.90)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
        "mean_ms": ((h.mean() / 1000.0) * 1000.0).round() / 1000.0,
    })
}

/// Connection attempts and their outcome.
#[derive(Default)]
pub struct Conns {
    pub attempted: AtomicU64,
    /// CONNACK accepted.
    pub connected: AtomicU64,
    /// SUBACK granted (or connected, when nothing is subscribed).
    pub ready: AtomicU64,
    pub session_present: AtomicU64,
    /// Connected over TLS with a resumed session (a ticket) / a full handshake.
    pub tls_resumed: AtomicU64,
    pub tls_full: AtomicU64,
    pub fail_tcp: AtomicU64,
    pub fail_tls: AtomicU64,
    pub fail_ws: AtomicU64,
    pub fail_refused: AtomicU64,
    pub fail_protocol: AtomicU64,
    pub fail_timeout: AtomicU64,
    /// Connections that ended while they should have been held.
    pub dropped: AtomicU64,
    pub first_attempt_ns: AtomicU64,
    pub last_ready_ns: AtomicU64,
    /// TCP connect to SUBACK (or CONNACK), microseconds.
    pub latency: Mutex<Option<Histogram<u64>>>,
    pub first_error: Mutex<Option<String>>,
}

impl Conns {
    pub fn new() -> Arc<Conns> {
        let c = Conns::default();
        *c.latency.lock() = Some(new_hist());
        Arc::new(c)
    }

    pub fn attempt(&self) -> u64 {
        let now = payload::now_ns();
        let _ = self
            .first_attempt_ns
            .compare_exchange(0, now, Relaxed, Relaxed);
        self.attempted.fetch_add(1, Relaxed);
        now
    }

    pub fn ready(&self, started_ns: u64) {
        let now = payload::now_ns();
        self.ready.fetch_add(1, Relaxed);
        self.last_ready_ns.fetch_max(now, Relaxed);
        if let Some(h) = self.latency.lock().as_mut() {
            let _ = h.record(((now - started_ns) / 1000).max(1));
        }
    }

    pub fn fail(&self, kind: FailKind, detail: &str) {
        let c = match kind {
            FailKind::Tcp => &self.fail_tcp,
            FailKind::Tls => &self.fail_tls,
            FailKind::WebSocket => &self.fail_ws,
            FailKind::Refused => &self.fail_refused,
            FailKind::Protocol => &self.fail_protocol,
            FailKind::Timeout => &self.fail_timeout,
        };
        c.fetch_add(1, Relaxed);
        let mut first = self.first_error.lock();
        if first.is_none() {
            *first = Some(format!("{kind:?}: {detail}"));
        }
    }

    pub fn failed(&self) -> u64 {
        [
            &self.fail_tcp,
            &self.fail_tls,
            &self.fail_ws,
            &self.fail_refused,
            &self.fail_protocol,
            &self.fail_timeout,
        ]
        .iter()
        .map(|c| c.load(Relaxed))
        .sum()
    }

    /// Ready connections per second, from the first attempt to the last ready one.
    pub fn rate(&self) -> f64 {
        let (a, b) = (
            self.first_attempt_ns.load(Relaxed),
            self.last_ready_ns.load(Relaxed),
        );
        if b <= a {
            return 0.0;
        }
        self.ready.load(Relaxed) as f64 / ((b - a) as f64 / 1e9)
    }

    pub fn seconds(&self) -> f64 {
        let (a, b) = (
            self.first_attempt_ns.load(Relaxed),
            self.last_ready_ns.load(Relaxed),
        );
        b.saturating_sub(a) as f64 / 1e9
    }

    pub fn json(&self) -> Value {
        let l = |c: &AtomicU64| c.load(Relaxed);
        json!({
            "attempted": l(&self.attempted),
            "connected": l(&self.connected),
            "ready": l(&self.ready),
            "session_present": l(&self.session_present),
            "tls_handshakes": {
                "full": l(&self.tls_full),
                "resumed": l(&self.tls_resumed),
            },
            "seconds": round3(self.seconds()),
            "rate_per_s": round1(self.rate()),
            "failed": {
                "tcp": l(&self.fail_tcp),
                "tls_handshake": l(&self.fail_tls),
                "websocket": l(&self.fail_ws),
                "refused": l(&self.fail_refused),
                "protocol": l(&self.fail_protocol),
                "timeout": l(&self.fail_timeout),
            },
            "dropped_while_held": l(&self.dropped),
            "first_error": self.first_error.lock().clone(),
            "latency": self.latency.lock().as_ref().map(hist_json),
        })
    }
}

/// Messages received, by sequence number: a count per sequence (saturating at 255) finds
/// losses and duplicates; latency per QoS.
pub struct Sink {
    counts: Vec<AtomicU8>,
    /// Per sequence: 0 = not sent, 1 + QoS once sent.
    sent: Vec<AtomicU8>,
    pub delivered: AtomicU64,
    pub distinct: AtomicU64,
    pub duplicates: AtomicU64,
    /// Payloads not from this run, or out of range.
    pub foreign: AtomicU64,
    pub last_new_ns: AtomicU64,
    hist: [Mutex<Histogram<u64>>; 2],
}

impl Sink {
    /// Room for sequence numbers `0..capacity`.
    pub fn new(capacity: usize) -> Arc<Sink> {
        Arc::new(Sink {
            counts: (0..capacity).map(|_| AtomicU8::new(0)).collect(),
            sent: (0..capacity).map(|_| AtomicU8::new(0)).collect(),
            delivered: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            last_new_ns: AtomicU64::new(0),
            hist: [Mutex::new(new_hist()), Mutex::new(new_hist())],
        })
    }

    pub fn capacity(&self) -> usize {
        self.counts.len()
    }

    /// Records one received payload; `expect_device` checks it reached the right device.
    pub fn record(&self, payload: &[u8], qos: u8, expect_device: Option<u32>) {
        let now = payload::now_ns();
        let Some(stamp) = payload::read(payload) else {
            self.foreign.fetch_add(1, Relaxed);
            return;
        };
        let Some(slot) = self.counts.get(stamp.seq as usize) else {
            self.foreign.fetch_add(1, Relaxed);
            return;
        };
        if expect_device.is_some_and(|d| d != stamp.device) {
            self.foreign.fetch_add(1, Relaxed);
            return;
        }
        self.delivered.fetch_add(1, Relaxed);
        let prev = slot
            .fetch_update(Relaxed, Relaxed, |c| Some(c.saturating_add(1)))
            .unwrap_or(255);
        if prev == 0 {
            self.distinct.fetch_add(1, Relaxed);
            self.last_new_ns.fetch_max(now, Relaxed);
        } else {
            self.duplicates.fetch_add(1, Relaxed);
        }
        let us = (now.saturating_sub(stamp.sent_ns) / 1000).max(1);
        let _ = self.hist[usize::from(qos.min(1))].lock().record(us);
    }

    /// Notes that `seq` was sent at `qos`.
    pub fn mark_sent(&self, seq: u64, qos: u8) {
        if let Some(s) = self.sent.get(seq as usize) {
            s.store(qos + 1, Relaxed);
        }
    }

    /// How many were sent at `qos`.
    pub fn sent(&self, qos: u8) -> u64 {
        self.sent
            .iter()
            .filter(|s| s.load(Relaxed) == qos + 1)
            .count() as u64
    }

    /// Sent at `qos` and never received.
    pub fn lost(&self, qos: u8) -> u64 {
        self.sent
            .iter()
            .zip(&self.counts)
            .filter(|(s, c)| s.load(Relaxed) == qos + 1 && c.load(Relaxed) == 0)
            .count() as u64
    }

    pub fn hist(&self, qos: u8) -> Histogram<u64> {
        self.hist[usize::from(qos.min(1))].lock().clone()
    }

    pub fn hist_all(&self) -> Histogram<u64> {
        let mut h = self.hist(0);
        let _ = h.add(self.hist(1));
        h
    }
}

pub fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A run's result: parameters and results as JSON, printed as JSON or as text.
pub struct Report {
    pub scenario: &'static str,
    pub params: Map<String, Value>,
    pub results: Map<String, Value>,
    /// Human lines, in order.
    pub lines: Vec<String>,
}

impl Report {
    pub fn new(scenario: &'static str) -> Report {
        Report {
            scenario,
            params: Map::new(),
            results: Map::new(),
            lines: Vec::new(),
        }
    }

    pub fn param(&mut self, k: &str, v: impl Into<Value>) {
        self.params.insert(k.into(), v.into());
    }

    pub fn set(&mut self, k: &str, v: impl Into<Value>) {
        self.results.insert(k.into(), v.into());
    }

    pub fn line(&mut self, s: impl Into<String>) {
        self.lines.push(s.into());
    }

    pub fn json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "params": self.params,
            "results": self.results,
        })
    }

    pub fn human(&self) -> String {
        let mut out = format!("== {} ==\n", self.scenario);
        for (k, v) in &self.params {
            out.push_str(&format!("  {k} = {v}\n"));
        }
        out.push_str("--\n");
        for l in &self.lines {
            out.push_str(&format!("  {l}\n"));
        }
        out
    }
}

/// "1.23 ms" for a histogram quantile in µs.
pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

/// A one-line summary of latency percentiles.
pub fn lat_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {}  p99 {}  p99.9 {}  max {}  (n={})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_command_name() {
        // pid (comm with ") (" inside) state ppid ... utime=1500 stime=500
        let stat = "42 (tokio ) (x) S 1 42 42 0 -1 4194560 100 0 0 0 1500 500 0 0 20 0 9 0 100 0 0";
        let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(cpu_from_stat(stat), Some(2000.0 / tck));
        assert!(sample_pid(std::process::id()).is_some_and(|s| s.rss_kib > 0));
    }

    #[test]
    fn sink_counts_losses_duplicates_and_strays() {
        let sink = Sink::new(10);
        let mut p = Vec::new();
        for seq in 0..5 {
            sink.mark_sent(seq, (seq % 2) as u8);
        }
        for seq in [0u64, 1, 1, 3, 42] {
            p.clear();
            payload::write(
                &mut p,
                payload::Stamp {
                    seq,
                    device: 7,
                    sent_ns: payload::now_ns(),
                },
                32,
            );
            sink.record(&p, 1, Some(7));
        }
        sink.record(b"not ours", 0, None);
        assert_eq!(sink.distinct.load(Relaxed), 3);
        assert_eq!(sink.duplicates.load(Relaxed), 1);
        assert_eq!(sink.foreign.load(Relaxed), 2);
        assert_eq!(sink.lost(0), 2); // 2 and 4, both sent at QoS 0
        assert_eq!(sink.lost(1), 0);
        assert_eq!((sink.sent(0), sink.sent(1)), (3, 2));
        assert_eq!(sink.hist(1).len(), 4);
    }
}
