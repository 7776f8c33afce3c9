//! Harness for the end-to-end tests: a real `fleetcore serve` process with its own data
//! directory, config and loopback ports, plus real MQTT clients driven as child processes.
//!
//! Layout:
//! - [`TestBroker`] / [`BrokerOpts`]: start, SIGKILL, SIGTERM and restart the broker.
//! - [`Pki`]: a CA, a server certificate, client certificates and a rogue CA (rcgen).
//! - [`LineChild`]: a child process whose stdout lines a test waits on, with deadlines.
//! - [`mosquitto_sub`], [`mosquitto_pub`], [`paho`]: the external clients.
//! - [`Event`]: one line printed by the paho scripts in `tests/clients/`.
//!
//! Every wait has a deadline, and every process started here is killed by its PID when
//! its owner is dropped, so a failing test neither hangs nor leaks processes.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod fleet;
pub mod raw;

use std::fmt::Display;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// The bound for one step of a test (a client connecting, a message arriving, ...).
pub const STEP: Duration = Duration::from_secs(10);
/// How long the broker may take to open its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a graceful stop may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Broker process
// ---------------------------------------------------------------------------------------

/// What to put in the broker's config beyond the plain-TCP listener.
#[derive(Default, Clone)]
pub struct BrokerOpts {
    tls: bool,
    limits: Vec<(String, String)>,
    session: Vec<(String, String)>,
    tokens: Vec<(String, String)>,
    policy: Option<String>,
    registry: bool,
    admin: bool,
    admin_tls: bool,
    server_pki: bool,
    wss: Option<String>,
    wss_fixed_port: Option<u16>,
    ws: Option<String>,
    raw: Vec<String>,
}

impl BrokerOpts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a mutual-TLS listener with certificates from a fresh [`Pki`].
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Sets `[limits] key = value`; `value` is written as TOML as is (`1`, `"x"`).
    pub fn limit(mut self, key: &str, value: impl Display) -> Self {
        self.limits.push((key.to_string(), value.to_string()));
        self
    }

    /// Binds every client on every listener by this IoT Core policy document
    /// (written to a file and named as `policy_file`).
    pub fn policy(mut self, json: &str) -> Self {
        self.policy = Some(json.to_string());
        self
    }

    /// Makes the TLS listener check certificates against the registry (the
    /// default in production); otherwise the tests' TLS listener trusts any
    /// certificate from the test CA.
    pub fn registry(mut self) -> Self {
        self.registry = true;
        self
    }

    /// Enables the admin API on a free loopback port (otherwise the harness writes
    /// `[admin] enabled = false`); see [`TestBroker::admin_url`] and [`TestBroker::admin`].
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// Enables the admin API like [`admin`](Self::admin), served over TLS
    /// (`[admin] tls = true`) with the PKI the server makes under `data_dir/pki`; see
    /// [`TestBroker::admin_https_url`].
    pub fn admin_tls(mut self) -> Self {
        self.admin = true;
        self.admin_tls = true;
        self
    }

    /// Adds a TLS listener that names no certificate files, so it uses the PKI the
    /// server makes under `data_dir/pki` (its CA is [`TestBroker::ca_file`]); no test
    /// [`Pki`] is generated.
    pub fn server_pki(mut self) -> Self {
        self.tls = true;
        self.server_pki = true;
        self
    }

    /// Adds the port-443-style listener: `kind = "tls"` with `websocket = true`
    /// (ALPN dispatch, MQTT over WebSocket at /mqtt, tokens), with the same
    /// certificates and registry setting as the TLS listener (implies [`tls`](Self::tls)).
    /// `extra` is appended to its `[[listener]]` table as is (TOML lines).
    pub fn wss(mut self, extra: &str) -> Self {
        self.tls = true;
        self.wss = Some(extra.to_string());
        self
    }

    /// As [`wss`](Self::wss), on this fixed port of 127.0.0.1 (e.g. the real 443, which
    /// needs root or CAP_NET_BIND_SERVICE).
    pub fn wss_on_port(mut self, port: u16, extra: &str) -> Self {
        self.wss_fixed_port = Some(port);
        self.wss(extra)
    }

    /// Adds a plain WebSocket listener (`kind = "tcp"`, `websocket = true`,
    /// anonymous clients allowed unless `extra` says otherwise); `extra` is
    /// appended to its table.
    pub fn ws(mut self, extra: &str) -> Self {
        self.ws = Some(extra.to_string());
        self
    }

    /// Sets `[session] key = value`.
    pub fn session(mut self, key: &str, value: impl Display) -> Self {
        self.session.push((key.to_string(), value.to_string()));
        self
    }

    /// Appends `toml` (whole tables, e.g. `"[events]\nenabled = false"`) to the config.
    pub fn raw(mut self, toml: &str) -> Self {
        self.raw.push(toml.to_string());
        self
    }

    /// Sets `[tokens] key = value`.
    pub fn tokens(mut self, key: &str, value: impl Display) -> Self {
        self.tokens.push((key.to_string(), value.to_string()));
        self
    }
}

