//! MQTT 5 features end to end, each exercised with real paho-mqtt 2.x clients
//! (`tests/clients/v5client.py`, driven step by step over a control socket) against the
//! real binary: subscription identifiers, subscription options, message expiry,
//! property pass-through, shared subscriptions, topic aliases both ways, session expiry,
//! will delay, assigned client identifiers, Receive Maximum both ways and the client's
//! Maximum Packet Size. Where paho hides what is on the wire (a server-side Receive
//! Maximum breach), raw MQTT 5 bytes are used.
//!
//! "Not delivered" is shown with a marker wherever possible: a live message published
//! after the one that must not arrive; a session's messages arrive in order, so once the
//! marker is in, anything routed before it would have been too.

mod common;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;

// ---- a paho client driven over its control socket ------------------------------------

/// A started `v5client.py` whose MQTT connection is not made yet: it waits for the
/// control connection, so the test decides the exact moment it connects.
struct Pending {
    name: String,
    proc: LineChild,
    control_port: u16,
}

impl Pending {
    fn spawn(broker: &TestBroker, client_id: &str, extra: &[&str]) -> Pending {
        let mut args = with(&broker.paho_tcp(), &["--client-id", client_id]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = paho("v5client.py", &args);
        let control = proc.expect_event("control", STEP);
        Pending {
            name: if client_id.is_empty() {
                "v5client(no id)".into()
            } else {
                client_id.to_string()
            },
            proc,
            control_port: control.num("port") as u16,
        }
    }

    /// Lets the client connect; returns once its CONNACK (of any reason code) is in.
    fn connect_any(self) -> V5 {
        let ctl = TcpStream::connect(("127.0.0.1", self.control_port)).expect("control socket");
        let mut client = V5 {
            name: self.name,
            proc: self.proc,
            ctl,
            backlog: VecDeque::new(),
            connack: None,
        };
        let connack = client.expect("connack");
        client.connack = Some(connack);
        client
    }

    /// Lets the client connect and checks that the broker accepted it.
    fn connect(self) -> V5 {
        let client = self.connect_any();
        assert_eq!(
            client.connack().num("reason_code"),
            0,
            "{}: CONNACK refused\n{}",
            client.name,
            client.proc.transcript()
        );
        client
    }
}

/// A connected paho MQTT 5 client. Events it prints are kept in arrival order until a
/// test asks for them, so waiting for one kind never loses another.
struct V5 {
    name: String,
    proc: LineChild,
    ctl: TcpStream,
    backlog: VecDeque<Event>,
    connack: Option<Event>,
}

impl V5 {
    /// Starts a client and connects it at once.
    fn connect(broker: &TestBroker, client_id: &str, extra: &[&str]) -> V5 {
        Pending::spawn(broker, client_id, extra).connect()
    }

    fn connack(&self) -> &Event {
        self.connack.as_ref().expect("connected")
    }

    fn command(&mut self, name: &str, fields: &[(&str, &str)]) {
        let mut line = name.to_string();
        for (k, v) in fields {
            line += &format!(" {k}={}", percent_encode(v));
        }
        line.push('\n');
        self.ctl
            .write_all(line.as_bytes())
            .unwrap_or_else(|e| panic!("{}: control socket: {e}", self.name));
    }

    /// The next printed event, or `None` when `deadline` passes first.
    fn pull(&mut self, deadline: Instant) -> Option<Event> {
        loop {
            let line = self.proc.next_line(deadline)?;
            if let Some(event) = Event::parse(&line) {
                assert_ne!(
                    event.kind,
                    "error",
                    "{}: the client reported an error\n{}",
                    self.name,
                    self.proc.transcript()
                );
                return Some(event);
            }
        }
    }

    /// The first event (kept back or new) of `kind` that satisfies `pred`, within `within`.
    fn expect_where(
        &mut self,
        kind: &str,
        within: Duration,
        pred: impl Fn(&Event) -> bool,
    ) -> Event {
        let ok = |e: &Event| e.kind == kind && pred(e);
        if let Some(i) = self.backlog.iter().position(&ok) {
            return self.backlog.remove(i).expect("index");
        }
        let deadline = Instant::now() + within;
        while let Some(event) = self.pull(deadline) {
            if ok(&event) {
                return event;
            }
            self.backlog.push_back(event);
        }
        panic!(
            "{}: no `{kind}` event within {within:?}\n{}",
            self.name,
            self.proc.transcript()
        );
    }

    fn expect(&mut self, kind: &str) -> Event {
        self.expect_where(kind, STEP, |_| true)
    }

