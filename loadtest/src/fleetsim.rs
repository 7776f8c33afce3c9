//! The moving parts every scenario is made of: a device task (connect, subscribe, hold,
//! receive and acknowledge, optionally publish), the paced fleet connector, the backend
//! publisher, and waiting with progress bars.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::fleet::{self, Fleet};
use crate::mqtt::{self, Packet};
use crate::net::{BrokerUrl, Fail, FailKind, Mqtt, Stream, TlsBase};
use crate::payload::{self, Stamp};
use crate::stats::{Conns, Probe, Sink};

/// Everything a connection needs, shared by all tasks.
pub struct Ctx {
    pub url: BrokerUrl,
    pub addr: SocketAddr,
    pub backend_url: BrokerUrl,
    pub backend_addr: SocketAddr,
    pub tls: Option<TlsBase>,
    pub backend_tls: Option<TlsBase>,
    pub alpn: Option<Vec<u8>>,
    pub fleet: Option<Fleet>,
    /// Device `i`'s TLS client configuration, built before any measured phase.
    pub device_tls: Vec<Arc<rustls::ClientConfig>>,
    pub version: u8,
    pub accounts: usize,
    pub keep_alive: u16,
    pub connect_timeout: Duration,
    pub sources: Vec<IpAddr>,
    pub probe: Arc<Probe>,
    pub bars: MultiProgress,
    /// Every wait ends here at the latest.
    pub deadline: Instant,
}

impl Ctx {
    pub fn source(&self, i: usize) -> Option<IpAddr> {
        if self.sources.is_empty() {
            None
        } else {
            Some(self.sources[i % self.sources.len()])
        }
    }

    /// Opens a connection for `name` and sends CONNECT; returns it once CONNACK accepts.
    pub async fn open(
        &self,
        backend: bool,
        source: Option<IpAddr>,
        name: &str,
        clean: bool,
        session_expiry: u32,
    ) -> Result<(Mqtt, bool), Fail> {
        let (url, addr, tls) = if backend {
            (&self.backend_url, self.backend_addr, &self.backend_tls)
        } else {
            (&self.url, self.addr, &self.tls)
        };
        let device = (!backend)
            .then(|| name.strip_prefix("dev")?.parse::<usize>().ok())
            .flatten();
        let tls = match tls {
            Some(base) if device.is_some_and(|i| i < self.device_tls.len()) => {
                Some((base, self.device_tls[device.unwrap()].clone()))
            }
            Some(base) => {
                let identity = match &self.fleet {
                    Some(f) => Some(f.load(name).map_err(|e| Fail::new(FailKind::Tls, e))?),
                    None => None,
                };
                let cfg = base
                    .client_config(identity, self.alpn.as_deref(), false)
                    .map_err(|e| Fail::new(FailKind::Tls, e))?;
                Some((base, cfg))
            }
            None => None,
        };
        let stream = Stream::open(url, addr, source, tls).await?;
        let mut m = Mqtt::new(stream, self.version);
        mqtt::connect(
            &mut m.wbuf,
            &mqtt::Connect {
                version: self.version,
                client_id: name,
                clean,
                keep_alive: self.keep_alive,
                session_expiry,
            },
        );
        m.flush()
            .await
            .map_err(|e| Fail::new(FailKind::Protocol, format!("sending CONNECT: {e}")))?;
        match m.recv().await {
            Ok(Packet::ConnAck {
                code: 0,
                session_present,
            }) => Ok((m, session_present)),
            Ok(Packet::ConnAck { code, .. }) => Err(Fail::new(
                FailKind::Refused,
                format!("CONNACK code 0x{code:02x}"),
            )),
            Ok(other) => Err(Fail::new(
                FailKind::Protocol,
                format!("expected CONNACK, got {other:?}"),
            )),
            Err(e) => Err(Fail::new(
                FailKind::Protocol,
                format!("waiting for CONNACK: {e}"),
            )),
        }
    }

    /// The backend connection (client id [`fleet::BACKEND`], clean session).
    pub async fn backend(&self) -> Result<Mqtt, Fail> {
        let (m, _) = tokio::time::timeout(
            self.connect_timeout,
            self.open(true, None, fleet::BACKEND, true, 0),
        )
        .await
        .map_err(|_| Fail::new(FailKind::Timeout, "backend connect"))??;
        Ok(m)
    }

