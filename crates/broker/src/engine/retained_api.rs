//! What the admin API's retained-message endpoints ask of the hub: a page of retained
//! topics in topic order, one retained message, and a delete that is exactly an MQTT
//! delete (a zero-byte retained publish through [`Hub::publish`]).

use std::sync::Arc;

use bytes::Bytes;
use fleetcore_core::message::Message;
use fleetcore_core::storage::StoreError;
use fleetcore_core::time::now_ms;
use fleetcore_core::topic::{validate_topic_name, TopicError, TopicLimits};
use mqtt_proto::v5::PublishProperties;
use mqtt_proto::{QoS, TopicName};

use crate::engine::hub::Hub;
use crate::retained::Retained;

/// One retained message as the API shows it.
#[derive(Debug, Clone)]
pub struct RetainedInfo {
    /// The message; its topic is `msg.topic`.
    pub msg: Arc<Message>,
    /// When it was stored, unix milliseconds.
    pub stored_at_ms: u64,
}

/// Why a retained message could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum RetainedDeleteError {
    #[error("invalid topic: {0}")]
    InvalidTopic(TopicError),
    /// The zero-byte retained message was routed, but its removal did not reach the disk
    /// (the tree was put back, as for a refused MQTT publish).
    #[error("{0}")]
    Store(StoreError),
}

/// The checks a topic name gets here: no wildcard, not empty, no NUL. No length or level
/// limit, so a topic retained under older, larger limits can still be read and deleted.
const ANY_LENGTH: TopicLimits = TopicLimits {
    max_len: 0,
    max_levels: 0,
};

/// Checks `topic` as a topic name for [`Hub::retained_get`] and [`Hub::retained_delete`].
pub fn check_topic(topic: &str) -> Result<(), TopicError> {
    validate_topic_name(topic, &ANY_LENGTH)
}

fn info(r: &Retained) -> RetainedInfo {
    RetainedInfo {
        msg: r.msg.clone(),
        stored_at_ms: r.stored_at_ms,
    }
}

impl Hub {
    /// Up to `limit` retained messages whose topic sorts after `after` (from the first
    /// with `None`), in ascending byte order of the topic, expired ones left out; and
    /// whether more follow this page.
    pub fn retained_page(&self, after: Option<&str>, limit: usize) -> (Vec<RetainedInfo>, bool) {
        let now = now_ms();
        let tree = self.retained.read();
        let mut live = tree.after(after).filter(|(_, r)| !r.msg.is_expired(now));
        let page: Vec<RetainedInfo> = live.by_ref().take(limit).map(|(_, r)| info(r)).collect();
        let more = live.next().is_some();
        (page, more)
    }

    /// The retained message of `topic`, unless there is none or it has expired.
    pub fn retained_get(&self, topic: &str) -> Option<RetainedInfo> {
        let now = now_ms();
        let tree = self.retained.read();
        tree.get(topic).filter(|r| !r.msg.is_expired(now)).map(info)
    }

    /// Deletes the retained message of `topic` as MQTT does: publishes a zero-byte
    /// retained message to it (QoS 1, from the broker itself), so current subscribers
    /// receive it too, and returns once the removal is on disk. `Ok(false)`, and nothing
    /// published, when the topic has no retained message.
    pub async fn retained_delete(&self, topic: &str) -> Result<bool, RetainedDeleteError> {
        check_topic(topic).map_err(RetainedDeleteError::InvalidTopic)?;
        if self.retained_get(topic).is_none() {
            return Ok(false);
        }
        let name = TopicName::try_from(topic)
            .map_err(|_| RetainedDeleteError::InvalidTopic(TopicError::WildcardInName))?;
        let msg = Message::from_publish(
            name,
            Bytes::new(),
            QoS::Level1,
            true,
            PublishProperties::default(),
            0,
        );
        if let Some(commit) = self.publish(msg).commit {
            commit.await.map_err(RetainedDeleteError::Store)?;
        }
        Ok(true)
    }
}
