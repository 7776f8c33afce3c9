//! The QoS state machines of a connection, driven packet by packet over an in-memory
//! pipe against a real hub and store (no sockets, no external client): outbound QoS 1
//! and 2 with their resends across a reconnect, inbound QoS 2 exactly once, the client's
//! receive maximum, and acknowledgements for unknown packet ids.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use fleetcore_core::message::Message;
use fleetcore_core::protocol::{self, Packet, Version};
use fleetcore_store::{Store, StoreOptions};
use mqtt_proto::v5::{self, PubcompReasonCode};
use mqtt_proto::{Pid, QoS, QosPid, TopicFilter, TopicName};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::time::Instant;

use super::{serve, PeerInfo};
use crate::engine::hub::Hub;

/// How long a packet that must come may take (a store commit included).
const WAIT: Duration = Duration::from_secs(10);
/// How long the broker is watched for a packet that must not come.
const QUIET: Duration = Duration::from_millis(300);

struct Broker {
    _dir: tempfile::TempDir,
    hub: Arc<Hub>,
}

fn broker() -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let (store, loaded) =
        Store::open(&dir.path().join("fleetcore.redb"), StoreOptions::default()).unwrap();
    let hub = Hub::new(
        crate::config::Config::default(),
        store.storage(),
        loaded,
        Default::default(),
    );
    Broker { _dir: dir, hub }
}

fn peer() -> Box<PeerInfo> {
    Box::new(PeerInfo {
        addr: "127.0.0.1:5000".parse().unwrap(),
        proxied_by: None,
        listener: "test",
        transport: "mqtt",
        allow_anonymous: true,
        cert: None,
        policy: None,
        uses_registry: false,
        tokens: false,
        tls_resumed: None,
        unregistered_cert_der: None,
    })
}

fn pid(n: u16) -> Pid {
    Pid::try_from(n).unwrap()
}

