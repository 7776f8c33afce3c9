//! Scenario `shadow`: AWS IoT Core Device Shadow updates (fleetcore's shadow service;
//! mosquitto has none). Device `i` (client id and thing `dev<i>`) subscribes to its own
//! `$aws/things/dev<i>/shadow/update/{accepted,rejected,delta}` and publishes
//! reported-state updates (QoS 1, a `clientToken` each, at most `--inflight`
//! unanswered) for a fleet-wide `--msg-rate`. With `--desired-every K` the backend sets
//! a desired value on a random device every K updates; the device adopts it in its next
//! report, as an agent would, so the delta clears.
//!
//! Measured: publish → `update/accepted` latency (matched by `clientToken`), rejections
//! by code, requests never answered, and the versions each device sees on its
//! `update/accepted` topic, which must grow by exactly 1 per accepted update of that
//! shadow (its own and the backend's).

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::fleet;
use crate::fleetsim::{spawn_paced, stop_all, wait_until, Ctx};
use crate::mqtt::{self, Packet};
use crate::net::{Fail, FailKind, Mqtt};
use crate::payload;
use crate::scenarios::{conn_figures, cpu_figures, kib, rss_figures, Common};
use crate::stats::{hist_json, lat_line, new_hist, round1, Conns, Report, Window};

/// The broker's limit of shadow requests in flight per connection (IoT Core's 10):
/// the backend keeps its desired updates under it.
const BACKEND_WINDOW: u32 = 10;

/// Shadow scenario parameters.
pub struct ShadowOpts {
    pub msg_rate: f64,
    pub inflight: u32,
    /// 0 = no desired updates.
    pub desired_every: u64,
    pub max_messages: u64,
}

/// The versions one device sees on its `update/accepted` topic. Every accepted update
/// of its shadow (whoever sent it) is published there, in order, so each must be the
/// previous one plus 1; the first one seen is the baseline (the shadow may predate the
/// run).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VersionTrack {
    last: Option<u64>,
    pub seen: u64,
    /// Versions skipped over (a jump from 4 to 7 counts 2).
    pub gaps: u64,
    /// Versions not above the last one seen (repeated or late).
    pub out_of_order: u64,
}

impl VersionTrack {
    pub fn see(&mut self, v: u64) {
        self.seen += 1;
        match self.last {
            Some(l) if v <= l => self.out_of_order += 1,
            Some(l) => {
                self.gaps += v - l - 1;
                self.last = Some(v);
            }
            None => self.last = Some(v),
        }
    }

    pub fn clean(&self) -> bool {
        self.gaps == 0 && self.out_of_order == 0
    }
}

/// Which answer topic of the device's shadow a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    Accepted,
    Rejected,
    Delta,
}

pub fn answer_kind(topic: &[u8]) -> Option<AnswerKind> {
    if topic.ends_with(b"/update/accepted") {
        Some(AnswerKind::Accepted)
    } else if topic.ends_with(b"/update/rejected") {
        Some(AnswerKind::Rejected)
    } else if topic.ends_with(b"/update/delta") {
        Some(AnswerKind::Delta)
    } else {
        None
    }
}

/// The fields of an answer the scenario reads; everything else is skipped unparsed.
#[derive(Debug, Default, Deserialize)]
pub struct Answer<'a> {
    #[serde(rename = "clientToken", borrow, default)]
    pub client_token: Option<Cow<'a, str>>,
    #[serde(default)]
    pub version: Option<u64>,
    /// `/rejected`: IoT Core's error code.
    #[serde(default)]
    pub code: Option<u16>,
    /// `/delta`: `{"config":{"rev":R}}` once the backend has set one.
    #[serde(default)]
    pub state: Option<DeltaState>,
}

#[derive(Debug, Default, Deserialize)]
pub struct DeltaState {
    #[serde(default)]
    pub config: Option<ConfigRev>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ConfigRev {
    #[serde(default)]
    pub rev: Option<u64>,
}

impl Answer<'_> {
    pub fn delta_rev(&self) -> Option<u64> {
        self.state.as_ref()?.config.as_ref()?.rev
    }
}

