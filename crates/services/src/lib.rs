//! fleetcore's device services: what the AWS IoT Device SDKs speak on `$aws/...` topics.
//!
//! Each service is one folder behind one interface, `fleetcore_core::service::TopicService`;
//! the broker's engine dispatches authorized publishes to the service whose filter
//! matches and feeds every service its events. Services depend on the core (and the
//! identity plane when they need it), never on the broker.
//!
//! # Layout
//! - [`events`]: lifecycle events (`$aws/events/presence/...`,
//!   `$aws/events/subscriptions/...`), made from the engine's events.
//! - [`jobs`]: IoT Core's Jobs, device side (`$aws/things/{thing}/jobs/...`) and the
//!   control plane the admin API serves.
//! - [`provisioning`]: fleet provisioning by claim and just-in-time provisioning.
//! - [`shadow`]: the Device Shadow service (`$aws/things/{thing}/shadow/...`, classic
//!   and named), its documents in the record store.
#![forbid(unsafe_code)]

use std::sync::Arc;

use bytes::Bytes;
use fleetcore_core::message::Message;
use fleetcore_core::service::Publisher;
use mqtt_proto::v5::PublishProperties;
use mqtt_proto::{QoS, TopicName};
use serde_json::Value;

pub mod events;
pub mod jobs;
pub mod provisioning;
pub mod shadow;
#[cfg(test)]
pub(crate) mod testing;

/// `body` as a QoS 1, non-retained JSON message from the broker to `topic`.
pub(crate) fn json_message(topic: &str, body: &Value) -> Option<Message> {
    let Ok(topic) = TopicName::try_from(topic) else {
        tracing::warn!(topic, "answer topic is not a valid topic name");
        return None;
    };
    let properties = PublishProperties {
        payload_is_utf8: Some(true),
        content_type: Some(Arc::from("application/json")),
        ..PublishProperties::default()
    };
    let payload = Bytes::from(body.to_string());
    Some(Message::from_publish(
        topic,
        payload,
        QoS::Level1,
        false,
        properties,
        0,
    ))
}

/// Publishes `body` as a QoS 1, non-retained JSON message from the broker.
pub(crate) fn publish_json(out: &dyn Publisher, topic: &str, body: &Value) -> usize {
    json_message(topic, body).map_or(0, |m| out.publish(m))
}

/// Sends `body` as a QoS 1 JSON message to client `client_id` only
/// ([`Publisher::send_to`]); whether it was queued for it.
pub(crate) fn send_json(out: &dyn Publisher, client_id: &str, topic: &str, body: &Value) -> bool {
    json_message(topic, body).is_some_and(|m| out.send_to(client_id, m))
}
