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

/// Publishes `body` as a QoS 1, non-retained JSON message from the broker.
pub(crate) fn publish_json(out: &dyn Publisher, topic: &str, body: &Value) -> usize {
    let Ok(topic) = TopicName::try_from(topic) else {
        tracing::warn!(topic, "answer topic is not a valid topic name");
        return 0;
    };
    let properties = PublishProperties {
        payload_is_utf8: Some(true),
        content_type: Some(Arc::from("application/json")),
        ..PublishProperties::default()
    };
    let payload = Bytes::from(body.to_string());
    out.publish(Message::from_publish(
        topic,
        payload,
        QoS::Level1,
        false,
        properties,
        0,
    ))
}