/// A running (or stopped, between [`kill9`](Self::kill9) and [`restart`](Self::restart))
/// fleetcore broker owned by one test.
pub struct TestBroker {
    dir: Option<tempfile::TempDir>,
    bin: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    tcp_port: u16,
    tls_port: Option<u16>,
    wss_port: Option<u16>,
    ws_port: Option<u16>,
    admin_port: Option<u16>,
    pki: Option<Pki>,
    child: Option<Child>,
    starts: u32,
}

impl TestBroker {
    /// Writes a config into a fresh temporary directory and starts the broker on free
    /// loopback ports, waiting until every listener accepts TCP connections.
    pub fn start(opts: BrokerOpts) -> TestBroker {
        let bin = broker_binary();
        TestBroker::try_start(opts).unwrap_or_else(|log| {
            panic!(
                "fleetcore did not start ({}); log tail:\n{}",
                bin.display(),
                tail(&log, 60)
            )
        })
    }

    /// As [`start`](Self::start), returning the log when the broker does not start
    /// (or exits) instead of panicking: for starts that must fail.
    pub fn try_start(opts: BrokerOpts) -> Result<TestBroker, String> {
        let bin = broker_binary();
        let dir = tempfile::Builder::new()
            .prefix("fleetcore-e2e-")
            .tempdir()
            .expect("create temp dir");
        let root = dir.path().to_path_buf();
        let pki = (opts.tls && !opts.server_pki).then(|| Pki::generate(&root.join("pki")));
        let mut broker = TestBroker {
            config_path: root.join("fleetcore.toml"),
            log_path: root.join("broker.log"),
            dir: Some(dir),
            bin,
            tcp_port: 0,
            tls_port: None,
            wss_port: None,
            ws_port: None,
            admin_port: None,
            pki,
            child: None,
            starts: 0,
        };
        // A port picked by binding to :0 can be taken by another test before the broker
        // binds it; when that happens, pick again.
        for attempt in 1..=3 {
            let mut ports = free_ports(
                1 + usize::from(opts.tls)
                    + usize::from(opts.wss.is_some() && opts.wss_fixed_port.is_none())
                    + usize::from(opts.ws.is_some())
                    + usize::from(opts.admin),
            )
            .into_iter();
            broker.tcp_port = ports.next().unwrap();
            broker.tls_port = opts.tls.then(|| ports.next().unwrap());
            broker.wss_port = opts
                .wss
                .is_some()
                .then(|| opts.wss_fixed_port.unwrap_or_else(|| ports.next().unwrap()));
            broker.ws_port = opts.ws.is_some().then(|| ports.next().unwrap());
            broker.admin_port = opts.admin.then(|| ports.next().unwrap());
            broker.write_config(&opts);
            match broker.spawn_and_wait() {
                Ok(()) => return Ok(broker),
                Err(log) if attempt < 3 && log.to_lowercase().contains("already in use") => {
                    continue
                }
                Err(log) => return Err(log),
            }
        }
        unreachable!()
    }

