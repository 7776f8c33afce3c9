//! TLS for the listeners: server configuration from PEM files, and what a
//! verified client certificate says about its holder.
//!
//! Client certificates are required and verified against the configured CA
//! bundle by rustls (`WebPkiClientVerifier`); by the time a connection reaches
//! the MQTT layer its peer certificate chains to a trusted CA. The subject is
//! read here so the identity layer can bind policy variables to it.

pub mod stream;
pub mod tickets;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{path} holds no {what}")]
    Empty { what: &'static str, path: PathBuf },
    #[error("TLS configuration refused: {0}")]
    Config(String),
}

/// Every certificate in a PEM file; an error names the file and what was expected.
/// A server configuration presenting `chain`/`key` that verifies client certificates
/// against `roots` (required, or only checked when sent if `optional`).
pub fn verifying_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: RootCertStore,
    optional: bool,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if optional {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("server certificate and key: {e}")))
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        what: "a private key",
        path: path.into(),
        reason: e.to_string(),
    })
}

/// Reads the CA certificates of a PEM file into a root store, and as DER.
pub fn read_roots(path: &Path) -> Result<(RootCertStore, Vec<CertificateDer<'static>>), TlsError> {
    let mut roots = RootCertStore::empty();
    let mut ders = Vec::new();
    for ca in read_certs(path, "a CA certificate")? {
        ders.push(ca.clone());
        roots
            .add(ca)
            .map_err(|e| TlsError::Config(format!("CA in {}: {e}", path.display())))?;
    }
    Ok((roots, ders))
}

/// Reads the certificates of a PEM file; `what` names them in errors.
pub fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::File {
            what,
            path: path.into(),
            reason: e.to_string(),
        })?
        .collect();
    let certs = certs.map_err(|e| TlsError::File {
        what,
        path: path.into(),
        reason: e.to_string(),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.into(),
        });
    }
    Ok(certs)
}

/// How a listener's TLS is set up beyond its files.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// ALPN protocols offered, in preference order (empty: ALPN ignored).
    pub alpn: Vec<Vec<u8>>,
    /// Let clients without a certificate complete the handshake (they must
    /// then authenticate another way, e.g. with a token). A certificate that
    /// is presented must still verify.
    pub client_cert_optional: bool,
    /// TLS 1.3 session resumption with persisted ticket keys (`None`: off).
    pub resumption: Option<Resumption>,
}

/// How a listener resumes TLS sessions: the broker's ticket keys, and the listener's
/// name, which (with its trust store) every ticket is bound to.
#[derive(Debug, Clone)]
pub struct Resumption {
    pub keys: Arc<crate::transport::tls::tickets::TicketKeys>,
    /// The listener's kind and address, e.g. `tls 0.0.0.0:8883`.
    pub listener: String,
}

/// ALPN protocol ids that select MQTT on a listener with ALPN dispatch:
/// AWS IoT's `x-amzn-mqtt-ca` (sent by the AWS SDKs on port 443) and `mqtt`.
pub const ALPN_MQTT: [&[u8]; 2] = [b"x-amzn-mqtt-ca", b"mqtt"];
/// ALPN protocol id that selects HTTP (and so MQTT over WebSocket).
pub const ALPN_HTTP: &[u8] = b"http/1.1";

/// A rustls server configuration that requires a client certificate
/// chaining to one of the CAs in `client_ca_file`.
pub fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: &Path,
    opts: &TlsOptions,
) -> Result<Arc<ServerConfig>, TlsError> {
    server_config_with(cert_file, key_file, client_ca_file, &[], opts)
}

/// As [`server_config`], also trusting the CA certificates in `extra_cas` (PEM),
/// such as CAs registered in the registry.
pub fn server_config_with(
    cert_file: &Path,
    key_file: &Path,
    client_ca_file: &Path,
    extra_cas: &[String],
    opts: &TlsOptions,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certs(cert_file, "a server certificate")?;
    let key = read_key(key_file)?;
    // Every CA trusted, as DER: what resumption tickets are bound to.
    let (mut roots, mut trusted) = read_roots(client_ca_file)?;
    for pem in extra_cas {
        for ca in CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
            trusted.push(ca.clone());
            roots
                .add(ca)
                .map_err(|e| TlsError::Config(format!("registered CA: {e}")))?;
        }
    }
    let provider = Arc::new(server_provider());
    let mut cfg = verifying_config(provider, roots, opts.client_cert_optional, chain, key)?;
    cfg.alpn_protocols = opts.alpn.clone();
    // No server-side session cache at all: no TLS 1.2 session ids, and no stateful
    // TLS 1.3 tickets (rustls's default keeps 256 sessions in memory).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    match &opts.resumption {
        // One stateless ticket after each full handshake, sealed with keys that
        // survive a restart and bound to this listener's trust store
        // (see `tls_tickets`): a reconnecting device skips the certificate exchange.
        Some(r) => {
            let cas: Vec<&[u8]> = trusted.iter().map(|c| c.as_ref()).collect();
            let binding = crate::transport::tls::tickets::binding(
                &r.listener,
                opts.client_cert_optional,
                &opts.alpn,
                &cas,
            );
            cfg.ticketer = Arc::new(r.keys.ticketer(binding));
            cfg.send_tls13_tickets = 1;
        }
        // No tickets: rustls would otherwise send two after every handshake, work on
        // every connection for resumption nobody could use.
        None => cfg.send_tls13_tickets = 0,
    }
    // Our order of cipher suites, not the client's (see `server_provider`).
    cfg.ignore_client_order = true;
    Ok(Arc::new(cfg))
}

