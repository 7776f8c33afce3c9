//! A published application message as the broker routes it.
//!
//! One `Message` is made per PUBLISH (or will) and shared by `Arc` with every
//! subscriber it reaches, so fan-out copies a pointer, not the payload. What
//! differs per subscriber (granted QoS, retain flag, subscription identifier,
//! packet identifier) lives in the broker's `Delivery`, not here.

use crate::time::now_ms;
use std::sync::{Arc, OnceLock};

use crate::storage::StoredMessage;
use bytes::Bytes;
use mqtt_proto::v5::{PublishProperties, UserProperty};
use mqtt_proto::{QoS, TopicName};

/// Identifies the session that published a message (for MQTT 5 No Local).
pub type Origin = u64;

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: TopicName,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 properties passed through to subscribers (topic alias and
    /// subscription identifier removed; they are per hop).
    pub properties: PublishProperties,
    /// Absolute expiry, unix milliseconds.
    pub expires_at_ms: Option<u64>,
    /// The publishing session, 0 for the broker itself.
    pub origin: Origin,
    /// The stored form of this message and the id of its body in the store, made at
    /// the first durable copy and shared by every later one: one body on disk for
    /// every offline session the message is queued for.
    pub stored: OnceLock<(u64, Arc<StoredMessage>)>,
}

impl Message {
    /// Builds a message from an incoming PUBLISH (alias already resolved).
    pub fn from_publish(
        topic: TopicName,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        mut properties: PublishProperties,
        origin: Origin,
    ) -> Message {
        properties.topic_alias = None;
        properties.subscription_id = None;
        let expires_at_ms = properties
            .message_expiry_interval
            .map(|secs| now_ms() + secs as u64 * 1000);
        Message {
            topic,
            payload,
            qos,
            retain,
            properties,
            expires_at_ms,
            origin,
            stored: OnceLock::new(),
        }
    }

    /// The stored form and body id of this message; `new_id` is called once, for the
    /// first durable copy.
    pub fn stored_body(&self, new_id: impl FnOnce() -> u64) -> (u64, Arc<StoredMessage>) {
        self.stored
            .get_or_init(|| (new_id(), Arc::new(self.to_stored())))
            .clone()
    }

    /// Restarts the Message Expiry Interval from now: a will's interval
    /// counts from when it is published, not from CONNECT.
    pub fn restamp(&mut self) {
        self.expires_at_ms = self
            .properties
            .message_expiry_interval
            .map(|secs| now_ms() + secs as u64 * 1000);
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }

    /// The Message Expiry Interval for a copy sent now: it counts down.
    pub fn remaining_expiry(&self, now_ms: u64) -> Option<u32> {
        self.expires_at_ms
            .map(|at| (at.saturating_sub(now_ms)).div_ceil(1000) as u32)
    }

    pub fn to_stored(&self) -> StoredMessage {
        StoredMessage {
            topic: self.topic.to_string(),
            payload: self.payload.to_vec(),
            qos: self.qos as u8,
            retain: self.retain,
            expires_at_ms: self.expires_at_ms,
            payload_format_utf8: self.properties.payload_is_utf8,
            content_type: self.properties.content_type.as_deref().map(str::to_owned),
            response_topic: self.properties.response_topic.as_deref().map(str::to_owned),
            correlation_data: self
                .properties
                .correlation_data
                .as_ref()
                .map(|b| b.to_vec()),
            user_properties: self
                .properties
                .user_properties
                .iter()
                .map(|u| (u.name.to_string(), u.value.to_string()))
                .collect(),
        }
    }

    /// Rebuilds a message read back from the store; `None` if the stored
    /// topic is no longer a valid topic name.
    pub fn from_stored(s: &StoredMessage) -> Option<Message> {
        let topic = TopicName::try_from(s.topic.as_str()).ok()?;
        let properties = PublishProperties {
            payload_is_utf8: s.payload_format_utf8,
            message_expiry_interval: None,
            topic_alias: None,
            response_topic: s
                .response_topic
                .as_deref()
                .and_then(|t| TopicName::try_from(t).ok()),
            correlation_data: s.correlation_data.clone().map(Bytes::from),
            user_properties: s
                .user_properties
                .iter()
                .map(|(k, v)| UserProperty {
                    name: Arc::from(k.as_str()),
                    value: Arc::from(v.as_str()),
                })
                .collect(),
            subscription_id: None,
            content_type: s.content_type.as_deref().map(Arc::from),
        };
        Some(Message {
            topic,
            payload: Bytes::from(s.payload.clone()),
            qos: QoS::from_u8(s.qos).unwrap_or(QoS::Level0),
            retain: s.retain,
            properties,
            expires_at_ms: s.expires_at_ms,
            origin: 0,
            stored: OnceLock::new(),
        })
    }
}
