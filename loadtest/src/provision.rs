//! Scenario `provision`: fleet provisioning by CSR (fleetcore only: mosquitto has no
//! provisioning). Issue #14's "2,000 agents provisioning at once".
//!
//! Set-up on the admin API (not timed): the agent policy (`--admin-policy`, created if
//! missing), a fleet-provisioning template `--template` (thing `<--thing-prefix><serial>`
//! from the `SerialNumber` parameter, attribute `account`, the agent policy attached) and
//! one claim certificate for it, shared by every agent. Each agent then has an ECDSA
//! P-256 key and a CSR with CN = its thing name, made beforehand (not timed either).
//!
//! Timed, per agent `i` (thing `prov-<i>`), all agents started at once (or at `--rate`,
//! at most `--max-pending` under way):
//! 1. **claim connect**: TCP, mutual TLS with the claim certificate, CONNECT (client id
//!    `claim-<thing>`), SUBSCRIBE to the two answer filters, both SUBACKs;
//! 2. **CreateCertificateFromCsr**: publish `{"certificateSigningRequest": PEM}` to
//!    `$aws/certificates/create-from-csr/json`, until `.../json/accepted`;
//! 3. **RegisterThing**: publish the ownership token and `{SerialNumber, Account}` to
//!    `$aws/provisioning-templates/<template>/provision/json`, until `.../accepted`;
//! 4. **own connect**: DISCONNECT, then TCP, mutual TLS with the new certificate,
//!    CONNECT with client id = thing name, until CONNACK. The agent is then done; it
//!    subscribes to `<account>/<thing>/#` (its policy must grant it; counted, not timed)
//!    and holds the connection until every agent is done.
//!
//! A request answered 429 ThrottlingException (more than the broker's
//! `[provisioning] max_in_flight` at once) is sent again after an exponential backoff
//! with jitter (100 ms doubling to 2 s, a random 50-100% of it), at most `--max-retries` times; those are counted apart. Any other rejection or
//! failure ends the agent and is counted, and every distinct error is printed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::fleet::{self, Http};
use crate::fleetsim::{spawn_paced, stop_all, Ctx};
use crate::mqtt::{self, Packet};
use crate::net::{Fail, FailKind, Mqtt, Stream};
use crate::payload;
use crate::scenarios::{cpu_figures, kib, Common};
use crate::stats::{hist_json, lat_line, new_hist, round1, round3, Conns, Report, Window};

const CSR_TOPIC: &str = "$aws/certificates/create-from-csr/json";

/// Provisioning scenario parameters.
#[derive(Clone)]
pub struct ProvisionOpts {
    pub admin_url: String,
    pub admin_token: String,
    pub policy: String,
    pub template: String,
    pub thing_prefix: String,
    pub max_retries: u32,
}

/// What one agent brings: its thing name, key (PKCS#8 DER) and CSR (PEM).
struct Agent {
    thing: String,
    account: String,
    key_der: Vec<u8>,
    csr_pem: String,
}

/// The timed steps, in order.
const STEPS: [&str; 5] = [
    "claim_connect",
    "create_from_csr",
    "register_thing",
    "own_connect",
    "total",
];

struct Stats {
    claim_connected: AtomicU64,
    certified: AtomicU64,
    registered: AtomicU64,
    own_connected: AtomicU64,
    /// Own connections whose SUBSCRIBE to `<account>/<thing>/#` was refused.
    own_subscribe_refused: AtomicU64,
    /// 429 answers (each one sent again).
    throttled: AtomicU64,
    /// Other `/rejected` answers, by errorCode.
    rejected: Mutex<BTreeMap<String, u64>>,
    /// Every distinct error (step: detail) and how often.
    errors: Mutex<BTreeMap<String, u64>>,
    hist: [Mutex<Histogram<u64>>; 5],
}

impl Stats {
    fn new() -> Stats {
        let z = || AtomicU64::new(0);
        Stats {
            claim_connected: z(),
            certified: z(),
            registered: z(),
            own_connected: z(),
            own_subscribe_refused: z(),
            throttled: z(),
            rejected: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            hist: std::array::from_fn(|_| Mutex::new(new_hist())),
        }
    }