    fn next_message(&mut self) -> Event {
        self.expect("message")
    }

    /// Messages in arrival order up to and including the first one on `topic`.
    fn messages_until(&mut self, topic: &str) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            let m = self.next_message();
            let last = m.get("topic") == topic;
            out.push(m);
            if last {
                return out;
            }
        }
    }

    /// Panics if a message is (or becomes, within `quiet`) available.
    fn assert_no_message(&mut self, quiet: Duration, why: &str) {
        let deadline = Instant::now() + quiet;
        while let Some(event) = self.pull(deadline) {
            self.backlog.push_back(event);
        }
        if let Some(m) = self.backlog.iter().find(|e| e.kind == "message") {
            panic!(
                "{}: {why}, but got {m:?}\n{}",
                self.name,
                self.proc.transcript()
            );
        }
    }

    /// One SUBSCRIBE with `filters` and the options in `opts`; returns the SUBACK codes.
    fn subscribe(&mut self, filters: &[&str], opts: &[(&str, &str)]) -> Vec<u64> {
        let mut fields: Vec<(&str, &str)> = filters.iter().map(|f| ("filter", *f)).collect();
        fields.extend_from_slice(opts);
        self.command("subscribe", &fields);
        let suback = self.expect("suback");
        suback
            .get("codes")
            .split(',')
            .map(|c| c.parse().expect("reason code"))
            .collect()
    }

    /// Sends a PUBLISH; returns its packet id.
    fn publish_nowait(&mut self, topic: &str, opts: &[(&str, &str)]) -> String {
        let mut fields = vec![("topic", topic)];
        fields.extend_from_slice(opts);
        self.command("publish", &fields);
        let published = self.expect("published");
        published.get("mid").to_string()
    }

    /// Publishes (QoS 1 unless `opts` says otherwise) and waits for the acknowledgement;
    /// returns its reason code (0 for QoS 0).
    fn publish(&mut self, topic: &str, opts: &[(&str, &str)]) -> u64 {
        let mid = self.publish_nowait(topic, opts);
        if opts.contains(&("qos", "0")) {
            return 0;
        }
        self.expect_where("ack", STEP, |e| e.get("mid") == mid)
            .num("reason_code")
    }

    fn ack(&mut self, message: &Event) {
        self.command("ack", &[("mid", message.get("mid"))]);
    }

    /// A normal DISCONNECT with `opts` (`session_expiry`, `reason`), waited for.
    fn disconnect(&mut self, opts: &[(&str, &str)]) {
        self.command("disconnect", opts);
        self.expect("disconnected");
    }

    /// SIGKILL: the broker sees the socket close without DISCONNECT.
    fn kill(&mut self) {
        self.proc.kill();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn topics(messages: &[Event]) -> Vec<&str> {
    messages.iter().map(|m| m.get("topic")).collect()
}

fn payloads_of(messages: &[Event]) -> Vec<&str> {
    messages.iter().map(|m| m.get("payload")).collect()
}

fn sleep_until(t: Instant) {
    thread::sleep(t.saturating_duration_since(Instant::now()));
}

const SUCCESS: u64 = 0x00;

// ---- subscription identifiers and options ---------------------------------------------

#[test]
fn one_copy_carries_the_identifiers_of_every_matching_subscription() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut sub = V5::connect(&broker, "sid-sub", &[]);
    assert_eq!(sub.subscribe(&["acct/dev/cfg"], &[("id", "2")]), [1]);
    assert_eq!(sub.subscribe(&["acct/dev/#"], &[("id", "300")]), [1]);
    let mut publisher = V5::connect(&broker, "sid-pub", &[]);
    assert_eq!(
        publisher.publish("acct/dev/cfg", &[("payload", "cfg-1")]),
        SUCCESS
    );
    publisher.publish("acct/dev/marker", &[("payload", "end")]);

    let got = sub.messages_until("acct/dev/marker");
    assert_eq!(
        topics(&got),
        ["acct/dev/cfg", "acct/dev/marker"],
        "the publish to acct/dev/cfg must arrive once"
    );
    let ids: BTreeSet<&str> = got[0].get("sub_ids").split(',').collect();
    assert_eq!(ids, BTreeSet::from(["2", "300"]), "{:?}", got[0]);
    assert_eq!(got[1].get("sub_ids"), "300", "{:?}", got[1]);
}

