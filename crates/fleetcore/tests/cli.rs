//! The operator CLI (`fleetcore thing|cert|policy|ca`) run as a real binary: its help,
//! the local `ca init`, its errors without a server, and whole operator flows against a
//! real `fleetcore serve` with the admin API on a loopback port.
//!
//! Every process started here is killed by its PID when its owner is dropped, and every
//! wait has a deadline.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The bound for one CLI run.
const RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to answer GET /healthz after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

fn binary() -> PathBuf {
    match std::env::var_os("FLEETCORE_BIN") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_BIN_EXE_fleetcore")),
    }
}

/// What one CLI run printed and how it ended.
struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self, what: &str) -> Out {
        assert!(
            self.status.success(),
            "`fleetcore {what}` failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts a failure with exactly one line on stderr, and returns that line.
    fn fails(self, what: &str) -> String {
        assert!(
            !self.status.success(),
            "`fleetcore {what}` should have failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one error line expected: {:?}", self.stderr);
        assert!(lines[0].starts_with("fleetcore: "), "{:?}", lines[0]);
        lines[0].to_string()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json output does not parse ({e}): {}", self.stdout))
    }
}

/// Runs the CLI in `cwd` with `args`, without any FLEETCORE_* variable from the
/// environment of the test, and waits at most [`RUN_TIMEOUT`].
fn fleetcore(cwd: &Path, args: &[&str]) -> Out {
    let out_path = cwd.join(".cli.stdout");
    let err_path = cwd.join(".cli.stderr");
    let mut child = Command::new(binary())
        .args(args)
        .current_dir(cwd)
        .env_remove("FLEETCORE_ADMIN_URL")
        .env_remove("FLEETCORE_ADMIN_TOKEN")
        .env_remove("FLEETCORE_DATA_DIR")
        .env_remove("FLEETCORE_CONFIG")
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"))
        .spawn()
        .expect("run fleetcore");
    let status = match wait_timeout(&mut child, RUN_TIMEOUT) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`fleetcore {}` did not finish in {RUN_TIMEOUT:?}",
                args.join(" ")
            );
        }
    };
    Out {
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
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

/// A loopback port nothing listens on (at the moment it is returned).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Checks what `cert create` wrote to `out` for `stem` (certificate, 0600 key, the
/// server's ca.pem, each named in its output); returns the certificate id it printed
/// and the key written.
fn issued_files(stdout: &str, dir: &Path, out: &str, stem: &str) -> (String, String) {
    let id = stdout
        .split_whitespace()
        .find(|w| w.len() == 64 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no certificate id in: {stdout}"))
        .to_string();
    let out = dir.join(out);
    let (cert_file, key_file) = (format!("{stem}.cert.pem"), format!("{stem}.private.key"));
    for file in [cert_file.as_str(), key_file.as_str(), "ca.pem"] {
        assert!(stdout.contains(file), "{file}: {stdout}");
    }
    assert_eq!(mode(&out.join(&key_file)), 0o600);
    let key = fs::read_to_string(out.join(&key_file)).expect("key");
    assert!(key.contains("PRIVATE KEY-----"), "{key}");
    let cert = fs::read_to_string(out.join(&cert_file)).expect("cert");
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    assert_eq!(
        fs::read_to_string(out.join("ca.pem")).expect("ca.pem"),
        fs::read_to_string(dir.join("data/pki/ca.pem")).expect("server's ca.pem"),
        "ca.pem is the server's CA"
    );
    (id, key)
}

fn temp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("fleetcore-cli-")
        .tempdir()
        .expect("create temp dir")
}

// ---------------------------------------------------------------------------------------
// Without a server
// ---------------------------------------------------------------------------------------

#[test]
fn every_command_has_help() {
    let dir = temp();
    let top = fleetcore(dir.path(), &["--help"]).ok("--help");
    for cmd in ["thing", "cert", "policy", "ca", "template", "retained"] {
        assert!(
            top.stdout.contains(&format!("\n  {cmd} ")),
            "--help lists {cmd}: {}",
            top.stdout
        );
    }
    let commands: &[&[&str]] = &[
        &["thing"],
        &["thing", "create"],
        &["thing", "list"],
        &["thing", "describe"],
        &["thing", "update"],
        &["thing", "delete"],
        &["thing", "attach"],
        &["thing", "detach"],
        &["cert"],
        &["cert", "create"],
        &["cert", "sign"],
        &["cert", "register"],
        &["cert", "list"],
        &["cert", "describe"],
        &["cert", "set-state"],
        &["cert", "revoke"],
        &["cert", "delete"],
        &["policy"],
        &["policy", "create"],
        &["policy", "list"],
        &["policy", "get"],
        &["policy", "version"],
        &["policy", "set-default"],
        &["policy", "delete"],
        &["policy", "attach"],
        &["policy", "detach"],
        &["ca"],
        &["ca", "init"],
        &["ca", "admin-cert"],
        &["ca", "reissue-server"],
        &["ca", "register"],
        &["ca", "list"],
        &["ca", "crl"],
        &["ca", "set-template"],
        &["ca", "clear-template"],
        &["template"],
        &["template", "create"],
        &["template", "list"],
        &["template", "describe"],
        &["template", "update"],
        &["template", "delete"],
        &["retained"],
        &["retained", "list"],
        &["retained", "get"],
        &["retained", "delete"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let what = args.join(" ");
        let out = fleetcore(dir.path(), &args).ok(&what);
        assert!(
            out.stdout.contains("Usage: fleetcore "),
            "{what}: {}",
            out.stdout
        );
        assert!(out.stdout.contains("--admin-url"), "{what}: {}", out.stdout);
    }
    let out = fleetcore(dir.path(), &["cert", "create", "--help"]).ok("cert create --help");
    for flag in [
        "--thing",
        "--out",
        "--policy",
        "--days",
        "--state",
        "--json",
        "--claim",
        "--template",
    ] {
        assert!(out.stdout.contains(flag), "cert create --help: {flag}");
    }
}

#[test]
fn bad_arguments_are_refused_before_anything_is_sent() {
    let dir = temp();
    let out = fleetcore(dir.path(), &["cert", "set-state", "abc", "BROKEN"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("PENDING_ACTIVATION"), "{}", out.stderr);
    let out = fleetcore(dir.path(), &["thing", "create", "a", "--attr", "novalue"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("KEY=VALUE"), "{}", out.stderr);
}

#[test]
fn ca_init_writes_private_keys_0600_and_refuses_to_replace_them() {
    let dir = temp();
    let out = fleetcore(
        dir.path(),
        &[
            "ca",
            "init",
            "--data-dir",
            "data",
            "--san",
            "broker.example.com",
        ],
    )
    .ok("ca init");
    let pki = dir.path().join("data/pki");
    for (file, expected) in [
        ("ca.pem", 0o644),
        ("ca.key", 0o600),
        ("server.pem", 0o644),
        ("server.key", 0o600),
    ] {
        assert_eq!(mode(&pki.join(file)), expected, "{file}");
        assert!(out.stdout.contains(file), "{}", out.stdout);
    }
    let ca_pem = fs::read_to_string(pki.join("ca.pem")).expect("ca.pem");
    assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));

    let line = fleetcore(dir.path(), &["ca", "init", "--data-dir", "data"]).fails("ca init again");
    assert!(
        line.contains("already exists") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(
        fs::read_to_string(pki.join("ca.pem")).expect("ca.pem"),
        ca_pem,
        "a refused ca init left the CA alone"
    );

    fleetcore(dir.path(), &["ca", "init", "--data-dir", "data", "--force"]).ok("ca init --force");
    assert_ne!(
        fs::read_to_string(pki.join("ca.pem")).expect("ca.pem"),
        ca_pem
    );
    assert_eq!(mode(&pki.join("ca.key")), 0o600);

    // --dir instead of <data-dir>/pki, and --json.
    let out = fleetcore(dir.path(), &["ca", "init", "--dir", "elsewhere", "--json"])
        .ok("ca init --dir --json");
    let v = out.json();
    assert_eq!(v["ca_key"], "elsewhere/ca.key", "{v}");
    assert_eq!(v["ca_id"].as_str().map(str::len), Some(64), "{v}");
    assert_eq!(mode(&dir.path().join("elsewhere/server.key")), 0o600);
}

/// `ca reissue-server` replaces the server certificate with one for new names, signed
/// by the same CA, offline; the CA is untouched.
#[test]
fn ca_reissue_server_changes_the_server_names_and_keeps_the_ca() {
    use x509_parser::extensions::GeneralName;
    let dir = temp();
    let line = fleetcore(
        dir.path(),
        &[
            "ca",
            "reissue-server",
            "--data-dir",
            "data",
            "--san",
            "host1",
        ],
    )
    .fails("reissue-server without a CA");
    assert!(line.contains("data/pki/ca.pem"), "{line}");
    fleetcore(dir.path(), &["ca", "init", "--data-dir", "data"]).ok("ca init");
    let pki = dir.path().join("data/pki");
    let read = |f: &str| fs::read_to_string(pki.join(f)).expect(f);
    let (ca_pem, ca_key, old_server) = (read("ca.pem"), read("ca.key"), read("server.pem"));

    let out = fleetcore(dir.path(), &["ca", "reissue-server", "--data-dir", "data"]);
    assert_eq!(out.status.code(), Some(2), "no --san: {}", out.stderr);

    let out = fleetcore(
        dir.path(),
        &[
            "--data-dir",
            "data",
            "ca",
            "reissue-server",
            "--san",
            "host1",
            "--name",
            "10.0.0.5",
        ],
    )
    .ok("ca reissue-server");
    assert!(
        out.stdout.contains("host1, 10.0.0.5") && out.stdout.contains("Restart"),
        "{}",
        out.stdout
    );
    assert_eq!(read("ca.pem"), ca_pem, "CA certificate unchanged");
    assert_eq!(read("ca.key"), ca_key, "CA key unchanged");
    assert_ne!(read("server.pem"), old_server);
    assert_eq!(mode(&pki.join("server.key")), 0o600);

    let pem = read("server.pem");
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM");
    let cert = block.parse_x509().expect("certificate");
    let (_, ca_block) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).expect("CA PEM");
    let ca = ca_block.parse_x509().expect("CA certificate");
    assert_eq!(cert.issuer(), ca.subject());
    cert.verify_signature(Some(ca.public_key()))
        .expect("signed by the CA");
    let names: Vec<String> = cert
        .subject_alternative_name()
        .expect("SAN")
        .expect("SAN present")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => format!("DNS:{d}"),
            GeneralName::IPAddress(ip) => format!("IP:{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(names, ["DNS:host1", "IP:[10, 0, 0, 5]"]);
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "host1");
}

/// A first start that fails after it created the PKI (here: the MQTT port is taken)
/// removes that PKI and says so; a PKI that existed before is left alone.
#[test]
fn a_failed_first_start_removes_the_ca_it_created() {
    let dir = temp();
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().unwrap().port();
    let config = format!(
        "data_dir = \"data\"\n[admin]\nenabled = false\n[[listener]]\nkind = \"tcp\"\nbind = \"127.0.0.1:{port}\"\nallow_anonymous = true\n"
    );
    fs::write(dir.path().join("f.toml"), config).expect("write config");
    let out = fleetcore(dir.path(), &["serve", "--config", "f.toml"]);
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("removed the CA"), "{}", out.stderr);
    let pki = dir.path().join("data/pki");
    assert!(!pki.exists(), "the new PKI was left behind");

    fleetcore(dir.path(), &["ca", "init", "--data-dir", "data"]).ok("ca init");
    let ca_pem = fs::read_to_string(pki.join("ca.pem")).expect("ca.pem");
    let out = fleetcore(dir.path(), &["serve", "--config", "f.toml"]);
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(!out.stderr.contains("removed the CA"), "{}", out.stderr);
    assert_eq!(
        fs::read_to_string(pki.join("ca.pem")).expect("ca.pem"),
        ca_pem
    );
    drop(taken);
}

#[test]
fn unreachable_admin_api_says_so_in_one_line() {
    let dir = temp();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let line = fleetcore(
        dir.path(),
        &["thing", "list", "--token", "t0ken", "--admin-url", &url],
    )
    .fails("thing list");
    assert_eq!(
        line,
        format!(
            "fleetcore: cannot reach the admin API at {url}: connection refused — is fleetcore serve running?"
        )
    );
}

#[test]
fn missing_token_is_explained_and_the_token_file_is_used() {
    let dir = temp();
    let line = fleetcore(dir.path(), &["cert", "list", "--data-dir", "nowhere"]).fails("cert list");
    assert!(
        line.contains("no admin token")
            && line.contains("nowhere/admin.token")
            && line.contains("--token"),
        "{line}"
    );

    // With the token file present, the CLI goes on to the (absent) server.
    fs::create_dir_all(dir.path().join("data")).expect("mkdir");
    fs::write(dir.path().join("data/admin.token"), "abc\n").expect("write token");
    let url = format!("http://127.0.0.1:{}", free_port());
    let line = fleetcore(dir.path(), &["cert", "list", "--admin-url", &url])
        .fails("cert list with ./data/admin.token");
    assert!(line.contains("cannot reach the admin API"), "{line}");
}

#[test]
fn cert_create_refuses_to_overwrite_before_asking_for_a_certificate() {
    let dir = temp();
    fs::create_dir_all(dir.path().join("certs")).expect("mkdir");
    fs::write(dir.path().join("certs/computer-a.private.key"), "keep me").expect("write");
    let url = format!("http://127.0.0.1:{}", free_port());
    let line = fleetcore(
        dir.path(),
        &[
            "cert",
            "create",
            "--thing",
            "computer-a",
            "--out",
            "certs",
            "--token",
            "t",
            "--admin-url",
            &url,
        ],
    )
    .fails("cert create over an existing key");
    assert!(
        line.contains("computer-a.private.key") && line.contains("refusing to overwrite"),
        "{line}"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("certs/computer-a.private.key")).expect("read"),
        "keep me"
    );
}