    fn record(&self, step: usize, from_ns: u64, to_ns: u64) {
        let _ = self.hist[step]
            .lock()
            .record((to_ns.saturating_sub(from_ns) / 1000).max(1));
    }

    fn error(&self, step: &str, detail: &str) {
        *self
            .errors
            .lock()
            .entry(format!("{step}: {detail}"))
            .or_insert(0) += 1;
    }
}

/// The template: thing `<prefix><SerialNumber>` with the account attribute, the
/// certificate activated, policy `policy` attached.
pub fn template_body(prefix: &str, policy: &str) -> Value {
    json!({
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "Account": {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}
        },
        "Resources": {
            "thing": {"Type": "AWS::IoT::Thing", "Properties": {
                "ThingName": {"Fn::Join": ["", [prefix, {"Ref": "SerialNumber"}]]},
                "AttributePayload": {"account": {"Ref": "Account"}, "serial": {"Ref": "SerialNumber"}}}},
            "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
                "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}},
            "policy": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": policy}}
        },
        "DeviceConfiguration": {
            "ordersTopic": {"Fn::Sub": format!("${{Account}}/{prefix}${{SerialNumber}}/orders")}
        }
    })
}

/// The agent policy, the template and one claim certificate (certificate PEM, key PEM).
fn set_up(o: &ProvisionOpts) -> anyhow::Result<(String, String)> {
    let mut http = Http::connect(&o.admin_url, &o.admin_token)?;
    let (status, body) = http.request(
        "POST",
        "/policies",
        &json!({"name": o.policy, "document": fleet::agent_policy()}),
    )?;
    if status != 201 && status != 409 {
        bail!("creating policy {}: HTTP {status}: {body}", o.policy);
    }
    let tpl = template_body(&o.thing_prefix, &o.policy).to_string();
    let (status, body) = http.request(
        "POST",
        "/provisioning-templates",
        &json!({"templateName": o.template, "templateBody": tpl}),
    )?;
    match status {
        201 => {}
        409 => eprintln!(
            "note: template {} exists already; it is used as it is",
            o.template
        ),
        _ => bail!("creating template {}: HTTP {status}: {body}", o.template),
    }
    let (status, body) = http.request(
        "POST",
        &format!("/provisioning-templates/{}/claim-certificates", o.template),
        &json!({}),
    )?;
    if status != 201 {
        bail!("creating a claim certificate: HTTP {status}: {body}");
    }
    let v: Value = serde_json::from_str(&body)?;
    let field = |k: &str| {
        v[k].as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no {k} in {body}"))
    };
    Ok((field("certificate_pem")?, field("private_key_pem")?))
}

/// Keys and CSRs for agents `0..n`.
fn make_agents(n: usize, prefix: &str, accounts: usize) -> anyhow::Result<Vec<Agent>> {
    (0..n)
        .map(|i| {
            let thing = format!("{prefix}{i}");
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, thing.as_str());
            params.distinguished_name = dn;
            let csr_pem = params.serialize_request(&key)?.pem()?;
            Ok(Agent {
                thing,
                account: fleet::account(i, accounts),
                key_der: key.serialize_der(),
                csr_pem,
            })
        })
        .collect()
}

struct Shared {
    agents: Vec<Agent>,
    claim_tls: Arc<rustls::ClientConfig>,
    template: String,
    max_retries: u32,
    st: Stats,
}

/// Reads packets until a PUBLISH on `prefix/accepted` or `prefix/rejected`; PUBACKs
/// what needs it. Returns (accepted, body).
async fn answer(m: &mut Mqtt, prefix: &str) -> Result<(bool, Value), Fail> {
    loop {
        let p = m
            .recv()
            .await
            .map_err(|e| Fail::new(FailKind::Protocol, format!("waiting for the answer: {e}")))?;
        match p {
            Packet::Publish(p) => {
                if p.qos == 1 {
                    mqtt::puback(&mut m.wbuf, p.pkid);
                }
                let topic = std::str::from_utf8(&p.topic).unwrap_or("");
                let accepted = match topic.strip_prefix(prefix) {
                    Some("/accepted") => true,
                    Some("/rejected") => false,
                    _ => continue,
                };
                let body: Value = serde_json::from_slice(&p.payload).map_err(|e| {
                    Fail::new(
                        FailKind::Protocol,
                        format!("answer on {topic} not JSON: {e}"),
                    )
                })?;
                if !m.wbuf.is_empty() {
                    m.flush()
                        .await
                        .map_err(|e| Fail::new(FailKind::Protocol, e))?;
                }
                return Ok((accepted, body));
            }
            Packet::Disconnect { reason } => {
                return Err(Fail::new(
                    FailKind::Protocol,
                    format!("DISCONNECT 0x{reason:02x} while waiting for the answer"),
                ))
            }
            _ => {}
        }
    }
}

