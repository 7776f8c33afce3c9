//! fleetcore nodes joined by the NATS fabric (a real nats-server, killed by PID at the
//! end), driven by mosquitto_pub and mosquitto_sub. With a redb each: a publish on either
//! node reaches the other node's subscribers once, even through two overlapping filters,
//! with levels NATS cannot carry as they are; a node never sends back what another node
//! forwarded to it. Sharing their state on NATS JetStream: what one retains the other
//! serves, and a shadow updated through one is read and updated through the other.
//!
//! The nodes run in this process, because the binary still holds one node per prefix
//! (docs/cluster.md).

#[path = "../../cluster/tests/support/nats.rs"]
mod nats;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleetcore_broker::config::ListenerConfig;
use fleetcore_broker::{Backend, Config, Server};
use fleetcore_cluster::fabric::NatsFabric;
use fleetcore_cluster::{NatsOptions, NatsStorage};
use fleetcore_store::{Store, StoreOptions};

/// A node on `dir`'s own redb, joined to the others by the fabric.
async fn node(nats: &nats::Nats, dir: &std::path::Path) -> (Server, SocketAddr) {
    let (store, loaded) = Store::open(&dir.join("fleetcore.redb"), StoreOptions::default())
        .expect("open the node's redb");
    start_node(
        nats,
        dir,
        store.storage(),
        loaded,
        "redb + NATS fabric",
        Vec::new(),
    )
    .await
}

/// A node keeping its state on NATS JetStream under the prefix every such node shares,
/// as cluster mode will run them, joined to the others by the fabric.
async fn shared_node(
    nats: &nats::Nats,
    dir: &std::path::Path,
    services: Vec<Arc<dyn fleetcore_core::service::TopicService>>,
) -> (Server, SocketAddr) {
    let opts = NatsOptions {
        prefix: "shared".into(),
        ..NatsOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (store, loaded) = loop {
        match NatsStorage::connect(&[nats.url()], opts.clone()).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("NATS: {e}\n{}", nats.log()),
        }
    };
    start_node(
        nats,
        dir,
        store.storage(),
        loaded,
        "NATS JetStream + fabric",
        services,
    )
    .await
}

async fn start_node(
    nats: &nats::Nats,
    dir: &std::path::Path,
    storage: fleetcore_core::storage::Storage,
    loaded: fleetcore_core::storage::Loaded,
    place: &str,
    services: Vec<Arc<dyn fleetcore_core::service::TopicService>>,
) -> (Server, SocketAddr) {
    let config = Config {
        data_dir: dir.into(),
        listeners: vec![ListenerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..ListenerConfig::default_tcp()
        }],
        ..Config::default()
    };
    let opts = NatsOptions {
        prefix: "e2e".into(),
        ..NatsOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let fabric = loop {
        match NatsFabric::connect(&[nats.url()], &opts).await {
            Ok(f) => break f,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("NATS: {e}\n{}", nats.log()),
        }
    };
    let backend = Backend {
        storage,
        loaded,
        place: place.into(),
        fabric: Arc::new(fabric),
    };
    let server = Server::start_on(config, Some(backend), services, |_| {})
        .await
        .expect("start a node");
    let addr = server.local_addrs()[0].1;
    (server, addr)
}

