//! Lifecycle events, as IoT Core publishes them: `$aws/events/presence/connected/{clientId}`,
//! `.../disconnected/{clientId}`, `$aws/events/subscriptions/subscribed/{clientId}` and
//! `.../unsubscribed/{clientId}`, with IoT Core's JSON (timestamps in milliseconds).
//!
//! Backends subscribe to them like any topic, through their policy (`iot:Subscribe` and
//! `iot:Receive` on `$aws/events/...`). No events are made for client ids containing `+`
//! or `#` (IoT Core's rule: they could not be topic levels).
//!
//! - `sessionIdentifier`: the connection's number, as 32 hex digits; one per connection.
//! - `versionNumber`: the same number, so it grows per client id (it may skip values, as
//!   IoT Core's does) and a connect and its matching disconnect share it.
//! - `principalIdentifier`: the certificate id (the one a token stands for, with device
//!   tokens); absent for anonymous clients.

use std::sync::Arc;

use fleetcore_core::service::{
    DisconnectCause, Event, Handled, Publisher, Requester, ServiceRequest, TopicService,
};
use serde_json::{json, Map, Value};

use crate::publish_json;

/// The lifecycle events service. It claims no topics; it only publishes.
#[derive(Debug, Default)]
pub struct EventsService;

impl TopicService for EventsService {
    fn name(&self) -> &'static str {
        "events"
    }

    fn filters(&self) -> Vec<String> {
        Vec::new()
    }

    fn handle(&self, _req: ServiceRequest<'_>, _out: &Arc<dyn Publisher>) -> Handled {
        Handled::PassThrough
    }

    fn on_event(&self, ev: &Event, out: &Arc<dyn Publisher>) {
        if let Some((topic, body)) = event_message(ev) {
            publish_json(out.as_ref(), &topic, &body);
        }
    }
}

/// IoT Core's `disconnectReason` for an engine cause.
pub fn disconnect_reason(cause: DisconnectCause) -> &'static str {
    match cause {
        DisconnectCause::ClientDisconnect => "CLIENT_INITIATED_DISCONNECT",
        DisconnectCause::Takeover => "DUPLICATE_CLIENTID",
        DisconnectCause::KeepAliveTimeout => "MQTT_KEEP_ALIVE_TIMEOUT",
        DisconnectCause::NotAuthorized => "AUTH_ERROR",
        DisconnectCause::ClientError => "CLIENT_ERROR",
        DisconnectCause::ServerShutdown | DisconnectCause::ServerInitiated => {
            "SERVER_INITIATED_DISCONNECT"
        }
        DisconnectCause::ConnectionLost => "CONNECTION_LOST",
    }
}

/// The topic and JSON body of the event for `ev`; `None` for client ids that get none.
pub fn event_message(ev: &Event) -> Option<(String, Value)> {
    let (client, connection) = match ev {
        Event::Connected {
            client, version, ..
        }
        | Event::Disconnected {
            client, version, ..
        } => (client, *version),
        Event::Subscribed { client, .. } | Event::Unsubscribed { client, .. } => (client, 0),
    };
    if client.client_id.contains(['+', '#']) {
        return None;
    }
    let mut body = base(client);
    let topic = match ev {
        Event::Connected { ip, at_ms, .. } => {
            body.insert("timestamp".into(), json!(at_ms));
            body.insert("eventType".into(), json!("connected"));
            body.insert("sessionIdentifier".into(), json!(session_id(connection)));
            body.insert("ipAddress".into(), json!(ip));
            body.insert("versionNumber".into(), json!(connection));
            format!("$aws/events/presence/connected/{}", client.client_id)
        }
        Event::Disconnected { cause, at_ms, .. } => {
            body.insert("timestamp".into(), json!(at_ms));
            body.insert("eventType".into(), json!("disconnected"));
            body.insert("sessionIdentifier".into(), json!(session_id(connection)));
            body.insert(
                "clientInitiatedDisconnect".into(),
                json!(*cause == DisconnectCause::ClientDisconnect),
            );
            body.insert("disconnectReason".into(), json!(disconnect_reason(*cause)));
            body.insert("versionNumber".into(), json!(connection));
            format!("$aws/events/presence/disconnected/{}", client.client_id)
        }
        Event::Subscribed {
            filters,
            at_ms,
            connection,
            ..
        } => {
            body.insert("timestamp".into(), json!(at_ms));
            body.insert("eventType".into(), json!("subscribed"));
            body.insert("sessionIdentifier".into(), json!(session_id(*connection)));
            body.insert("topics".into(), json!(filters));
            format!("$aws/events/subscriptions/subscribed/{}", client.client_id)
        }
        Event::Unsubscribed {
            filters,
            at_ms,
            connection,
            ..
        } => {
            body.insert("timestamp".into(), json!(at_ms));
            body.insert("eventType".into(), json!("unsubscribed"));
            body.insert("sessionIdentifier".into(), json!(session_id(*connection)));
            body.insert("topics".into(), json!(filters));
            format!(
                "$aws/events/subscriptions/unsubscribed/{}",
                client.client_id
            )
        }
    };
    Some((topic, Value::Object(body)))
}

