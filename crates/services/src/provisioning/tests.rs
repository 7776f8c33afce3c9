//! The service with the real store, registry and CA, and a publisher that keeps what
//! was sent (and to whom).

use super::*;
use bytes::Bytes;
use fleetcore_core::message::Message;
use fleetcore_identity::ca::CaFiles;
use fleetcore_identity::token::TokenConfig;
use fleetcore_store::{Store, StoreOptions};
use mqtt_proto::v5::PublishProperties;
use mqtt_proto::{QoS, TopicName};

use crate::testing::Sent;

struct Rig {
    svc: ProvisioningService,
    reg: Arc<Registry>,
    sent: Arc<Sent>,
    _dir: tempfile::TempDir,
}

const TEMPLATE: &str = r#"{
  "Parameters": {"SerialNumber": {"Type": "String"}},
  "Resources": {
    "thing": {"Type": "AWS::IoT::Thing", "Properties": {
      "ThingName": {"Fn::Join": ["", ["agent-", {"Ref": "SerialNumber"}]]}}},
    "certificate": {"Type": "AWS::IoT::Certificate", "Properties": {
      "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "Active"}}
  },
  "DeviceConfiguration": {"serial": {"Ref": "SerialNumber"}}
}"#;

async fn rig(config: Config) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let (store, loaded) = Store::open(&dir.path().join("p.redb"), StoreOptions::default()).unwrap();
    let store: Arc<dyn RecordStore> = Arc::new(store);
    let (ca, _) = Ca::load_or_init(
        &CaFiles::in_dir(&dir.path().join("pki")),
        &["localhost".into()],
    )
    .unwrap();
    let reg = Arc::new(Registry::new(
        store.clone(),
        &loaded.records,
        TokenConfig::default(),
    ));
    let svc = ProvisioningService::new(config, Arc::new(ca));
    let sent = Arc::new(Sent::default());
    svc.start(ServiceContext {
        store,
        records: &loaded.records,
        publisher: sent.clone(),
    });
    svc.bind_registry(reg.clone());
    svc.create_template(
        "fleet",
        TemplateSpec {
            body: Some(TEMPLATE.into()),
            ..TemplateSpec::default()
        },
    )
    .await
    .unwrap();
    Rig {
        svc,
        reg,
        sent,
        _dir: dir,
    }
}

fn claim(client: &str) -> Requester {
    Requester {
        client_id: Arc::from(client),
        thing: None,
        cert_id: Some(Arc::from("claim-cert")),
    }
}

impl Rig {
    /// Publishes `body` to `topic` as `from`; waits for the PUBACK (the answer is sent
    /// by then).
    async fn ask(&self, from: &Requester, topic: &str, body: &str) -> Option<RefuseCode> {
        let msg = Message::from_publish(
            TopicName::try_from(topic).unwrap(),
            Bytes::from(body.to_owned()),
            QoS::Level1,
            false,
            PublishProperties::default(),
            1,
        );
        let out: Arc<dyn Publisher> = self.sent.clone();
        match self.svc.handle(
            ServiceRequest {
                message: &msg,
                from,
            },
            &out,
        ) {
            Handled::Consumed { commit: Some(c) } => {
                c.await.unwrap();
                None
            }
            Handled::Consumed { commit: None } => None,
            Handled::Refused { code, .. } => Some(code),
            Handled::PassThrough => panic!("passed through"),
        }
    }

    fn answers(&self) -> Vec<(Option<String>, String, Value)> {
        self.sent.take()
    }

    async fn create(&self, from: &Requester) -> Value {
        assert_eq!(
            self.ask(from, "$aws/certificates/create/json", "").await,
            None
        );
        let mut a = self.answers();
        assert_eq!(a.len(), 1, "{a:?}");
        let (to, topic, body) = a.remove(0);
        assert_eq!(to.as_deref(), Some(&*from.client_id));
        assert_eq!(topic, "$aws/certificates/create/json/accepted", "{body}");
        body
    }