/// A mosquitto_sub whose `topic payload` lines are collected as they come.
struct Sub {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Sub {
    fn start(addr: SocketAddr, filters: &[&str]) -> Sub {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
            .args(["-V", "mqttv5", "-q", "1", "-v", "-W", "60"]);
        for f in filters {
            cmd.args(["-t", f]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run mosquitto_sub (Debian package mosquitto-clients)");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Sub { child, lines }
    }

    fn has(&self, line: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l == line)
    }

    /// What arrived, probes left out.
    fn got(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|l| !l.ends_with(" probe"))
            .cloned()
            .collect()
    }
}

impl Drop for Sub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn publish(addr: SocketAddr, topic: &str, payload: &str) {
    let out = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-V", "mqttv5", "-q", "1", "-t", topic, "-m", payload])
        .output()
        .expect("run mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Publishes `topic probe` on `addr` until `sub` has it: its node's interest reached NATS.
fn probe(addr: SocketAddr, sub: &Sub, topic: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sub.has(&format!("{topic} probe")) {
        assert!(
            Instant::now() < deadline,
            "{topic} never reached the other node"
        );
        publish(addr, topic, "probe");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for(sub: &Sub, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !sub.has(line) {
        assert!(
            Instant::now() < deadline,
            "{line:?} did not arrive; got {:?}",
            sub.got()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_cross_between_two_nodes_once() {
    let nats = nats::Nats::start();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, addr_a) = node(&nats, dirs.0.path()).await;
    let (b, addr_b) = node(&nats, dirs.1.path()).await;

    tokio::task::spawn_blocking(move || {
        // On b: two filters that both match the commands; on a: one.
        let on_b = Sub::start(addr_b, &["fleet/#", "fleet/+/cmd"]);
        let on_a = Sub::start(addr_a, &["fleet/#"]);
        probe(addr_a, &on_b, "fleet/probe-ab");
        probe(addr_b, &on_a, "fleet/probe-ba");

        publish(addr_a, "fleet/d1/cmd", "one");
        publish(addr_a, "fleet/a.b c/cmd", "two");
        publish(addr_a, "fleet/end", "end-a");
        wait_for(&on_b, "fleet/end end-a");
        publish(addr_b, "fleet/from-b", "three");
        publish(addr_b, "fleet/end", "end-b");
        wait_for(&on_b, "fleet/end end-b");
        wait_for(&on_a, "fleet/end end-b");
        let expected = [
            "fleet/d1/cmd one",
            "fleet/a.b c/cmd two",
            "fleet/end end-a",
            "fleet/from-b three",
            "fleet/end end-b",
        ];
        // b got a's publishes once though two of its filters match (one session, one
        // copy, and one NATS delivery kept of two), and its own as any broker does.
        assert_eq!(on_b.got(), expected, "on b");
        // a got its own once: b did not send back what a forwarded to it.
        assert_eq!(on_a.got(), expected, "on a");
    })
    .await
    .unwrap();

    a.shutdown(Duration::from_secs(2)).await.unwrap();
    b.shutdown(Duration::from_secs(2)).await.unwrap();
    drop(nats);
}

/// mosquitto_sub on `addr` for `filter`, waiting at most `secs` for one message: the
/// `topic payload` line it printed, if any (a new subscriber gets the retained one).
fn first_message(addr: SocketAddr, filter: &str, secs: u32) -> String {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-V", "mqttv5", "-q", "1", "-v", "-C", "1"])
        .args(["-W", &secs.to_string(), "-t", filter])
        .output()
        .expect("run mosquitto_sub");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn publish_retained(addr: SocketAddr, topic: &str, payload: Option<&str>) {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["-V", "mqttv5", "-q", "1", "-r", "-t", topic]);
    match payload {
        Some(p) => cmd.args(["-m", p]),
        None => cmd.arg("-n"),
    };
    let out = cmd.output().expect("run mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two nodes sharing their state on NATS JetStream: a message retained through one is
/// served to a new subscriber of the other, a newer one replaces it there, and a removal
/// (an empty retained publish) removes it there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_stored_through_one_node_are_served_by_the_other() {
    let nats = nats::Nats::start();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, addr_a) = shared_node(&nats, dirs.0.path(), Vec::new()).await;
    let (b, addr_b) = shared_node(&nats, dirs.1.path(), Vec::new()).await;

    tokio::task::spawn_blocking(move || {
        let until_b_serves = |want: &str| {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                let got = first_message(addr_b, "acct/dev1/#", 1);
                if got == want {
                    return;
                }
                assert!(Instant::now() < deadline, "b serves {got:?}, not {want:?}");
            }
        };
        publish_retained(addr_a, "acct/dev1/config", Some("version 1"));
        until_b_serves("acct/dev1/config version 1");
        publish_retained(addr_a, "acct/dev1/config", Some("version 2"));
        until_b_serves("acct/dev1/config version 2");
        // And the other way.
        publish_retained(addr_b, "acct/dev2/config", Some("from b"));
        assert_eq!(
            first_message(addr_a, "acct/dev2/#", 10),
            "acct/dev2/config from b"
        );
        publish_retained(addr_a, "acct/dev1/config", None);
        until_b_serves("");
    })
    .await
    .unwrap();

    a.shutdown(Duration::from_secs(2)).await.unwrap();
    b.shutdown(Duration::from_secs(2)).await.unwrap();
    drop(nats);
}

fn publish_json(addr: SocketAddr, topic: &str, payload: &str) {
    publish(addr, topic, payload);
}

/// Asks `addr` for thing `dev1`'s classic shadow (a `get` request, answered on
/// `get/accepted` to the subscriber `answers`) until the answer holds every one of
/// `want`; returns that answer.
fn shadow_until(addr: SocketAddr, answers: &Sub, want: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = answers
            .got()
            .into_iter()
            .find(|l| want.iter().all(|w| l.contains(w)));
        if let Some(l) = found {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no answer with {want:?}; got {:?}",
            answers.got()
        );
        publish_json(addr, "$aws/things/dev1/shadow/get", "{}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two nodes on one NATS prefix, each with the Device Shadow service (the NATS server
/// and the data dirs live as long as the returned values).
async fn two_shadow_nodes() -> (
    nats::Nats,
    (tempfile::TempDir, tempfile::TempDir),
    (Server, SocketAddr),
    (Server, SocketAddr),
) {
    use fleetcore_services::shadow::ShadowService;
    let nats = nats::Nats::start();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let shadows = || -> Vec<Arc<dyn fleetcore_core::service::TopicService>> {
        vec![Arc::new(ShadowService::new(Default::default()))]
    };
    let a = shared_node(&nats, dirs.0.path(), shadows()).await;
    let b = shared_node(&nats, dirs.1.path(), shadows()).await;
    (nats, dirs, a, b)
}

/// Two nodes sharing their state on NATS JetStream, each with the Device Shadow service:
/// a shadow updated through one is read through the other, and an update through the
/// other builds on it (the next version, both parts of the state), as one broker does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_updated_through_one_node_is_read_and_updated_through_the_other() {
    let (nats, _dirs, (a, addr_a), (b, addr_b)) = two_shadow_nodes().await;

    tokio::task::spawn_blocking(move || {
        let on_a = Sub::start(addr_a, &["$aws/things/dev1/shadow/get/accepted"]);
        let on_b = Sub::start(addr_b, &["$aws/things/dev1/shadow/get/accepted"]);
        // QoS 1: acknowledged once the shadow is stored.
        publish_json(
            addr_a,
            "$aws/things/dev1/shadow/update",
            r#"{"state":{"desired":{"mode":"on"}}}"#,
        );
        let seen = shadow_until(addr_b, &on_b, &[r#""desired":{"mode":"on"}"#]);
        assert!(seen.contains(r#""version":1"#), "{seen}");

        publish_json(
            addr_b,
            "$aws/things/dev1/shadow/update",
            r#"{"state":{"reported":{"mode":"on"}}}"#,
        );
        let seen = shadow_until(
            addr_a,
            &on_a,
            &[r#""reported":{"mode":"on"}"#, r#""version":2"#],
        );
        assert!(seen.contains(r#""desired":{"mode":"on"}"#), "{seen}");
    })
    .await
    .unwrap();

    a.shutdown(Duration::from_secs(2)).await.unwrap();
    b.shutdown(Duration::from_secs(2)).await.unwrap();
    drop(nats);
}

/// Twenty updates of one shadow at the same moment, ten through each of two nodes (each
/// mosquitto_pub waits for its PUBACK, given once the update is stored): none is lost.
/// Updates racing on two nodes conflict in the store (compare-and-set on the record's
/// revision); the loser works its request out again on the winner's shadow, so both
/// nodes end with every key at version 20.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_of_one_shadow_racing_on_two_nodes_are_all_kept() {
    let (nats, _dirs, (a, addr_a), (b, addr_b)) = two_shadow_nodes().await;

    tokio::task::spawn_blocking(move || {
        // mosquitto_pub exits 0 on a PUBACK with an error code too: refusals show here.
        let refused: Vec<Sub> = [addr_a, addr_b]
            .into_iter()
            .map(|addr| {
                let sub = Sub::start(addr, &["$aws/things/dev1/shadow/update/rejected", "ready"]);
                probe(addr, &sub, "ready");
                sub
            })
            .collect();
        let mut children = Vec::new();
        let mut keys = Vec::new();
        for i in 0..10 {
            for (node, addr) in [("a", addr_a), ("b", addr_b)] {
                let key = format!("{node}{i}");
                children.push(
                    Command::new("mosquitto_pub")
                        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
                        .args(["-V", "mqttv5", "-q", "1", "-i", &format!("pub-{key}")])
                        .args(["-t", "$aws/things/dev1/shadow/update"])
                        .args([
                            "-m",
                            &format!(r#"{{"state":{{"reported":{{"{key}":1}}}}}}"#),
                        ])
                        .stderr(std::process::Stdio::piped())
                        .spawn()
                        .expect("run mosquitto_pub"),
                );
                keys.push(format!(r#""{key}":1"#));
            }
        }
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "mosquitto_pub: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        keys.push(r#""version":20"#.into());
        let want: Vec<&str> = keys.iter().map(String::as_str).collect();
        for addr in [addr_a, addr_b] {
            let answers = Sub::start(addr, &["$aws/things/dev1/shadow/get/accepted"]);
            shadow_until(addr, &answers, &want);
        }
        for sub in refused {
            assert_eq!(sub.got(), Vec::<String>::new(), "updates were refused");
        }
    })
    .await
    .unwrap();

    a.shutdown(Duration::from_secs(2)).await.unwrap();
    b.shutdown(Duration::from_secs(2)).await.unwrap();
    drop(nats);
}

/// What `addr` serves a new subscriber of `topic` as retained (`None`: nothing in 2 s).
fn retained_on(addr: SocketAddr, topic: &str) -> Option<String> {
    let out = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args([
            "-V",
            "mqttv5",
            "-C",
            "1",
            "-W",
            "2",
            "--retained-only",
            "-t",
            topic,
        ])
        .output()
        .expect("run mosquitto_sub");
    let got = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!got.is_empty()).then_some(got)
}

/// Twenty retained publishes on one topic at the same moment, ten through each of two
/// nodes: both nodes end serving the same message (the last one stored), as they take
/// their own writes and the other node's into their trees in store revision order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_publishes_racing_on_two_nodes_end_the_same_on_both() {
    let nats = nats::Nats::start();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, addr_a) = shared_node(&nats, dirs.0.path(), Vec::new()).await;
    let (b, addr_b) = shared_node(&nats, dirs.1.path(), Vec::new()).await;

    tokio::task::spawn_blocking(move || {
        for round in 0..3 {
            let mut children = Vec::new();
            for i in 0..10 {
                for (node, addr) in [("a", addr_a), ("b", addr_b)] {
                    children.push(
                        Command::new("mosquitto_pub")
                            .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
                            .args(["-V", "mqttv5", "-q", "1", "-r", "-t", "fleet/order"])
                            .args(["-m", &format!("{round}-{node}{i}")])
                            .spawn()
                            .expect("run mosquitto_pub"),
                    );
                }
            }
            for mut child in children {
                assert!(child.wait().unwrap().success());
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (on_a, on_b) = (
                    retained_on(addr_a, "fleet/order"),
                    retained_on(addr_b, "fleet/order"),
                );
                let settled = on_a.is_some() && on_a == on_b;
                if settled {
                    assert!(on_a.unwrap().starts_with(&format!("{round}-")));
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: a serves {on_a:?}, b serves {on_b:?}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    })
    .await
    .unwrap();

    a.shutdown(Duration::from_secs(2)).await.unwrap();
    b.shutdown(Duration::from_secs(2)).await.unwrap();
    drop(nats);
}