// ---------------------------------------------------------------------------------------
// Against a running server
// ---------------------------------------------------------------------------------------

/// `fleetcore serve` with the admin API on a free loopback port, in its own directory.
struct Server {
    dir: tempfile::TempDir,
    child: Option<Child>,
    admin_url: String,
    log: PathBuf,
}

impl Server {
    fn start() -> Server {
        let dir = temp();
        let log = dir.path().join("server.log");
        let mut server = Server {
            dir,
            child: None,
            admin_url: String::new(),
            log,
        };
        // A port picked by binding to :0 can be taken before the server binds it; then
        // pick again.
        for attempt in 1..=3 {
            let (mqtt, admin) = (free_port(), free_port());
            let config = format!(
                "data_dir = \"data\"\n\n[log]\nformat = \"human\"\nlevel = \"info\"\n\n\
                 [[listener]]\nkind = \"tcp\"\nbind = \"127.0.0.1:{mqtt}\"\nallow_anonymous = true\n\n\
                 [admin]\nenabled = true\nbind = \"127.0.0.1:{admin}\"\n"
            );
            fs::write(server.path().join("fleetcore.toml"), config).expect("write config");
            let log_file = File::options()
                .create(true)
                .append(true)
                .open(&server.log)
                .expect("open log");
            let child = Command::new(binary())
                .args(["serve", "--config", "fleetcore.toml"])
                .current_dir(server.path())
                .env_remove("FLEETCORE_DATA_DIR")
                .env_remove("FLEETCORE_CONFIG")
                .stdin(Stdio::null())
                .stdout(log_file.try_clone().expect("clone log"))
                .stderr(log_file)
                .spawn()
                .expect("run fleetcore serve");
            server.child = Some(child);
            server.admin_url = format!("http://127.0.0.1:{admin}");
            match server.wait_healthy(admin) {
                Ok(()) => return server,
                Err(why) => {
                    server.kill();
                    let text = fs::read_to_string(&server.log).unwrap_or_default();
                    if attempt < 3 && text.to_lowercase().contains("in use") {
                        continue;
                    }
                    panic!("fleetcore serve did not serve the admin API: {why}\nlog:\n{text}");
                }
            }
        }
        unreachable!()
    }