#[test]
fn overlapping_subscriptions_give_one_copy_at_the_highest_granted_qos() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut sub = V5::connect(&broker, "ov-sub", &[]);
    assert_eq!(sub.subscribe(&["ov/#"], &[("qos", "0")]), [0]);
    assert_eq!(sub.subscribe(&["ov/x"], &[("qos", "2")]), [2]);
    let mut publisher = V5::connect(&broker, "ov-pub", &[]);
    publisher.publish("ov/x", &[("qos", "2"), ("payload", "both")]);
    publisher.publish("ov/end", &[("payload", "marker")]);

    let got = sub.messages_until("ov/end");
    assert_eq!(
        topics(&got),
        ["ov/x", "ov/end"],
        "one copy of ov/x expected"
    );
    assert_eq!(got[0].num("qos"), 2, "{:?}", got[0]);
    assert_eq!(got[1].num("qos"), 0, "only ov/# (QoS 0) matches ov/end");
}

#[test]
fn no_local_subscriber_does_not_get_its_own_publish() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut a = V5::connect(&broker, "nl-a", &[]);
    assert_eq!(a.subscribe(&["nl/#"], &[("no_local", "1")]), [1]);
    let mut b = V5::connect(&broker, "nl-b", &[]);
    assert_eq!(b.subscribe(&["nl/#"], &[]), [1]);

    assert_eq!(a.publish("nl/from-a", &[("payload", "a")]), SUCCESS);
    b.publish("nl/from-b", &[("payload", "b")]);

    assert_eq!(
        topics(&b.messages_until("nl/from-b")),
        ["nl/from-a", "nl/from-b"],
        "without No Local a client gets its own publish"
    );
    assert_eq!(
        topics(&a.messages_until("nl/from-b")),
        ["nl/from-b"],
        "the No Local subscriber got its own publish"
    );
}

#[test]
fn retain_as_published_keeps_the_retain_flag_of_live_messages() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut rap = V5::connect(&broker, "rap-1", &[]);
    assert_eq!(rap.subscribe(&["rap/#"], &[("rap", "1")]), [1]);
    let mut plain = V5::connect(&broker, "rap-0", &[]);
    assert_eq!(plain.subscribe(&["rap/#"], &[]), [1]);
    let mut publisher = V5::connect(&broker, "rap-pub", &[]);
    publisher.publish("rap/state", &[("payload", "on"), ("retain", "1")]);
    publisher.publish("rap/live", &[("payload", "x")]);

    let retain_flags = |client: &mut V5| -> Vec<(String, String)> {
        client
            .messages_until("rap/live")
            .iter()
            .map(|m| (m.get("topic").to_string(), m.get("retain").to_string()))
            .collect()
    };
    let pair = |t: &str, r: &str| (t.to_string(), r.to_string());
    assert_eq!(
        retain_flags(&mut rap),
        [pair("rap/state", "1"), pair("rap/live", "0")],
        "Retain As Published"
    );
    assert_eq!(
        retain_flags(&mut plain),
        [pair("rap/state", "0"), pair("rap/live", "0")],
        "without Retain As Published a live message has RETAIN 0"
    );
}

#[test]
fn retain_handling_sends_retained_always_only_for_new_subscriptions_or_never() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut publisher = V5::connect(&broker, "rh-pub", &[]);
    publisher.publish("rh/t", &[("payload", "kept"), ("retain", "1")]);
    let mut sub = V5::connect(&broker, "rh-sub", &[]);

    // What one SUBSCRIBE delivers: the messages before a live marker sent after SUBACK.
    let mut retained_on = |filter: &str, rh: &str| -> Vec<String> {
        assert_eq!(sub.subscribe(&[filter], &[("rh", rh)]), [1]);
        publisher.publish("rh/marker", &[("payload", "end")]);
        let got = sub.messages_until("rh/marker");
        let before = &got[..got.len() - 1];
        for m in before {
            assert_eq!(m.get("retain"), "1", "sent on subscribe: {m:?}");
        }
        before.iter().map(|m| m.get("topic").to_string()).collect()
    };
    assert_eq!(
        retained_on("rh/#", "0"),
        ["rh/t"],
        "0 on a new subscription"
    );
    assert_eq!(retained_on("rh/#", "0"), ["rh/t"], "0 on an existing one");
    assert_eq!(
        retained_on("rh/+", "1"),
        ["rh/t"],
        "1 on a new subscription"
    );
    assert!(retained_on("rh/+", "1").is_empty(), "1 on an existing one");
    assert!(
        retained_on("rh/t", "2").is_empty(),
        "2 on a new subscription"
    );
}

// ---- message expiry and properties ------------------------------------------------------

