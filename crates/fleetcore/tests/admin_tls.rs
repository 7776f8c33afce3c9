//! The admin API over TLS (`[admin] tls = true`) of a real `fleetcore serve`: plain HTTP
//! gets nothing, and a request is let in with the bearer token or with an admin client
//! certificate (CN fleetcore-admin, from `fleetcore ca admin-cert`), never with a device
//! certificate alone; the CLI works over https with a client certificate and no token.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{json, Value};

fn broker() -> TestBroker {
    TestBroker::start(BrokerOpts::new().admin_tls())
}

/// A client certificate and its key, PEM.
struct Identity {
    cert_pem: String,
    key_pem: String,
}

/// One HTTP/1.1 request over TLS to 127.0.0.1:`port`, trusting `ca_pem`, presenting
/// `identity` when given. Err: the TLS connection failed (handshake refused).
fn https_request(
    port: u16,
    ca_pem: &str,
    identity: Option<&Identity>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> Result<(u16, Vec<u8>), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("add CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some(id) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .expect("client cert PEM");
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).expect("key PEM");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client conn");
    let tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin API");
    tcp.set_read_timeout(Some(STEP)).expect("set timeout");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req += &format!("Authorization: Bearer {t}\r\n");
    }
    if !body.is_empty() {
        req += "Content-Type: application/json\r\n";
    }
    req += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    tls.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw) {
        Ok(_) => {}
        // Some servers close without close_notify; what was read is still the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {:?}", String::from_utf8_lossy(&raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "chunked answers are not expected here: {head}"
    );
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

fn status(result: Result<(u16, Vec<u8>), String>) -> u16 {
    result
        .unwrap_or_else(|e| panic!("HTTPS request failed: {e}"))
        .0
}