    pub fn bar(&self, len: u64, what: &str) -> ProgressBar {
        let bar = self.bars.add(ProgressBar::new(len));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} {msg}",
            )
            .expect("template"),
        );
        bar.set_prefix(what.to_owned());
        bar
    }
}

pub fn multi_progress(enabled: bool) -> MultiProgress {
    if enabled {
        MultiProgress::new()
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    }
}

/// Telemetry a device publishes once the `go` signal gives the window.
pub struct PubPlan {
    pub interval: Duration,
    /// QoS by device index.
    pub qos_of: fn(usize) -> u8,
    pub size: usize,
    pub seq: Arc<AtomicU64>,
    pub sink: Arc<Sink>,
    pub subject: &'static str,
    pub skipped: AtomicU64,
    pub go: watch::Receiver<Option<(Instant, Instant)>>,
}

/// What each device of a phase does.
pub struct Plan {
    pub clean: bool,
    pub session_expiry: u32,
    /// Subscribe to `account/device/#` at this QoS.
    pub subscribe: Option<u8>,
    /// Disconnect right after being ready instead of holding the connection.
    pub leave: bool,
    /// Record received messages here (checking they are for this device).
    pub sink: Option<Arc<Sink>>,
    pub publish: Option<PubPlan>,
}

/// Handles one received packet: records publishes and queues their PUBACK.
fn on_packet(m: &mut Mqtt, p: Packet, sink: Option<&Sink>, i: usize) -> Option<()> {
    match p {
        Packet::Publish(p) => {
            if let Some(s) = sink {
                s.record(&p.payload, p.qos, Some(i as u32));
            }
            if p.qos == 1 {
                mqtt::puback(&mut m.wbuf, p.pkid);
            }
            Some(())
        }
        Packet::Disconnect { .. } => None,
        _ => Some(()),
    }
}

