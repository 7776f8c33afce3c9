//! A provisioned fleet for tests on registry listeners: the seed's shared agent policy,
//! a backend policy, and devices created through the admin API.

use std::path::Path;

use serde_json::{json, Value};

use super::{ClientCert, HttpResponse, TestBroker};

/// The shared agent policy of docs (iot-core-semantics.md): one document for every
/// agent, scoped by the thing's `account` attribute and its name.
pub const AGENT_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect",
      "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}" },
    { "Effect": "Allow", "Action": "iot:Subscribe",
      "Resource": "arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*" },
    { "Effect": "Allow", "Action": ["iot:Receive", "iot:Publish"],
      "Resource": "arn:aws:iot:*:*:topic/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*" } ] }"#;

pub const BACKEND_POLICY: &str = r#"{
  "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": ["iot:Connect", "iot:Publish", "iot:RetainPublish"], "Resource": "*" } ] }"#;

pub fn ok(resp: HttpResponse, status: u16) -> Value {
    assert_eq!(resp.status, status, "{}", resp.text());
    if resp.body.is_empty() {
        Value::Null
    } else {
        resp.json()
    }
}

/// POST /certificates/create for `thing`, written as PEM files in `dir`.
pub fn provision(
    broker: &TestBroker,
    dir: &Path,
    thing: &str,
    policies: &[&str],
) -> (String, ClientCert) {
    let c = ok(
        broker.admin(
            "POST",
            "/certificates/create",
            Some(&json!({"thing": thing, "policies": policies})),
        ),
        201,
    );
    let cert = dir.join(format!("{thing}.pem"));
    let key = dir.join(format!("{thing}.key"));
    std::fs::write(&cert, c["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&key, c["private_key_pem"].as_str().unwrap()).unwrap();
    (
        c["certificate_id"].as_str().unwrap().to_string(),
        ClientCert { cert, key },
    )
}

/// One agent and one backend on a registry listener, as the seed provisions them.
pub struct Fleet {
    /// Thing `computer-a` (attribute account = `customer-a`) with the agent policy.
    pub agent_id: String,
    pub agent: ClientCert,
    /// Thing `backend`, allowed to publish anywhere.
    pub backend: ClientCert,
}

/// The agent's order topic in [`Fleet`].
pub const AGENT_ORDERS: &str = "customer-a/computer-a/orders";

/// Creates the policies, the two things and their certificates (files in `dir`).
pub fn provision_fleet(broker: &TestBroker, dir: &Path) -> Fleet {
    for (thing, account) in [("computer-a", "customer-a"), ("backend", "ops")] {
        ok(
            broker.admin(
                "POST",
                "/things",
                Some(&json!({"name": thing, "type": "agent", "attributes": {"account": account}})),
            ),
            201,
        );
    }
    for (name, doc) in [("agent", AGENT_POLICY), ("backend", BACKEND_POLICY)] {
        ok(
            broker.admin(
                "POST",
                "/policies",
                Some(&json!({"name": name, "document": doc})),
            ),
            201,
        );
    }
    let (agent_id, agent) = provision(broker, dir, "computer-a", &["agent"]);
    let (_, backend) = provision(broker, dir, "backend", &["backend"]);
    Fleet {
        agent_id,
        agent,
        backend,
    }
}