    fn write_config(&self, opts: &BrokerOpts) {
        let root = self.dir();
        let mut toml = format!(
            "data_dir = {}\n\n[log]\nformat = \"human\"\nlevel = \"info\"\n\n\
             [[listener]]\nkind = \"tcp\"\nbind = \"127.0.0.1:{}\"\nallow_anonymous = true\n",
            toml_str(&root.join("data")),
            self.tcp_port
        );
        let policy_line = match &opts.policy {
            Some(json) => {
                let path = root.join("policy.json");
                fs::write(&path, json).expect("write policy");
                format!("policy_file = {}\n", toml_str(&path))
            }
            None => String::new(),
        };
        toml += &policy_line;
        let tls_listeners = self
            .tls_port
            .map(|p| (p, None))
            .into_iter()
            .chain(self.wss_port.map(|p| (p, opts.wss.as_deref())));
        for (port, wss_extra) in tls_listeners {
            toml += &format!("\n[[listener]]\nkind = \"tls\"\nbind = \"127.0.0.1:{port}\"\n");
            if let Some(extra) = wss_extra {
                toml += &format!("websocket = true\n{extra}\n");
            }
            if let Some(pki) = &self.pki {
                toml += &format!(
                    "cert_file = {}\nkey_file = {}\nclient_ca_file = {}\n",
                    toml_str(&pki.server_cert),
                    toml_str(&pki.server_key),
                    toml_str(&pki.ca_cert)
                );
            }
            if opts.registry {
                toml += "registry = true\n";
            } else {
                toml += "registry = false\n";
                toml += &policy_line;
                if wss_extra.is_some_and(|e| !e.contains("tokens")) {
                    // Tokens are checked against the registry.
                    toml += "tokens = false\n";
                }
            }
        }
        if let (Some(port), Some(extra)) = (self.ws_port, &opts.ws) {
            toml += &format!(
                "\n[[listener]]\nkind = \"tcp\"\nbind = \"127.0.0.1:{port}\"\nwebsocket = true\n"
            );
            if !extra.contains("allow_anonymous") && !extra.contains("tokens = true") {
                toml += "allow_anonymous = true\n";
            }
            toml += &format!("{extra}\n");
        }
        // The admin API's default port is fixed (8080): tests that do not ask for it
        // turn it off, so parallel brokers do not fight over that port.
        toml += &match self.admin_port {
            Some(port) if opts.admin_tls => {
                format!("\n[admin]\nenabled = true\nbind = \"127.0.0.1:{port}\"\ntls = true\n")
            }
            Some(port) => format!("\n[admin]\nenabled = true\nbind = \"127.0.0.1:{port}\"\n"),
            None => "\n[admin]\nenabled = false\n".to_string(),
        };
        for (table, entries) in [
            ("limits", &opts.limits),
            ("session", &opts.session),
            ("tokens", &opts.tokens),
        ] {
            if !entries.is_empty() {
                toml += &format!("\n[{table}]\n");
                for (k, v) in entries {
                    toml += &format!("{k} = {v}\n");
                }
            }
        }
        for r in &opts.raw {
            toml += &format!("\n{r}\n");
        }
        fs::write(&self.config_path, toml).expect("write config");
    }