/// `dev<i>:<seq>`: the token of device `name`'s request `seq`.
pub fn token(name: &str, seq: u64) -> String {
    format!("{name}:{seq}")
}

/// The request number in `token` if it is one of `name`'s, `None` for anyone else's.
pub fn own_seq(token: &str, name: &str) -> Option<u64> {
    token.strip_prefix(name)?.strip_prefix(':')?.parse().ok()
}

/// A small agent's reported state (about 420 bytes), with the counter `seq` and the
/// configuration revision `rev` it runs, as an update request.
pub fn report_doc(out: &mut Vec<u8>, name: &str, seq: u64, rev: u64, uptime_s: u64) {
    let cpu = (seq * 37 + 11) % 1000;
    let _ = write!(
        out,
        concat!(
            r#"{{"state":{{"reported":{{"#,
            r#""agent":{{"name":"fleet-agent","version":"3.2.1","seq":{seq},"uptime_s":{up}}},"#,
            r#""health":{{"cpu_pct":{c1}.{c2},"mem_mb":{mem},"disk_free_mb":{disk},"load1":{l1}.{l2}}},"#,
            r#""net":{{"online":true,"iface":"eth0","rx_bytes":{rx},"tx_bytes":{tx}}},"#,
            r#""config":{{"interval_s":60,"rev":{rev}}}}}}},"clientToken":"{token}"}}"#
        ),
        seq = seq,
        up = uptime_s,
        c1 = cpu / 10,
        c2 = cpu % 10,
        mem = 180 + seq % 64,
        disk = 40_960 - (seq % 512),
        l1 = (seq % 7) / 2,
        l2 = seq % 10,
        rx = seq * 1_493,
        tx = seq * 611,
        rev = rev,
        token = token(name, seq),
    );
}

/// The backend's desired update: configuration revision `rev`.
pub fn desired_doc(out: &mut Vec<u8>, rev: u64) {
    let _ = write!(
        out,
        r#"{{"state":{{"desired":{{"config":{{"interval_s":60,"rev":{rev}}}}}}},"clientToken":"backend:{rev}"}}"#
    );
}

fn update_topic(name: &str) -> String {
    format!("$aws/things/{name}/shadow/update")
}

/// What the devices and the backend count, shared.
struct Stats {
    /// Updates sent by devices (also the cap on them).
    sent: AtomicU64,
    pubacks: AtomicU64,
    accepted: AtomicU64,
    /// Accepted answers that arrived before the end of --duration.
    accepted_in_window: AtomicU64,
    rejected: AtomicU64,
    rejected_by_code: Mutex<BTreeMap<u16, u64>>,
    /// Ticks at which a device had --inflight requests unanswered and sent nothing.
    skipped: AtomicU64,
    /// Answers with this device's token that match no request waiting for one.
    unmatched: AtomicU64,
    /// Answers to someone else's request (the backend's desired updates).
    others_accepted: AtomicU64,
    others_rejected: AtomicU64,
    malformed: AtomicU64,
    versions_seen: AtomicU64,
    version_gaps: AtomicU64,
    out_of_order: AtomicU64,
    devices_with_gaps: AtomicU64,
    latency: Mutex<Histogram<u64>>,
    deltas: AtomicU64,
    /// Deltas carrying a revision the device had not seen yet.
    deltas_new: AtomicU64,
    delta_latency: Mutex<Histogram<u64>>,
    /// Send time of desired revision `r` at index `r`.
    desired_sent_ns: Vec<AtomicU64>,
    desired_sent: AtomicU64,
    desired_acked: AtomicU64,
}