/// Subscribes a persistent session (expiry 300 s) to `filter` and disconnects it.
fn offline_session(broker: &TestBroker, client_id: &str, filter: &str) {
    let mut s = V5::connect(broker, client_id, &["--session-expiry", "300"]);
    assert_eq!(s.subscribe(&[filter], &[]), [1]);
    s.disconnect(&[]);
}

#[test]
fn expired_messages_are_not_delivered_and_expiry_counts_down() {
    let broker = TestBroker::start(BrokerOpts::new());
    offline_session(&broker, "exp-sub", "exp/#");
    let resumed = Pending::spawn(
        &broker,
        "exp-sub",
        &["--no-clean-start", "--session-expiry", "300"],
    );
    let mut publisher = V5::connect(&broker, "exp-pub", &[]);
    publisher.publish("exp/short", &[("payload", "1s"), ("expiry", "1")]);
    publisher.publish("exp/long", &[("payload", "60s"), ("expiry", "60")]);
    let published = Instant::now();

    sleep_until(published + Duration::from_millis(2500));
    let mut sub = resumed.connect();
    assert_eq!(sub.connack().get("session_present"), "1");
    publisher.publish("exp/marker", &[("payload", "end")]);
    let got = sub.messages_until("exp/marker");
    assert_eq!(
        topics(&got),
        ["exp/long", "exp/marker"],
        "a message whose expiry passed while queued was delivered"
    );
    let left = got[0].num("expiry");
    assert!(
        (50..60).contains(&left),
        "Message Expiry Interval {left}, expected it counted down from 60"
    );
    assert_eq!(got[1].get("expiry"), "", "no expiry was set on the marker");
}

/// Publishes a message with every pass-through property to `topic`.
fn publish_with_properties(publisher: &mut V5, topic: &str) {
    let code = publisher.publish(
        topic,
        &[
            ("payload", r#"{"temp":21.5}"#),
            ("payload_format", "1"),
            ("content_type", "application/json"),
            ("response_topic", "props/reply/7"),
            ("correlation", "00a1ff10"),
            ("user", "origin:dev-7"),
            ("user", "trace:abc=1;x"),
            ("user", "origin:repeated keys keep their order"),
        ],
    );
    assert!(code < 0x80, "PUBACK reason {code:#x}");
}

fn assert_properties_unchanged(m: &Event) {
    assert_eq!(m.get("payload"), r#"{"temp":21.5}"#);
    assert_eq!(m.get("payload_format"), "1", "{m:?}");
    assert_eq!(m.get("content_type"), "application/json", "{m:?}");
    assert_eq!(m.get("response_topic"), "props/reply/7", "{m:?}");
    assert_eq!(m.get("correlation"), "00a1ff10", "{m:?}");
    assert_eq!(
        m.get("user"),
        r#"[["origin", "dev-7"], ["trace", "abc=1;x"], ["origin", "repeated keys keep their order"]]"#,
        "{m:?}"
    );
    assert_eq!(m.get("expiry"), "", "{m:?}");
}

#[test]
fn user_properties_content_type_response_topic_and_correlation_data_pass_through() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut sub = V5::connect(&broker, "props-sub", &[]);
    assert_eq!(sub.subscribe(&["props/#"], &[]), [1]);
    let mut publisher = V5::connect(&broker, "props-pub", &[]);
    publish_with_properties(&mut publisher, "props/x");
    let m = sub.next_message();
    assert_eq!(m.get("topic"), "props/x");
    assert_properties_unchanged(&m);
}

#[test]
fn message_properties_survive_the_offline_queue() {
    let broker = TestBroker::start(BrokerOpts::new());
    offline_session(&broker, "props-offline", "props/#");
    let mut publisher = V5::connect(&broker, "props-pub", &[]);
    publish_with_properties(&mut publisher, "props/queued");
    let mut sub = V5::connect(
        &broker,
        "props-offline",
        &["--no-clean-start", "--session-expiry", "300"],
    );
    assert_eq!(sub.connack().get("session_present"), "1");
    let m = sub.next_message();
    assert_eq!(m.get("topic"), "props/queued");
    assert_properties_unchanged(&m);
}

// ---- shared subscriptions -----------------------------------------------------------------

#[test]
fn shared_subscription_delivers_each_message_to_exactly_one_member_round_robin() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut members: Vec<V5> = ["worker-a", "worker-b"]
        .iter()
        .map(|id| {
            let mut m = V5::connect(&broker, id, &[]);
            assert_eq!(
                m.subscribe(&["$share/g/jobs/#", &format!("marker/{id}")], &[]),
                [1, 1]
            );
            m
        })
        .collect();
    let mut publisher = V5::connect(&broker, "jobs-pub", &[]);
    for i in 0..20 {
        let code = publisher.publish("jobs/x", &[("payload", &format!("job-{i:02}"))]);
        assert_eq!(code, SUCCESS, "job-{i:02}");
    }
    publisher.publish("marker/worker-a", &[("payload", "end")]);
    publisher.publish("marker/worker-b", &[("payload", "end")]);

    let mut all = Vec::new();
    for m in &mut members {
        let marker = format!("marker/{}", m.name);
        let got = m.messages_until(&marker);
        let jobs: Vec<String> = got[..got.len() - 1]
            .iter()
            .map(|e| e.get("payload").to_string())
            .collect();
        assert!(!jobs.is_empty(), "{} got no job: not round robin", m.name);
        all.extend(jobs);
    }
    all.sort();
    let expected: Vec<String> = (0..20).map(|i| format!("job-{i:02}")).collect();
    assert_eq!(all, expected, "every job exactly once across the group");
}