    /// Spawns the binary and waits until it accepts connections; on failure returns the log.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "broker is already running");
        self.starts += 1;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open broker log");
        use std::io::Write;
        writeln!(log, "===== e2e harness: start #{} =====", self.starts).ok();
        let err = log.try_clone().expect("clone log handle");
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {}: {e} (build it, or point FLEETCORE_BIN at it)",
                    self.bin.display()
                )
            });
        self.child = Some(child);

        let ports: Vec<u16> = std::iter::once(self.tcp_port)
            .chain(self.tls_port)
            .chain(self.wss_port)
            .chain(self.ws_port)
            .chain(self.admin_port)
            .collect();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
                self.child = None;
                return Err(format!("exited early with {status}\n{}", self.log()));
            }
            if ports.iter().all(|p| can_connect(*p)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill_child();
                return Err(format!(
                    "not accepting connections on {ports:?} after {START_TIMEOUT:?}\n{}",
                    self.log()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("broker is not running")
    }

    fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = wait_timeout(&mut child, STOP_TIMEOUT);
        }
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("temp dir").path()
    }

    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    pub fn tls_port(&self) -> u16 {
        self.tls_port
            .expect("broker started without BrokerOpts::tls()")
    }

    /// The port of the [`BrokerOpts::wss`] listener (the stand-in for 443).
    pub fn wss_port(&self) -> u16 {
        self.wss_port
            .expect("broker started without BrokerOpts::wss()")
    }

    /// The port of the [`BrokerOpts::ws`] listener.
    pub fn ws_port(&self) -> u16 {
        self.ws_port
            .expect("broker started without BrokerOpts::ws()")
    }

    pub fn pki(&self) -> &Pki {
        self.pki
            .as_ref()
            .expect("broker started without BrokerOpts::tls()")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker is not running").id()
    }

    /// SIGKILL: the broker gets no chance to flush anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("broker is not running");
        child.kill().expect("SIGKILL broker");
        wait_timeout(&mut child, STOP_TIMEOUT).expect("broker did not die after SIGKILL");
    }

    /// SIGTERM, then waits for the exit; returns the exit status. Panics (after SIGKILL)
    /// when the broker does not stop within the bound.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("broker is not running");
        send_sigterm(child.id());
        match wait_timeout(&mut child, STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "broker did not stop within {STOP_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// Waits up to `bound` for the broker to exit by itself; its status, or `None` if it
    /// still runs.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("broker is not running");
        let status = wait_timeout(child, bound);
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Starts the broker again with the same config, data directory and ports.
    pub fn restart(&mut self) {
        if let Err(log) = self.spawn_and_wait() {
            panic!("fleetcore did not restart; log tail:\n{}", tail(&log, 60));
        }
    }

    /// Everything the broker wrote to stdout/stderr, across restarts.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        tail(&self.log(), 60)
    }

    /// Panics unless the broker process is still running and never logged a panic.
    pub fn assert_healthy(&mut self) {
        if let Some(status) = self.child_mut().try_wait().expect("try_wait") {
            self.child = None;
            panic!("broker died ({status}); log tail:\n{}", self.log_tail());
        }
        self.assert_no_panic_logged();
    }

    pub fn assert_no_panic_logged(&self) {
        let log = self.log();
        assert!(
            !log.contains("panicked"),
            "broker logged a panic:\n{}",
            tail(&log, 80)
        );
    }

    /// Arguments for the paho scripts to reach the plain-TCP listener.
    pub fn paho_tcp(&self) -> Vec<String> {
        strings(["--host", "127.0.0.1", "--port", &self.tcp_port.to_string()])
    }

    /// Arguments for the paho scripts to reach the TLS listener with a client certificate.
    pub fn paho_tls(&self, client: &ClientCert) -> Vec<String> {
        let mut args = self.paho_tls_no_cert();
        args.extend([
            "--cert".into(),
            path_str(&client.cert),
            "--key".into(),
            path_str(&client.key),
        ]);
        args
    }

    pub fn paho_tls_no_cert(&self) -> Vec<String> {
        vec![
            "--host".into(),
            "localhost".into(),
            "--port".into(),
            self.tls_port().to_string(),
            "--tls-ca".into(),
            path_str(&self.ca_file()),
        ]
    }

    /// Arguments for the paho scripts to reach the [`BrokerOpts::wss`] listener over
    /// WebSocket (path /mqtt) inside TLS, with a client certificate when one is given.
    pub fn paho_wss(&self, client: Option<&ClientCert>) -> Vec<String> {
        let mut args = strings([
            "--host",
            "localhost",
            "--port",
            &self.wss_port().to_string(),
            "--websocket",
            "/mqtt",
            "--tls-ca",
            &path_str(&self.ca_file()),
        ]);
        if let Some(c) = client {
            args.extend(strings([
                "--cert",
                &path_str(&c.cert),
                "--key",
                &path_str(&c.key),
            ]));
        }
        args
    }

    /// Arguments for mosquitto_pub/sub to reach the [`BrokerOpts::wss`] listener with
    /// MQTT over TLS (mosquitto's clients send no ALPN unless told to).
    pub fn mosq_wss(&self, client: &ClientCert) -> Vec<String> {
        strings([
            "-h",
            "localhost",
            "-p",
            &self.wss_port().to_string(),
            "--cafile",
            &path_str(&self.ca_file()),
            "--cert",
            &path_str(&client.cert),
            "--key",
            &path_str(&client.key),
        ])
    }

    /// Arguments for mosquitto_pub/sub to reach the plain-TCP listener.
    pub fn mosq_tcp(&self) -> Vec<String> {
        strings(["-h", "127.0.0.1", "-p", &self.tcp_port.to_string()])
    }

    /// Arguments for mosquitto_pub/sub to reach the TLS listener with a client certificate.
    pub fn mosq_tls(&self, client: &ClientCert) -> Vec<String> {
        let mut args = self.mosq_tls_no_cert();
        args.extend([
            "--cert".into(),
            path_str(&client.cert),
            "--key".into(),
            path_str(&client.key),
        ]);
        args
    }

    pub fn mosq_tls_no_cert(&self) -> Vec<String> {
        vec![
            "-h".into(),
            "localhost".into(),
            "-p".into(),
            self.tls_port().to_string(),
            "--cafile".into(),
            path_str(&self.ca_file()),
        ]
    }
}

impl TestBroker {
    /// The broker's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The CA clients trust for the TLS listener: the test [`Pki`]'s, or with
    /// [`BrokerOpts::server_pki`] the one the server made in `data_dir/pki`.
    pub fn ca_file(&self) -> PathBuf {
        match &self.pki {
            Some(pki) => pki.ca_cert.clone(),
            None => self.data_dir().join("pki").join("ca.pem"),
        }
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
            .expect("broker started without BrokerOpts::admin()")
    }