impl Stats {
    fn new(desired_cap: usize) -> Stats {
        let z = || AtomicU64::new(0);
        Stats {
            sent: z(),
            pubacks: z(),
            accepted: z(),
            accepted_in_window: z(),
            rejected: z(),
            rejected_by_code: Mutex::new(BTreeMap::new()),
            skipped: z(),
            unmatched: z(),
            others_accepted: z(),
            others_rejected: z(),
            malformed: z(),
            versions_seen: z(),
            version_gaps: z(),
            out_of_order: z(),
            devices_with_gaps: z(),
            latency: Mutex::new(new_hist()),
            deltas: z(),
            deltas_new: z(),
            delta_latency: Mutex::new(new_hist()),
            desired_sent_ns: (0..desired_cap).map(|_| z()).collect(),
            desired_sent: z(),
            desired_acked: z(),
        }
    }
}

struct DevicePlan {
    interval: Duration,
    inflight: usize,
    cap: u64,
    go: watch::Receiver<Option<(Instant, Instant)>>,
}

#[allow(clippy::too_many_arguments)]
async fn device(
    ctx: Arc<Ctx>,
    i: usize,
    plan: Arc<DevicePlan>,
    st: Arc<Stats>,
    conns: Arc<Conns>,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let started = conns.attempt();
    let name = fleet::device_name(i);
    let setup = async {
        let (mut m, _) = ctx.open(false, ctx.source(i), &name, true, 0).await?;
        conns.connected.fetch_add(1, Relaxed);
        match m.stream.tls_resumed() {
            Some(true) => conns.tls_resumed.fetch_add(1, Relaxed),
            Some(false) => conns.tls_full.fetch_add(1, Relaxed),
            None => 0,
        };
        let base = format!("$aws/things/{name}/shadow/update");
        for (k, s) in ["accepted", "rejected", "delta"].iter().enumerate() {
            mqtt::subscribe(
                &mut m.wbuf,
                ctx.version,
                k as u16 + 1,
                &format!("{base}/{s}"),
                1,
            );
        }
        m.flush()
            .await
            .map_err(|e| Fail::new(FailKind::Protocol, e))?;
        let mut granted = 0;
        while granted < 3 {
            match m.recv().await {
                Ok(Packet::SubAck { code, .. }) if mqtt::suback_ok(code) => granted += 1,
                Ok(Packet::SubAck { code, pkid }) => {
                    return Err(Fail::new(
                        FailKind::Refused,
                        format!("SUBACK 0x{code:02x} for subscription {pkid} under {base}"),
                    ))
                }
                Ok(Packet::Publish(p)) if p.qos == 1 => mqtt::puback(&mut m.wbuf, p.pkid),
                Ok(_) => {}
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

    let far = Instant::now() + Duration::from_secs(365 * 86_400);
    let ping_every = if ctx.keep_alive > 0 {
        Duration::from_millis(u64::from(ctx.keep_alive) * 500)
    } else {
        Duration::from_secs(365 * 86_400)
    };
    let mut next_ping = Instant::now() + ping_every;
    let topic = update_topic(&name);
    let mut go = plan.go.clone();
    let mut window: Option<(Instant, Instant)> = *go.borrow();
    // Golden-ratio phase so the fleet's updates are spread over the interval.
    let phase = plan.interval.mul_f64((i as f64 * 0.618_033_988_75).fract());
    let mut next_pub = window.map_or(far, |(start, _)| start + phase);
    let mut waiting: VecDeque<(u64, u64)> = VecDeque::new();
    let mut versions = VersionTrack::default();
    let mut seq = 0u64;
    let mut rev = 0u64;
    let mut pkid = 0u16;
    let mut pbuf = Vec::with_capacity(512);
    let born = Instant::now();
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = m.recv() => match r {
                Ok(Packet::Publish(p)) => {
                    if p.qos == 1 {
                        mqtt::puback(&mut m.wbuf, p.pkid);
                    }
                    let end = window.map_or(far, |w| w.1);
                    on_answer(&st, &name, &p.topic, &p.payload, &mut waiting, &mut versions, &mut rev, end);
                }
                Ok(Packet::PubAck { .. }) => {
                    st.pubacks.fetch_add(1, Relaxed);
                }
                Ok(Packet::Disconnect { .. }) | Err(_) => {
                    conns.dropped.fetch_add(1, Relaxed);
                    return;
                }
                Ok(_) => {}
            },
            _ = tokio::time::sleep_until(next_ping) => {
                mqtt::pingreq(&mut m.wbuf);
                next_ping += ping_every;
            }
            r = go.changed(), if window.is_none() => {
                if r.is_err() {
                    break;
                }
                window = *go.borrow();
                if let Some((start, _)) = window {
                    next_pub = start + phase;
                }
            }
            _ = tokio::time::sleep_until(next_pub), if next_pub < far => {
                let end = window.map_or(far, |w| w.1);
                if Instant::now() >= end {
                    next_pub = far;
                } else {
                    next_pub += plan.interval;
                    if waiting.len() >= plan.inflight {
                        st.skipped.fetch_add(1, Relaxed);
                    } else if st.sent.fetch_add(1, Relaxed) >= plan.cap {
                        st.sent.fetch_sub(1, Relaxed);
                        next_pub = far;
                    } else {
                        seq += 1;
                        pbuf.clear();
                        report_doc(&mut pbuf, &name, seq, rev, born.elapsed().as_secs() + 86_400);
                        pkid = pkid.checked_add(1).unwrap_or(1);
                        waiting.push_back((seq, payload::now_ns()));
                        mqtt::publish(&mut m.wbuf, ctx.version, &topic, 1, pkid, false, &pbuf);
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

/// One message on the device's answer topics.
#[allow(clippy::too_many_arguments)]
fn on_answer(
    st: &Stats,
    name: &str,
    topic: &[u8],
    body: &[u8],
    waiting: &mut VecDeque<(u64, u64)>,
    versions: &mut VersionTrack,
    rev: &mut u64,
    window_end: Instant,
) {
    let now = payload::now_ns();
    let Some(kind) = answer_kind(topic) else {
        st.malformed.fetch_add(1, Relaxed);
        return;
    };
    let Ok(a) = serde_json::from_slice::<Answer>(body) else {
        st.malformed.fetch_add(1, Relaxed);
        return;
    };
    let own = a.client_token.as_deref().and_then(|t| own_seq(t, name));
    // The request this answers, if it is one of ours still waiting.
    let mut answered = || {
        let seq = own?;
        let k = waiting.iter().position(|(s, _)| *s == seq)?;
        waiting.remove(k).map(|(_, sent)| sent)
    };
    match kind {
        AnswerKind::Accepted => {
            if let Some(v) = a.version {
                let before = *versions;
                versions.see(v);
                st.versions_seen.fetch_add(1, Relaxed);
                st.version_gaps
                    .fetch_add(versions.gaps - before.gaps, Relaxed);
                st.out_of_order
                    .fetch_add(versions.out_of_order - before.out_of_order, Relaxed);
                if before.clean() && !versions.clean() {
                    st.devices_with_gaps.fetch_add(1, Relaxed);
                }
            } else {
                st.malformed.fetch_add(1, Relaxed);
            }
            match answered() {
                Some(sent) => {
                    st.accepted.fetch_add(1, Relaxed);
                    if Instant::now() < window_end {
                        st.accepted_in_window.fetch_add(1, Relaxed);
                    }
                    let _ = st
                        .latency
                        .lock()
                        .record((now.saturating_sub(sent) / 1000).max(1));
                }
                None if own.is_some() => {
                    st.unmatched.fetch_add(1, Relaxed);
                }
                None => {
                    st.others_accepted.fetch_add(1, Relaxed);
                }
            }
        }
        AnswerKind::Rejected => match answered() {
            Some(_) => {
                st.rejected.fetch_add(1, Relaxed);
                *st.rejected_by_code
                    .lock()
                    .entry(a.code.unwrap_or(0))
                    .or_insert(0) += 1;
            }
            None if own.is_some() => {
                st.unmatched.fetch_add(1, Relaxed);
            }
            None => {
                st.others_rejected.fetch_add(1, Relaxed);
            }
        },
        AnswerKind::Delta => {
            st.deltas.fetch_add(1, Relaxed);
            if let Some(r) = a.delta_rev().filter(|r| *r > *rev) {
                *rev = r;
                st.deltas_new.fetch_add(1, Relaxed);
                if let Some(sent) = st.desired_sent_ns.get(r as usize) {
                    let sent = sent.load(Relaxed);
                    if sent > 0 {
                        let _ = st
                            .delta_latency
                            .lock()
                            .record((now.saturating_sub(sent) / 1000).max(1));
                    }
                }
            }
        }
    }
}

/// The backend: a desired update to a random device every `every` device updates,
/// with at most [`BACKEND_WINDOW`] unacknowledged (its PUBACK comes after the answer).
async fn desired_loop(
    mut m: Mqtt,
    st: Arc<Stats>,
    every: u64,
    devices: usize,
    end: Instant,
    mut stop: watch::Receiver<bool>,
) -> Mqtt {
    let mut inflight = 0u32;
    let mut issued = 0u64;
    let mut pkid = 0u16;
    let mut rng = (payload::now_ns() | 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut pbuf = Vec::with_capacity(128);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = m.recv() => match r {
                Ok(Packet::PubAck { .. }) => {
                    inflight = inflight.saturating_sub(1);
                    st.desired_acked.fetch_add(1, Relaxed);
                }
                Ok(Packet::Publish(p)) if p.qos == 1 => mqtt::puback(&mut m.wbuf, p.pkid),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("backend: connection ended: {e}");
                    return m;
                }
            },
            _ = tick.tick() => {
                let due = st.sent.load(Relaxed) / every;
                while issued < due
                    && inflight < BACKEND_WINDOW
                    && Instant::now() < end
                    && ((issued + 1) as usize) < st.desired_sent_ns.len()
                {
                    issued += 1;
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let d = (rng % devices as u64) as usize;
                    pbuf.clear();
                    desired_doc(&mut pbuf, issued);
                    pkid = pkid.checked_add(1).unwrap_or(1);
                    inflight += 1;
                    st.desired_sent_ns[issued as usize].store(payload::now_ns(), Relaxed);
                    st.desired_sent.fetch_add(1, Relaxed);
                    let topic = update_topic(&fleet::device_name(d));
                    mqtt::publish(&mut m.wbuf, m.version, &topic, 1, pkid, false, &pbuf);
                }
            }
        }
        if let Err(e) = m.flush().await {
            eprintln!("backend: write failed: {e}");
            return m;
        }
    }
    m
}

/// Scenario `shadow`.
pub async fn shadow(ctx: Arc<Ctx>, c: &Common, o: &ShadowOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("shadow");
    let n = c.devices.max(1);
    if o.msg_rate <= 0.0 {
        anyhow::bail!("--msg-rate must be above 0");
    }
    let cap = ((o.msg_rate * c.duration.as_secs_f64() * 1.05).ceil() as u64 + n as u64)
        .min(o.max_messages)
        .max(1);
    r.param("target_rate_per_s", o.msg_rate);
    r.param("inflight_per_device", o.inflight);
    r.param("desired_every", o.desired_every);
    r.param("updates_cap", cap);
    let desired_cap = cap.checked_div(o.desired_every).map_or(0, |k| k + 2);
    let st = Arc::new(Stats::new(desired_cap as usize));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (go_tx, go_rx) = watch::channel(None);
    let plan = Arc::new(DevicePlan {
        interval: Duration::from_secs_f64(n as f64 / o.msg_rate),
        inflight: o.inflight.max(1) as usize,
        cap,
        go: go_rx,
    });
    let backend = if o.desired_every > 0 {
        Some(
            ctx.backend()
                .await
                .map_err(|f| anyhow::anyhow!("backend: {f:?}"))?,
        )
    } else {
        None
    };
    let conns = Conns::new();
    let before = ctx.probe.broker();
    let handles = spawn_paced(
        &ctx,
        0..n,
        c.rate,
        c.max_pending,
        &conns,
        "connect",
        |i, permit| {
            tokio::spawn(device(
                ctx.clone(),
                i,
                plan.clone(),
                st.clone(),
                conns.clone(),
                permit,
                stop_rx.clone(),
            ))
        },
    )
    .await;
    conn_figures(&mut r, "connections", &conns);
    let after = ctx.probe.broker();
    rss_figures(
        &mut r,
        before,
        after,
        conns.ready.load(Relaxed) + u64::from(backend.is_some()),
        ctx.probe.peak_rss_kib.load(Relaxed),
    );
    let win = Window::start(&ctx.probe);
    let start = Instant::now() + Duration::from_millis(100);
    let end = (start + c.duration).min(ctx.deadline);
    let backend_task: Option<JoinHandle<Mqtt>> = backend.map(|m| {
        tokio::spawn(desired_loop(
            m,
            st.clone(),
            o.desired_every,
            n,
            end,
            stop_rx.clone(),
        ))
    });
    let _ = go_tx.send(Some((start, end)));
    let bar = ctx.bar(cap, "accepted");
    wait_until(end, &bar, || (st.accepted.load(Relaxed), false)).await;
    // Drain: until every update sent has its answer, or --drain.
    let drain_until = (Instant::now() + c.drain).min(ctx.deadline);
    wait_until(drain_until, &bar, || {
        let answered = st.accepted.load(Relaxed) + st.rejected.load(Relaxed);
        (st.accepted.load(Relaxed), answered >= st.sent.load(Relaxed))
    })
    .await;
    bar.finish();
    let (wall, bcpu, mcpu) = win.end(&ctx.probe);
    let l = |a: &AtomicU64| a.load(Relaxed);
    let window = end.saturating_duration_since(start).as_secs_f64().max(1e-9);
    let (sent, accepted, rejected) = (l(&st.sent), l(&st.accepted), l(&st.rejected));
    let lost = sent.saturating_sub(accepted + rejected);
    let achieved = l(&st.accepted_in_window) as f64 / window;
    let sustained = achieved >= 0.95 * o.msg_rate && lost == 0;
    let codes = st.rejected_by_code.lock().clone();
    let codes_json: serde_json::Map<String, serde_json::Value> = codes
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let codes_text = if codes.is_empty() {
        "none".to_string()
    } else {
        codes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let h = st.latency.lock().clone();
    r.set("sent", sent);
    r.set("pubacks", l(&st.pubacks));
    r.set("accepted", accepted);
    r.set("accepted_in_window", l(&st.accepted_in_window));
    r.set("rejected", rejected);
    r.set("rejected_by_code", serde_json::Value::Object(codes_json));
    r.set("lost", lost);
    r.set("unmatched_answers", l(&st.unmatched));
    r.set("malformed_answers", l(&st.malformed));
    r.set("skipped_inflight_full", l(&st.skipped));
    r.set("target_rate_per_s", o.msg_rate);
    r.set("sent_rate_per_s", round1(sent as f64 / window));
    r.set("achieved_rate_per_s", round1(achieved));
    r.set("rate_sustained", sustained);
    r.set("latency", hist_json(&h));
    r.set(
        "versions",
        json!({
            "seen": l(&st.versions_seen),
            "gaps": l(&st.version_gaps),
            "out_of_order": l(&st.out_of_order),
            "devices_with_gaps_or_out_of_order": l(&st.devices_with_gaps),
        }),
    );
    r.line(format!(
        "shadow updates    sent {sent} ({:.0}/s) accepted {accepted} rejected {rejected} lost {lost}; accepted {achieved:.0}/s of {:.0}/s target{}",
        sent as f64 / window,
        o.msg_rate,
        if sustained { "" } else { " (NOT sustained)" }
    ));
    r.line(format!(
        "  rejected by code {codes_text}; skipped (--inflight {} unanswered) {}; unmatched answers {}; malformed {}",
        o.inflight,
        l(&st.skipped),
        l(&st.unmatched),
        l(&st.malformed)
    ));
    r.line(format!(
        "latency           {} (publish -> update/accepted)",
        lat_line(&h)
    ));
    r.line(format!(
        "versions          {} seen on update/accepted; gaps {}, out of order {} (devices affected: {})",
        l(&st.versions_seen),
        l(&st.version_gaps),
        l(&st.out_of_order),
        l(&st.devices_with_gaps)
    ));
    if o.desired_every > 0 {
        let dh = st.delta_latency.lock().clone();
        r.set(
            "desired",
            json!({
                "sent": l(&st.desired_sent),
                "acked": l(&st.desired_acked),
                "accepted_seen_by_devices": l(&st.others_accepted),
                "rejected_seen_by_devices": l(&st.others_rejected),
                "deltas_received": l(&st.deltas),
                "deltas_new_revision": l(&st.deltas_new),
                "latency_to_delta": hist_json(&dh),
            }),
        );
        r.line(format!(
            "desired           sent {} acked {}; devices saw {} accepted, {} rejected; deltas {} ({} new revisions)",
            l(&st.desired_sent),
            l(&st.desired_acked),
            l(&st.others_accepted),
            l(&st.others_rejected),
            l(&st.deltas),
            l(&st.deltas_new)
        ));
        r.line(format!(
            "latency to delta  {} (desired publish -> update/delta)",
            lat_line(&dh)
        ));
    }
    cpu_figures(
        &mut r,
        "shadow",
        wall,
        bcpu,
        mcpu,
        Some((accepted, "update")),
    );
    r.set("broker_rss_peak_kib", ctx.probe.peak_rss_kib.load(Relaxed));
    r.set("broker_rss_end_kib", kib(ctx.probe.broker()));
    r.line(format!(
        "broker RSS peak   {:.1} MiB",
        ctx.probe.peak_rss_kib.load(Relaxed) as f64 / 1024.0
    ));
    stop_all(&stop_tx, handles).await;
    if let Some(t) = backend_task {
        if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), t).await {
            m.close().await;
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_grow_by_one() {
        let mut t = VersionTrack::default();
        for v in [7, 8, 9] {
            t.see(v);
        }
        assert!(t.clean());
        assert_eq!(t.seen, 3);
        t.see(12); // 10 and 11 never came
        assert_eq!((t.gaps, t.out_of_order), (2, 0));
        t.see(11); // late
        t.see(12); // repeated
        assert_eq!((t.gaps, t.out_of_order), (2, 2));
        t.see(13); // continues from the highest seen
        assert_eq!((t.gaps, t.out_of_order, t.seen), (2, 2, 7));
    }

    #[test]
    fn first_version_is_the_baseline() {
        let mut t = VersionTrack::default();
        t.see(1000);
        t.see(1001);
        assert!(t.clean());
    }

    #[test]
    fn tokens_are_per_device() {
        assert_eq!(own_seq(&token("dev12", 5), "dev12"), Some(5));
        assert_eq!(own_seq(&token("dev12", 5), "dev1"), None);
        assert_eq!(own_seq("dev123:5", "dev12"), None);
        assert_eq!(own_seq("backend:3", "dev12"), None);
        assert_eq!(own_seq("dev12:x", "dev12"), None);
    }

    #[test]
    fn report_is_a_valid_small_update() {
        let mut b = Vec::new();
        report_doc(&mut b, "dev4999", 123_456, 17, 90_000);
        assert!(b.len() < 600, "{} bytes", b.len());
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        let rep = &v["state"]["reported"];
        assert_eq!(rep["agent"]["seq"], 123_456);
        assert_eq!(rep["config"]["rev"], 17);
        assert!(rep["health"]["cpu_pct"].is_f64());
        assert_eq!(v["clientToken"], "dev4999:123456");
        // Depth 3 under reported: well within the shadow's limit of 6.
        let mut d = Vec::new();
        desired_doc(&mut d, 9);
        let v: serde_json::Value = serde_json::from_slice(&d).unwrap();
        assert_eq!(v["state"]["desired"]["config"]["rev"], 9);
        assert_eq!(v["clientToken"], "backend:9");
    }

    #[test]
    fn answers_are_read_by_topic_and_fields() {
        let t = b"$aws/things/dev3/shadow/update/accepted";
        assert_eq!(answer_kind(t), Some(AnswerKind::Accepted));
        assert_eq!(
            answer_kind(b"$aws/things/dev3/shadow/update/rejected"),
            Some(AnswerKind::Rejected)
        );
        assert_eq!(
            answer_kind(b"$aws/things/dev3/shadow/update/delta"),
            Some(AnswerKind::Delta)
        );
        assert_eq!(
            answer_kind(b"$aws/things/dev3/shadow/update/documents"),
            None
        );
        let acc = br#"{"state":{"reported":{"config":{"rev":3}}},"metadata":{"reported":{"config":{"rev":{"timestamp":1}}}},"version":42,"timestamp":1,"clientToken":"dev3:9"}"#;
        let a: Answer = serde_json::from_slice(acc).unwrap();
        assert_eq!(
            (a.version, a.client_token.as_deref()),
            (Some(42), Some("dev3:9"))
        );
        assert_eq!(a.delta_rev(), None);
        let rej =
            br#"{"code":429,"message":"Too Many Requests","timestamp":1,"clientToken":"dev3:10"}"#;
        let a: Answer = serde_json::from_slice(rej).unwrap();
        assert_eq!(a.code, Some(429));
        let delta = br#"{"state":{"config":{"rev":5}},"metadata":{"config":{"rev":{"timestamp":1}}},"version":43,"timestamp":1,"clientToken":"backend:5"}"#;
        let a: Answer = serde_json::from_slice(delta).unwrap();
        assert_eq!(a.delta_rev(), Some(5));
        let cleared = br#"{"state":null,"metadata":{"timestamp":1},"version":44,"timestamp":1}"#;
        let a: Answer = serde_json::from_slice(cleared).unwrap();
        assert_eq!((a.version, a.delta_rev()), (Some(44), None));
    }

    #[test]
    fn answering_matches_tokens_and_counts_versions() {
        let st = Stats::new(4);
        st.sent.store(2, Relaxed);
        let now = payload::now_ns();
        let mut waiting = VecDeque::from([(1, now), (2, now)]);
        let mut versions = VersionTrack::default();
        let mut rev = 0;
        let end = Instant::now() + Duration::from_secs(60);
        let acc = "$aws/things/dev3/shadow/update/accepted".as_bytes();
        let rej = "$aws/things/dev3/shadow/update/rejected".as_bytes();
        let delta = "$aws/things/dev3/shadow/update/delta".as_bytes();
        let mut feed = |topic: &[u8], body: &str| {
            on_answer(
                &st,
                "dev3",
                topic,
                body.as_bytes(),
                &mut waiting,
                &mut versions,
                &mut rev,
                end,
            )
        };
        feed(acc, r#"{"version":1,"clientToken":"dev3:1"}"#);
        feed(acc, r#"{"version":2,"clientToken":"backend:1"}"#);
        feed(rej, r#"{"code":409,"clientToken":"dev3:2"}"#);
        feed(acc, r#"{"version":4,"clientToken":"dev3:1"}"#); // again, and version 3 missing
        feed(delta, r#"{"state":{"config":{"rev":1}},"version":2}"#);
        feed(delta, r#"{"state":{"config":{"rev":1}},"version":4}"#);
        feed(acc, "not json");
        let l = |a: &AtomicU64| a.load(Relaxed);
        assert_eq!((l(&st.accepted), l(&st.rejected)), (1, 1));
        assert_eq!(st.rejected_by_code.lock().get(&409), Some(&1));
        assert_eq!((l(&st.others_accepted), l(&st.unmatched)), (1, 1));
        assert_eq!((l(&st.version_gaps), l(&st.out_of_order)), (1, 0));
        assert_eq!(l(&st.devices_with_gaps), 1);
        assert_eq!((l(&st.deltas), l(&st.deltas_new), rev), (2, 1, 1));
        assert_eq!(l(&st.malformed), 1);
        assert!(waiting.is_empty());
        assert_eq!(st.latency.lock().len(), 1);
    }
}