/// An MQTT 5 client speaking packets over the pipe.
struct Client {
    io: DuplexStream,
    buf: BytesMut,
    served: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Connects as `id` (clean start or not, session expiry, receive maximum) and
    /// returns the CONNACK.
    async fn connect(
        b: &Broker,
        id: &str,
        clean_start: bool,
        expiry: u32,
        receive_max: Option<u16>,
    ) -> (Client, v5::Connack) {
        let (server, io) = tokio::io::duplex(1 << 16);
        let served = tokio::spawn(serve(b.hub.clone(), server, peer(), Instant::now() + WAIT));
        let mut c = Client {
            io,
            buf: BytesMut::new(),
            served,
        };
        let mut connect = v5::Connect::new(Arc::from(id), 0);
        connect.clean_start = clean_start;
        connect.properties.session_expiry_interval = Some(expiry);
        connect.properties.receive_max = receive_max;
        c.send(Packet::Connect(connect)).await;
        match c.recv().await {
            Packet::Connack(ack) => {
                assert_eq!(ack.reason_code, v5::ConnectReasonCode::Success);
                (c, ack)
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: Packet) {
        let mut out = BytesMut::new();
        protocol::encode(Version::V5, &p, &mut out).unwrap();
        self.io.write_all(&out).await.unwrap();
    }

    /// The next packet from the broker, within [`WAIT`].
    async fn recv(&mut self) -> Packet {
        self.recv_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("no packet from the broker within {WAIT:?}"))
    }

    async fn recv_within(&mut self, d: Duration) -> Option<Packet> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(n) = protocol::frame_len(&self.buf, 1 << 20).unwrap() {
                let frame = self.buf.split_to(n);
                return Some(protocol::decode(Version::V5, &frame).unwrap());
            }
            match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
                Err(_) => return None,
                Ok(Ok(0)) => panic!("the broker closed the connection"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("read: {e}"),
            }
        }
    }

    /// Nothing arrives for [`QUIET`].
    async fn quiet(&mut self) {
        if let Some(p) = self.recv_within(QUIET).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let topics = vec![(
            TopicFilter::try_from(filter).unwrap(),
            v5::SubscriptionOptions::new(qos),
        )];
        self.send(Packet::Subscribe(v5::Subscribe::new(pid(1), topics)))
            .await;
        match self.recv().await {
            Packet::Suback(s) => assert_eq!(s.pid, pid(1)),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn publish(&mut self, p: v5::Publish) {
        self.send(Packet::Publish(p)).await;
    }

    async fn expect_publish(&mut self) -> v5::Publish {
        match self.recv().await {
            Packet::Publish(p) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Ends the connection without DISCONNECT (as a lost network does), and waits until
    /// the broker has let it go.
    async fn drop_link(self) {
        drop(self.io);
        tokio::time::timeout(WAIT, self.served)
            .await
            .expect("the connection did not end")
            .unwrap();
    }
}

fn order(topic: &str, payload: &'static str, qos: QoS) -> Message {
    Message::from_publish(
        TopicName::try_from(topic).unwrap(),
        Bytes::from_static(payload.as_bytes()),
        qos,
        false,
        Default::default(),
        0,
    )
}

fn publish(qos_pid: QosPid, topic: &str, payload: &'static str) -> v5::Publish {
    v5::Publish::new(
        qos_pid,
        TopicName::try_from(topic).unwrap(),
        Bytes::from_static(payload.as_bytes()),
    )
}

#[tokio::test]
async fn qos1_is_sent_again_with_dup_after_a_reconnect_until_acknowledged() {
    let b = broker();
    let (mut c, _) = Client::connect(&b, "dev", true, 600, None).await;
    c.subscribe("acct/dev/#", QoS::Level1).await;
    let _ = b.hub.publish(order("acct/dev/cmd", "one", QoS::Level1));
    let first = c.expect_publish().await;
    let QosPid::Level1(p) = first.qos_pid else {
        panic!("{first:?}")
    };
    assert!(!first.dup);
    assert_eq!(&first.payload[..], b"one");
    // No PUBACK: the link drops.
    c.drop_link().await;

    let (mut c, ack) = Client::connect(&b, "dev", false, 600, None).await;
    assert!(ack.session_present);
    let again = c.expect_publish().await;
    assert_eq!(again.qos_pid, QosPid::Level1(p), "same packet id");
    assert!(again.dup, "a resend has DUP set");
    assert_eq!(&again.payload[..], b"one");
    c.send(Packet::Puback(v5::Puback::new_success(p))).await;
    c.quiet().await;
    c.drop_link().await;

    // Acknowledged: not sent a third time.
    let (mut c, ack) = Client::connect(&b, "dev", false, 600, None).await;
    assert!(ack.session_present);
    c.quiet().await;
    c.drop_link().await;
}

#[tokio::test]
async fn qos2_outbound_goes_pubrec_pubrel_pubcomp_and_resends_the_pubrel_not_the_publish() {
    let b = broker();
    let (mut c, _) = Client::connect(&b, "dev", true, 600, None).await;
    c.subscribe("acct/dev/#", QoS::Level2).await;
    let _ = b.hub.publish(order("acct/dev/cmd", "once", QoS::Level2));
    let p = match c.expect_publish().await.qos_pid {
        QosPid::Level2(p) => p,
        other => panic!("{other:?}"),
    };
    c.send(Packet::Pubrec(v5::Pubrec::new_success(p))).await;
    match c.recv().await {
        Packet::Pubrel(r) => assert_eq!(r.pid, p),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    // No PUBCOMP: the link drops. The message was received; only the release is owed.
    c.drop_link().await;

    let (mut c, ack) = Client::connect(&b, "dev", false, 600, None).await;
    assert!(ack.session_present);
    match c.recv().await {
        Packet::Pubrel(r) => assert_eq!(r.pid, p, "the PUBREL again, same id"),
        other => panic!("expected PUBREL (never the PUBLISH again), got {other:?}"),
    }
    c.send(Packet::Pubcomp(v5::Pubcomp::new_success(p))).await;
    c.quiet().await;
    c.drop_link().await;

    let (mut c, _) = Client::connect(&b, "dev", false, 600, None).await;
    c.quiet().await;
    c.drop_link().await;
}

#[tokio::test]
async fn qos2_inbound_is_delivered_once_though_the_publish_comes_twice() {
    let b = broker();
    let (mut sub, _) = Client::connect(&b, "backend", true, 0, None).await;
    sub.subscribe("acct/+/report", QoS::Level0).await;
    let (mut dev, _) = Client::connect(&b, "dev", true, 0, None).await;

    dev.publish(publish(QosPid::Level2(pid(7)), "acct/dev/report", "r1"))
        .await;
    match dev.recv().await {
        Packet::Pubrec(r) => assert_eq!(r.pid, pid(7)),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    assert_eq!(&sub.expect_publish().await.payload[..], b"r1");

    // The client did not see the PUBREC and sends again, DUP set: acknowledged again,
    // not delivered again.
    let mut dup = publish(QosPid::Level2(pid(7)), "acct/dev/report", "r1");
    dup.dup = true;
    dev.publish(dup).await;
    match dev.recv().await {
        Packet::Pubrec(r) => assert_eq!(r.pid, pid(7)),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    sub.quiet().await;

    dev.send(Packet::Pubrel(v5::Pubrel::new_success(pid(7))))
        .await;
    match dev.recv().await {
        Packet::Pubcomp(c) => {
            assert_eq!(c.pid, pid(7));
            assert_eq!(c.reason_code, PubcompReasonCode::Success);
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    // Released: the same id now starts a new message.
    dev.publish(publish(QosPid::Level2(pid(7)), "acct/dev/report", "r2"))
        .await;
    assert!(matches!(dev.recv().await, Packet::Pubrec(_)));
    assert_eq!(&sub.expect_publish().await.payload[..], b"r2");
    dev.drop_link().await;
    sub.drop_link().await;
}

#[tokio::test]
async fn the_clients_receive_maximum_bounds_what_is_in_flight() {
    let b = broker();
    let (mut c, _) = Client::connect(&b, "dev", true, 600, Some(2)).await;
    c.subscribe("acct/dev/#", QoS::Level1).await;
    for payload in ["1", "2", "3", "4"] {
        let _ = b.hub.publish(order("acct/dev/cmd", payload, QoS::Level1));
    }
    let first = c.expect_publish().await;
    let second = c.expect_publish().await;
    assert_eq!(
        (&first.payload[..], &second.payload[..]),
        (&b"1"[..], &b"2"[..])
    );
    c.quiet().await;
    let QosPid::Level1(p) = first.qos_pid else {
        panic!("{first:?}")
    };
    c.send(Packet::Puback(v5::Puback::new_success(p))).await;
    assert_eq!(&c.expect_publish().await.payload[..], b"3");
    c.quiet().await;
    c.drop_link().await;
}

#[tokio::test]
async fn acknowledgements_for_unknown_packet_ids() {
    let b = broker();
    let (mut c, _) = Client::connect(&b, "dev", true, 0, None).await;
    // A PUBREL for an id the broker never saw: PUBCOMP 0x92.
    c.send(Packet::Pubrel(v5::Pubrel::new_success(pid(99))))
        .await;
    match c.recv().await {
        Packet::Pubcomp(comp) => {
            assert_eq!(comp.pid, pid(99));
            assert_eq!(
                comp.reason_code,
                PubcompReasonCode::PacketIdentifierNotFound
            );
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    // A PUBACK or PUBCOMP for an id not in flight is no error: the connection goes on.
    c.send(Packet::Puback(v5::Puback::new_success(pid(55))))
        .await;
    c.send(Packet::Pubcomp(v5::Pubcomp::new_success(pid(56))))
        .await;
    c.send(Packet::Pingreq).await;
    assert!(matches!(c.recv().await, Packet::Pingresp));
    c.drop_link().await;
}
