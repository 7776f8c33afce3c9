//! TLS 1.3 session resumption on a registry TLS listener, end to end in process:
//! real certificates (rcgen), the real listener, a rustls client with a session store
//! of its own, and MQTT 3.1.1 CONNECT/CONNACK on top.
//!
//! What must hold: a ticket resumes across a broker restart; a resumed session is
//! still checked at CONNECT (a revoked certificate, an expired certificate are
//! refused); a ticket does not resume once the trusted CAs changed; with resumption
//! turned off every handshake is full.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleetcore_broker::config::{ListenerConfig, ListenerKind, TlsResumptionConfig};
use fleetcore_broker::{Config, Server};
use fleetcore_core::principal::ClientCert;
use fleetcore_identity::registry::{CaRecord, CertState, NewCert};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::client::{ClientSessionMemoryCache, Resumption};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::HandshakeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ALLOW_ALL: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:*","Resource":"*"}]}"#;

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

struct Device {
    name: String,
    cert_pem: String,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

fn new_ca(cn: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = new_ca("resumption test CA");
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key.serialize_pem()).unwrap();
        Pki {
            dir,
            ca_pem,
            issuer,
        }
    }

    /// A device certificate with CN = `name`, valid for `valid_for` from now.
    fn device(&self, name: &str, valid_for: Duration) -> Device {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + valid_for;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Device {
            name: name.into(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn config(pki: &Pki, data_dir: &Path, resumption: bool) -> Config {
    let mut l = ListenerConfig::default_tcp();
    l.kind = ListenerKind::Tls;
    l.bind = "127.0.0.1:0".parse().unwrap();
    l.allow_anonymous = false;
    l.cert_file = Some(pki.path("server.pem"));
    l.key_file = Some(pki.path("server.key"));
    l.client_ca_file = Some(pki.path("ca.pem"));
    Config {
        data_dir: data_dir.into(),
        listeners: vec![l],
        tls_resumption: TlsResumptionConfig {
            enabled: resumption,
            ..TlsResumptionConfig::default()
        },
        ..Config::default()
    }
}

fn tls_port(server: &Server) -> u16 {
    server
        .local_addrs()
        .iter()
        .find(|(k, _)| *k == "tls")
        .unwrap()
        .1
        .port()
}

/// Registers the device's certificate ACTIVE with an allow-all policy; returns its id.
async fn register(server: &Server, d: &Device) -> String {
    let info = ClientCert::from_der(&d.cert_der).unwrap();
    let reg = &server.hub().registry;
    reg.register_certificate(
        NewCert {
            id: info.fingerprint.clone(),
            pem: d.cert_pem.clone(),
            subject: info.subject.clone(),
            subject_cn: info.subject_cn.clone(),
            issuer: info.issuer.clone(),
            serial: info.serial.clone(),
            not_after_ms: u64::MAX,
        },
        CertState::Active,
    )
    .await
    .unwrap();
    if reg.policy("all").is_none() {
        reg.create_policy("all", ALLOW_ALL).await.unwrap();
    }
    reg.attach_policy("all", &info.fingerprint).await.unwrap();
    info.fingerprint
}

/// A device's TLS client: its own certificate and its own session store, as a
/// device would keep across reconnections.
fn client(pki: &Pki, d: &Device) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in rustls_pemfile_certs(&pki.ca_pem) {
        roots.add(ca).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![d.cert_der.clone().into()],
        PrivateKeyDer::try_from(d.key_der.clone()).unwrap(),
    )
    .unwrap();
    cfg.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(8)));
    Arc::new(cfg)
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

/// Connects, sends an MQTT 3.1.1 CONNECT with the device's name as client id and
/// returns how the handshake went and the CONNACK return code (0: accepted).
async fn connect(
    port: u16,
    cfg: &Arc<rustls::ClientConfig>,
    client_id: &str,
) -> (HandshakeKind, u8) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake failed");
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    let mut pkt = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
    pkt.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    pkt.extend_from_slice(client_id.as_bytes());
    let mut connect = vec![0x10, pkt.len() as u8];
    connect.extend_from_slice(&pkt);
    tls.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut connack))
        .await
        .expect("no CONNACK in time")
        .expect("connection closed before CONNACK");
    assert_eq!(connack[..2], [0x20, 0x02], "not a CONNACK: {connack:?}");
    if connack[3] == 0 {
        // DISCONNECT, then wait for the broker to close.
        tls.write_all(&[0xe0, 0x00]).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut rest)).await;
    }
    (kind, connack[3])
}

const ACCEPTED: u8 = 0;
/// MQTT 3.1.1 CONNACK "not authorized".
const NOT_AUTHORIZED: u8 = 5;

async fn restart(server: Server, cfg: &Config) -> Server {
    server.shutdown(Duration::from_secs(2)).await.unwrap();
    // The store closes when the last task holding the hub has dropped it (aborted
    // tasks go away asynchronously): until then it is still locked.
    for _ in 0..100 {
        match Server::start(cfg.clone()).await {
            Ok(s) => return s,
            Err(e) if e.to_string().contains("already open") => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("restart: {e}"),
        }
    }
    panic!("the store stayed locked after shutdown")
}