// ---- topic aliases ---------------------------------------------------------------------

#[test]
fn topic_alias_from_client_is_resolved_and_one_above_the_maximum_is_refused() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut sub = V5::connect(&broker, "alias-sub", &[]);
    assert_eq!(sub.subscribe(&["alias/#"], &[]), [1]);
    let mut publisher = V5::connect(&broker, "alias-pub", &[]);
    assert_eq!(publisher.connack().get("topic_alias_max"), "16");

    assert_eq!(
        publisher.publish("alias/in", &[("alias", "1"), ("payload", "named")]),
        SUCCESS
    );
    assert_eq!(
        publisher.publish("", &[("alias", "1"), ("payload", "by-alias")]),
        SUCCESS
    );
    let got = [sub.next_message(), sub.next_message()];
    for m in &got {
        assert_eq!(m.get("topic"), "alias/in", "{m:?}");
    }
    assert_eq!(payloads_of(&got), ["named", "by-alias"]);

    publisher.publish_nowait("alias/too-high", &[("alias", "17"), ("payload", "x")]);
    let gone = publisher.expect("disconnected");
    assert_eq!(
        (gone.num("reason_code"), gone.get("from_broker")),
        (0x94, "1"),
        "expected DISCONNECT 0x94 (Topic Alias invalid)\n{}",
        publisher.proc.transcript()
    );
    sub.assert_no_message(Duration::from_millis(300), "the refused publish was routed");
}

#[test]
fn server_uses_topic_aliases_within_the_client_maximum() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut sub = V5::connect(&broker, "srv-alias", &["--topic-alias-maximum", "4"]);
    assert_eq!(sub.subscribe(&["srv/#"], &[]), [1]);
    let mut publisher = V5::connect(&broker, "srv-pub", &[]);
    let sent = [
        "srv/a", "srv/a", "srv/a", "srv/b", "srv/a", "srv/c", "srv/d", "srv/e", "srv/f", "srv/b",
        "srv/f",
    ];
    for (i, topic) in sent.iter().enumerate() {
        publisher.publish(topic, &[("payload", &format!("p{i}"))]);
    }

    // paho hands over the PUBLISH as received: an alias-only one has an empty topic.
    let mut bound: HashMap<u64, String> = HashMap::new();
    let mut alias_only = 0;
    for (i, topic) in sent.iter().enumerate() {
        let m = sub.next_message();
        assert_eq!(m.get("payload"), format!("p{i}"));
        let resolved = match (m.get("topic"), m.get("topic_alias")) {
            (t, "") => {
                assert!(!t.is_empty(), "PUBLISH without topic or alias: {m:?}");
                t.to_string()
            }
            (t, alias) => {
                let alias: u64 = alias.parse().expect("alias");
                assert!(
                    (1..=4).contains(&alias),
                    "alias {alias} above the client's Topic Alias Maximum 4: {m:?}"
                );
                if t.is_empty() {
                    alias_only += 1;
                    bound
                        .get(&alias)
                        .unwrap_or_else(|| panic!("alias {alias} used before it was set: {m:?}"))
                        .clone()
                } else {
                    bound.insert(alias, t.to_string());
                    t.to_string()
                }
            }
        };
        assert_eq!(resolved, *topic, "message p{i} {m:?}");
    }
    assert!(
        alias_only >= 3,
        "the broker hardly used topic aliases ({alias_only} alias-only PUBLISHes)\n{}",
        sub.proc.transcript()
    );
}