/// Publishes `body` to `topic` (QoS 1) until it is accepted, sending it again after a
/// 429; the accepted answer.
async fn ask(
    sh: &Shared,
    m: &mut Mqtt,
    pkid: &mut u16,
    topic: &str,
    body: &str,
) -> Result<Value, Fail> {
    let mut tries = 0u32;
    loop {
        *pkid = pkid.checked_add(1).unwrap_or(1);
        mqtt::publish(
            &mut m.wbuf,
            m.version,
            topic,
            1,
            *pkid,
            false,
            body.as_bytes(),
        );
        m.flush()
            .await
            .map_err(|e| Fail::new(FailKind::Protocol, e))?;
        let (ok, v) = answer(m, topic).await?;
        if ok {
            return Ok(v);
        }
        let status = v["statusCode"].as_u64().unwrap_or(0);
        let code = v["errorCode"].as_str().unwrap_or("?").to_owned();
        if status == 429 && tries < sh.max_retries {
            tries += 1;
            sh.st.throttled.fetch_add(1, Relaxed);
            // Exponential backoff with jitter, as the AWS SDKs retry throttling:
            // 100 ms doubling up to 2 s, a random 50-100% of it.
            let cap = (50u64 << tries.min(6)).min(2000);
            let r = (payload::now_ns() ^ u64::from(*pkid).wrapping_mul(0x9E37_79B9)) % 1000;
            tokio::time::sleep(Duration::from_millis(cap / 2 + cap * r / 2000)).await;
            continue;
        }
        *sh.st.rejected.lock().entry(code.clone()).or_insert(0) += 1;
        return Err(Fail::new(
            FailKind::Refused,
            format!(
                "rejected {status} {code}: {}",
                v["errorMessage"].as_str().unwrap_or("")
            ),
        ));
    }
}