    /// Waits until the token file exists and GET /healthz with it answers 200.
    fn wait_healthy(&mut self, port: u16) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let token_path = self.dir.path().join("data/admin.token");
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("exited early with {status}"));
            }
            if let Ok(token) = fs::read_to_string(&token_path) {
                if healthz(port, token.trim()).is_some_and(|s| s.starts_with("HTTP/1.1 200")) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no healthy answer within {START_TIMEOUT:?}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The CLI run in the server's directory, so ./data/admin.token is found by default.
    fn cli(&self, args: &[&str]) -> Out {
        let mut all = args.to_vec();
        all.extend(["--admin-url", self.admin_url.as_str()]);
        fleetcore(self.path(), &all)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = wait_timeout(&mut child, Duration::from_secs(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET /healthz over a plain socket; the status line, if any answer came.
fn healthz(port: u16, token: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    answer.lines().next().map(str::to_string)
}

/// The admin options are global: before the subcommand (the form docs/admin-api.md
/// shows), between, or after it, with the same effect.
#[test]
fn admin_options_go_before_or_after_the_subcommand() {
    let server = Server::start();
    let url = server.admin_url.as_str();
    fleetcore(
        server.path(),
        &["thing", "create", "computer-a", "--admin-url", url],
    )
    .ok("thing create --admin-url URL");
    let before = fleetcore(
        server.path(),
        &["--admin-url", url, "--json", "thing", "list"],
    )
    .ok("--admin-url URL --json thing list");
    let between = fleetcore(
        server.path(),
        &["thing", "--admin-url", url, "--json", "list"],
    )
    .ok("thing --admin-url URL --json list");
    let after = fleetcore(
        server.path(),
        &["thing", "list", "--admin-url", url, "--json"],
    )
    .ok("thing list --admin-url URL --json");
    assert_eq!(before.json()["things"][0]["name"], "computer-a");
    assert_eq!(before.json(), after.json());
    assert_eq!(between.json(), after.json());

    // --data-dir and --token before the subcommand too: a wrong token from --token is
    // used (and refused by the server) instead of ./data/admin.token.
    let line = fleetcore(
        server.path(),
        &["--token", "wrong", "--admin-url", url, "cert", "list"],
    )
    .fails("--token wrong cert list");
    assert!(line.contains("401"), "{line}");
    let dir = temp();
    fleetcore(dir.path(), &["--data-dir", "elsewhere", "ca", "init"]).ok("--data-dir DIR ca init");
    assert!(dir.path().join("elsewhere/pki/ca.key").exists());
}

/// FLEETCORE_DATA_DIR stands for --data-dir (the container image sets it, so
/// `docker compose exec fleetcore fleetcore thing list` finds admin.token).
#[test]
fn fleetcore_data_dir_from_the_environment_finds_the_token() {
    let server = Server::start();
    fleetcore(
        server.path(),
        &[
            "thing",
            "create",
            "computer-a",
            "--admin-url",
            &server.admin_url,
        ],
    )
    .ok("thing create");
    let elsewhere = temp();
    let run = |env: Option<&Path>| {
        let mut cmd = Command::new(binary());
        cmd.args(["thing", "list", "--admin-url", &server.admin_url])
            .current_dir(elsewhere.path())
            .env_remove("FLEETCORE_ADMIN_TOKEN")
            .env_remove("FLEETCORE_DATA_DIR")
            .stdin(Stdio::null());
        if let Some(dir) = env {
            cmd.env("FLEETCORE_DATA_DIR", dir);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run fleetcore");
        match wait_timeout(&mut child, RUN_TIMEOUT) {
            Some(_) => child.wait_with_output().expect("output"),
            None => {
                let _ = child.kill();
                panic!("thing list did not finish");
            }
        }
    };
    let without = run(None);
    assert!(!without.status.success(), "no ./data/admin.token here");
    let with = run(Some(&server.path().join("data")));
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
    assert!(String::from_utf8_lossy(&with.stdout).contains("computer-a"));
}

/// `serve` takes --data-dir of the global options; an admin-only one is refused, not
/// ignored.
#[test]
fn serve_refuses_admin_only_options() {
    let dir = temp();
    for args in [
        &["--admin-url", "http://127.0.0.1:1", "serve"][..],
        &["serve", "--token", "t"][..],
        &["default-config", "--json"][..],
    ] {
        let out = fleetcore(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("is an option of the admin commands"),
            "{args:?}: {}",
            out.stderr
        );
    }
    assert!(
        fs::read_dir(dir.path()).unwrap().all(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".cli.")),
        "nothing was started or created"
    );
}

/// Configuration mistakes a new user makes stop `serve` at once with what to write
/// instead: a misspelt log level (which would otherwise silence every log line), a NATS
/// URL that is not one, and a host name as bind address.
#[test]
fn serve_names_the_fix_for_a_misspelt_log_level_and_a_host_name_bind() {
    let dir = temp();
    for (config, expected) in [
        (
            "[log]\nlevel = \"inof\"\n",
            &[
                "log.level",
                "\"inof\"",
                "trace, debug, info, warn, error, off",
            ][..],
        ),
        (
            "[cluster]\nnats_urls = [\"http://10.0.0.1:4222\"]\n",
            &[
                "cluster.nats_urls",
                "\"http://10.0.0.1:4222\"",
                "nats://host:port",
            ][..],
        ),
        (
            "[[listener]]\nkind = \"tcp\"\nbind = \"localhost:1883\"\n",
            &[
                "\"localhost:1883\"",
                "\"127.0.0.1:1883\"",
                "host names are not resolved",
            ][..],
        ),
    ] {
        fs::write(dir.path().join("bad.toml"), config).expect("write config");
        let out = fleetcore(
            dir.path(),
            &["serve", "--config", "bad.toml", "--data-dir", "data"],
        );
        assert!(!out.status.success(), "{config}: {}", out.stderr);
        for e in expected {
            assert!(
                out.stderr.contains(e),
                "{config}: {e} missing in {}",
                out.stderr
            );
        }
        assert!(
            !dir.path().join("data").exists(),
            "nothing created for {config}"
        );
    }
}

const POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}" },
    { "Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"], "Resource": "arn:aws:iot:*:*:topic/agents/${iot:Connection.Thing.ThingName}/*" }
  ]
}"#;