    /// `http://127.0.0.1:<admin port>`.
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port())
    }

    /// `https://127.0.0.1:<admin port>` (with [`BrokerOpts::admin_tls`]).
    pub fn admin_https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.admin_port())
    }

    /// Runs the `fleetcore` CLI against this broker's admin API (its URL and data
    /// directory given, the FLEETCORE_* environment cleared), bounded by [`STEP`].
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(broker_binary());
        cmd.args(args)
            .arg("--admin-url")
            .arg(self.admin_url())
            .arg("--data-dir")
            .arg(self.data_dir())
            .env_remove("FLEETCORE_ADMIN_URL")
            .env_remove("FLEETCORE_ADMIN_TOKEN")
            .env_remove("FLEETCORE_DATA_DIR");
        run(cmd, STEP)
    }

    /// As [`TestBroker::cli`]: (succeeded, stdout, stderr).
    pub fn cli_text(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.cli(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// The admin token the server wrote to `data_dir/admin.token`.
    pub fn admin_token(&self) -> String {
        let path = self.data_dir().join("admin.token");
        fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
            .trim()
            .to_string()
    }

    /// One admin API request with the server's token; `body` is sent as JSON.
    pub fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> HttpResponse {
        let body = body.map(|b| b.to_string());
        http_request(
            self.admin_port(),
            method,
            path,
            Some(&self.admin_token()),
            body.as_deref(),
        )
    }
}

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header of this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text()))
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` over a fresh connection (`Connection: close`),
/// with an optional bearer token and JSON body; the answer is read to the end.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> HttpResponse {
    use std::io::Write;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the admin API");
    stream.set_read_timeout(Some(STEP)).expect("set timeout");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req += &format!("Authorization: Bearer {t}\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req += "Content-Type: application/json\r\n";
    }
    req += &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    stream.write_all(req.as_bytes()).expect("send request");
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("{method} {path}: reading the answer failed: {e}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "{method} {path}: no HTTP header in {:?}",
                String::from_utf8_lossy(&raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad status line in {head:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("chunk size");
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
    out
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.kill_child();
        if thread::panicking() {
            eprintln!("---- fleetcore log tail ----\n{}", self.log_tail());
        }
        if std::env::var_os("FLEETCORE_KEEP_TEST_DIRS").is_some() {
            if let Some(dir) = self.dir.take() {
                eprintln!("keeping {}", dir.keep().display());
            }
        }
    }
}

/// The binary under test: `FLEETCORE_BIN` if set, else the one cargo built for this package.
pub fn broker_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("FLEETCORE_BIN") {
        return PathBuf::from(path);
    }
    match option_env!("CARGO_BIN_EXE_fleetcore") {
        Some(path) => PathBuf::from(path),
        None => panic!("no fleetcore binary: set FLEETCORE_BIN"),
    }
}

/// Distinct free loopback ports (all held open until every one is picked).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

fn can_connect(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// SIGTERM without libc: the `kill` builtin of sh (a /bin/kill binary is not everywhere).
fn send_sigterm(pid: u32) {
    let status = Command::new("sh")
        .args(["-c", "kill -TERM \"$1\"", "sh", &pid.to_string()])
        .status()
        .expect("run sh -c kill -TERM");
    assert!(status.success(), "kill -TERM {pid} failed: {status}");
}

/// Waits for a child for at most `limit`; `None` when it is still running.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn toml_str(path: &Path) -> String {
    format!("{:?}", path_str(path))
}

pub fn path_str(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

fn strings<const N: usize>(items: [&str; N]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------

/// A client certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Test PKI, all ECDSA P-256, written as PEM files: a CA the TLS listener trusts, a
/// server certificate for `localhost` and `127.0.0.1`, client certificates whose CN is a
/// thing name, and a client certificate from an unrelated ("rogue") CA.
pub struct Pki {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// CN `thing-1`.
    pub thing1: ClientCert,
    /// CN `thing-2`.
    pub thing2: ClientCert,
    /// CN `thing-1`, issued by a CA the broker does not trust.
    pub rogue: ClientCert,
}

impl Pki {
    pub fn generate(dir: &Path) -> Pki {
        fs::create_dir_all(dir).expect("create pki dir");
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            fs::write(&path, pem).expect("write pem");
            path
        };

        let ca = new_ca("fleetcore e2e CA");
        let ca_issuer: &Issuer<'_, KeyPair> = &ca;
        let (server_pem, server_key) = new_leaf(
            ca_issuer,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = |cn: &str, issuer: &Issuer<'_, KeyPair>, file: &str| {
            let (cert, key) = new_leaf(issuer, cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
            ClientCert {
                cert: write(&format!("{file}.pem"), &cert),
                key: write(&format!("{file}.key"), &key),
            }
        };
        let thing1 = client("thing-1", ca_issuer, "thing-1");
        let thing2 = client("thing-2", ca_issuer, "thing-2");
        let rogue_ca = new_ca("rogue CA");
        let rogue = client("thing-1", &rogue_ca, "rogue-thing-1");
        write("rogue-ca.pem", &rogue_ca.pem());

        Pki {
            ca_cert: write("ca.pem", &ca.pem()),
            server_cert: write("server.pem", &server_pem),
            server_key: write("server.key", &server_key),
            thing1,
            thing2,
            rogue,
        }
    }
}

fn new_ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("ca key");
    CertifiedIssuer::self_signed(params, key).expect("self-sign ca")
}

/// Issues an end-entity certificate; returns (certificate PEM, PKCS#8 key PEM).
fn new_leaf(
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("leaf params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

// ---------------------------------------------------------------------------------------
// Client processes
// ---------------------------------------------------------------------------------------

/// A child process whose stdout is read line by line in the background, so a test can
/// wait for a line with a deadline. Killed (by PID) when dropped.
pub struct LineChild {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    eof: bool,
}

impl LineChild {
    pub fn spawn(name: &str, mut cmd: Command) -> LineChild {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn_or_explain(&mut cmd);
        let stdout = child.stdout.take().expect("stdout");
        let stderr_pipe = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            let mut buf = String::new();
            let _ = BufReader::new(stderr_pipe).read_to_string(&mut buf);
            sink.lock().unwrap().push_str(&buf);
        });
        LineChild {
            name: name.to_string(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
            eof: false,
        }
    }

    /// The next stdout line, or `None` at end of output or when `deadline` passes.
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        if self.eof {
            return None;
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(wait) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                None
            }
        }
    }

    /// Waits for a line matching `pred`, skipping others; panics with the transcript if
    /// none comes within `within`.
    pub fn expect_line(
        &mut self,
        what: &str,
        within: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + within;
        while let Some(line) = self.next_line(deadline) {
            if pred(&line) {
                return line;
            }
        }
        panic!(
            "{}: no {what} within {within:?}\n{}",
            self.name,
            self.transcript()
        );
    }

    /// Waits for the next paho [`Event`] of kind `kind` (skipping other lines).
    pub fn expect_event(&mut self, kind: &str, within: Duration) -> Event {
        let line = self.expect_line(&format!("`{kind}` event"), within, |l| {
            Event::parse(l).is_some_and(|e| e.kind == kind)
        });
        Event::parse(&line).expect("event")
    }

    /// Reads lines until the process closes stdout or `within` passes.
    pub fn drain(&mut self, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while let Some(line) = self.next_line(deadline) {
            out.push(line);
        }
        out
    }

    /// Waits for the process to exit; kills it and panics if it takes longer than `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        match wait_timeout(&mut self.child, within) {
            Some(status) => {
                // Collect what it printed last, for diagnostics.
                self.drain(Duration::from_secs(2));
                status
            }
            None => {
                self.kill();
                panic!(
                    "{}: still running after {within:?}\n{}",
                    self.name,
                    self.transcript()
                );
            }
        }
    }

    /// Waits for the process to exit with status 0.
    pub fn expect_success(&mut self, within: Duration) {
        let status = self.wait_exit(within);
        assert!(
            status.success(),
            "{}: exited with {status}\n{}",
            self.name,
            self.transcript()
        );
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = wait_timeout(&mut self.child, STOP_TIMEOUT);
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// All stdout lines seen so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Every event line seen so far, parsed.
    pub fn events(&self) -> Vec<Event> {
        self.seen.iter().filter_map(|l| Event::parse(l)).collect()
    }

    pub fn transcript(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.seen.join("\n"),
            self.stderr.lock().unwrap()
        )
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill();
        }
    }
}