/// One device: connect, subscribe, then hold (receiving, acknowledging, pinging,
/// publishing) until `stop`.
pub async fn device(
    ctx: Arc<Ctx>,
    i: usize,
    plan: Arc<Plan>,
    conns: Arc<Conns>,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let started = conns.attempt();
    let name = fleet::device_name(i);
    let sink = plan.sink.as_deref();
    let setup = async {
        let (mut m, session_present) = ctx
            .open(false, ctx.source(i), &name, plan.clean, plan.session_expiry)
            .await?;
        conns.connected.fetch_add(1, Relaxed);
        match m.stream.tls_resumed() {
            Some(true) => conns.tls_resumed.fetch_add(1, Relaxed),
            Some(false) => conns.tls_full.fetch_add(1, Relaxed),
            None => 0,
        };
        if session_present {
            conns.session_present.fetch_add(1, Relaxed);
        }
        if let Some(qos) = plan.subscribe {
            let filter = format!("{}/{name}/#", fleet::account(i, ctx.accounts));
            mqtt::subscribe(&mut m.wbuf, ctx.version, 1, &filter, qos);
            m.flush()
                .await
                .map_err(|e| Fail::new(FailKind::Protocol, e))?;
            loop {
                match m.recv().await {
                    Ok(Packet::SubAck { code, .. }) if mqtt::suback_ok(code) => break,
                    Ok(Packet::SubAck { code, .. }) => {
                        return Err(Fail::new(
                            FailKind::Refused,
                            format!("SUBACK 0x{code:02x} for {filter}"),
                        ))
                    }
                    // Queued messages may come before the SUBACK.
                    Ok(p) => {
                        if on_packet(&mut m, p, sink, i).is_none() {
                            return Err(Fail::new(FailKind::Protocol, "DISCONNECT before SUBACK"));
                        }
                    }
                    Err(e) => {
                        return Err(Fail::new(
                            FailKind::Protocol,
                            format!("waiting for SUBACK: {e}"),
                        ))
                    }
                }
            }
            m.flush()
                .await
                .map_err(|e| Fail::new(FailKind::Protocol, e))?;
        }
        Ok::<Mqtt, Fail>(m)
    };
    let mut m = match tokio::time::timeout(ctx.connect_timeout, setup).await {
        Ok(Ok(m)) => m,
        Ok(Err(f)) => {
            conns.fail(f.kind, &f.detail);
            return;
        }
        Err(_) => {
            conns.fail(FailKind::Timeout, "connect + subscribe timed out");
            return;
        }
    };
    conns.ready(started);
    drop(permit);
    if plan.leave {
        m.close().await;
        return;
    }

    let far = Instant::now() + Duration::from_secs(365 * 86_400);
    let ping_every = if ctx.keep_alive > 0 {
        Duration::from_millis(u64::from(ctx.keep_alive) * 500)
    } else {
        Duration::from_secs(365 * 86_400)
    };
    let mut next_ping = Instant::now() + ping_every;
    let topic = plan
        .publish
        .as_ref()
        .map(|p| fleet::topic(i, ctx.accounts, p.subject));
    let mut go = plan.publish.as_ref().map(|p| p.go.clone());
    let mut window: Option<(Instant, Instant)> = go.as_ref().and_then(|g| *g.borrow());
    let mut next_pub = far;
    let mut unacked = 0u32;
    let mut pkid = 0u16;
    let mut pbuf = Vec::new();
    let spread = |p: &PubPlan| {
        // Golden-ratio phase so the fleet's publishes are spread over the interval.
        let frac = (i as f64 * 0.618_033_988_75).fract();
        p.interval.mul_f64(frac)
    };
    if let (Some((start, _)), Some(p)) = (window, &plan.publish) {
        next_pub = start + spread(p);
    }
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = m.recv() => match r {
                Ok(Packet::PubAck { .. }) => unacked = unacked.saturating_sub(1),
                Ok(p) => {
                    if on_packet(&mut m, p, sink, i).is_none() {
                        conns.dropped.fetch_add(1, Relaxed);
                        return;
                    }
                }
                Err(_) => {
                    conns.dropped.fetch_add(1, Relaxed);
                    return;
                }
            },
            _ = tokio::time::sleep_until(next_ping) => {
                mqtt::pingreq(&mut m.wbuf);
                next_ping += ping_every;
            }
            r = async { go.as_mut().unwrap().changed().await }, if go.is_some() && window.is_none() => {
                if r.is_err() {
                    go = None;
                } else {
                    window = *go.as_ref().unwrap().borrow();
                    if let (Some((start, _)), Some(p)) = (window, &plan.publish) {
                        next_pub = start + spread(p);
                    }
                }
            }
            _ = tokio::time::sleep_until(next_pub), if next_pub < far => {
                let p = plan.publish.as_ref().unwrap();
                let end = window.map(|w| w.1).unwrap_or(far);
                let now = Instant::now();
                if now >= end {
                    next_pub = far;
                } else {
                    next_pub += p.interval;
                    let qos = (p.qos_of)(i);
                    if qos == 1 && unacked >= 32 {
                        p.skipped.fetch_add(1, Relaxed);
                    } else {
                        let seq = p.seq.fetch_add(1, Relaxed);
                        if seq as usize >= p.sink.capacity() {
                            next_pub = far;
                        } else {
                            pbuf.clear();
                            payload::write(&mut pbuf, Stamp { seq, device: i as u32, sent_ns: payload::now_ns() }, p.size);
                            p.sink.mark_sent(seq, qos);
                            if qos == 1 {
                                pkid = pkid.checked_add(1).unwrap_or(1);
                                unacked += 1;
                            }
                            mqtt::publish(&mut m.wbuf, ctx.version, topic.as_deref().unwrap(), qos, pkid, false, &pbuf);
                        }
                    }
                }
            }
        }
        if !m.wbuf.is_empty() {
            if m.flush().await.is_err() {
                conns.dropped.fetch_add(1, Relaxed);
                return;
            }
            next_ping = Instant::now() + ping_every;
        }
    }
    m.close().await;
}