// ---- session expiry ------------------------------------------------------------------------

#[test]
fn session_expires_after_its_session_expiry_interval() {
    let broker = TestBroker::start(BrokerOpts::new());
    let resume = ["--no-clean-start", "--session-expiry", "2"];
    let mut first = V5::connect(&broker, "se-1", &["--session-expiry", "2"]);
    assert_eq!(first.subscribe(&["se/#"], &[]), [1]);
    let early = Pending::spawn(&broker, "se-1", &resume);
    first.disconnect(&[]);
    let gone = Instant::now();

    sleep_until(gone + Duration::from_secs(1));
    let late = Pending::spawn(&broker, "se-1", &resume);
    let mut second = early.connect();
    assert_eq!(
        second.connack().get("session_present"),
        "1",
        "reconnected 1 s into a 2 s session expiry"
    );
    second.disconnect(&[]);
    let gone = Instant::now();

    // The expiry reaper runs every second: by 3.5 s the 2 s session is gone.
    sleep_until(gone + Duration::from_millis(3600));
    let third = late.connect();
    assert_eq!(
        third.connack().get("session_present"),
        "0",
        "the session outlived its 2 s expiry by 3.6 s"
    );
}

#[test]
fn disconnect_with_a_session_expiry_interval_replaces_the_connect_one() {
    let broker = TestBroker::start(BrokerOpts::new());
    // 2 s at CONNECT, 30 s at DISCONNECT: still there after 3.6 s.
    let mut client = V5::connect(&broker, "se-2", &["--session-expiry", "2"]);
    assert_eq!(client.subscribe(&["se/#"], &[]), [1]);
    let resume = ["--no-clean-start", "--session-expiry", "300"];
    let later = Pending::spawn(&broker, "se-2", &resume);
    client.disconnect(&[("session_expiry", "30")]);
    sleep_until(Instant::now() + Duration::from_millis(3600));
    let mut client = later.connect();
    assert_eq!(
        client.connack().get("session_present"),
        "1",
        "DISCONNECT raised the expiry to 30 s"
    );

    // 300 s at CONNECT, 0 at DISCONNECT: the session ends with the connection.
    let again = Pending::spawn(&broker, "se-2", &resume);
    client.disconnect(&[("session_expiry", "0")]);
    // The client's socket is closed as soon as DISCONNECT is written; give the broker
    // a moment to read it before the same client id connects again.
    thread::sleep(Duration::from_millis(500));
    let client = again.connect();
    assert_eq!(
        client.connack().get("session_present"),
        "0",
        "DISCONNECT lowered the expiry to 0"
    );
}

#[test]
fn session_ended_by_disconnect_expiry_0_stays_gone_after_a_restart() {
    let mut broker = TestBroker::start(BrokerOpts::new());
    let mut client = V5::connect(&broker, "se-gone", &["--session-expiry", "3600"]);
    assert_eq!(client.subscribe(&["gone/#"], &[]), [1]);
    client.disconnect(&[("session_expiry", "0")]);
    thread::sleep(Duration::from_millis(500));
    assert_eq!(broker.terminate().code(), Some(0));
    broker.restart();
    let resume = ["--no-clean-start", "--session-expiry", "300"];
    let client = V5::connect(&broker, "se-gone", &resume);
    assert_eq!(
        client.connack().get("session_present"),
        "0",
        "the stored session must have been deleted when it ended"
    );
}

// ---- will delay -------------------------------------------------------------------------------

fn will_watcher(broker: &TestBroker) -> V5 {
    let mut w = V5::connect(broker, "will-watcher", &[]);
    assert_eq!(w.subscribe(&["will/#"], &[]), [1]);
    w
}

fn will_args<'a>(delay: &'a str, expiry: &'a str) -> [&'a str; 8] {
    [
        "--will-topic",
        "will/agent",
        "--will-payload",
        "agent-lost",
        "--will-delay",
        delay,
        "--session-expiry",
        expiry,
    ]
}

#[test]
fn delayed_will_is_published_after_the_will_delay() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut watcher = will_watcher(&broker);
    let mut agent = V5::connect(&broker, "will-agent", &will_args("2", "10"));
    agent.kill();
    let died = Instant::now();
    let will = watcher.expect_where("message", STEP, |_| true);
    let after = died.elapsed();
    assert_eq!(
        (will.get("topic"), will.get("payload")),
        ("will/agent", "agent-lost")
    );
    assert!(
        after >= Duration::from_millis(1900) && after <= Duration::from_secs(4),
        "will with a 2 s delay arrived {after:?} after the client died"
    );
}

