//! The service with the real store (redb in a temporary directory) and a publisher
//! that keeps what the service sent.

use super::*;
use fleetcore_core::message::Message;
use fleetcore_core::service::Requester;
use fleetcore_store::{Store, StoreOptions};
use mqtt_proto::v5::PublishProperties;
use mqtt_proto::{QoS, TopicName};

#[derive(Default)]
struct Sent(Mutex<Vec<(String, Value)>>);

impl Publisher for Sent {
    fn publish(&self, msg: Message) -> usize {
        let body = serde_json::from_slice(&msg.payload).unwrap();
        self.0.lock().push((msg.topic.to_string(), body));
        1
    }
    fn send_to(&self, _: &str, _: Message) -> bool {
        unreachable!("shadow answers are routed, not sent to one client")
    }
}

impl Sent {
    fn take(&self) -> Vec<(String, Value)> {
        std::mem::take(&mut *self.0.lock())
    }
}

struct Rig {
    service: ShadowService,
    sent: Arc<Sent>,
    _dir: tempfile::TempDir,
}

fn rig_at(dir: tempfile::TempDir, limits: Limits) -> Rig {
    let path = dir.path().join("s.redb");
    let (store, loaded) = Store::open(&path, StoreOptions::default()).unwrap();
    let service = ShadowService::new(limits);
    let sent = Arc::new(Sent::default());
    service.start(ServiceContext {
        store: Arc::new(store),
        records: &loaded.records,
        publisher: sent.clone(),
    });
    Rig {
        service,
        sent,
        _dir: dir,
    }
}

fn rig() -> Rig {
    rig_at(tempfile::tempdir().unwrap(), Limits::default())
}

fn request(topic: &str, body: &str) -> Message {
    Message::from_publish(
        TopicName::try_from(topic).unwrap(),
        Bytes::from(body.to_string()),
        QoS::Level1,
        false,
        PublishProperties::default(),
        7,
    )
}

fn from(id: &str) -> Requester {
    Requester {
        client_id: Arc::from(id),
        thing: None,
        cert_id: None,
    }
}

impl Rig {
    /// Sends one request and waits until its PUBACK would be sent.
    async fn mqtt(&self, topic: &str, body: &str) -> Result<(), StoreError> {
        let msg = request(topic, body);
        let out: Arc<dyn Publisher> = self.sent.clone();
        match self.service.handle(
            ServiceRequest {
                message: &msg,
                from: &from("c1"),
            },
            &out,
        ) {
            Handled::Consumed { commit: Some(c) } => c.await,
            Handled::Consumed { commit: None } => Ok(()),
            Handled::Refused { why, .. } => panic!("refused: {why}"),
            Handled::PassThrough => panic!("passed through"),
        }
    }
}

#[test]
fn topics_are_requests_answers_or_invalid() {
    let l = Limits::default();
    let key = |t: &str, n: Option<&str>| Key {
        thing: t.into(),
        name: n.map(Into::into),
    };
    assert_eq!(
        parse_topic("$aws/things/t1/shadow/update", &l),
        ShadowTopic::Request(key("t1", None), Operation::Update)
    );
    assert_eq!(
        parse_topic("$aws/things/t1/shadow/name/cfg/get", &l),
        ShadowTopic::Request(key("t1", Some("cfg")), Operation::Get)
    );
    for answer in [
        "$aws/things/t1/shadow/update/accepted",
        "$aws/things/t1/shadow/get/rejected",
        "$aws/things/t1/shadow/update/delta",
        "$aws/things/t1/shadow/name/n/update/documents",
        "$aws/things/t1/shadow/name/n/delete/accepted",
    ] {
        assert_eq!(parse_topic(answer, &l), ShadowTopic::Answer, "{answer}");
    }
    for bad in [
        "$aws/things/t1/shadow/frobnicate",
        "$aws/things/t1/shadow",
        "$aws/things/t1/shadow/name/n",
        "$aws/things/t.1/shadow/get",
        "$aws/things/t1/shadow/name/a.b/get",
    ] {
        assert!(
            matches!(parse_topic(bad, &l), ShadowTopic::Invalid(_)),
            "{bad}"
        );
    }
    let long = format!("$aws/things/t/shadow/name/{}/get", "n".repeat(65));
    assert!(matches!(parse_topic(&long, &l), ShadowTopic::Invalid(_)));
}

#[tokio::test]
async fn an_update_answers_accepted_delta_and_documents_then_get_sees_it() {
    let r = rig();
    r.mqtt(
        "$aws/things/t1/shadow/update",
        r#"{"state":{"desired":{"on":true}},"clientToken":"a"}"#,
    )
    .await
    .unwrap();
    let sent = r.sent.take();
    let topics: Vec<&str> = sent.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        topics,
        [
            "$aws/things/t1/shadow/update/accepted",
            "$aws/things/t1/shadow/update/delta",
            "$aws/things/t1/shadow/update/documents"
        ]
    );
    assert_eq!(sent[0].1["version"], 1);
    r.mqtt("$aws/things/t1/shadow/get", r#"{"clientToken":"g"}"#)
        .await
        .unwrap();
    let sent = r.sent.take();
    assert_eq!(sent[0].0, "$aws/things/t1/shadow/get/accepted");
    assert_eq!(sent[0].1["state"]["delta"], json!({"on": true}));
    assert_eq!(sent[0].1["clientToken"], "g");
    // Through the HTTP entry point too, which also publishes the change.
    let got = r.service.get(Key::parse("t1")).await.unwrap();
    assert_eq!(got["version"], 1);
    assert!(
        r.sent.take().is_empty(),
        "a get over HTTP publishes nothing"
    );
    let acc = r
        .service
        .update(
            Key::parse("t1"),
            Bytes::from(r#"{"state":{"reported":{"on":true}}}"#),
        )
        .await
        .unwrap();
    assert_eq!(acc["version"], 2);
    let topics: Vec<String> = r.sent.take().into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        topics,
        [
            "$aws/things/t1/shadow/update/accepted",
            "$aws/things/t1/shadow/update/documents"
        ]
    );
}