/// Starts devices `ids` at `rate` per second (0 = as fast as `max_pending` allows), with at
/// most `max_pending` connections between TCP connect and ready at once.
#[allow(clippy::too_many_arguments)]
pub async fn connect_fleet(
    ctx: &Arc<Ctx>,
    ids: std::ops::Range<usize>,
    rate: f64,
    max_pending: usize,
    plan: Arc<Plan>,
    conns: Arc<Conns>,
    stop: &watch::Receiver<bool>,
    what: &str,
) -> Vec<JoinHandle<()>> {
    let c2 = conns.clone();
    spawn_paced(ctx, ids, rate, max_pending, &c2, what, |i, permit| {
        tokio::spawn(device(
            ctx.clone(),
            i,
            plan.clone(),
            conns.clone(),
            permit,
            stop.clone(),
        ))
    })
    .await
}

/// The pacing of [`connect_fleet`] for any device task: `spawn(i, permit)` starts device
/// `i`, which drops `permit` once it is ready (or has failed) and records its outcome in
/// `conns`; waits until every started device is ready or failed (or the deadline).
pub async fn spawn_paced(
    ctx: &Arc<Ctx>,
    ids: std::ops::Range<usize>,
    rate: f64,
    max_pending: usize,
    conns: &Conns,
    what: &str,
    mut spawn: impl FnMut(usize, tokio::sync::OwnedSemaphorePermit) -> JoinHandle<()>,
) -> Vec<JoinHandle<()>> {
    let n = ids.len() as u64;
    let bar = ctx.bar(n, what);
    let sem = Arc::new(Semaphore::new(max_pending.max(1)));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(ids.len());
    for (k, i) in ids.enumerate() {
        if Instant::now() >= ctx.deadline {
            break;
        }
        if rate > 0.0 {
            let at = start + Duration::from_secs_f64(k as f64 / rate);
            if at > Instant::now() {
                tokio::time::sleep_until(at).await;
            }
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        handles.push(spawn(i, permit));
        if k % 64 == 0 {
            bar.set_position(conns.ready.load(Relaxed));
        }
    }
    // Wait for the stragglers of this phase.
    wait(ctx, &bar, || {
        let done = conns.ready.load(Relaxed) + conns.failed();
        (conns.ready.load(Relaxed), done >= n)
    })
    .await;
    bar.finish();
    handles
}

/// Polls `f` (progress, done) every 20 ms until done or the run's deadline; false when the
/// deadline came first.
pub async fn wait(ctx: &Ctx, bar: &ProgressBar, mut f: impl FnMut() -> (u64, bool)) -> bool {
    wait_until(ctx.deadline, bar, &mut f).await
}

pub async fn wait_until(
    until: Instant,
    bar: &ProgressBar,
    mut f: impl FnMut() -> (u64, bool),
) -> bool {
    loop {
        let (pos, done) = f();
        bar.set_position(pos);
        if done {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the backend publishes.
pub struct PubJob {
    /// Messages per second (0 = as fast as the in-flight window allows).
    pub rate: f64,
    pub count: u64,
    pub until: Instant,
    pub inflight: u32,
    pub qos: u8,
    pub retain: bool,
    pub size: usize,
    pub subject: &'static str,
    pub accounts: usize,
    /// Devices to address: random in `0..devices`, or `seq % devices` in order.
    pub devices: usize,
    pub random: bool,
    pub sink: Option<Arc<Sink>>,
    /// Empty payloads (clearing retained messages) instead of stamped ones.
    pub empty: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct PubResult {
    pub sent: u64,
    pub acked: u64,
    /// From the first publish to the last one.
    pub publish_seconds: f64,
    /// Until the last acknowledgement (or the drain's end).
    pub seconds: f64,
    /// Sends held back because the in-flight window was full.
    pub window_full: u64,
}

/// Publishes `job` from one connection, paced, with a window of unacknowledged QoS 1
/// messages, then waits (at most `drain`) for the outstanding PUBACKs.
pub async fn publish(
    m: &mut Mqtt,
    job: &PubJob,
    drain: Duration,
    progress: &AtomicU64,
) -> std::io::Result<PubResult> {
    let start = Instant::now();
    let mut res = PubResult::default();
    let mut inflight = 0u32;
    let mut pkid = 0u16;
    let mut rng = (payload::now_ns() | 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut pbuf = Vec::with_capacity(job.size.max(payload::HEADER));
    let version = m.version;
    let on_ack = |p: Packet, inflight: &mut u32, res: &mut PubResult| {
        if let Packet::PubAck { .. } = p {
            *inflight = inflight.saturating_sub(1);
            res.acked += 1;
        }
    };
    while res.sent < job.count && Instant::now() < job.until {
        let due = if job.rate > 0.0 {
            (((Instant::now() - start).as_secs_f64() * job.rate) as u64 + 1).min(job.count)
        } else {
            job.count
        };
        while res.sent < due && (job.qos == 0 || inflight < job.inflight) {
            let seq = res.sent;
            let device = if job.random {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng % job.devices as u64) as usize
            } else {
                (seq % job.devices as u64) as usize
            };
            pbuf.clear();
            if !job.empty {
                payload::write(
                    &mut pbuf,
                    Stamp {
                        seq,
                        device: device as u32,
                        sent_ns: payload::now_ns(),
                    },
                    job.size,
                );
            }
            if let Some(s) = &job.sink {
                s.mark_sent(seq, job.qos);
            }
            if job.qos > 0 {
                pkid = pkid.checked_add(1).unwrap_or(1);
                inflight += 1;
            }
            let topic = fleet::topic(device, job.accounts, job.subject);
            mqtt::publish(
                &mut m.wbuf,
                version,
                &topic,
                job.qos,
                pkid,
                job.retain,
                &pbuf,
            );
            res.sent += 1;
            if m.wbuf.len() > 64 * 1024 {
                break;
            }
        }
        m.flush().await?;
        progress.store(res.sent, Relaxed);
        if res.sent >= job.count {
            break;
        }
        let full = job.qos > 0 && inflight >= job.inflight;
        if full {
            res.window_full += 1;
        }
        let next_send = if job.rate > 0.0 {
            (start + Duration::from_secs_f64(res.sent as f64 / job.rate)).min(job.until)
        } else {
            Instant::now()
        };
        if full || (job.qos > 0 && inflight > 0 && next_send > Instant::now()) {
            let sleep_to = if full { job.until } else { next_send };
            tokio::select! {
                r = m.recv() => {
                    on_ack(r?, &mut inflight, &mut res);
                    while m.has_buffered() {
                        on_ack(m.recv().await?, &mut inflight, &mut res);
                    }
                }
                _ = tokio::time::sleep_until(sleep_to) => {}
            }
        } else if next_send > Instant::now() {
            tokio::time::sleep_until(next_send).await;
        } else {
            tokio::task::yield_now().await;
        }
    }
    res.publish_seconds = (Instant::now() - start).as_secs_f64();
    // The outstanding acknowledgements.
    let until = Instant::now() + drain;
    while inflight > 0 {
        match tokio::time::timeout_at(until, m.recv()).await {
            Ok(r) => on_ack(r?, &mut inflight, &mut res),
            Err(_) => break,
        }
    }
    res.seconds = (Instant::now() - start).as_secs_f64();
    progress.store(res.sent, Relaxed);
    Ok(res)
}

/// Receives on the backend (the telemetry subscriber) until `stop`.
pub async fn receive(mut m: Mqtt, sink: Arc<Sink>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = m.recv() => match r {
                Ok(Packet::Publish(p)) => {
                    sink.record(&p.payload, p.qos, None);
                    if p.qos == 1 {
                        mqtt::puback(&mut m.wbuf, p.pkid);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("backend subscriber: connection ended: {e}");
                    return;
                }
            }
        }
        // Acknowledge in batches: only write when nothing more is already buffered.
        if m.wbuf.len() > 8 * 1024 || !m.has_buffered() {
            if let Err(e) = m.flush().await {
                eprintln!("backend subscriber: write failed: {e}");
                return;
            }
        }
    }
    m.close().await;
}

/// Stops every device task and waits (bounded) for them to close.
pub async fn stop_all(stop: &watch::Sender<bool>, handles: Vec<JoinHandle<()>>) {
    let _ = stop.send(true);
    let all = futures_util::future::join_all(handles);
    let _ = tokio::time::timeout(Duration::from_secs(15), all).await;
}
