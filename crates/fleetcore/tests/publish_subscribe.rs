//! Publish/subscribe over plain TCP with the mosquitto command-line clients, across
//! MQTT 3.1.1 and 5 and all three QoS levels.

mod common;

use common::*;

/// Three messages from `pub_version` publishers reach one `sub_version` subscriber at `qos`.
fn messages_reach_subscriber(sub_version: &str, pub_version: &str, qos: u8) {
    let broker = TestBroker::start(BrokerOpts::new());
    let topic = format!("pubsub/{sub_version}/{pub_version}/q{qos}");
    let q = qos.to_string();
    let sub_args = [
        "-V",
        sub_version,
        "-q",
        &q,
        "-t",
        "pubsub/#",
        "-C",
        "3",
        "-W",
        "20",
    ];
    let mut sub = mosquitto_sub(&with(&broker.mosq_tcp(), &sub_args));

    let sent: Vec<String> = (0..3).map(|i| format!("hello {i}")).collect();
    for payload in &sent {
        let pub_args = ["-V", pub_version, "-q", &q, "-t", &topic, "-m", payload];
        mosquitto_pub(&with(&broker.mosq_tcp(), &pub_args));
    }

    // Each message comes from its own publisher connection, so order between them is
    // not promised; what arrives, at which QoS, is.
    let mut got: Vec<String> = (0..3)
        .map(|_| {
            let (got_qos, retain, got_topic, payload) = expect_mosq_msg(&mut sub, STEP);
            assert_eq!(
                (got_qos, retain, got_topic.as_str()),
                (qos, false, topic.as_str())
            );
            payload
        })
        .collect();
    got.sort();
    assert_eq!(got, sent);
    sub.expect_success(STEP);
}

#[test]
fn v311_publish_subscribe_qos0() {
    messages_reach_subscriber("mqttv311", "mqttv311", 0);
}

#[test]
fn v311_publish_subscribe_qos1() {
    messages_reach_subscriber("mqttv311", "mqttv311", 1);
}

#[test]
fn v311_publish_subscribe_qos2() {
    messages_reach_subscriber("mqttv311", "mqttv311", 2);
}

#[test]
fn v5_publish_subscribe_qos0() {
    messages_reach_subscriber("mqttv5", "mqttv5", 0);
}

#[test]
fn v5_publish_subscribe_qos1() {
    messages_reach_subscriber("mqttv5", "mqttv5", 1);
}

#[test]
fn v5_publish_subscribe_qos2() {
    messages_reach_subscriber("mqttv5", "mqttv5", 2);
}

#[test]
fn v311_publisher_reaches_v5_subscriber() {
    messages_reach_subscriber("mqttv5", "mqttv311", 1);
}

#[test]
fn v5_publisher_reaches_v311_subscriber() {
    messages_reach_subscriber("mqttv311", "mqttv5", 2);
}

#[test]
fn delivery_qos_is_the_lower_of_publish_and_subscription_qos() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut sub = mosquitto_sub(&with(
        &broker.mosq_tcp(),
        &["-V", "mqttv5", "-q", "1", "-t", "downgrade/#"],
    ));
    mosquitto_pub(&with(
        &broker.mosq_tcp(),
        &["-q", "2", "-t", "downgrade/x", "-m", "two"],
    ));
    assert_eq!(
        expect_mosq_msg(&mut sub, STEP),
        (1, false, "downgrade/x".to_string(), "two".to_string())
    );
}

/// A client that sends SUBSCRIBE and PUBLISH right behind its CONNECT, in the same TCP
/// segment, gets every answer without having to send anything more (the packets that
/// arrived with the CONNECT are not left waiting for the next read).
#[test]
fn packets_pipelined_behind_connect_are_answered_at_once() {
    use common::raw::{packet, read_packet, string, Incoming};
    use std::io::Write;
    use std::time::{Duration, Instant};

    let broker = TestBroker::start(BrokerOpts::new());
    let mut s = std::net::TcpStream::connect(("127.0.0.1", broker.tcp_port())).unwrap();
    let mut connect = string("MQTT");
    connect.extend([4, 0x02, 0, 60]);
    connect.extend(string("pipelined"));
    let mut sub = vec![0, 7];
    sub.extend(string("pipe/#"));
    sub.push(0);
    let mut publish = string("pipe/x");
    publish.extend_from_slice(b"hi");
    let mut all = packet(0x10, &connect);
    all.extend(packet(0x82, &sub));
    all.extend(packet(0x30, &publish));
    s.write_all(&all).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    for _ in 0..3 {
        match read_packet(&mut s, deadline) {
            Incoming::Packet(t, body) => got.push((t, body)),
            other => panic!("after {got:02x?}: {other:?}"),
        }
    }
    assert_eq!(got[0], (0x20, vec![0, 0]), "CONNACK");
    assert_eq!(got[1], (0x90, vec![0, 7, 0]), "SUBACK");
    assert_eq!(got[2], (0x30, publish), "the PUBLISH back");
}
