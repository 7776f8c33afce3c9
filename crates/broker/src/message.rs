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
    /// The durable copy of this delivery; `new_body` gives the message's body id the
    /// first time one is stored (every later copy shares it).
    pub fn to_stored(&self, new_body: impl FnOnce() -> u64) -> StoredQueued {
        let (body, msg) = self.msg.stored_body(new_body);
        StoredQueued {
            body,
            msg,
            qos: self.qos as u8,
            retain: self.retain,
            subscription_ids: self.subscription_ids.clone(),
        }
    }

    /// A delivery restored from the store. `bodies` holds the messages made so far by
    /// body id, so the copies of one message queued for many sessions share one
    /// `Message` in memory as they do one body on disk.
    pub fn from_stored(
        seq: u64,
        q: &StoredQueued,
        bodies: &mut std::collections::HashMap<u64, Arc<Message>>,
    ) -> Option<Delivery> {
        let msg = match bodies.get(&q.body) {
            Some(m) => m.clone(),
            None => {
                let m = Message::from_stored(&q.msg)?;
                let _ = m.stored.set((q.body, q.msg.clone()));
                let m = Arc::new(m);
                bodies.insert(q.body, m.clone());
                m
            }
        };
        Some(Delivery {
            msg,
            qos: QoS::from_u8(q.qos).ok()?,
            retain: q.retain,
            subscription_ids: q.subscription_ids.clone(),
            seq: Some(seq),
        })
    }
}
