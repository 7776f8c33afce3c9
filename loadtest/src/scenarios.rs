//! The five scenarios. Each one runs its phases, bounded by `--duration`, `--drain` and
//! the run's `--timeout`, and fills a [`Report`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::fleetsim::{
    self, connect_fleet, stop_all, wait, wait_until, Ctx, Plan, PubJob, PubPlan,
};
use crate::mqtt::{self, Packet};
use crate::payload;
use crate::stats::{hist_json, lat_line, round1, round3, Conns, ProcSample, Report, Sink, Window};

/// Options every scenario shares (the parts the scenarios read).
pub struct Common {
    pub devices: usize,
    pub accounts: usize,
    pub rate: f64,
    pub max_pending: usize,
    pub duration: Duration,
    pub drain: Duration,
}

pub(crate) fn kib(s: Option<ProcSample>) -> serde_json::Value {
    s.map_or(serde_json::Value::Null, |s| json!(s.rss_kib))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Broker RSS before/after and per connection, into the report.
pub(crate) fn rss_figures(
    r: &mut Report,
    before: Option<ProcSample>,
    after: Option<ProcSample>,
    conns: u64,
    peak: u64,
) {
    r.set("broker_rss_before_kib", kib(before));
    r.set("broker_rss_after_kib", kib(after));
    r.set("broker_rss_peak_kib", peak);
    if let Some(me) = crate::stats::sample_pid(std::process::id()) {
        r.set("generator_rss_kib", me.rss_kib);
    }
    if let (Some(b), Some(a)) = (before, after) {
        let per = if conns > 0 {
            (a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / conns as f64
        } else {
            0.0
        };
        r.set("broker_rss_per_connection_bytes", round1(per));
        r.line(format!(
            "broker RSS        {} -> {} ({:.0} bytes per connection over {conns}), peak {}",
            mib(b.rss_kib),
            mib(a.rss_kib),
            per,
            mib(peak)
        ));
    } else {
        r.line("broker RSS        (no --broker-pid)");
    }
}

pub(crate) fn conn_figures(r: &mut Report, key: &str, c: &Conns) {
    r.set(key, c.json());
    r.line(format!(
        "{key:<17} {}/{} ready in {:.2} s = {:.0}/s; failed: tcp {} tls {} ws {} refused {} protocol {} timeout {}; dropped while held {}",
        c.ready.load(Relaxed),
        c.attempted.load(Relaxed),
        c.seconds(),
        c.rate(),
        c.fail_tcp.load(Relaxed),
        c.fail_tls.load(Relaxed),
        c.fail_ws.load(Relaxed),
        c.fail_refused.load(Relaxed),
        c.fail_protocol.load(Relaxed),
        c.fail_timeout.load(Relaxed),
        c.dropped.load(Relaxed),
    ));
    let (full, resumed) = (c.tls_full.load(Relaxed), c.tls_resumed.load(Relaxed));
    if full + resumed > 0 {
        r.line(format!(
            "  TLS handshakes  {full} full, {resumed} resumed (session tickets)"
        ));
    }
    if let Some(h) = c.latency.lock().as_ref() {
        r.line(format!("  connect latency {}", lat_line(h)));
    }
    if let Some(e) = c.first_error.lock().as_ref() {
        r.line(format!("  first error: {e}"));
    }
}

pub(crate) fn cpu_figures(
    r: &mut Report,
    what: &str,
    wall: f64,
    broker: Option<f64>,
    me: Option<f64>,
    per: Option<(u64, &str)>,
) {
    let mut o = serde_json::Map::new();
    o.insert("wall_s".into(), json!(round3(wall)));
    o.insert("broker_cpu_s".into(), json!(broker.map(round3)));
    o.insert(
        "broker_cpu_percent".into(),
        json!(broker.map(|b| round1(b / wall * 100.0))),
    );
    o.insert("generator_cpu_s".into(), json!(me.map(round3)));
    o.insert(
        "generator_cpu_percent".into(),
        json!(me.map(|m| round1(m / wall * 100.0))),
    );
    let mut line = format!("{what:<17} {wall:.2} s wall");
    if let Some(b) = broker {
        line += &format!(", broker CPU {b:.2} s ({:.0}% of a core)", b / wall * 100.0);
    }
    if let Some(m) = me {
        line += &format!(", generator CPU {m:.2} s ({:.0}%)", m / wall * 100.0);
    }
    if let (Some(b), Some((n, unit))) = (broker, per) {
        if n > 0 {
            let us = b * 1e6 / n as f64;
            o.insert(format!("broker_cpu_us_per_{unit}"), json!(round1(us)));
            line += &format!(", {us:.1} µs broker CPU per {unit}");
            if unit == "connection" && b > 0.0 {
                o.insert(
                    "connections_per_broker_cpu_s".into(),
                    json!(round1(n as f64 / b)),
                );
                line += &format!(" ({:.0} per broker CPU-second)", n as f64 / b);
            }
        }
    }
    r.set(
        &format!("{}_cpu", what.trim().replace(' ', "_")),
        serde_json::Value::Object(o),
    );
    r.line(line);
}

fn device_plan(subscribe: bool, sink: Option<Arc<Sink>>) -> Arc<Plan> {
    Arc::new(Plan {
        clean: true,
        session_expiry: 0,
        subscribe: subscribe.then_some(1),
        leave: false,
        sink,
        publish: None,
    })
}

/// Scenario 1: Idle fleet: connect, subscribe, hold.
pub async fn idle(ctx: Arc<Ctx>, c: &Common, settle: Duration) -> Report {
    let mut r = Report::new("idle");
    let before = ctx.probe.broker();
    let (stop_tx, stop_rx) = watch::channel(false);
    let conns = Conns::new();
    let win = Window::start(&ctx.probe);
    let handles = connect_fleet(
        &ctx,
        0..c.devices,
        c.rate,
        c.max_pending,
        device_plan(true, None),
        conns.clone(),
        &stop_rx,
        "connect",
    )
    .await;
    let (wall, bcpu, mcpu) = win.end(&ctx.probe);
    conn_figures(&mut r, "connections", &conns);
    let ready = conns.ready.load(Relaxed);
    cpu_figures(
        &mut r,
        "connect",
        wall,
        bcpu,
        mcpu,
        Some((ready, "connection")),
    );
    tokio::time::sleep(settle.min(ctx.deadline.saturating_duration_since(Instant::now()))).await;
    let after = ctx.probe.broker();
    let hold_until = (Instant::now() + c.duration).min(ctx.deadline);
    let bar = ctx.bar(c.duration.as_secs(), "hold (s)");
    let t = Instant::now();
    wait_until(hold_until, &bar, || (t.elapsed().as_secs(), false)).await;
    bar.finish();
    let after_hold = ctx.probe.broker();
    rss_figures(
        &mut r,
        before,
        after,
        ready,
        ctx.probe.peak_rss_kib.load(Relaxed),
    );
    r.set("broker_rss_after_hold_kib", kib(after_hold));
    r.set(
        "handshake_failures",
        conns.fail_tls.load(Relaxed) + conns.fail_ws.load(Relaxed),
    );
    r.set("dropped_while_held", conns.dropped.load(Relaxed));
    stop_all(&stop_tx, handles).await;
    r
}

/// Connects `c.devices` devices that record what they receive into `sink`; returns the
/// stop switch, the tasks and the connection figures.
async fn fleet_with_sink(
    ctx: &Arc<Ctx>,
    c: &Common,
    sink: Arc<Sink>,
) -> (
    watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<()>>,
    Arc<Conns>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let conns = Conns::new();
    let handles = connect_fleet(
        ctx,
        0..c.devices,
        c.rate,
        c.max_pending,
        device_plan(true, Some(sink)),
        conns.clone(),
        &stop_rx,
        "connect",
    )
    .await;
    (stop_tx, handles, conns)
}

/// Push parameters.
pub struct PushOpts {
    pub msg_rate: f64,
    pub inflight: u32,
    pub payload: usize,
    pub max_messages: u64,
}

/// Scenario 2: Targeted push: QoS 1 orders from the backend to random single devices.
pub async fn push(ctx: Arc<Ctx>, c: &Common, o: &PushOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("push");
    let count = ((o.msg_rate * c.duration.as_secs_f64()).ceil() as u64)
        .min(o.max_messages)
        .max(1);
    r.param("messages_planned", count);
    let sink = Sink::new(count as usize);
    let before = ctx.probe.broker();
    let (stop_tx, handles, conns) = fleet_with_sink(&ctx, c, sink.clone()).await;
    conn_figures(&mut r, "connections", &conns);
    let after = ctx.probe.broker();
    rss_figures(
        &mut r,
        before,
        after,
        conns.ready.load(Relaxed),
        ctx.probe.peak_rss_kib.load(Relaxed),
    );
    let mut backend = ctx
        .backend()
        .await
        .map_err(|f| anyhow::anyhow!("backend: {f:?}"))?;
    let job = PubJob {
        rate: o.msg_rate,
        count,
        until: (Instant::now() + c.duration).min(ctx.deadline),
        inflight: o.inflight,
        qos: 1,
        retain: false,
        size: o.payload,
        subject: "orders",
        accounts: c.accounts,
        devices: c.devices.max(1),
        random: true,
        sink: Some(sink.clone()),
        empty: false,
    };
    let sent = Arc::new(AtomicU64::new(0));
    let win = Window::start(&ctx.probe);
    let drain = c.drain;
    let s2 = sent.clone();
    let publisher = tokio::spawn(async move {
        let res = fleetsim::publish(&mut backend, &job, drain, &s2).await;
        (res, backend)
    });
    let bar = ctx.bar(count, "delivered");
    wait(&ctx, &bar, || {
        (sink.delivered.load(Relaxed), publisher.is_finished())
    })
    .await;
    let (res, backend) = publisher.await?;
    let res = res?;
    let drain_until = (Instant::now() + c.drain).min(ctx.deadline);
    wait_until(drain_until, &bar, || {
        (
            sink.delivered.load(Relaxed),
            sink.distinct.load(Relaxed) >= res.sent,
        )
    })
    .await;
    bar.finish();
    let (wall, bcpu, mcpu) = win.end(&ctx.probe);
    let delivered = sink.delivered.load(Relaxed);
    // On schedule, the n-th send is at n / rate: never report more than the target.
    let achieved = res.sent as f64
        / res
            .publish_seconds
            .max(res.sent as f64 / o.msg_rate)
            .max(1e-9);
    let lost = sink.lost(1);
    let dup = sink.duplicates.load(Relaxed);
    let h = sink.hist(1);
    r.set("sent", res.sent);
    r.set("acked", res.acked);
    r.set("delivered", delivered);
    r.set("lost", lost);
    r.set("duplicated", dup);
    r.set("misrouted_or_foreign", sink.foreign.load(Relaxed));
    r.set("target_rate_per_s", o.msg_rate);
    r.set("achieved_rate_per_s", round1(achieved));
    r.set("publisher_window_full", res.window_full);
    r.set("latency", hist_json(&h));
    let sustained = achieved >= 0.95 * o.msg_rate && lost == 0;
    r.set("rate_sustained", sustained);
    r.line(format!(
        "orders            sent {} acked {} delivered {delivered} lost {lost} duplicated {dup}; {achieved:.0}/s of {:.0}/s target{}",
        res.sent,
        res.acked,
        o.msg_rate,
        if sustained { "" } else { " (NOT sustained)" }
    ));
    r.line(format!("latency           {}", lat_line(&h)));
    cpu_figures(
        &mut r,
        "push",
        wall,
        bcpu,
        mcpu,
        Some((delivered, "message")),
    );
    r.set("broker_rss_peak_kib", ctx.probe.peak_rss_kib.load(Relaxed));
    r.set("broker_rss_end_kib", kib(ctx.probe.broker()));
    stop_all(&stop_tx, handles).await;
    backend.close().await;
    Ok(r)
}

/// Fan-in parameters.
pub struct FaninOpts {
    pub msg_rate: f64,
    pub qos: String,
    pub payload: usize,
    pub max_messages: u64,
}

/// Subscribes the backend to `filter` at QoS 1 and waits for the SUBACK.
async fn backend_subscriber(ctx: &Ctx, filter: &str) -> anyhow::Result<crate::net::Mqtt> {
    let mut m = ctx
        .backend()
        .await
        .map_err(|f| anyhow::anyhow!("backend: {f:?}"))?;
    mqtt::subscribe(&mut m.wbuf, ctx.version, 1, filter, 1);
    m.flush().await?;
    match tokio::time::timeout(ctx.connect_timeout, m.recv()).await?? {
        Packet::SubAck { code, .. } if mqtt::suback_ok(code) => Ok(m),
        other => anyhow::bail!("backend SUBSCRIBE {filter}: {other:?}"),
    }
}

/// Scenario 3: Telemetry fan-in: every device publishes to its own topic, one backend receives
/// everything through `+/+/telemetry`.
pub async fn fanin(ctx: Arc<Ctx>, c: &Common, o: &FaninOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("fanin");
    let qos_of: fn(usize) -> u8 = match o.qos.as_str() {
        "0" => |_| 0,
        "1" => |_| 1,
        "both" => |i| (i % 2) as u8,
        other => anyhow::bail!("--qos must be 0, 1 or both (got {other})"),
    };
    let n = c.devices.max(1);
    let cap = ((o.msg_rate * c.duration.as_secs_f64() * 1.05).ceil() as u64 + n as u64)
        .min(o.max_messages)
        .max(1);
    let sink = Sink::new(cap as usize);
    let backend = backend_subscriber(&ctx, "+/+/telemetry").await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let receiver = tokio::spawn(fleetsim::receive(backend, sink.clone(), stop_rx.clone()));
    let (go_tx, go_rx) = watch::channel(None);
    let plan = Arc::new(Plan {
        clean: true,
        session_expiry: 0,
        subscribe: None,
        leave: false,
        sink: None,
        publish: Some(PubPlan {
            interval: Duration::from_secs_f64(n as f64 / o.msg_rate.max(0.001)),
            qos_of,
            size: o.payload,
            seq: Arc::new(AtomicU64::new(0)),
            sink: sink.clone(),
            subject: "telemetry",
            skipped: AtomicU64::new(0),
            go: go_rx,
        }),
    });
    let conns = Conns::new();
    let before = ctx.probe.broker();
    let handles = connect_fleet(
        &ctx,
        0..n,
        c.rate,
        c.max_pending,
        plan.clone(),
        conns.clone(),
        &stop_rx,
        "connect",
    )
    .await;
    conn_figures(&mut r, "connections", &conns);
    let after = ctx.probe.broker();
    rss_figures(
        &mut r,
        before,
        after,
        conns.ready.load(Relaxed) + 1,
        ctx.probe.peak_rss_kib.load(Relaxed),
    );
    let win = Window::start(&ctx.probe);
    let start = Instant::now() + Duration::from_millis(100);
    let end = (start + c.duration).min(ctx.deadline);
    let _ = go_tx.send(Some((start, end)));
    let pp = plan.publish.as_ref().unwrap();
    let bar = ctx.bar(cap, "delivered");
    wait_until(end, &bar, || (sink.delivered.load(Relaxed), false)).await;
    let sent_total = pp.seq.load(Relaxed).min(cap);
    // Drain: until everything sent arrived, or nothing arrived for 2 s, or --drain.
    let drain_until = (Instant::now() + c.drain).min(ctx.deadline);
    let mut last = (sink.delivered.load(Relaxed), Instant::now());
    wait_until(drain_until, &bar, || {
        let d = sink.delivered.load(Relaxed);
        if d != last.0 {
            last = (d, Instant::now());
        }
        (
            d,
            sink.distinct.load(Relaxed) >= sent_total || last.1.elapsed() > Duration::from_secs(2),
        )
    })
    .await;
    bar.finish();
    let (wall, bcpu, mcpu) = win.end(&ctx.probe);
    let window = (end - start).as_secs_f64();
    let delivered = sink.delivered.load(Relaxed);
    let (sent0, sent1) = (sink.sent(0), sink.sent(1));
    let (lost0, lost1) = (sink.lost(0), sink.lost(1));
    let (h0, h1, ha) = (sink.hist(0), sink.hist(1), sink.hist_all());
    r.set("sent_qos0", sent0);
    r.set("sent_qos1", sent1);
    r.set("delivered", delivered);
    r.set("delivered_per_s", round1(delivered as f64 / window));
    r.set("target_rate_per_s", o.msg_rate);
    r.set("lost_qos1", lost1);
    r.set("undelivered_qos0", lost0);
    r.set("duplicated", sink.duplicates.load(Relaxed));
    r.set("skipped_unacked", pp.skipped.load(Relaxed));
    r.set("latency_qos0", hist_json(&h0));
    r.set("latency_qos1", hist_json(&h1));
    r.set("latency", hist_json(&ha));
    r.line(format!(
        "telemetry         sent {} (QoS 0 {sent0}, QoS 1 {sent1}) delivered {delivered} = {:.0}/s of {:.0}/s target; QoS 1 lost {lost1}, QoS 0 undelivered {lost0}, duplicated {}, skipped (32 unacked) {}",
        sent0 + sent1,
        delivered as f64 / window,
        o.msg_rate,
        sink.duplicates.load(Relaxed),
        pp.skipped.load(Relaxed),
    ));
    r.line(format!("latency QoS 0     {}", lat_line(&h0)));
    r.line(format!("latency QoS 1     {}", lat_line(&h1)));
    cpu_figures(
        &mut r,
        "fanin",
        wall,
        bcpu,
        mcpu,
        Some((delivered, "message")),
    );
    r.set("broker_rss_peak_kib", ctx.probe.peak_rss_kib.load(Relaxed));
    stop_all(&stop_tx, handles).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), receiver).await;
    Ok(r)
}