#[tokio::test]
async fn accepted_versions_survive_a_reopen_and_deleted_ones_keep_their_number() {
    let dir = tempfile::tempdir().unwrap();
    let dir = {
        let r = rig_at(dir, Limits::default());
        for i in 0..5 {
            r.mqtt(
                "$aws/things/t1/shadow/name/cfg/update",
                &format!(r#"{{"state":{{"reported":{{"i":{i}}}}}}}"#),
            )
            .await
            .unwrap();
        }
        r.mqtt(
            "$aws/things/t2/shadow/update",
            r#"{"state":{"reported":{"x":1}}}"#,
        )
        .await
        .unwrap();
        r.mqtt("$aws/things/t2/shadow/delete", "").await.unwrap();
        assert_eq!(r.service.totals().0, 1);
        r._dir
    };
    // The store of the first rig is closed (dropped); a second one opens the file.
    let r = rig_at(dir, Limits::default());
    let got = r.service.get(Key::parse("t1/cfg")).await.unwrap();
    assert_eq!(got["version"], 5);
    assert_eq!(got["state"]["reported"]["i"], 4);
    assert_eq!(r.service.get(Key::parse("t2")).await.unwrap_err().code, 404);
    let acc = r
        .service
        .update(
            Key::parse("t2"),
            Bytes::from(r#"{"state":{"reported":{"y":1}}}"#),
        )
        .await
        .unwrap();
    assert_eq!(acc["version"], 2, "a deleted shadow's version is continued");
    assert_eq!(r.service.totals().0, 2);
    let list = r.service.list_named("t1", None, 25).unwrap();
    assert_eq!(list["results"], json!(["cfg"]));
}

#[tokio::test]
async fn rejections_echo_the_token_on_the_rejected_topic() {
    let r = rig();
    r.mqtt("$aws/things/t1/shadow/update", r#"{"clientToken":"x"}"#)
        .await
        .unwrap();
    r.mqtt("$aws/things/t1/shadow/get", r#"{"clientToken":"y"}"#)
        .await
        .unwrap();
    let sent = r.sent.take();
    assert_eq!(sent[0].0, "$aws/things/t1/shadow/update/rejected");
    assert_eq!(sent[0].1["code"], 400);
    assert_eq!(sent[0].1["clientToken"], "x");
    assert_eq!(sent[1].0, "$aws/things/t1/shadow/get/rejected");
    assert_eq!(sent[1].1["code"], 404);
    assert_eq!(sent[1].1["clientToken"], "y");
}

#[tokio::test]
async fn requests_to_one_shadow_run_in_order_and_more_than_the_limit_get_429() {
    let r = rig_at(
        tempfile::tempdir().unwrap(),
        Limits {
            max_in_flight: 3,
            ..Limits::default()
        },
    );
    let out: Arc<dyn Publisher> = r.sent.clone();
    let mut commits = Vec::new();
    let mut refused = 0;
    for i in 0..5 {
        let msg = request(
            "$aws/things/t1/shadow/update",
            &format!(r#"{{"state":{{"reported":{{"i":{i}}}}},"clientToken":"{i}"}}"#),
        );
        match r.service.handle(
            ServiceRequest {
                message: &msg,
                from: &from("c1"),
            },
            &out,
        ) {
            Handled::Consumed { commit: Some(c) } => commits.push(c),
            Handled::Consumed { commit: None } => refused += 1,
            _ => panic!(),
        }
    }
    assert_eq!((commits.len(), refused), (3, 2));
    for c in commits {
        c.await.unwrap();
    }
    let sent = r.sent.take();
    let rejected: Vec<&Value> = sent
        .iter()
        .filter(|(t, _)| t.ends_with("/update/rejected"))
        .map(|(_, b)| b)
        .collect();
    assert_eq!(rejected.len(), 2);
    assert!(rejected.iter().all(|b| b["code"] == 429));
    let versions: Vec<(u64, String)> = sent
        .iter()
        .filter(|(t, _)| t.ends_with("/update/accepted"))
        .map(|(_, b)| {
            (
                b["version"].as_u64().unwrap(),
                b["clientToken"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [
            (1, "0".to_string()),
            (2, "1".to_string()),
            (3, "2".to_string())
        ]
    );
    // The slots are free again.
    r.mqtt("$aws/things/t1/shadow/get", "").await.unwrap();
}

struct Failing;
impl RecordStore for Failing {
    fn submit_records(
        &self,
        _: Vec<fleetcore_core::storage::RecordOp>,
    ) -> fleetcore_core::storage::RecordCommit {
        Commit::failed(StoreError::DiskFull("no space left on device".into()))
    }
}

#[tokio::test]
async fn a_failed_write_is_answered_500_and_changes_nothing() {
    let service = ShadowService::new(Limits::default());
    let sent = Arc::new(Sent::default());
    service.start(ServiceContext {
        store: Arc::new(Failing),
        records: &[],
        publisher: sent.clone(),
    });
    let e = service
        .update(
            Key::parse("t"),
            Bytes::from(r#"{"state":{"reported":{"a":1}}}"#),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, 500);
    assert_eq!(service.get(Key::parse("t")).await.unwrap_err().code, 404);
    assert!(
        sent.take().is_empty(),
        "nothing published for an update not on disk"
    );
    assert_eq!(service.totals(), (0, 0));
}
