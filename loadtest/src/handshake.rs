//! rustls alone: full mutual-TLS handshakes between an in-process client and server
//! through memory buffers, with fleetcore's server configuration (ring, TLS 1.2/1.3,
//! ECDSA P-256 server certificate, client certificate required and verified with
//! `WebPkiClientVerifier`). The server's CPU time per handshake gives the ceiling a broker
//! can reach per core; `fleetcore handshakes/s per core >= 90% of this` is the target.

use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use serde_json::json;

use crate::payload::thread_cpu_ns;
use crate::stats::{round1, Report};

fn configs(tls12: bool) -> anyhow::Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let (ca, ca_key, server, server_key) = crate::fleet::make_test_pki(&["localhost"])?;
    let dir = std::env::temp_dir().join(format!("fleetcore-hs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ca.pem"), &ca)?;
    std::fs::write(dir.join("ca.key"), &ca_key)?;
    let source = crate::fleet::Source::Ca {
        cert: dir.join("ca.pem"),
        key: dir.join("ca.key"),
    };
    let (fleet, _) = crate::fleet::Fleet::prepare(&dir.join("fleet"), &source, 1, 1)?;
    let (client_chain, client_key) = fleet.load("dev0")?;
    std::fs::remove_dir_all(&dir).ok();

    let provider = Arc::new(server_provider());
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca.as_bytes())?)?;
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .context("client verifier")?;
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(server.as_bytes())?],
            PrivateKeyDer::from_pem_slice(server_key.as_bytes())?,
        )?;
    // As fleetcore's server: no TLS 1.3 session tickets, AES-128-GCM first.
    server.send_tls13_tickets = 0;
    server.ignore_client_order = true;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)?;
    client.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(server), Arc::new(client)))
}

/// ring's suites with AES-128-GCM first, as fleetcore's server orders them
/// (with `ignore_client_order`, the server's order decides).
fn server_provider() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite as C;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| {
        !matches!(
            s.suite(),
            C::TLS13_AES_128_GCM_SHA256
                | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// Handshakes `n` times; returns (server CPU ns, client CPU ns).
fn run(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    n: u64,
) -> anyhow::Result<(u64, u64)> {
    let name = ServerName::try_from("localhost")?;
    let (mut s_ns, mut c_ns) = (0u64, 0u64);
    let mut buf = Vec::with_capacity(16 * 1024);
    for _ in 0..n {
        let t = thread_cpu_ns();
        let mut c = ClientConnection::new(client.clone(), name.clone())?;
        let t2 = thread_cpu_ns();
        c_ns += t2 - t;
        let mut s = ServerConnection::new(server.clone())?;
        s_ns += thread_cpu_ns() - t2;
        while c.is_handshaking() || s.is_handshaking() {
            // Client to server: the server's read and processing is server time.
            let t = thread_cpu_ns();
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf)?;
            }
            let t2 = thread_cpu_ns();
            c_ns += t2 - t;
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd)?;
                s.process_new_packets()
                    .map_err(|e| anyhow::anyhow!("server: {e}"))?;
            }
            let mut out = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut out)?;
            }
            let t3 = thread_cpu_ns();
            s_ns += t3 - t2;
            let mut rd = &out[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd)?;
                c.process_new_packets()
                    .map_err(|e| anyhow::anyhow!("client: {e}"))?;
            }
            c_ns += thread_cpu_ns() - t3;
            if buf.is_empty() && out.is_empty() && (c.is_handshaking() || s.is_handshaking()) {
                anyhow::bail!("handshake stalled");
            }
        }
        // Make sure the client certificate was really verified.
        anyhow::ensure!(
            s.peer_certificates().is_some_and(|c| !c.is_empty()),
            "no client certificate"
        );
    }
    Ok((s_ns, c_ns))
}