    async fn register(&self, from: &Requester, token: &str, serial: &str) -> (String, Value) {
        let body =
            json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": serial}});
        assert_eq!(
            self.ask(
                from,
                "$aws/provisioning-templates/fleet/provision/json",
                &body.to_string()
            )
            .await,
            None
        );
        let (to, topic, body) = self.answers().remove(0);
        assert_eq!(to.as_deref(), Some(&*from.client_id));
        (topic.rsplit('/').next().unwrap().to_owned(), body)
    }
}

#[test]
fn topics_are_requests_answers_cbor_or_invalid() {
    assert!(matches!(
        parse_topic("$aws/certificates/create/json"),
        Parsed::Request(Request::CreateKeys, ref p) if p == "$aws/certificates/create/json"
    ));
    assert!(matches!(
        parse_topic("$aws/certificates/create-from-csr/json"),
        Parsed::Request(Request::FromCsr, _)
    ));
    assert!(matches!(
        parse_topic("$aws/provisioning-templates/fleet-1/provision/json"),
        Parsed::Request(Request::Register(ref t), _) if t == "fleet-1"
    ));
    for answer in [
        "$aws/certificates/create/json/accepted",
        "$aws/certificates/create-from-csr/json/rejected",
        "$aws/provisioning-templates/t/provision/cbor/accepted",
    ] {
        assert!(matches!(parse_topic(answer), Parsed::Answer), "{answer}");
    }
    assert!(matches!(
        parse_topic("$aws/certificates/create/cbor"),
        Parsed::Cbor
    ));
    for bad in [
        "$aws/certificates/other/json",
        "$aws/certificates/create",
        "$aws/certificates/create/json/x",
        "$aws/provisioning-templates/a.b/provision/json",
        "$aws/provisioning-templates/t/register/json",
    ] {
        assert!(matches!(parse_topic(bad), Parsed::Invalid(_)), "{bad}");
    }
}

#[tokio::test]
async fn a_token_registers_one_thing_once_even_when_used_twice_at_once() {
    let r = rig(Config::default()).await;
    let a = claim("agent-a");
    let created = r.create(&a).await;
    let token = created["certificateOwnershipToken"].as_str().unwrap();
    let id = created["certificateId"].as_str().unwrap();
    assert!(created["privateKey"]
        .as_str()
        .unwrap()
        .contains("PRIVATE KEY"));
    assert_eq!(
        r.reg.certificate_state(id),
        Some(CertState::PendingActivation)
    );
    assert_eq!(r.svc.pending().len(), 1);
    let body = json!({"certificateOwnershipToken": token, "parameters": {"SerialNumber": "1"}})
        .to_string();
    let topic = "$aws/provisioning-templates/fleet/provision/json";
    let (x, y) = tokio::join!(r.ask(&a, topic, &body), r.ask(&a, topic, &body));
    assert_eq!((x, y), (None, None));
    let answers = r.answers();
    let accepted: Vec<_> = answers
        .iter()
        .filter(|(_, t, _)| t.ends_with("/accepted"))
        .collect();
    let rejected: Vec<_> = answers
        .iter()
        .filter(|(_, t, _)| t.ends_with("/rejected"))
        .collect();
    assert_eq!((accepted.len(), rejected.len()), (1, 1), "{answers:?}");
    assert_eq!(accepted[0].2["thingName"], "agent-1");
    assert_eq!(accepted[0].2["deviceConfiguration"], json!({"serial": "1"}));
    assert_eq!(r.reg.certificate_state(id), Some(CertState::Active));
    assert!(r.reg.is_attached(id, "agent-1"));
    assert!(r.svc.pending().is_empty());
    // Nothing was broadcast: every answer went to the requester.
    assert!(answers
        .iter()
        .all(|(to, _, _)| to.as_deref() == Some("agent-a")));
}