/// CONNECT as `client_id` over `stream`, until CONNACK accepts.
async fn connect(ctx: &Ctx, stream: Stream, client_id: &str) -> Result<Mqtt, Fail> {
    let mut m = Mqtt::new(stream, ctx.version);
    mqtt::connect(
        &mut m.wbuf,
        &mqtt::Connect {
            version: ctx.version,
            client_id,
            clean: true,
            keep_alive: ctx.keep_alive,
            session_expiry: 0,
        },
    );
    m.flush()
        .await
        .map_err(|e| Fail::new(FailKind::Protocol, format!("sending CONNECT: {e}")))?;
    match m.recv().await {
        Ok(Packet::ConnAck { code: 0, .. }) => Ok(m),
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

/// SUBSCRIBEs to each filter (QoS 1) and waits for every SUBACK; Err names a refused one.
async fn subscribe(m: &mut Mqtt, filters: &[&str]) -> Result<(), Fail> {
    for (k, f) in filters.iter().enumerate() {
        mqtt::subscribe(&mut m.wbuf, m.version, k as u16 + 1, f, 1);
    }
    m.flush()
        .await
        .map_err(|e| Fail::new(FailKind::Protocol, e))?;
    let mut granted = 0;
    while granted < filters.len() {
        match m.recv().await {
            Ok(Packet::SubAck { code, .. }) if mqtt::suback_ok(code) => granted += 1,
            Ok(Packet::SubAck { code, pkid }) => {
                let f = filters
                    .get(usize::from(pkid).wrapping_sub(1))
                    .unwrap_or(&"?");
                return Err(Fail::new(
                    FailKind::Refused,
                    format!("SUBACK 0x{code:02x} for {f}"),
                ));
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
    Ok(())
}

async fn step<T>(
    ctx: &Ctx,
    what: &str,
    f: impl std::future::Future<Output = Result<T, Fail>>,
) -> Result<T, Fail> {
    match tokio::time::timeout(ctx.connect_timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(Fail::new(
            FailKind::Timeout,
            format!("{what}: no answer within --connect-timeout"),
        )),
    }
}

/// One agent: claim connect, CSR, RegisterThing, own connect; then holds until `stop`.
async fn agent(
    ctx: Arc<Ctx>,
    sh: Arc<Shared>,
    i: usize,
    conns: Arc<Conns>,
    permit: tokio::sync::OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let t0 = conns.attempt();
    let a = &sh.agents[i];
    let st = &sh.st;
    let base = ctx.tls.as_ref().expect("provision runs over TLS");
    let mut at = "claim_connect";
    let run = async {
        // 1. Claim connection.
        let claim_id = format!("claim-{}", a.thing);
        let mut m = step(&ctx, at, async {
            let s = Stream::open(
                &ctx.url,
                ctx.addr,
                ctx.source(i),
                Some((base, sh.claim_tls.clone())),
            )
            .await?;
            let mut m = connect(&ctx, s, &claim_id).await?;
            let reg = format!(
                "$aws/provisioning-templates/{}/provision/json/+",
                sh.template
            );
            subscribe(&mut m, &[&format!("{CSR_TOPIC}/+"), &reg]).await?;
            Ok(m)
        })
        .await?;
        let t1 = payload::now_ns();
        st.record(0, t0, t1);
        st.claim_connected.fetch_add(1, Relaxed);

        // 2. CreateCertificateFromCsr.
        at = "create_from_csr";
        let mut pkid = 10u16;
        let req = json!({"certificateSigningRequest": a.csr_pem}).to_string();
        let v = step(&ctx, at, ask(&sh, &mut m, &mut pkid, CSR_TOPIC, &req)).await?;
        let (Some(token), Some(cert_pem)) = (
            v["certificateOwnershipToken"].as_str(),
            v["certificatePem"].as_str(),
        ) else {
            return Err(Fail::new(
                FailKind::Protocol,
                format!("accepted without certificateOwnershipToken or certificatePem: {v}"),
            ));
        };
        let cert_pem = cert_pem.to_owned();
        let t2 = payload::now_ns();
        st.record(1, t1, t2);
        st.certified.fetch_add(1, Relaxed);

        // 3. RegisterThing.
        at = "register_thing";
        let serial = i.to_string();
        let req = json!({
            "certificateOwnershipToken": token,
            "parameters": {"SerialNumber": serial, "Account": a.account},
        })
        .to_string();
        let topic = format!("$aws/provisioning-templates/{}/provision/json", sh.template);
        let v = step(&ctx, at, ask(&sh, &mut m, &mut pkid, &topic, &req)).await?;
        let thing = v["thingName"].as_str().unwrap_or("").to_owned();
        if thing != a.thing {
            return Err(Fail::new(
                FailKind::Protocol,
                format!("thingName {thing:?}, expected {:?}: {v}", a.thing),
            ));
        }
        let t3 = payload::now_ns();
        st.record(2, t2, t3);
        st.registered.fetch_add(1, Relaxed);

        // 4. Reconnect with the new certificate as the thing.
        at = "own_connect";
        m.close().await;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Fail::new(FailKind::Protocol, format!("certificatePem: {e}")))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(a.key_der.clone()));
        let cfg = base
            .client_config(Some((chain, key)), ctx.alpn.as_deref(), false)
            .map_err(|e| Fail::new(FailKind::Tls, e))?;
        let m = step(&ctx, at, async {
            let s = Stream::open(&ctx.url, ctx.addr, ctx.source(i), Some((base, cfg))).await?;
            connect(&ctx, s, &a.thing).await
        })
        .await?;
        let t4 = payload::now_ns();
        st.record(3, t3, t4);
        Ok::<(Mqtt, u64), Fail>((m, t4))
    };
    let (mut m, t4) = match run.await {
        Ok(x) => x,
        Err(f) => {
            st.error(at, &f.detail);
            conns.fail(f.kind, &format!("{at}: {}", f.detail));
            return;
        }
    };
    st.record(4, t0, t4);
    st.own_connected.fetch_add(1, Relaxed);
    conns.connected.fetch_add(1, Relaxed);
    conns.ready(t0);
    drop(permit);
    // Its policy lets it reach its own topics (checked, not timed).
    let filter = format!("{}/{}/#", a.account, a.thing);
    if let Err(f) = step(&ctx, "own_subscribe", subscribe(&mut m, &[&filter])).await {
        st.own_subscribe_refused.fetch_add(1, Relaxed);
        st.error("own_subscribe", &f.detail);
    }
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = m.recv() => match r {
                Ok(Packet::Publish(p)) if p.qos == 1 => mqtt::puback(&mut m.wbuf, p.pkid),
                Ok(Packet::Disconnect { .. }) | Err(_) => {
                    conns.dropped.fetch_add(1, Relaxed);
                    return;
                }
                Ok(_) => {}
            }
        }
        if m.flush().await.is_err() {
            conns.dropped.fetch_add(1, Relaxed);
            return;
        }
    }
    m.close().await;
}

/// Scenario `provision`.
pub async fn provision(ctx: Arc<Ctx>, c: &Common, o: &ProvisionOpts) -> anyhow::Result<Report> {
    let mut r = Report::new("provision");
    let n = c.devices.max(1);
    let base = ctx
        .tls
        .as_ref()
        .context("provision needs a TLS --url (mqtts://) and --ca")?;
    r.param("template", o.template.clone());
    r.param("thing_prefix", o.thing_prefix.clone());
    r.param("max_retries_on_429", o.max_retries);
    r.param(
        "flow",
        "CreateCertificateFromCsr + RegisterThing, then reconnect as the thing",
    );

    let prep = std::time::Instant::now();
    let opts = o.clone();
    let accounts = c.accounts;
    let (claim, agents) = tokio::task::spawn_blocking(move || {
        let claim = set_up(&opts)?;
        let agents = make_agents(n, &opts.thing_prefix, accounts)?;
        Ok::<_, anyhow::Error>((claim, agents))
    })
    .await??;
    let chain = CertificateDer::pem_slice_iter(claim.0.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the claim certificate")?;
    let key = PrivateKeyDer::from_pem_slice(claim.1.as_bytes()).context("the claim key")?;
    let claim_tls = base.client_config(Some((chain, key)), ctx.alpn.as_deref(), false)?;
    eprintln!(
        "set up the template, a claim certificate and {n} keys + CSRs in {:.1} s (not timed)",
        prep.elapsed().as_secs_f64()
    );
    let sh = Arc::new(Shared {
        agents,
        claim_tls,
        template: o.template.clone(),
        max_retries: o.max_retries,
        st: Stats::new(),
    });

    let conns = Conns::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let before = ctx.probe.broker();
    let win = Window::start(&ctx.probe);
    let started = Instant::now();
    // Progress, every second, on stderr.
    let progress = {
        let (sh, conns) = (sh.clone(), conns.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let l = |a: &AtomicU64| a.load(Relaxed);
                let st = &sh.st;
                eprintln!(
                    "[{:>4.0} s] done {}/{n}  (claim connected {}, certificate {}, registered {}); 429 retried {}, failed {}",
                    started.elapsed().as_secs_f64(),
                    l(&st.own_connected),
                    l(&st.claim_connected),
                    l(&st.certified),
                    l(&st.registered),
                    l(&st.throttled),
                    conns.failed(),
                );
            }
        })
    };
    let handles = spawn_paced(
        &ctx,
        0..n,
        c.rate,
        c.max_pending,
        &conns,
        "provision",
        |i, permit| {
            tokio::spawn(agent(
                ctx.clone(),
                sh.clone(),
                i,
                conns.clone(),
                permit,
                stop_rx.clone(),
            ))
        },
    )
    .await;
    let (wall, bcpu, mcpu) = win.end(&ctx.probe);
    // The last own subscriptions.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = ctx.probe.broker();
    progress.abort();

    let st = &sh.st;
    let l = |a: &AtomicU64| a.load(Relaxed);
    let done = l(&st.own_connected);
    let failed = conns.failed();
    // From the first agent's start to the last one connected as its thing.
    let all_s = conns.seconds();
    r.set("agents", n as u64);
    r.set("provisioned_and_connected", done);
    r.set("failed", failed);
    r.set("throttled_429_retried", l(&st.throttled));
    r.set("own_subscribe_refused", l(&st.own_subscribe_refused));
    let rejected = st.rejected.lock().clone();
    r.set("rejected_by_code", json!(rejected));
    r.set("errors", json!(st.errors.lock().clone()));
    r.set("wall_s_until_all_connected", round3(all_s));
    let per_s = if all_s > 0.0 {
        done as f64 / all_s
    } else {
        0.0
    };
    r.set("provisions_per_s", round1(per_s));
    let mut lat = serde_json::Map::new();
    for (k, name) in STEPS.iter().enumerate() {
        lat.insert((*name).into(), hist_json(&st.hist[k].lock()));
    }
    r.set("latency", Value::Object(lat));
    r.set("connections", conns.json());
    r.set("broker_rss_before_kib", kib(before));
    r.set("broker_rss_after_kib", kib(after));
    r.set("broker_rss_peak_kib", ctx.probe.peak_rss_kib.load(Relaxed));

    r.line(format!(
        "provisioned       {done}/{n} connected with their own certificate in {all_s:.2} s = {per_s:.0} provisions/s; failed {failed}, rejected {}, 429 retried {}, own SUBSCRIBE refused {}",
        rejected.values().sum::<u64>(),
        l(&st.throttled),
        l(&st.own_subscribe_refused)
    ));
    for (k, name) in STEPS.iter().enumerate() {
        r.line(format!("  {name:<16}{}", lat_line(&st.hist[k].lock())));
    }
    cpu_figures(
        &mut r,
        "provisioning",
        wall,
        bcpu,
        mcpu,
        Some((done, "provisioning")),
    );
    if let (Some(b), true) = (bcpu, done > 0) {
        r.set(
            "broker_cpu_ms_per_provisioning",
            round3(b * 1e3 / done as f64),
        );
        if b > 0.0 {
            r.set("provisions_per_broker_cpu_s", round1(done as f64 / b));
            r.line(format!(
                "  = {:.2} ms broker CPU per provisioning, {:.0} provisions per broker CPU-second",
                b * 1e3 / done as f64,
                done as f64 / b
            ));
        }
    }
    match (before, after) {
        (Some(b), Some(a)) => r.line(format!(
            "broker RSS        {:.1} MiB -> {:.1} MiB (with {done} agents connected), peak {:.1} MiB",
            b.rss_kib as f64 / 1024.0,
            a.rss_kib as f64 / 1024.0,
            ctx.probe.peak_rss_kib.load(Relaxed) as f64 / 1024.0
        )),
        _ => r.line("broker RSS        (no --broker-pid)"),
    }
    let errors = st.errors.lock().clone();
    if errors.is_empty() {
        r.line("errors            none");
    } else {
        r.line(format!("errors            {} distinct:", errors.len()));
        for (e, k) in &errors {
            r.line(format!("  {k:>6} x {e}"));
        }
    }
    stop_all(&stop_tx, handles).await;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_have_csrs_for_their_thing() {
        let a = make_agents(3, "prov-", 2).unwrap();
        assert_eq!(a[2].thing, "prov-2");
        assert_eq!(a[1].account, "acct1");
        assert!(a[0]
            .csr_pem
            .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert!(PrivateKeyDer::try_from(a[0].key_der.clone()).is_ok());
    }

    #[test]
    fn template_names_the_thing_and_policy() {
        let t = template_body("prov-", "agent");
        assert_eq!(
            t["Resources"]["thing"]["Properties"]["ThingName"]["Fn::Join"][1][0],
            "prov-"
        );
        assert_eq!(
            t["Resources"]["policy"]["Properties"]["PolicyName"],
            "agent"
        );
        assert_eq!(
            t["DeviceConfiguration"]["ordersTopic"]["Fn::Sub"],
            "${Account}/prov-${SerialNumber}/orders"
        );
    }
}