fn base(client: &Requester) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("clientId".into(), json!(&*client.client_id));
    if let Some(cert) = &client.cert_id {
        m.insert("principalIdentifier".into(), json!(&**cert));
    }
    m
}

fn session_id(connection: u64) -> String {
    format!("{connection:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str) -> Requester {
        Requester {
            client_id: Arc::from(id),
            thing: Some(Arc::from(id)),
            cert_id: Some(Arc::from("ab12")),
        }
    }

    #[test]
    fn connected_and_disconnected_carry_iot_cores_fields() {
        let (topic, body) = event_message(&Event::Connected {
            client: client("dev-1"),
            ip: "127.0.0.1".into(),
            version: 7,
            at_ms: 1_573_002_230_757,
        })
        .unwrap();
        assert_eq!(topic, "$aws/events/presence/connected/dev-1");
        assert_eq!(
            body,
            json!({"clientId": "dev-1", "timestamp": 1_573_002_230_757u64,
                   "eventType": "connected", "sessionIdentifier": "00000000000000000000000000000007",
                   "principalIdentifier": "ab12", "ipAddress": "127.0.0.1", "versionNumber": 7})
        );
        let (topic, body) = event_message(&Event::Disconnected {
            client: client("dev-1"),
            cause: DisconnectCause::KeepAliveTimeout,
            version: 7,
            at_ms: 1_573_002_340_451,
        })
        .unwrap();
        assert_eq!(topic, "$aws/events/presence/disconnected/dev-1");
        assert_eq!(body["disconnectReason"], "MQTT_KEEP_ALIVE_TIMEOUT");
        assert_eq!(body["clientInitiatedDisconnect"], false);
        assert_eq!(body["versionNumber"], 7);
        assert!(body.get("ipAddress").is_none());
    }

    #[test]
    fn subscription_events_list_the_topics() {
        let (topic, body) = event_message(&Event::Subscribed {
            client: client("dev-1"),
            filters: vec!["a/#".into(), "b".into()],
            connection: 3,
            at_ms: 5,
        })
        .unwrap();
        assert_eq!(topic, "$aws/events/subscriptions/subscribed/dev-1");
        assert_eq!(body["topics"], json!(["a/#", "b"]));
        assert_eq!(body["eventType"], "subscribed");
    }

    #[test]
    fn client_ids_with_wildcards_get_no_events() {
        for id in ["a+b", "a#"] {
            let ev = Event::Connected {
                client: client(id),
                ip: String::new(),
                version: 1,
                at_ms: 1,
            };
            assert!(event_message(&ev).is_none(), "{id}");
        }
    }

    #[test]
    fn every_cause_has_a_reason_from_iot_cores_list() {
        use DisconnectCause::*;
        for (cause, want) in [
            (ClientDisconnect, "CLIENT_INITIATED_DISCONNECT"),
            (Takeover, "DUPLICATE_CLIENTID"),
            (NotAuthorized, "AUTH_ERROR"),
            (ClientError, "CLIENT_ERROR"),
            (ServerShutdown, "SERVER_INITIATED_DISCONNECT"),
            (ConnectionLost, "CONNECTION_LOST"),
        ] {
            assert_eq!(disconnect_reason(cause), want);
        }
    }
}