fn spawn_or_explain(cmd: &mut Command) -> Child {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed: {}", install_hint(&program))
        }
        Err(e) => panic!("cannot run `{program}`: {e}"),
    }
}

/// Fails the test, saying what to install, unless `program` is on PATH.
pub fn require_program(program: &str) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|dir| dir.join(program).is_file()) {
        panic!("`{program}` is not installed: {}", install_hint(program));
    }
}

fn install_hint(program: &str) -> &'static str {
    match program {
        "mosquitto_sub" | "mosquitto_pub" => "apt-get install mosquitto-clients",
        "python3" => {
            "apt-get install python3 python3-pip, then python3 -m pip install 'paho-mqtt>=2,<3'"
        }
        _ => "install it (see .ci/run)",
    }
}

/// Runs a command to completion with a bound; kills it and panics on timeout.
pub fn run(mut cmd: Command, within: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let name = format!("{cmd:?}");
    let mut child = spawn_or_explain(&mut cmd);
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let (status, timed_out) = match wait_timeout(&mut child, within) {
        Some(status) => (status, false),
        None => {
            let _ = child.kill();
            (child.wait().expect("wait"), true)
        }
    };
    let output = Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    };
    assert!(
        !timed_out,
        "{name}: still running after {within:?}\n{}",
        describe(&output)
    );
    output
}