/// Runs the CLI without any FLEETCORE_* variable from the test's environment.
fn cli(cwd: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(broker_binary());
    cmd.args(args).current_dir(cwd);
    for var in [
        "FLEETCORE_ADMIN_URL",
        "FLEETCORE_ADMIN_TOKEN",
        "FLEETCORE_ADMIN_CACERT",
        "FLEETCORE_ADMIN_CERT",
        "FLEETCORE_ADMIN_KEY",
        "FLEETCORE_DATA_DIR",
        "FLEETCORE_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    run(cmd, STEP * 3)
}

fn expect_ok(out: &std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "`fleetcore {what}` failed: {}",
        describe(out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CLI with the wrong scheme says which one the server speaks: http:// against
/// the TLS admin API; https:// against a plain one (TestBroker's default admin API).
#[test]
fn the_cli_names_the_scheme_the_admin_api_speaks() {
    let work = tempfile::tempdir().expect("temp dir");
    let tls = broker();
    let data_dir = tls.data_dir();
    let http_url = format!("http://127.0.0.1:{}", tls.admin_port());
    let out = cli(
        work.path(),
        &[
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--admin-url",
            &http_url,
            "thing",
            "list",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        err.contains(&format!("use https://127.0.0.1:{}", tls.admin_port())),
        "{err}"
    );

    let plain = TestBroker::start(BrokerOpts::new().admin());
    let data_dir = plain.data_dir();
    let https_url = format!("https://127.0.0.1:{}", plain.admin_port());
    let out = cli(
        work.path(),
        &[
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--admin-url",
            &https_url,
            "thing",
            "list",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        err.contains("answered in plain HTTP, not TLS")
            && err.contains(&format!("use http://127.0.0.1:{}", plain.admin_port())),
        "{err}"
    );
}

#[test]
fn admin_api_over_tls_takes_the_token_or_an_admin_client_certificate() {
    let b = broker();
    let port = b.admin_port();
    let ca_pem = std::fs::read_to_string(b.ca_file()).expect("the server's CA");
    let token = b.admin_token();
    let work = tempfile::tempdir().expect("temp dir");

    // Plain HTTP on the TLS port gets no HTTP answer.
    {
        let mut tcp = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        tcp.set_read_timeout(Some(STEP)).unwrap();
        let req = format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        );
        let _ = tcp.write_all(req.as_bytes());
        let mut raw = Vec::new();
        let _ = tcp.read_to_end(&mut raw);
        assert!(
            !raw.starts_with(b"HTTP/"),
            "plain HTTP was answered: {:?}",
            String::from_utf8_lossy(&raw)
        );
    }

    // HTTPS: nothing without the token or a certificate; the token works.
    let anon = https_request(port, &ca_pem, None, "GET", "/things", None, None);
    assert_eq!(status(anon), 401);
    let with_token = https_request(port, &ca_pem, None, "GET", "/things", Some(&token), None);
    assert_eq!(status(with_token), 200);

    // An admin client certificate made by `fleetcore ca admin-cert`, without the token.
    let data_dir = b.data_dir();
    let out_dir = work.path().join("admin");
    let out = cli(
        work.path(),
        &[
            "ca",
            "admin-cert",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    expect_ok(&out, "ca admin-cert");
    let cert_file = out_dir.join("admin.cert.pem");
    let key_file = out_dir.join("admin.private.key");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "admin.private.key mode");
    }
    let admin = Identity {
        cert_pem: std::fs::read_to_string(&cert_file).unwrap(),
        key_pem: std::fs::read_to_string(&key_file).unwrap(),
    };
    let by_cert = https_request(port, &ca_pem, Some(&admin), "GET", "/things", None, None);
    assert_eq!(status(by_cert), 200);
    let create = https_request(
        port,
        &ca_pem,
        Some(&admin),
        "POST",
        "/things",
        None,
        Some(&json!({"name": "made-by-cert"})),
    );
    assert_eq!(status(create), 201);

    // A device certificate from the same CA (CN device-1) is no admin.
    let (code, body) = https_request(
        port,
        &ca_pem,
        None,
        "POST",
        "/certificates/create",
        Some(&token),
        Some(&json!({"thing": "device-1"})),
    )
    .expect("create a device certificate");
    assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    let device = Identity {
        cert_pem: v["certificate_pem"].as_str().unwrap().to_string(),
        key_pem: v["private_key_pem"].as_str().unwrap().to_string(),
    };
    let by_device = https_request(port, &ca_pem, Some(&device), "GET", "/things", None, None);
    assert_eq!(status(by_device), 401);

    // The CLI over https with the client certificate only: an empty data dir, so there
    // is no token file to fall back on.
    let empty = work.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let url = b.admin_https_url();
    let out = cli(
        work.path(),
        &[
            "thing",
            "list",
            "--json",
            "--admin-url",
            &url,
            "--data-dir",
            empty.to_str().unwrap(),
            "--cacert",
            b.ca_file().to_str().unwrap(),
            "--client-cert",
            cert_file.to_str().unwrap(),
            "--client-key",
            key_file.to_str().unwrap(),
        ],
    );
    let stdout = expect_ok(&out, "thing list over https with a client certificate");
    let listed: Value = serde_json::from_str(&stdout).expect("--json output");
    let names: Vec<&str> = listed["things"]
        .as_array()
        .expect("things")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(names.contains(&"made-by-cert"), "{names:?}");
    assert!(names.contains(&"device-1"), "{names:?}");

    // The CLI with neither token nor certificate is refused with 401.
    let out = cli(
        work.path(),
        &[
            "thing",
            "list",
            "--admin-url",
            &url,
            "--data-dir",
            empty.to_str().unwrap(),
            "--cacert",
            b.ca_file().to_str().unwrap(),
            "--token",
            "wrong",
        ],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(401)"),
        "{}",
        describe(&out)
    );

    // The CLI with the token and the server's CA from <data-dir>/pki/ca.pem by default.
    let out = cli(
        work.path(),
        &[
            "thing",
            "list",
            "--admin-url",
            &url,
            "--data-dir",
            data_dir.to_str().unwrap(),
        ],
    );
    expect_ok(&out, "thing list over https with the token");
    b.assert_no_panic_logged();
}