#[tokio::test]
async fn a_disabled_template_and_a_full_queue_are_refused_with_their_codes() {
    let r = rig(Config {
        max_in_flight: 1,
        ..Config::default()
    })
    .await;
    let a = claim("agent-a");
    let created = r.create(&a).await;
    let token = created["certificateOwnershipToken"].as_str().unwrap();
    r.svc
        .update_template(
            "fleet",
            TemplateSpec {
                enabled: Some(false),
                ..TemplateSpec::default()
            },
        )
        .await
        .unwrap();
    let (suffix, body) = r.register(&a, token, "1").await;
    assert_eq!(
        (suffix.as_str(), body["statusCode"].as_u64()),
        ("rejected", Some(403)),
        "{body}"
    );
    // One request in flight at most: the second, handled before the first could even
    // start, gets 429 on its rejected topic at once.
    let msg = Message::from_publish(
        TopicName::try_from("$aws/certificates/create/json").unwrap(),
        Bytes::new(),
        QoS::Level1,
        false,
        PublishProperties::default(),
        1,
    );
    let out: Arc<dyn Publisher> = r.sent.clone();
    let req = || ServiceRequest {
        message: &msg,
        from: &a,
    };
    let first = r.svc.handle(req(), &out);
    let second = r.svc.handle(req(), &out);
    assert!(matches!(second, Handled::Consumed { commit: None }));
    let answers = r.answers();
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert_eq!(answers[0].1, "$aws/certificates/create/json/rejected");
    assert_eq!(answers[0].2["statusCode"], 429);
    assert_eq!(answers[0].2["errorCode"], "ThrottlingException");
    let Handled::Consumed { commit: Some(c) } = first else {
        panic!("the first request is worked on")
    };
    c.await.unwrap();
    assert!(r.answers()[0].1.ends_with("/accepted"));
}

#[tokio::test]
async fn bad_templates_are_refused_at_creation_and_jitp_needs_a_registered_ca() {
    let r = rig(Config::default()).await;
    let e = r
        .svc
        .create_template(
            "bad",
            TemplateSpec {
                body: Some(
                    r#"{"Resources":{"w":{"Type":"AWS::IoT::Widget","Properties":{}}}}"#.into(),
                ),
                ..TemplateSpec::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, TemplateChangeError::Invalid(m) if m.contains("Resources.w") && m.contains("AWS::IoT::Widget")),
        "{e}"
    );
    let e = r
        .svc
        .create_template("a/b", TemplateSpec::default())
        .await
        .unwrap_err();
    assert!(matches!(e, TemplateChangeError::Invalid(_)), "{e}");
    let e = r
        .svc
        .create_template(
            "fleet",
            TemplateSpec {
                body: Some(TEMPLATE.into()),
                ..TemplateSpec::default()
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, TemplateChangeError::Conflict(_)), "{e}");
    // A fleet template cannot be attached to a CA; a JITP one needs a registered CA.
    let e = r
        .svc
        .set_ca_template("ca-1", Some("fleet"))
        .await
        .unwrap_err();
    assert!(matches!(e, TemplateChangeError::Invalid(_)), "{e}");
    r.svc
        .create_template(
            "jitp",
            TemplateSpec {
                body: Some(TEMPLATE.into()),
                template_type: Some(TemplateType::Jitp),
                ..TemplateSpec::default()
            },
        )
        .await
        .unwrap();
    let e = r
        .svc
        .set_ca_template("ca-1", Some("jitp"))
        .await
        .unwrap_err();
    assert!(matches!(e, TemplateChangeError::NotFound(_)), "{e}");
}

#[tokio::test]
async fn expired_certificates_are_swept_and_provisioned_ones_are_not() {
    let r = rig(Config::default()).await;
    let a = claim("agent-a");
    let kept = r.create(&a).await;
    let gone = r.create(&a).await;
    let (suffix, _) = r
        .register(&a, kept["certificateOwnershipToken"].as_str().unwrap(), "1")
        .await;
    assert_eq!(suffix, "accepted");
    let later = now_ms() + 2 * 3600 * 1000;
    assert_eq!(r.svc.sweep(later).await, 1);
    assert!(r
        .reg
        .certificate(gone["certificateId"].as_str().unwrap())
        .is_none());
    assert_eq!(
        r.reg
            .certificate_state(kept["certificateId"].as_str().unwrap()),
        Some(CertState::Active)
    );
    assert!(r.svc.pending().is_empty());
}