pub fn describe(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---------------------------------------------------------------------------------------
// mosquitto clients
// ---------------------------------------------------------------------------------------

/// Starts `mosquitto_sub -d -F 'MSG %q %r %t %p' <args>` and waits for its SUBACK, so
/// anything published afterwards is meant for it. Message lines parse with [`mosq_msg`].
pub fn mosquitto_sub(args: &[String]) -> LineChild {
    require_program("mosquitto_sub");
    // mosquitto_sub flushes stdout only when it prints a message, which would hide the
    // SUBACK debug line; stdbuf (coreutils) makes it line-buffered, then execs it.
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "mosquitto_sub", "-d", "-F", "MSG %q %r %t %p"])
        .args(args);
    let mut sub = LineChild::spawn("mosquitto_sub", cmd);
    sub.expect_line("SUBACK", STEP, |l| l.contains("received SUBACK"));
    sub
}

/// A message line of [`mosquitto_sub`]: (qos, retain, topic, payload).
pub fn mosq_msg(line: &str) -> Option<(u8, bool, String, String)> {
    let rest = line.strip_prefix("MSG ")?;
    let mut parts = rest.splitn(4, ' ');
    let qos = parts.next()?.parse().ok()?;
    let retain = parts.next()? == "1";
    let topic = parts.next()?.to_string();
    let payload = parts.next().unwrap_or("").to_string();
    Some((qos, retain, topic, payload))
}

/// Waits for the next message line of a [`mosquitto_sub`].
pub fn expect_mosq_msg(sub: &mut LineChild, within: Duration) -> (u8, bool, String, String) {
    let line = sub.expect_line("message", within, |l| mosq_msg(l).is_some());
    mosq_msg(&line).expect("message line")
}

/// Runs `mosquitto_pub <args>` and returns its output (it may have failed).
pub fn mosquitto_pub_output(args: &[String]) -> Output {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(args);
    run(cmd, STEP)
}

/// Runs `mosquitto_pub <args>` and panics unless it succeeds.
pub fn mosquitto_pub(args: &[String]) {
    let output = mosquitto_pub_output(args);
    assert!(
        output.status.success(),
        "mosquitto_pub {args:?} failed\n{}",
        describe(&output)
    );
}

