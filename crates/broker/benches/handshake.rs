// Server CPU of one mutual-TLS handshake with the listener's configuration
// (`tls::server_config`): full without tickets (resumption off), full with the one
// ticket it then issues (resumption on, a client that never resumes), and resumed
// from that ticket. Client and server run in memory in one thread; only the server's
// calls (read_tls, process_new_packets, write_tls) are timed.
//
//     cargo bench -p fleetcore-broker --bench handshake

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use fleetcore_broker::transport::tls::tickets::{TicketKeys, KEY_FILE};
use fleetcore_broker::transport::tls::{self, Resumption, TlsOptions};
use rustls::client::{ClientSessionMemoryCache, Resumption as ClientResumption};
use rustls::pki_types::{PrivateKeyDer, ServerName};

struct Setup {
    _dir: tempfile::TempDir,
    server_off: Arc<rustls::ServerConfig>,
    server_on: Arc<rustls::ServerConfig>,
    client_no_resume: Arc<rustls::ClientConfig>,
    client_resume: Arc<rustls::ClientConfig>,
}

fn setup() -> Setup {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert, key)
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into()]);
    let (client_cert, client_key) = leaf(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    let (cert, key, ca) = (
        write("server.pem", server_cert.pem()),
        write("server.key", server_key.serialize_pem()),
        write("ca.pem", ca_cert.pem()),
    );
    let server_off = tls::server_config(&cert, &key, &ca, &TlsOptions::default()).unwrap();
    let keys = Arc::new(TicketKeys::open(&dir.path().join(KEY_FILE), 3600, 3600).unwrap());
    let server_on = tls::server_config(
        &cert,
        &key,
        &ca,
        &TlsOptions {
            resumption: Some(Resumption {
                keys,
                listener: "tls bench".into(),
            }),
            ..Default::default()
        },
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let client = |resume: bool| {
        let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(
            vec![client_cert.der().clone()],
            PrivateKeyDer::try_from(client_key.serialize_der()).unwrap(),
        )
        .unwrap();
        c.resumption = if resume {
            ClientResumption::store(Arc::new(ClientSessionMemoryCache::new(4)))
        } else {
            ClientResumption::disabled()
        };
        Arc::new(c)
    };
    Setup {
        _dir: dir,
        server_off,
        server_on,
        client_no_resume: client(false),
        client_resume: client(true),
    }
}

/// One handshake (and the ticket after it, if any); returns the server's time and
/// whether it resumed.
fn handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
) -> (Duration, bool) {
    let name = ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
    let mut spent = Duration::ZERO;
    let t = Instant::now();
    let mut s = server_new(server);
    spent += t.elapsed();
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let t = Instant::now();
        let out = server_step(&mut s, &buf);
        spent += t.elapsed();
        let mut rd = &out[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
        if buf.is_empty() && out.is_empty() {
            break;
        }
    }
    assert!(!s.is_handshaking());
    let resumed = s.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let t = Instant::now();
    server_drop(s);
    spent += t.elapsed();
    (spent, resumed)
}

// The server's work, kept out of line so that callgrind can count it alone
// (`--toggle-collect='handshake::server_*'`).
#[inline(never)]
fn server_new(server: &Arc<rustls::ServerConfig>) -> rustls::ServerConnection {
    rustls::ServerConnection::new(server.clone()).unwrap()
}

#[inline(never)]
fn server_step(s: &mut rustls::ServerConnection, input: &[u8]) -> Vec<u8> {
    let mut rd = input;
    while !rd.is_empty() {
        s.read_tls(&mut rd).unwrap();
        s.process_new_packets().unwrap();
    }
    let mut out = Vec::new();
    while s.wants_write() {
        s.write_tls(&mut out).unwrap();
    }
    out
}

#[inline(never)]
fn server_drop(s: rustls::ServerConnection) {
    drop(s)
}

fn bench_handshake(c: &mut Criterion) {
    let st = setup();
    let mut group = c.benchmark_group("mTLS handshake, server CPU");
    let cases = [
        (
            "full, resumption off",
            &st.server_off,
            &st.client_no_resume,
            false,
        ),
        (
            "full, resumption on (issues a ticket)",
            &st.server_on,
            &st.client_no_resume,
            false,
        ),
        (
            "resumed from a ticket",
            &st.server_on,
            &st.client_resume,
            true,
        ),
    ];
    for (label, server, client, expect_resumed) in cases {
        // Primes the client's session store (a first, full handshake).
        handshake(server, client);
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (spent, resumed) = handshake(server, client);
                    assert_eq!(resumed, expect_resumed, "{label}");
                    total += spent;
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_handshake);

/// `HANDSHAKES=N CASE=full-off|full-on|resumed` runs N handshakes of one case (after
/// one that primes the client) and nothing else: for counting instructions, e.g.
/// `valgrind --tool=callgrind --toggle-collect='handshake::server_*'`
/// at two values of N, whose difference divided by the difference of N is one
/// handshake's server work (exact, whatever else runs on the machine).
fn main() {
    if let (Ok(n), Ok(case)) = (std::env::var("HANDSHAKES"), std::env::var("CASE")) {
        let n: u32 = n.parse().expect("HANDSHAKES=<count>");
        let st = setup();
        let (server, client, expect_resumed) = match case.as_str() {
            "full-off" => (&st.server_off, &st.client_no_resume, false),
            "full-on" => (&st.server_on, &st.client_no_resume, false),
            "resumed" => (&st.server_on, &st.client_resume, true),
            other => panic!("CASE={other}: full-off, full-on or resumed"),
        };
        handshake(server, client);
        for _ in 0..n {
            assert_eq!(handshake(server, client).1, expect_resumed);
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