/// Reconnect-storm parameters.
pub struct StormOpts {
    pub restart_cmd: Option<String>,
    pub wait_restart: bool,
    pub session_expiry: u32,
    pub payload: usize,
    pub msg_rate: f64,
    pub reconnect_rate: f64,
}

/// Runs the restart command; its last output line, if a number, is the new broker PID.
async fn restart(ctx: &Ctx, cmd: &str) -> anyhow::Result<()> {
    let cmd = cmd.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stderr(std::process::Stdio::inherit())
            .output()
    })
    .await??;
    if !out.status.success() {
        anyhow::bail!("--restart-cmd failed: {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(pid) = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| l.trim().parse::<u32>().ok())
    {
        ctx.probe.broker_pid.store(pid, Relaxed);
        eprintln!("broker restarted, new PID {pid}");
    }
    Ok(())
}

/// Polls with backend connections until one succeeds (`up`) or fails (`!up`).
async fn wait_broker(ctx: &Ctx, up: bool) -> bool {
    while Instant::now() < ctx.deadline {
        let ok = match tokio::time::timeout(Duration::from_secs(2), ctx.backend()).await {
            Ok(Ok(m)) => {
                m.close().await;
                true
            }
            _ => false,
        };
        if ok == up {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Scenario 4: Reconnect storm: persistent sessions, orders queued while offline, broker restarted,
/// everyone back at once.
pub async fn storm(ctx: Arc<Ctx>, c: &Common, o: &StormOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("storm");
    let n = c.devices.max(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    // A: sessions.
    let conns_a = Conns::new();
    let plan_a = Arc::new(Plan {
        clean: false,
        session_expiry: o.session_expiry,
        subscribe: Some(1),
        leave: true,
        sink: None,
        publish: None,
    });
    let h = connect_fleet(
        &ctx,
        0..n,
        c.rate,
        c.max_pending,
        plan_a,
        conns_a.clone(),
        &stop_rx,
        "sessions",
    )
    .await;
    futures_util::future::join_all(h).await;
    conn_figures(&mut r, "sessions", &conns_a);
    // B: one order per offline device.
    let sink = Sink::new(n);
    let mut backend = ctx
        .backend()
        .await
        .map_err(|f| anyhow::anyhow!("backend: {f:?}"))?;
    let job = PubJob {
        rate: o.msg_rate,
        count: n as u64,
        until: ctx.deadline,
        inflight: 100,
        qos: 1,
        retain: false,
        size: o.payload,
        subject: "orders",
        accounts: c.accounts,
        devices: n,
        random: false,
        sink: Some(sink.clone()),
        empty: false,
    };
    let progress = AtomicU64::new(0);
    let res = fleetsim::publish(&mut backend, &job, c.drain, &progress).await?;
    backend.close().await;
    r.set("orders_sent", res.sent);
    r.set("orders_acked", res.acked);
    r.line(format!(
        "queued orders     {} sent, {} acknowledged in {:.2} s",
        res.sent, res.acked, res.seconds
    ));
    let rss_queued = ctx.probe.broker();
    r.set("broker_rss_with_queued_kib", kib(rss_queued));
    // C: restart.
    let t = Instant::now();
    if let Some(cmd) = &o.restart_cmd {
        eprintln!("running --restart-cmd");
        restart(&ctx, cmd).await?;
        if !wait_broker(&ctx, true).await {
            anyhow::bail!("the broker did not come back before the timeout");
        }
        r.set("restarted", true);
    } else if o.wait_restart {
        eprintln!("waiting for the broker to go down and come back (restart it now)");
        if !wait_broker(&ctx, false).await || !wait_broker(&ctx, true).await {
            anyhow::bail!("the broker did not restart before the timeout");
        }
        r.set("restarted", true);
    } else {
        r.set("restarted", false);
    }
    r.set("restart_seconds", round3(t.elapsed().as_secs_f64()));
    let after_restart = ctx.probe.broker();
    r.set("broker_rss_after_restart_kib", kib(after_restart));
    // D: the storm.
    let conns_d = Conns::new();
    let plan_d = Arc::new(Plan {
        clean: false,
        session_expiry: o.session_expiry,
        subscribe: Some(1),
        leave: false,
        sink: Some(sink.clone()),
        publish: None,
    });
    let win = Window::start(&ctx.probe);
    let t0 = payload::now_ns();
    let handles = connect_fleet(
        &ctx,
        0..n,
        o.reconnect_rate,
        c.max_pending,
        plan_d,
        conns_d.clone(),
        &stop_rx,
        "reconnect",
    )
    .await;
    let bar = ctx.bar(res.sent, "delivered");
    let drain_until = (Instant::now() + c.drain).min(ctx.deadline);
    wait_until(drain_until, &bar, || {
        (
            sink.distinct.load(Relaxed),
            sink.distinct.load(Relaxed) >= res.sent,
        )
    })
    .await;
    bar.finish();
    let (wall, bcpu, mcpu) = win.end(&ctx.probe);
    conn_figures(&mut r, "reconnect", &conns_d);
    let all_ready = conns_d.ready.load(Relaxed) == n as u64;
    let all_delivered = sink.distinct.load(Relaxed) >= res.sent;
    let t_ready = conns_d.last_ready_ns.load(Relaxed).saturating_sub(t0) as f64 / 1e9;
    let t_deliv = sink.last_new_ns.load(Relaxed).saturating_sub(t0) as f64 / 1e9;
    let lost = sink.lost(1);
    r.set("all_reconnected", all_ready);
    r.set("seconds_to_all_reconnected_and_subscribed", round3(t_ready));
    r.set("all_orders_delivered", all_delivered);
    r.set("seconds_to_all_orders_delivered", round3(t_deliv));
    r.set("lost", lost);
    r.set("duplicated", sink.duplicates.load(Relaxed));
    r.set("session_present", conns_d.session_present.load(Relaxed));
    r.line(format!(
        "storm             all reconnected+subscribed after {t_ready:.2} s{}; all orders delivered after {t_deliv:.2} s{}; lost {lost} (must be 0), duplicated {}, session present {}/{n}",
        if all_ready { "" } else { " (NOT all)" },
        if all_delivered { "" } else { " (NOT all)" },
        sink.duplicates.load(Relaxed),
        conns_d.session_present.load(Relaxed),
    ));
    cpu_figures(
        &mut r,
        "storm",
        wall,
        bcpu,
        mcpu,
        Some((n as u64, "connection")),
    );
    stop_all(&stop_tx, handles).await;
    Ok(r)
}

/// Retained-config parameters.
pub struct RetainedOpts {
    pub payload: usize,
    pub msg_rate: f64,
    pub keep: bool,
}

/// Scenario 5: Retained config: one retained config per device, then every device subscribes
/// with a clean session.
pub async fn retained(ctx: Arc<Ctx>, c: &Common, o: &RetainedOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("retained");
    let n = c.devices.max(1);
    let sink = Sink::new(n);
    let mut backend = ctx
        .backend()
        .await
        .map_err(|f| anyhow::anyhow!("backend: {f:?}"))?;
    let mut job = PubJob {
        rate: o.msg_rate,
        count: n as u64,
        until: ctx.deadline,
        inflight: 100,
        qos: 1,
        retain: true,
        size: o.payload,
        subject: "config",
        accounts: c.accounts,
        devices: n,
        random: false,
        sink: Some(sink.clone()),
        empty: false,
    };
    let progress = AtomicU64::new(0);
    let res = fleetsim::publish(&mut backend, &job, c.drain, &progress).await?;
    r.set("configs_published", res.sent);
    r.set("configs_acked", res.acked);
    r.line(format!(
        "retained configs  {} published, {} acknowledged in {:.2} s",
        res.sent, res.acked, res.seconds
    ));
    let before = ctx.probe.broker();
    let win = Window::start(&ctx.probe);
    let t0 = payload::now_ns();
    let (stop_tx, handles, conns) = fleet_with_sink(&ctx, c, sink.clone()).await;
    let bar = ctx.bar(n as u64, "configs");
    let drain_until = (Instant::now() + c.drain).min(ctx.deadline);
    wait_until(drain_until, &bar, || {
        (
            sink.distinct.load(Relaxed),
            sink.distinct.load(Relaxed) >= n as u64,
        )
    })
    .await;
    bar.finish();
    let (wall, bcpu, mcpu) = win.end(&ctx.probe);
    conn_figures(&mut r, "connections", &conns);
    let got = sink.distinct.load(Relaxed);
    let t_all = sink.last_new_ns.load(Relaxed).saturating_sub(t0) as f64 / 1e9;
    let t_ready = conns.last_ready_ns.load(Relaxed).saturating_sub(t0) as f64 / 1e9;
    r.set("devices_with_config", got);
    r.set("missing", n as u64 - got.min(n as u64));
    r.set("wrong_device", sink.foreign.load(Relaxed));
    r.set("seconds_to_all_configs", round3(t_all));
    r.set("seconds_to_all_subscribed", round3(t_ready));
    r.line(format!(
        "configs           {got}/{n} devices have their config after {t_all:.2} s (all subscribed after {t_ready:.2} s); wrong device {}",
        sink.foreign.load(Relaxed)
    ));
    let after = ctx.probe.broker();
    rss_figures(
        &mut r,
        before,
        after,
        conns.ready.load(Relaxed),
        ctx.probe.peak_rss_kib.load(Relaxed),
    );
    cpu_figures(
        &mut r,
        "resubscribe",
        wall,
        bcpu,
        mcpu,
        Some((n as u64, "connection")),
    );
    stop_all(&stop_tx, handles).await;
    if !o.keep {
        job.empty = true;
        job.sink = None;
        job.rate = 0.0;
        job.until = ctx.deadline;
        let progress = AtomicU64::new(0);
        let cleared = fleetsim::publish(&mut backend, &job, c.drain, &progress).await?;
        r.line(format!(
            "cleared           {} retained configs",
            cleared.acked
        ));
    }
    backend.close().await;
    Ok(r)
}