/// Turns `&str` arguments into the owned form the helpers take, appending to `base`.
pub fn with(base: &[String], more: &[&str]) -> Vec<String> {
    base.iter()
        .cloned()
        .chain(more.iter().map(|s| s.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------------------
// paho scripts
// ---------------------------------------------------------------------------------------

/// Starts `python3 tests/clients/<script> <args>`; its events parse with [`Event`].
pub fn paho(script: &str, args: &[String]) -> LineChild {
    require_paho();
    let mut cmd = Command::new("python3");
    cmd.arg("-u").arg(clients_dir().join(script)).args(args);
    LineChild::spawn(script, cmd)
}

/// The AWS IoT Device SDK agent's arguments for thing-1 of the test [`Pki`] under a
/// per-device policy (`acct/<CN>/...`): what it may and may not use.
pub const SDK_THING1_ARGS: [&str; 10] = [
    "--client-id",
    "thing-1",
    "--allowed",
    "acct/thing-1/#",
    "--allowed-topic",
    "acct/thing-1/orders",
    "--denied",
    "acct/thing-2/#",
    "--denied-topic",
    "acct/thing-2/orders",
];

/// Runs tests/clients/awsiot_agent.py (the AWS IoT Device SDK v2) against
/// localhost:`port` with this CA file and client certificate, and fails the test
/// unless every check it makes passes.
pub fn run_awsiot_agent(port: u16, ca: &Path, cert: &ClientCert, args: &[&str]) {
    let mut cmd = Command::new("python3");
    cmd.arg(clients_dir().join("awsiot_agent.py"))
        .args(["--host", "localhost", "--port", &port.to_string(), "--ca"])
        .arg(ca)
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key)
        .args(args);
    let out = run(cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_ne!(
        out.status.code(),
        Some(10),
        "awsiotsdk is missing: python3 -m pip install awsiotsdk\n{}",
        describe(&out)
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!stdout.contains("fail "), "{stdout}");
}

/// Starts the MQTT.js agent (tests/clients/node/mqttjs_agent.js) with these arguments.
/// Fails the test, saying what to run, when Node.js or the npm packages are missing.
pub fn mqttjs(args: &[String]) -> LineChild {
    require_program("node");
    let dir = clients_dir().join("node");
    assert!(
        dir.join("node_modules").join("mqtt").is_dir(),
        "MQTT.js is not installed: run npm ci --prefix {}",
        dir.display()
    );
    let mut cmd = Command::new("node");
    cmd.arg(dir.join("mqttjs_agent.js")).args(args);
    LineChild::spawn("mqttjs", cmd)
}

pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("clients")
}

/// A Python client of tests/clients (`script`) set to reach `broker`'s TLS listener as
/// `cert` (`--host localhost --port P --ca F --cert F --key F`, unbuffered output); the
/// caller adds the script's own arguments.
pub fn tls_client_script(broker: &TestBroker, script: &str, cert: &ClientCert) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(clients_dir().join(script))
        .args([
            "--host",
            "localhost",
            "--port",
            &broker.tls_port().to_string(),
        ])
        .arg("--ca")
        .arg(broker.ca_file())
        .arg("--cert")
        .arg(&cert.cert)
        .arg("--key")
        .arg(&cert.key);
    cmd
}

/// Fails the test, saying what to install, when python3 or paho-mqtt 2.x is missing.
fn require_paho() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            "import sys, paho.mqtt; sys.exit(int(paho.mqtt.__version__.split('.')[0]) < 2)",
        ]);
        let output = run(cmd, STEP);
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "python3 has no paho-mqtt 2.x: run python3 -m pip install 'paho-mqtt>=2,<3'\n{}",
                describe(&output)
            ))
        }
    });
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// One line printed by a paho script: `kind key=value ...`, values percent-encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub kind: String,
    fields: Vec<(String, String)>,
}

impl Event {
    pub fn parse(line: &str) -> Option<Event> {
        let mut words = line.split(' ');
        let kind = words.next().filter(|k| !k.is_empty())?.to_string();
        let mut fields = Vec::new();
        for word in words {
            let (k, v) = word.split_once('=')?;
            fields.push((k.to_string(), percent_decode(v)?));
        }
        Some(Event { kind, fields })
    }

    pub fn get(&self, key: &str) -> &str {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("event {self:?} has no `{key}`"))
    }

    pub fn num(&self, key: &str) -> u64 {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("event {self:?}: `{key}` is not a number"))
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The payloads of the `message` events seen so far, in arrival order.
pub fn payloads(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.kind == "message")
        .map(|e| e.get("payload").to_string())
        .collect()
}

/// Subscribes to `filter` and returns the retained (topic, payload) pairs it delivers.
///
/// The subscriber also listens on a marker topic; a live marker published after SUBACK
/// arrives after every retained message the subscription produced, so no fixed wait is
/// needed to know that the set is complete.
pub fn retained_under(
    broker: &TestBroker,
    filter: &str,
) -> std::collections::BTreeSet<(String, String)> {
    let marker = "e2e-marker/retained";
    let args = ["-V", "mqttv5", "-q", "1", "-t", filter, "-t", marker];
    let mut sub = mosquitto_sub(&with(&broker.mosq_tcp(), &args));
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "1", "-t", marker, "-m", "end"],
    ));
    let mut found = std::collections::BTreeSet::new();
    loop {
        let (_qos, retain, topic, payload) = expect_mosq_msg(&mut sub, STEP);
        if topic == marker {
            return found;
        }
        assert!(
            retain,
            "{topic} {payload:?} arrived on subscribe without the retain flag"
        );
        found.insert((topic, payload));
    }
}