#[test]
fn reconnecting_within_the_will_delay_suppresses_the_will() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut watcher = will_watcher(&broker);
    let back = Pending::spawn(
        &broker,
        "will-agent",
        &["--no-clean-start", "--session-expiry", "10"],
    );
    let mut agent = V5::connect(&broker, "will-agent", &will_args("2", "10"));
    agent.kill();
    let died = Instant::now();
    thread::sleep(Duration::from_millis(300));
    let agent = back.connect();
    assert_eq!(agent.connack().get("session_present"), "1");

    sleep_until(died + Duration::from_millis(3500));
    let mut publisher = V5::connect(&broker, "will-marker", &[]);
    publisher.publish("will/marker", &[("payload", "end")]);
    assert_eq!(
        topics(&watcher.messages_until("will/marker")),
        ["will/marker"],
        "the will was published although the client came back within its delay"
    );
}

#[test]
fn will_delay_is_cut_short_when_the_session_ends_first() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut watcher = will_watcher(&broker);
    let mut agent = V5::connect(&broker, "will-agent", &will_args("5", "0"));
    agent.kill();
    let died = Instant::now();
    let will = watcher.expect_where("message", STEP, |_| true);
    let after = died.elapsed();
    assert_eq!(will.get("topic"), "will/agent");
    assert!(
        after < Duration::from_secs(2),
        "with session expiry 0 the will (delay 5 s) must go out when the session ends; \
         it arrived after {after:?}"
    );
}

// ---- connection properties ------------------------------------------------------------------

#[test]
fn empty_client_id_gets_an_assigned_client_identifier() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut ids = BTreeSet::new();
    for _ in 0..2 {
        let mut client = V5::connect(&broker, "", &[]);
        let id = client.connack().get("assigned_client_id").to_string();
        assert!(!id.is_empty(), "no Assigned Client Identifier in CONNACK");
        // The assigned id is usable: the client can subscribe and be served.
        assert_eq!(client.subscribe(&["assigned/#"], &[]), [1]);
        ids.insert(id);
    }
    assert_eq!(
        ids.len(),
        2,
        "two clients were assigned the same id: {ids:?}"
    );
}

#[test]
fn client_receive_maximum_bounds_unacknowledged_deliveries() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut sub = V5::connect(
        &broker,
        "rm-sub",
        &["--receive-maximum", "2", "--manual-ack"],
    );
    assert_eq!(sub.subscribe(&["rm/#"], &[]), [1]);
    let mut publisher = V5::connect(&broker, "rm-pub", &[]);
    for i in 0..5 {
        assert_eq!(
            publisher.publish("rm/x", &[("payload", &format!("m-{i}"))]),
            SUCCESS
        );
    }

    let first = sub.next_message();
    let second = sub.next_message();
    assert_eq!(payloads_of(&[first.clone(), second]), ["m-0", "m-1"]);
    sub.assert_no_message(
        Duration::from_secs(1),
        "a third QoS 1 PUBLISH while 2 were unacknowledged (Receive Maximum 2)",
    );
    sub.ack(&first);
    let third = sub.next_message();
    assert_eq!(third.get("payload"), "m-2");
    sub.assert_no_message(
        Duration::from_millis(500),
        "a fourth PUBLISH after only one acknowledgement",
    );
    let mut rest = Vec::new();
    let mut unacked = vec![third];
    while rest.len() < 2 {
        for m in unacked.drain(..) {
            sub.ack(&m);
        }
        let m = sub.next_message();
        rest.push(m.get("payload").to_string());
        unacked.push(m);
    }
    assert_eq!(rest, ["m-3", "m-4"]);
}

#[test]
fn client_maximum_packet_size_drops_larger_messages_for_that_client_only() {
    let broker = TestBroker::start(BrokerOpts::new());
    let mut small = V5::connect(&broker, "mps-sub", &["--maximum-packet-size", "64"]);
    assert_eq!(small.subscribe(&["mps/#"], &[]), [1]);
    let mut big = V5::connect(&broker, "mps-big", &[]);
    assert_eq!(big.subscribe(&["mps/#"], &[]), [1]);
    let mut publisher = V5::connect(&broker, "mps-pub", &[]);
    for (topic, size) in [("mps/small", "20"), ("mps/large", "200")] {
        let code = publisher.publish(topic, &[("size", size)]);
        assert!(code < 0x80, "{topic}: PUBACK reason {code:#x}");
    }
    publisher.publish("mps/end", &[("payload", "end")]);

    let got = small.messages_until("mps/end");
    assert_eq!(
        topics(&got),
        ["mps/small", "mps/end"],
        "a PUBLISH larger than the client's Maximum Packet Size (64) was sent"
    );
    assert_eq!(got[0].num("size"), 20);
    let got = big.messages_until("mps/end");
    assert_eq!(topics(&got), ["mps/small", "mps/large", "mps/end"]);
    assert_eq!(got[1].num("size"), 200);
}

