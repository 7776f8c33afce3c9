//! `[cluster]` with a real nats-server (the test's own, on loopback, killed by PID): the
//! node holds its prefix alone (a second node on it is refused, with the reason), and a
//! node cut off from NATS for longer than its lease stops serving (fail closed) instead
//! of acknowledging what it can no longer store.

mod common;

#[path = "../../cluster/tests/support/nats.rs"]
mod nats;

use std::time::Duration;

use common::*;

fn cluster(nats: &nats::Nats, node: &str) -> String {
    format!(
        "[cluster]\nnats_urls = [\"{}\"]\nprefix = \"e2e\"\nnode_name = \"{node}\"\nrequest_timeout_ms = 2000\n",
        nats.url()
    )
}

#[test]
fn a_second_node_on_the_same_prefix_is_refused_and_the_first_serves_on() {
    let nats = nats::Nats::start();
    let mut first = TestBroker::start(BrokerOpts::new().admin().raw(&cluster(&nats, "node-a")));
    let log = match TestBroker::try_start(BrokerOpts::new().raw(&cluster(&nats, "node-b"))) {
        Ok(mut second) => {
            second.terminate();
            panic!("a second node started on a prefix node-a holds");
        }
        Err(log) => log,
    };
    for expected in ["in use by another fleetcore node", "node-a", "prefix"] {
        assert!(log.contains(expected), "{expected:?} missing in:\n{log}");
    }
    // The first node was not disturbed.
    mosq_pub(&first, "acct/dev/cmd", "still here");
    first.assert_healthy();

    // Its JetStream round trips are measured: the retained write, from publish to
    // JetStream's acknowledgement, and the lease's renewals (every 2 s for a 6 s lease).
    let out = std::process::Command::new("mosquitto_pub")
        .args(first.mosq_tcp())
        .args(["-q", "1", "-r", "-t", "acct/dev/config", "-m", "kept"])
        .output()
        .expect("run mosquitto_pub");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = first.admin("GET", "/metrics", None).text();
        let writes = observed(
            &text,
            "fleetcore_jetstream_write_seconds",
            "bucket=\"retained\"",
        );
        let rtt = observed(&text, "fleetcore_jetstream_rtt_seconds", "");
        if writes >= 1 && rtt >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 15 s: {writes} retained writes and {rtt} lease round trips measured:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // `fleetcore cluster status` names the holder and the buckets, and says healthy.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fleetcore.toml");
    std::fs::write(&config, cluster(&nats, "node-a")).unwrap();
    let (code, out, err) = status(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    for expected in [
        "node          node-a",
        "e2e_sessions",
        "e2e_retained",
        "health        ok",
    ] {
        assert!(out.contains(expected), "{expected:?} missing in:\n{out}");
    }
    let (code, out, err) = status(&["--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(v["node"]["name"], "node-a");
    assert_eq!(v["prefix"], "e2e");
    assert_eq!(v["buckets"].as_array().map(Vec::len), Some(5), "{v}");
    // Another prefix: nothing there, and it says so (exit 1: no node holds it).
    let (code, out, _) = status(&["--nats-url", &nats.url(), "--json"]);
    assert_eq!(code, Some(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["prefix"], "fleetcore");
    assert!(
        v["node"].is_null() && v["buckets"].as_array().unwrap().is_empty(),
        "{v}"
    );
    assert!(first.terminate().success());
    drop(nats);
}

#[test]
fn a_node_cut_off_from_nats_stops_serving() {
    let mut nats = nats::Nats::start();
    let mut broker = TestBroker::start(BrokerOpts::new().raw(&cluster(&nats, "node-a")));
    nats.kill();
    // Its 6 s lease cannot be renewed: the node stops within about that, not at once.
    let status = broker
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| {
            panic!(
                "still serving 30 s after NATS went away:\n{}",
                broker.log_tail()
            )
        });
    assert!(!status.success(), "{status}");
    let (code, _, err) = self::status(&["--nats-url", &nats.url()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("NATS") && err.contains(&nats.url()), "{err}");
    let log = broker.log();
    assert!(
        log.contains("no longer holds its cluster prefix") && log.contains("could not be renewed"),
        "{}",
        broker.log_tail()
    );
}

/// Runs `fleetcore cluster status ARGS`: (exit code, stdout, stderr).
fn status(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(broker_binary())
        .args(["cluster", "status"])
        .args(args)
        .env_remove("FLEETCORE_CONFIG")
        .output()
        .expect("run fleetcore cluster status");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// How many observations the summary `name` holds (its `_count` lines whose labels
/// contain `labels`, summed), from a Prometheus scrape.
fn observed(scrape: &str, name: &str, labels: &str) -> u64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_count")) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn mosq_pub(broker: &TestBroker, topic: &str, payload: &str) {
    let out = std::process::Command::new("mosquitto_pub")
        .args(broker.mosq_tcp())
        .args(["-q", "1", "-t", topic, "-m", payload])
        .output()
        .expect("run mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