#[tokio::test]
async fn session_resumes_after_broker_restart() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(&pki, data.path(), true);
    let server = Server::start(cfg.clone()).await.unwrap();
    let dev = pki.device("dev-1", Duration::from_secs(3600));
    register(&server, &dev).await;
    let client = client(&pki, &dev);
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Full, ACCEPTED)
    );
    let keys = data
        .path()
        .join(fleetcore_broker::transport::tls::tickets::KEY_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keys).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "ticket key file mode {mode:o}");
    }
    let server = restart(server, &cfg).await;
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Resumed, ACCEPTED),
        "the ticket from before the restart did not resume"
    );
    // Another device, another store: a full handshake.
    let other = pki.device("dev-2", Duration::from_secs(3600));
    register(&server, &other).await;
    assert_eq!(
        connect(tls_port(&server), &client_for(&pki, &other), &other.name).await,
        (HandshakeKind::Full, ACCEPTED)
    );
    // New key file (a broker whose data directory lost it): the old ticket cannot
    // resume; the device gets in with a full handshake.
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await.0,
        HandshakeKind::Resumed
    );
    std::fs::remove_file(&keys).unwrap();
    let server = restart(server, &cfg).await;
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Full, ACCEPTED)
    );
    server.shutdown(Duration::from_secs(2)).await.unwrap();
}

fn client_for(pki: &Pki, d: &Device) -> Arc<rustls::ClientConfig> {
    client(pki, d)
}

#[tokio::test]
async fn revoked_certificate_cannot_come_back_with_a_ticket() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(&pki, data.path(), true);
    let server = Server::start(cfg.clone()).await.unwrap();
    let dev = pki.device("dev-r", Duration::from_secs(3600));
    let id = register(&server, &dev).await;
    let client = client(&pki, &dev);
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Full, ACCEPTED)
    );
    server
        .hub()
        .registry
        .set_certificate_state(&id, CertState::Revoked)
        .await
        .unwrap();
    let server = restart(server, &cfg).await;
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Resumed, NOT_AUTHORIZED),
        "a revoked certificate got back in on a resumed session"
    );
    server.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn expired_certificate_cannot_come_back_with_a_ticket() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(&pki, data.path(), true);
    let server = Server::start(cfg.clone()).await.unwrap();
    // Valid for about two more seconds (X.509 times are whole seconds).
    let dev = pki.device("dev-x", Duration::from_secs(2));
    let not_after = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    register(&server, &dev).await;
    let client = client(&pki, &dev);
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Full, ACCEPTED)
    );
    // Still valid: resumes and is let in (the check is not refusing everything).
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Resumed, ACCEPTED)
    );
    while SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        <= not_after + 1
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Resumed, NOT_AUTHORIZED),
        "an expired certificate got in on a resumed session"
    );
    server.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn ticket_does_not_resume_after_trusted_cas_change() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(&pki, data.path(), true);
    let server = Server::start(cfg.clone()).await.unwrap();
    let dev = pki.device("dev-c", Duration::from_secs(3600));
    register(&server, &dev).await;
    let client = client(&pki, &dev);
    let port = tls_port(&server);
    assert_eq!(
        connect(port, &client, &dev.name).await,
        (HandshakeKind::Full, ACCEPTED)
    );
    assert_eq!(
        connect(port, &client, &dev.name).await,
        (HandshakeKind::Resumed, ACCEPTED)
    );
    // Register another CA: the listener's trust store changes.
    let (other_ca, _) = new_ca("another CA");
    server
        .hub()
        .registry
        .register_ca(CaRecord {
            id: "other".into(),
            pem: other_ca,
            subject: "CN=another CA".into(),
            created_ms: 0,
        })
        .await
        .unwrap();
    server.hub().reload_trust().unwrap();
    assert_eq!(
        connect(port, &client, &dev.name).await,
        (HandshakeKind::Full, ACCEPTED),
        "a ticket issued under the old trust store resumed"
    );
    // And across a restart, the binding is computed the same way again.
    assert_eq!(
        connect(port, &client, &dev.name).await,
        (HandshakeKind::Resumed, ACCEPTED)
    );
    let server = restart(server, &cfg).await;
    assert_eq!(
        connect(tls_port(&server), &client, &dev.name).await,
        (HandshakeKind::Resumed, ACCEPTED)
    );
    server.shutdown(Duration::from_secs(2)).await.unwrap();
}

#[tokio::test]
async fn resumption_turned_off_means_full_handshakes() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(&pki, data.path(), false);
    let server = Server::start(cfg.clone()).await.unwrap();
    let dev = pki.device("dev-o", Duration::from_secs(3600));
    register(&server, &dev).await;
    let client = client(&pki, &dev);
    let port = tls_port(&server);
    for _ in 0..2 {
        assert_eq!(
            connect(port, &client, &dev.name).await,
            (HandshakeKind::Full, ACCEPTED)
        );
    }
    assert!(!data
        .path()
        .join(fleetcore_broker::transport::tls::tickets::KEY_FILE)
        .exists());
    server.shutdown(Duration::from_secs(2)).await.unwrap();
}