/// ring's suites with AES-128-GCM first. Clients (rustls, OpenSSL) list
/// AES-256-GCM-SHA384 first; AES-128-GCM-SHA256 is as standard (TLS 1.3's
/// mandatory suite), runs 10 AES rounds instead of 14 on every record, and its
/// handshake hashes with SHA-256, which this hardware does in instructions
/// (SHA-384 is software). The other suites keep their order.
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

/// A TLS listener's configuration, rebuilt when the set of trusted CAs
/// changes (a CA registered through the admin API), without a restart.
pub struct TlsSource {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: PathBuf,
    opts: TlsOptions,
    current: parking_lot::RwLock<Arc<ServerConfig>>,
}

impl TlsSource {
    pub fn new(
        cert_file: &Path,
        key_file: &Path,
        client_ca_file: &Path,
        opts: TlsOptions,
    ) -> Result<TlsSource, TlsError> {
        let cfg = server_config(cert_file, key_file, client_ca_file, &opts)?;
        Ok(TlsSource {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            client_ca_file: client_ca_file.into(),
            opts,
            current: parking_lot::RwLock::new(cfg),
        })
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.read().clone()
    }

    /// Rebuilds the configuration trusting `client_ca_file` plus `extra_cas`.
    /// On error the previous configuration stays in force.
    pub fn reload(&self, extra_cas: &[String]) -> Result<(), TlsError> {
        let cfg = server_config_with(
            &self.cert_file,
            &self.key_file,
            &self.client_ca_file,
            extra_cas,
            &self.opts,
        )?;
        *self.current.write() = cfg;
        Ok(())
    }
}

/// A CA, a server certificate for `localhost` and a client certificate, the
/// server's as PEM files, for tests of the listener configuration.
#[cfg(test)]
pub(crate) struct TestPki {
    pub dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    client_cert: CertificateDer<'static>,
    client_key: Vec<u8>,
}

#[cfg(test)]
impl TestPki {
    pub fn new() -> TestPki {
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
        for (name, pem) in [
            ("server.pem", server_cert.pem()),
            ("server.key", server_key.serialize_pem()),
            ("ca.pem", ca_cert.pem()),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        TestPki {
            dir,
            ca: ca_cert.der().clone(),
            client_cert: client_cert.der().clone(),
            client_key: client_key.serialize_der(),
        }
    }

    /// The listener's configuration, as `server_config` makes it from the files.
    pub fn server_config(&self, opts: &TlsOptions) -> Arc<ServerConfig> {
        let p = |name: &str| self.dir.path().join(name);
        server_config(&p("server.pem"), &p("server.key"), &p("ca.pem"), opts).unwrap()
    }

    /// A rustls client (ring's default suite order) presenting the client
    /// certificate, speaking `versions`.
    pub fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![self.client_cert.clone()],
            PrivateKeyDer::try_from(self.client_key.clone()).unwrap(),
        )
        .unwrap()
    }
}

/// Runs a client and a server connection against each other in memory until
/// neither has anything more to say (tickets follow the handshake), and checks
/// that the handshake finished with a client certificate.
#[cfg(test)]
pub(crate) fn handshake_in_memory(
    c: &mut rustls::ClientConnection,
    s: &mut rustls::ServerConnection,
) {
    for _ in 0..10 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        let mut out = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut out).unwrap();
        }
        let mut rd = &out[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
        if buf.is_empty() && out.is_empty() {
            break;
        }
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    assert!(s.peer_certificates().is_some_and(|chain| !chain.is_empty()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener's configuration in a real (in-memory) handshake with a
    /// client that, like rustls and OpenSSL clients, prefers AES-256: the
    /// server's order wins, and no session ticket reaches the client.
    #[test]
    fn server_picks_aes_128_and_sends_no_session_tickets() {
        use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
        use rustls::pki_types::ServerName;

        let pki = TestPki::new();
        let server = pki.server_config(&TlsOptions::default());
        let mut client = pki.client_config(rustls::DEFAULT_VERSIONS);
        let tickets = Arc::new(ClientSessionMemoryCache::new(8));
        client.resumption = Resumption::store(tickets.clone());
        assert_eq!(
            client.crypto_provider().cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            "the client must prefer AES-256 for this test to mean anything"
        );

        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(Arc::new(client), name.clone()).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        handshake_in_memory(&mut c, &mut s);
        assert_eq!(
            s.negotiated_cipher_suite().map(|cs| cs.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert!(
            tickets.take_tls13_ticket(&name).is_none(),
            "the server sent a session ticket"
        );
    }
}