#[test]
fn operator_issues_a_certificate_for_a_thing_and_revokes_it() {
    let server = Server::start();
    let dir = server.path();

    let out = server
        .cli(&[
            "thing",
            "create",
            "computer-a",
            "--type",
            "agent",
            "--attr",
            "account=customer-b",
        ])
        .ok("thing create");
    assert!(out.stdout.contains("computer-a"), "{}", out.stdout);
    assert!(out.stdout.contains("account=customer-b"), "{}", out.stdout);

    let things = server
        .cli(&["thing", "list", "--json"])
        .ok("thing list --json")
        .json();
    let names: Vec<&str> = things["things"]
        .as_array()
        .expect("things array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(names, ["computer-a"]);
    let table = server.cli(&["thing", "list"]).ok("thing list");
    assert!(table.stdout.starts_with("NAME"), "{}", table.stdout);

    fs::write(dir.join("agent.json"), POLICY).expect("write policy");
    server
        .cli(&["policy", "create", "agent", "--file", "agent.json"])
        .ok("policy create");
    let got = server.cli(&["policy", "get", "agent"]).ok("policy get");
    assert!(got.stdout.contains("version 1"), "{}", got.stdout);
    assert!(got.stdout.contains("iot:Connect"), "{}", got.stdout);

    let out = server
        .cli(&[
            "cert",
            "create",
            "--thing",
            "computer-a",
            "--policy",
            "agent",
            "--out",
            "certs",
        ])
        .ok("cert create");
    let (id, key) = issued_files(&out.stdout, dir, "certs", "computer-a");
    let certs = dir.join("certs");

    let v = server
        .cli(&["cert", "describe", &id, "--json"])
        .ok("cert describe --json")
        .json();
    assert_eq!(v["state"], "ACTIVE", "{v}");
    assert_eq!(v["subject_cn"], "computer-a", "{v}");
    assert_eq!(v["things"], serde_json::json!(["computer-a"]), "{v}");
    assert_eq!(v["policies"], serde_json::json!(["agent"]), "{v}");

    // Same thing, same directory: nothing is replaced.
    let line = server
        .cli(&["cert", "create", "--thing", "computer-a", "--out", "certs"])
        .fails("cert create again");
    assert!(line.contains("refusing to overwrite"), "{line}");
    assert_eq!(
        fs::read_to_string(certs.join("computer-a.private.key")).expect("key"),
        key
    );

    let out = server.cli(&["cert", "revoke", &id]).ok("cert revoke");
    assert!(out.stdout.contains("REVOKED"), "{}", out.stdout);
    let v = server
        .cli(&["cert", "describe", &id, "--json"])
        .ok("cert describe after revoke")
        .json();
    assert_eq!(v["state"], "REVOKED", "{v}");
    let line = server
        .cli(&["cert", "set-state", &id, "active"])
        .fails("reactivating a revoked certificate");
    assert!(line.ends_with("(409)"), "{line}");

    let crl = dir.join("crl.der");
    server
        .cli(&["ca", "crl", "--out", "crl.der"])
        .ok("ca crl --out");
    assert_eq!(fs::read(&crl).expect("crl")[0], 0x30, "DER SEQUENCE");
    let pem = server.cli(&["ca", "crl"]).ok("ca crl");
    assert!(pem.stdout.contains("BEGIN X509 CRL"), "{}", pem.stdout);

    let list = server
        .cli(&["cert", "list", "--json"])
        .ok("cert list")
        .json();
    assert_eq!(
        list["certificates"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
}

#[test]
fn errors_from_the_api_are_one_line_with_the_status() {
    let server = Server::start();
    let line = server
        .cli(&["thing", "describe", "nobody"])
        .fails("thing describe nobody");
    assert!(line.contains("nobody") && line.ends_with("(404)"), "{line}");

    let line = server
        .cli(&["thing", "list", "--token", "wrong"])
        .fails("wrong token");
    assert!(line.contains("(401)") && line.contains("--token"), "{line}");

    fs::write(server.path().join("bad.json"), "{ not json").expect("write");
    let line = server
        .cli(&["policy", "create", "bad", "--file", "bad.json"])
        .fails("policy create with bad JSON");
    assert!(
        line.contains("bad.json is not a JSON policy document"),
        "{line}"
    );

    fs::write(server.path().join("deny.json"), r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Conect","Resource":"*"}]}"#).expect("write");
    let line = server
        .cli(&["policy", "create", "typo", "--file", "deny.json"])
        .fails("policy create with a bad action");
    assert!(line.ends_with("(400)"), "{line}");
}

#[test]
fn things_policies_and_attachments_round_trip() {
    let server = Server::start();
    let dir = server.path();
    server
        .cli(&[
            "thing",
            "create",
            "computer-b",
            "--attr",
            "a=1",
            "--attr",
            "b=2",
        ])
        .ok("thing create");
    let v = server
        .cli(&[
            "thing",
            "update",
            "computer-b",
            "--attr",
            "a=",
            "--attr",
            "c=3",
            "--json",
        ])
        .ok("thing update (merge)")
        .json();
    assert_eq!(
        v["attributes"],
        serde_json::json!({"b": "2", "c": "3"}),
        "{v}"
    );
    let v = server
        .cli(&[
            "thing",
            "update",
            "computer-b",
            "--replace",
            "--attr",
            "z=9",
            "--json",
        ])
        .ok("thing update --replace")
        .json();
    assert_eq!(v["attributes"], serde_json::json!({"z": "9"}), "{v}");

    // A CSR: the key never leaves this test.
    let key = rcgen::KeyPair::generate().expect("key");
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .expect("params")
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("csr pem");
    fs::write(dir.join("b.csr"), csr).expect("write csr");
    let out = server
        .cli(&[
            "cert",
            "sign",
            "--csr",
            "b.csr",
            "--thing",
            "computer-b",
            "--out",
            "b.pem",
        ])
        .ok("cert sign");
    assert!(fs::read_to_string(dir.join("b.pem"))
        .expect("b.pem")
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let id = out
        .stdout
        .split_whitespace()
        .find(|w| w.trim_end_matches(',').len() == 64)
        .map(|w| w.trim_end_matches(',').to_string())
        .unwrap_or_else(|| panic!("no id in {}", out.stdout));

    fs::write(dir.join("p.json"), POLICY).expect("write policy");
    server
        .cli(&["policy", "create", "p", "--file", "p.json"])
        .ok("policy create");
    server
        .cli(&["policy", "version", "p", "--file", "p.json", "--default"])
        .ok("policy version");
    let v = server
        .cli(&["policy", "set-default", "p", "1", "--json"])
        .ok("policy set-default")
        .json();
    assert_eq!(v["default_version"], 1, "{v}");
    server
        .cli(&["policy", "attach", "p", "--cert", &id])
        .ok("policy attach");
    let line = server
        .cli(&["policy", "delete", "p"])
        .fails("policy delete while attached");
    assert!(line.ends_with("(409)"), "{line}");
    server
        .cli(&["policy", "detach", "p", "--cert", &id])
        .ok("policy detach");
    server.cli(&["policy", "delete", "p"]).ok("policy delete");

    let line = server
        .cli(&["thing", "delete", "computer-b"])
        .fails("thing delete while attached");
    assert!(line.ends_with("(409)"), "{line}");
    server
        .cli(&["thing", "detach", "computer-b", "--cert", &id])
        .ok("thing detach");
    server
        .cli(&["thing", "delete", "computer-b"])
        .ok("thing delete");
    server
        .cli(&["cert", "set-state", &id, "INACTIVE"])
        .ok("cert set-state INACTIVE");
    server.cli(&["cert", "delete", &id]).ok("cert delete");

    let cas = server.cli(&["ca", "list", "--json"]).ok("ca list").json();
    assert_eq!(cas["cas"].as_array().map(Vec::len), Some(1), "{cas}");
}

#[test]
fn certificates_from_a_registered_ca_can_be_registered() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    let server = Server::start();
    let dir = server.path();

    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "own CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let own_ca =
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
    let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, "computer-d");
    let leaf = leaf
        .signed_by(&KeyPair::generate().expect("key"), &own_ca)
        .expect("sign leaf");
    fs::write(dir.join("own-ca.pem"), own_ca.pem()).expect("write");
    fs::write(dir.join("leaf.pem"), leaf.pem()).expect("write");

    // Not yet: the leaf chains to nothing fleetcore knows.
    let line = server
        .cli(&["cert", "register", "--pem", "leaf.pem"])
        .fails("cert register before its CA");
    assert!(line.ends_with("(400)"), "{line}");

    server
        .cli(&["ca", "register", "--pem", "own-ca.pem"])
        .ok("ca register");
    let cas = server.cli(&["ca", "list"]).ok("ca list");
    assert!(cas.stdout.contains("CN=own CA"), "{}", cas.stdout);

    let v = server
        .cli(&[
            "cert",
            "register",
            "--pem",
            "leaf.pem",
            "--thing",
            "computer-d",
            "--state",
            "inactive",
            "--json",
        ])
        .ok("cert register")
        .json();
    assert_eq!(v["state"], "INACTIVE", "{v}");
    assert_eq!(v["subject_cn"], "computer-d", "{v}");
}

// ---------------------------------------------------------------------------------------
// Fleet provisioning: templates, claim certificates, JITP
// ---------------------------------------------------------------------------------------

/// A FLEET_PROVISIONING template (as tests/provisioning.rs's), laid out as a person
/// would write it.
const FLEET_TEMPLATE: &str = r#"{
  "Parameters": {
    "SerialNumber": { "Type": "String" },
    "AWS::IoT::Certificate::Id": { "Type": "String" }
  },
  "Resources": {
    "thing": {
      "Type": "AWS::IoT::Thing",
      "Properties": {
        "ThingName": { "Fn::Join": ["", ["agent-", { "Ref": "SerialNumber" }]] },
        "AttributePayload": { "serial": { "Ref": "SerialNumber" } }
      }
    },
    "certificate": {
      "Type": "AWS::IoT::Certificate",
      "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": "Active" }
    },
    "policy": { "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "agent" } }
  }
}
"#;

/// A JITP template: the thing is named after the certificate's CN.
const JITP_TEMPLATE: &str = r#"{
  "Parameters": {
    "AWS::IoT::Certificate::CommonName": { "Type": "String" },
    "AWS::IoT::Certificate::Id": { "Type": "String" }
  },
  "Resources": {
    "thing": { "Type": "AWS::IoT::Thing", "Properties": { "ThingName": { "Ref": "AWS::IoT::Certificate::CommonName" } } },
    "certificate": { "Type": "AWS::IoT::Certificate", "Properties": { "CertificateId": { "Ref": "AWS::IoT::Certificate::Id" }, "Status": "ACTIVE" } },
    "policy": { "Type": "AWS::IoT::Policy", "Properties": { "PolicyName": "agent" } }
  }
}
"#;

#[test]
fn claim_and_template_arguments_are_checked_by_the_cli() {
    let dir = temp();
    let clap_error = |args: &[&str], needle: &str| {
        let out = fleetcore(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    };
    clap_error(&["cert", "create", "--claim", "--out", "d"], "--template");
    clap_error(
        &[
            "cert",
            "create",
            "--claim",
            "--template",
            "fleet",
            "--thing",
            "a",
            "--out",
            "d",
        ],
        "cannot be used with",
    );
    clap_error(
        &[
            "cert",
            "create",
            "--claim",
            "--template",
            "fleet",
            "--policy",
            "p",
            "--out",
            "d",
        ],
        "cannot be used with",
    );
    clap_error(
        &["cert", "create", "--template", "fleet", "--out", "d"],
        "--claim",
    );
    clap_error(&["cert", "create", "--out", "d"], "--thing");
    clap_error(
        &["template", "update", "t", "--enable", "--disable"],
        "cannot be used with",
    );
    clap_error(
        &[
            "template",
            "update",
            "t",
            "--hook-url",
            "http://h/",
            "--no-hook",
        ],
        "cannot be used with",
    );
    clap_error(
        &["template", "create", "t", "--file", "f", "--type", "x"],
        "jitp",
    );
    assert!(!dir.path().join("d").exists(), "nothing written");
}

#[test]
fn a_template_file_that_is_not_json_is_refused_before_anything_is_sent() {
    let dir = temp();
    // Nothing listens there: an attempt to call the API would say so instead.
    let url = format!("http://127.0.0.1:{}", free_port());
    fs::write(
        dir.path().join("broken-template.json"),
        "{\n  \"Resources\": {\n    \"thing\": { \"Type\": \"AWS::IoT::Thing\" },\n  }\n}\n",
    )
    .expect("write");
    for args in [
        &["template", "create", "t", "--file", "broken-template.json"][..],
        &["template", "update", "t", "--file", "broken-template.json"][..],
    ] {
        let mut args = args.to_vec();
        args.extend(["--admin-url", &url, "--token", "x"]);
        let line = fleetcore(dir.path(), &args).fails("template with a broken file");
        assert!(
            line.contains("broken-template.json is not valid JSON: line 4, column"),
            "{line}"
        );
    }
    fs::write(dir.path().join("list.json"), "[1, 2]").expect("write");
    let line = fleetcore(
        dir.path(),
        &[
            "template",
            "create",
            "t",
            "--file",
            "list.json",
            "--admin-url",
            &url,
            "--token",
            "x",
        ],
    )
    .fails("template from an array");
    assert!(
        line.contains("list.json is not a provisioning template") && line.contains("an array"),
        "{line}"
    );
    let line = fleetcore(
        dir.path(),
        &[
            "template",
            "create",
            "t",
            "--file",
            "missing.json",
            "--admin-url",
            &url,
            "--token",
            "x",
        ],
    )
    .fails("template from a missing file");
    assert!(line.contains("missing.json"), "{line}");
}

#[test]
fn provisioning_templates_are_created_listed_described_updated_and_deleted() {
    let server = Server::start();
    let dir = server.path();
    fs::write(dir.join("fleet-template.json"), FLEET_TEMPLATE).expect("write");

    let out = server
        .cli(&[
            "template",
            "create",
            "fleet",
            "--file",
            "fleet-template.json",
            "--description",
            "agents of customer B",
        ])
        .ok("template create");
    assert!(
        out.stdout.contains("created provisioning template fleet"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("cert create --claim --template fleet"),
        "{}",
        out.stdout
    );
    let line = server
        .cli(&[
            "template",
            "create",
            "fleet",
            "--file",
            "fleet-template.json",
        ])
        .fails("template create twice");
    assert!(line.ends_with("(409)"), "{line}");

    let table = server.cli(&["template", "list"]).ok("template list");
    let mut lines = table.stdout.lines();
    let head = lines.next().unwrap_or_default();
    assert!(
        head.starts_with("NAME") && head.contains("ENABLED"),
        "{head}"
    );
    let row = lines.next().unwrap_or_default();
    for cell in [
        "fleet",
        "FLEET_PROVISIONING",
        "true",
        "agents of customer B",
    ] {
        assert!(row.contains(cell), "{cell}: {row}");
    }
    let v = server
        .cli(&["template", "list", "--json"])
        .ok("template list --json")
        .json();
    assert_eq!(v["templates"][0]["templateName"], "fleet", "{v}");

    let out = server
        .cli(&["template", "describe", "fleet"])
        .ok("template describe");
    assert!(out.stdout.contains("template body:"), "{}", out.stdout);
    assert!(out.stdout.contains("FLEET_PROVISIONING"), "{}", out.stdout);
    // The body pretty-printed, indented under its heading.
    assert!(
        out.stdout.contains("\n    \"Resources\": {\n"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("\"Type\": \"AWS::IoT::Thing\""),
        "{}",
        out.stdout
    );
    // In the order the file has it (SerialNumber first), not sorted.
    let serial = out
        .stdout
        .find("\"SerialNumber\": {")
        .expect("SerialNumber");
    let cert_id = out
        .stdout
        .find("\"AWS::IoT::Certificate::Id\": {")
        .expect("Id");
    assert!(serial < cert_id, "{}", out.stdout);

    // Disable, then enable again.
    let out = server
        .cli(&["template", "update", "fleet", "--disable"])
        .ok("template update --disable");
    assert!(out.stdout.contains("updated provisioning template fleet"));
    let enabled = |server: &Server| {
        server
            .cli(&["template", "describe", "fleet", "--json"])
            .ok("template describe --json")
            .json()["enabled"]
            .clone()
    };
    assert_eq!(enabled(&server), Value::Bool(false));
    server
        .cli(&["template", "update", "fleet", "--enable"])
        .ok("template update --enable");
    assert_eq!(enabled(&server), Value::Bool(true));

    // A hook, then none; a new body is a new version.
    let v = server
        .cli(&[
            "template",
            "update",
            "fleet",
            "--hook-url",
            "http://127.0.0.1:9/hook",
            "--json",
        ])
        .ok("template update --hook-url")
        .json();
    assert_eq!(
        v["preProvisioningHook"]["url"], "http://127.0.0.1:9/hook",
        "{v}"
    );
    let out = server
        .cli(&[
            "template",
            "update",
            "fleet",
            "--no-hook",
            "--file",
            "fleet-template.json",
        ])
        .ok("template update --no-hook --file");
    assert!(out.stdout.contains("version:"), "{}", out.stdout);
    let v = server
        .cli(&["template", "describe", "fleet", "--json"])
        .ok("template describe --json")
        .json();
    assert!(v.get("preProvisioningHook").is_none(), "{v}");
    assert_eq!(v["defaultVersionId"], 2, "{v}");
    let line = server
        .cli(&["template", "update", "fleet"])
        .fails("template update without a change");
    assert!(line.contains("nothing to update"), "{line}");

    // The server refuses what it cannot run, naming the resource at fault.
    fs::write(
        dir.join("widget.json"),
        r#"{"Resources": {"gadget": {"Type": "AWS::IoT::Widget", "Properties": {}}}}"#,
    )
    .expect("write");
    let line = server
        .cli(&["template", "create", "widgets", "--file", "widget.json"])
        .fails("template create with an unknown resource type");
    assert!(
        line.contains("gadget") && line.contains("AWS::IoT::Widget") && line.ends_with("(400)"),
        "{line}"
    );
    let line = server
        .cli(&["template", "update", "fleet", "--file", "widget.json"])
        .fails("template update with an unknown resource type");
    assert!(line.contains("gadget") && line.ends_with("(400)"), "{line}");

    let out = server
        .cli(&["template", "delete", "fleet"])
        .ok("template delete");
    assert!(
        out.stdout.contains("deleted provisioning template fleet"),
        "{}",
        out.stdout
    );
    let line = server
        .cli(&["template", "describe", "fleet"])
        .fails("template describe after delete");
    assert!(line.contains("fleet") && line.ends_with("(404)"), "{line}");
    let out = server.cli(&["template", "list"]).ok("template list");
    assert_eq!(out.stdout.trim(), "no provisioning templates");
}

#[test]
fn cert_create_claim_writes_a_claim_certificate_for_a_template() {
    let server = Server::start();
    let dir = server.path();
    fs::write(dir.join("fleet-template.json"), FLEET_TEMPLATE).expect("write");
    // The policy the template names need not exist yet: it is looked up at RegisterThing.
    server
        .cli(&[
            "template",
            "create",
            "fleet",
            "--file",
            "fleet-template.json",
        ])
        .ok("template create");

    let out = server
        .cli(&[
            "cert",
            "create",
            "--claim",
            "--template",
            "fleet",
            "--out",
            "claim",
        ])
        .ok("cert create --claim");
    let (id, key) = issued_files(&out.stdout, dir, "claim", "claim-fleet");
    let claim = dir.join("claim");
    assert!(
        out.stdout.contains("fleetcore-claim-fleet"),
        "{}",
        out.stdout
    );

    let v = server
        .cli(&["cert", "describe", &id, "--json"])
        .ok("cert describe --json")
        .json();
    assert_eq!(v["state"], "ACTIVE", "{v}");
    assert_eq!(v["subject_cn"], "claim-fleet", "{v}");
    assert_eq!(
        v["policies"],
        serde_json::json!(["fleetcore-claim-fleet"]),
        "{v}"
    );
    let out = server.cli(&["cert", "describe", &id]).ok("cert describe");
    assert!(out.stdout.contains("ACTIVE"), "{}", out.stdout);
    assert!(
        out.stdout.contains("fleetcore-claim-fleet"),
        "{}",
        out.stdout
    );

    // Same template, same directory: nothing is replaced, nothing is issued.
    let line = server
        .cli(&[
            "cert",
            "create",
            "--claim",
            "--template",
            "fleet",
            "--out",
            "claim",
        ])
        .fails("cert create --claim again");
    assert!(
        line.contains("claim-fleet") && line.contains("refusing to overwrite"),
        "{line}"
    );
    assert_eq!(
        fs::read_to_string(claim.join("claim-fleet.private.key")).expect("key"),
        key
    );
    let certs = server
        .cli(&["cert", "list", "--json"])
        .ok("cert list")
        .json();
    assert_eq!(
        certs["certificates"].as_array().map(Vec::len),
        Some(1),
        "{certs}"
    );

    // A second claim certificate elsewhere, as JSON.
    let v = server
        .cli(&[
            "cert",
            "create",
            "--claim",
            "--template",
            "fleet",
            "--out",
            "claim2",
            "--days",
            "30",
            "--json",
        ])
        .ok("cert create --claim --json")
        .json();
    assert_eq!(v["policy_name"], "fleetcore-claim-fleet", "{v}");
    assert_eq!(v["template_name"], "fleet", "{v}");
    assert_ne!(v["certificate_id"], Value::String(id.clone()), "{v}");
    assert_eq!(mode(&dir.join("claim2/claim-fleet.private.key")), 0o600);

    let line = server
        .cli(&[
            "cert",
            "create",
            "--claim",
            "--template",
            "nobody",
            "--out",
            "claim3",
        ])
        .fails("cert create --claim for an unknown template");
    assert!(line.contains("nobody") && line.ends_with("(404)"), "{line}");
    assert!(!dir.join("claim3/claim-nobody.private.key").exists());
}

#[test]
fn a_jitp_template_is_set_on_a_registered_ca_and_cleared() {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
        KeyPair, KeyUsagePurpose,
    };
    let server = Server::start();
    let dir = server.path();
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "factory CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let own_ca =
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
    fs::write(dir.join("factory-ca.pem"), own_ca.pem()).expect("write");
    let ca = server
        .cli(&["ca", "register", "--pem", "factory-ca.pem", "--json"])
        .ok("ca register")
        .json();
    let ca_id = ca["id"].as_str().expect("CA id").to_string();

    fs::write(dir.join("jitp.json"), JITP_TEMPLATE).expect("write");
    fs::write(dir.join("fleet-template.json"), FLEET_TEMPLATE).expect("write");
    let out = server
        .cli(&[
            "template",
            "create",
            "factory",
            "--file",
            "jitp.json",
            "--type",
            "jitp",
        ])
        .ok("template create --type jitp");
    assert!(out.stdout.contains("ca set-template"), "{}", out.stdout);
    server
        .cli(&[
            "template",
            "create",
            "fleet",
            "--file",
            "fleet-template.json",
        ])
        .ok("template create");

    let line = server
        .cli(&["ca", "set-template", &ca_id, "fleet"])
        .fails("ca set-template with a fleet template");
    assert!(line.contains("fleet") && line.ends_with("(400)"), "{line}");
    let line = server
        .cli(&[
            "cert",
            "create",
            "--claim",
            "--template",
            "factory",
            "--out",
            "c",
        ])
        .fails("a claim certificate for a JITP template");
    assert!(line.ends_with("(400)"), "{line}");

    let out = server
        .cli(&["ca", "set-template", &ca_id, "factory"])
        .ok("ca set-template");
    assert!(out.stdout.contains("factory"), "{}", out.stdout);
    let cas = server.cli(&["ca", "list"]).ok("ca list");
    assert!(cas.stdout.contains("JITP TEMPLATE"), "{}", cas.stdout);
    let row = cas
        .stdout
        .lines()
        .find(|l| l.starts_with(&ca_id))
        .unwrap_or_else(|| panic!("no row for {ca_id}: {}", cas.stdout));
    assert!(row.trim_end().ends_with("factory"), "{row}");

    server
        .cli(&["ca", "clear-template", &ca_id])
        .ok("ca clear-template");
    let cas = server.cli(&["ca", "list"]).ok("ca list");
    let row = cas
        .stdout
        .lines()
        .find(|l| l.starts_with(&ca_id))
        .expect("row");
    assert!(row.trim_end().ends_with('-'), "{row}");
}
