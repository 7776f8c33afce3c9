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