// ---- server Receive Maximum (raw MQTT 5 bytes) ----------------------------------------------

const RECEIVE_MAXIMUM: u16 = 5;

/// The two-byte-integer property `id` of a CONNACK body, if present.
fn connack_u16_property(body: &[u8], id: u8) -> Option<u16> {
    let (mut len, mut i) = (0usize, 2usize);
    for shift in [0, 7, 14, 21] {
        let b = *body.get(i)?;
        i += 1;
        len |= usize::from(b & 0x7F) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let props = body.get(i..i + len)?;
    let mut j = 0;
    while j < props.len() {
        let pid = props[j];
        j += 1;
        let width = match pid {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => 1,
            0x13 | 0x21 | 0x22 | 0x23 => 2,
            0x02 | 0x11 | 0x18 | 0x27 => 4,
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                2 + usize::from(u16::from_be_bytes([*props.get(j)?, *props.get(j + 1)?]))
            }
            0x26 => {
                let k = 2 + usize::from(u16::from_be_bytes([*props.get(j)?, *props.get(j + 1)?]));
                let v = u16::from_be_bytes([*props.get(j + k)?, *props.get(j + k + 1)?]);
                k + 2 + usize::from(v)
            }
            _ => return None,
        };
        if pid == id {
            return Some(u16::from_be_bytes([*props.get(j)?, *props.get(j + 1)?]));
        }
        j += width;
    }
    None
}

#[test]
fn server_receive_maximum_is_announced_and_exceeding_it_is_disconnect_0x93() {
    let broker = TestBroker::start(BrokerOpts::new().limit("receive_maximum", RECEIVE_MAXIMUM));
    let mut stream = TcpStream::connect(("127.0.0.1", broker.tcp_port())).expect("connect");
    let mut connect = string("MQTT");
    connect.extend([5, 0x02, 0, 30, 0]); // v5, clean start, keep alive 30, no properties
    connect.extend(string("rm-raw"));
    stream
        .write_all(&packet(0x10, &connect))
        .expect("send CONNECT");
    let (kind, connack) = read_packet(&mut stream, Instant::now() + STEP)
        .packet()
        .expect("CONNACK");
    assert_eq!(
        kind, 0x20,
        "expected CONNACK, got {kind:#04x} {connack:02x?}"
    );
    assert_eq!(connack.get(1), Some(&0), "CONNACK refused: {connack:02x?}");
    assert_eq!(
        connack_u16_property(&connack, 0x21),
        Some(RECEIVE_MAXIMUM),
        "Receive Maximum in CONNACK {connack:02x?}"
    );

    // QoS 2 PUBLISHes never released with PUBREL: each stays unacknowledged.
    for pid in 1..=RECEIVE_MAXIMUM + 1 {
        let mut body = string("rm/raw");
        body.extend(pid.to_be_bytes());
        body.push(0); // no properties
        body.extend(b"x");
        // The broker may close while the last one is on its way; what counts is the answer.
        let _ = stream.write_all(&packet(0x34, &body));
    }
    let mut pubrecs = 0;
    let deadline = Instant::now() + STEP;
    let disconnect = loop {
        match read_packet(&mut stream, deadline).packet() {
            Some((0x50, _)) => pubrecs += 1,
            Some((0xE0, body)) => break body,
            Some((kind, body)) => panic!("unexpected packet {kind:#04x} {body:02x?}"),
            None => panic!(
                "no DISCONNECT after {} unreleased QoS 2 PUBLISHes ({pubrecs} PUBREC)",
                RECEIVE_MAXIMUM + 1
            ),
        }
    };
    assert_eq!(
        disconnect.first().copied(),
        Some(0x93),
        "DISCONNECT {disconnect:02x?}, expected reason 0x93 (Receive Maximum exceeded)"
    );
    assert_eq!(pubrecs, RECEIVE_MAXIMUM, "PUBRECs before the DISCONNECT");
    assert!(
        read_packet(&mut stream, Instant::now() + STEP)
            .packet()
            .is_none(),
        "connection still open after DISCONNECT"
    );
    broker.assert_no_panic_logged();
}