/// Runs the benchmark; `n` handshakes after `n / 10` warm-up ones.
pub fn bench(n: u64, tls12: bool) -> anyhow::Result<Report> {
    let (server, client) = configs(tls12)?;
    run(&server, &client, (n / 10).max(10))?;
    let wall = std::time::Instant::now();
    let (s_ns, c_ns) = run(&server, &client, n)?;
    let wall = wall.elapsed().as_secs_f64();
    let mut r = Report::new("handshake");
    r.param("handshakes", n);
    r.param("tls", if tls12 { "1.2" } else { "1.3" });
    r.param(
        "key",
        "ECDSA P-256 (server and client), client certificate required",
    );
    let per_s = n as f64 / (s_ns as f64 / 1e9);
    r.set(
        "server_cpu_us_per_handshake",
        round1(s_ns as f64 / n as f64 / 1000.0),
    );
    r.set("server_handshakes_per_cpu_s", round1(per_s));
    r.set(
        "client_cpu_us_per_handshake",
        round1(c_ns as f64 / n as f64 / 1000.0),
    );
    r.set("both_sides_per_s_wall", round1(n as f64 / wall));
    r.set("note", json!("server_handshakes_per_cpu_s is rustls alone on one core: the ceiling for a broker's mTLS handshakes per core"));
    r.line(format!(
        "rustls server     {:.1} µs CPU per handshake = {per_s:.0} handshakes/s per core",
        s_ns as f64 / n as f64 / 1000.0
    ));
    r.line(format!(
        "rustls client     {:.1} µs CPU per handshake; both sides in one thread: {:.0}/s",
        c_ns as f64 / n as f64 / 1000.0,
        n as f64 / wall
    ));
    Ok(r)
}

/// A null broker: TLS (fleetcore's server configuration) or plain TCP, answering CONNECT,
/// SUBSCRIBE and PINGREQ and nothing else. The `idle` scenario against it measures what
/// accepting, the handshake and two packets cost with no broker logic: the ceiling for
/// "connections per broker CPU-second" on this machine. Runs until SIGTERM/SIGINT or
/// `max_secs`.
pub async fn null_broker(
    bind: std::net::SocketAddr,
    tls: Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    max_secs: u64,
) -> anyhow::Result<()> {
    use crate::mqtt;
    use crate::net::{Io, Mqtt, Stream};
    use rustls::pki_types::pem::PemObject;
    let acceptor = match tls {
        Some((cert, key, ca)) => {
            let provider = Arc::new(server_provider());
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&ca)? {
                roots.add(c?)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()?;
            let mut cfg = ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    CertificateDer::pem_file_iter(&cert)?.collect::<Result<Vec<_>, _>>()?,
                    PrivateKeyDer::from_pem_file(&key)?,
                )?;
            // As fleetcore's server: no TLS 1.3 session tickets, AES-128-GCM first.
            cfg.send_tls13_tickets = 0;
            cfg.ignore_client_order = true;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(bind).await?;
    eprintln!(
        "null broker listening on {bind} ({})",
        if acceptor.is_some() {
            "mutual TLS"
        } else {
            "plain TCP"
        }
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = tokio::time::sleep(std::time::Duration::from_secs(max_secs));
    tokio::pin!(stop);
    loop {
        let (sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = &mut stop => return Ok(()),
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let io = match acceptor {
                Some(a) => match a.accept(sock).await {
                    Ok(s) => Io::ServerTls(Box::new(s)),
                    Err(_) => return,
                },
                None => Io::Tcp(sock),
            };
            let mut m = Mqtt::new(Stream::Raw(io), mqtt::V311);
            loop {
                match m.recv().await {
                    Ok(mqtt::Packet::Connect { version }) => {
                        m.version = version;
                        mqtt::connack(&mut m.wbuf, version);
                    }
                    Ok(mqtt::Packet::Subscribe { pkid }) => {
                        mqtt::suback(&mut m.wbuf, m.version, pkid)
                    }
                    Ok(mqtt::Packet::PingReq) => mqtt::pingresp(&mut m.wbuf),
                    Ok(mqtt::Packet::Publish(p)) if p.qos == 1 => mqtt::puback(&mut m.wbuf, p.pkid),
                    Ok(mqtt::Packet::Disconnect { .. }) | Err(_) => return,
                    Ok(_) => {}
                }
                if !m.has_buffered() && m.flush().await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn handshakes_complete_both_versions() {
        for tls12 in [false, true] {
            let r = super::bench(10, tls12).unwrap();
            assert!(r.results["server_handshakes_per_cpu_s"].as_f64().unwrap() > 0.0);
        }
    }
}
