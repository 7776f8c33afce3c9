//! An agent on a site whose only way out is an HTTP proxy: a real tinyproxy (Debian's
//! package) on 127.0.0.1 that allows CONNECT to the broker's 443-style port and nothing
//! else. The agent (paho-mqtt over WSS, tunnelled with CONNECT, its client certificate
//! end to end) connects through it and receives an order from the backend.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::fleet::*;
use common::*;

const SEC: Duration = Duration::from_secs(1);

/// A tinyproxy in the foreground, killed with its [`LineChild`].
struct Proxy {
    port: u16,
    log: std::path::PathBuf,
    _child: LineChild,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_tinyproxy(dir: &Path, connect_port: u16) -> Proxy {
    require_program("tinyproxy");
    let port = free_port();
    let log = dir.join("tinyproxy.log");
    let conf = dir.join("tinyproxy.conf");
    // Only CONNECT to the broker's port; only from loopback.
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 20\nAllow 127.0.0.1\n\
             ConnectPort {connect_port}\nLogFile \"{}\"\nLogLevel Info\nDisableViaHeader Yes\n",
            log.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("tinyproxy");
    cmd.arg("-d").arg("-c").arg(&conf);
    let child = LineChild::spawn("tinyproxy", cmd);
    let deadline = Instant::now() + 10 * SEC;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "tinyproxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proxy {
        port,
        log,
        _child: child,
    }
}

/// Sends `CONNECT target` to the proxy and returns its status line.
fn connect_through(proxy: &Proxy, target: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    s.set_read_timeout(Some(10 * SEC)).unwrap();
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn agent_behind_an_http_proxy_gets_its_order_over_wss() {
    let broker = TestBroker::start(BrokerOpts::new().server_pki().registry().admin().wss(""));
    let dir = tempfile::tempdir().unwrap();
    let fleet = provision_fleet(&broker, dir.path());
    let proxy = start_tinyproxy(dir.path(), broker.wss_port());

    // The proxy is as strict as a corporate one: the broker's plain MQTT port is refused.
    let refused = connect_through(&proxy, &format!("127.0.0.1:{}", broker.tcp_port()));
    assert!(
        refused.contains(" 403"),
        "CONNECT to another port: {refused:?}"
    );
    let allowed = connect_through(&proxy, &format!("127.0.0.1:{}", broker.wss_port()));
    assert!(
        allowed.contains(" 200"),
        "CONNECT to the broker's port: {allowed:?}"
    );

    let mut agent = paho(
        "subscribe.py",
        &with(
            &broker.paho_wss(Some(&fleet.agent)),
            &[
                "--host",
                "127.0.0.1",
                "--http-proxy",
                &format!("127.0.0.1:{}", proxy.port),
                "--client-id",
                "computer-a",
                "--filter",
                "customer-a/computer-a/#",
                "--count",
                "1",
            ],
        ),
    );
    assert_eq!(
        agent.expect_event("suback", 15 * SEC).get("codes"),
        "1",
        "{}",
        agent.transcript()
    );
    mosquitto_pub(&with(
        &broker.mosq_tls(&fleet.backend),
        &[
            "-i",
            "backend",
            "-q",
            "1",
            "-t",
            AGENT_ORDERS,
            "-m",
            "reboot-at-2am",
        ],
    ));
    agent.expect_success(10 * SEC);
    assert_eq!(payloads(&agent.events()), ["reboot-at-2am"]);

    // The agent's connection really went through the proxy.
    let log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
    let tunnels = log
        .lines()
        .filter(|l| l.contains("CONNECT") && l.contains(&broker.wss_port().to_string()))
        .count();
    assert!(
        tunnels >= 2,
        "the agent's CONNECT is in the proxy log:\n{log}"
    );
    let connected = broker.log();
    assert!(
        connected.lines().any(|l| l.contains("client connected")
            && l.contains("computer-a")
            && l.contains("transport=\"wss\"")),
        "{}",
        broker.log_tail()
    );
    broker.assert_no_panic_logged();
}
