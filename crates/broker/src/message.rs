//! One message on its way to one session: [`Delivery`].
//!
//! The message itself ([`Message`]) is shared by every subscriber it reaches; what
//! differs per subscriber (granted QoS, retain flag, subscription identifiers, the store
//! key of its durable copy) lives here.

use std::sync::Arc;

use fleetcore_core::message::Message;
use fleetcore_core::storage::StoredQueued;
use mqtt_proto::QoS;

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub msg: Arc<Message>,
    /// min(published QoS, granted QoS).
    pub qos: QoS,
    /// The RETAIN flag as sent to this subscriber.
    pub retain: bool,
    /// Identifiers of every subscription of this session that matched.
    pub subscription_ids: Vec<u32>,
    /// Key of the durable copy in the store's queue, if one was written.
    pub seq: Option<u64>,
}

impl Delivery {
    pub fn to_stored(&self) -> StoredQueued {
        StoredQueued {
            msg: self.msg.to_stored(),
            qos: self.qos as u8,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
        }
    }

    pub fn from_stored(seq: u64, q: &StoredQueued) -> Option<Delivery> {
        Some(Delivery {
            msg: Arc::new(Message::from_stored(&q.msg)?),
            qos: QoS::from_u8(q.qos).ok()?,
            retain: q.retain,
            subscription_ids: q.subscription_ids.clone(),
            seq: Some(seq),
        })
    }
}
