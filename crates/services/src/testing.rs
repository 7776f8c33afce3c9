//! Test support shared by the services' tests: a publisher that keeps what a service
//! sent, and to whom.

use fleetcore_core::message::Message;
use fleetcore_core::service::Publisher;
use parking_lot::Mutex;
use serde_json::Value;

/// Every message a service published (`None`) or sent to one client (`Some(id)`), with
/// its topic and JSON body, in order.
#[derive(Default)]
pub struct Sent(pub Mutex<Vec<(Option<String>, String, Value)>>);

impl Publisher for Sent {
    fn publish(&self, msg: Message) -> usize {
        let body = serde_json::from_slice(&msg.payload).unwrap();
        self.0.lock().push((None, msg.topic.to_string(), body));
        1
    }
    fn send_to(&self, client_id: &str, msg: Message) -> bool {
        let body = serde_json::from_slice(&msg.payload).unwrap();
        self.0
            .lock()
            .push((Some(client_id.to_string()), msg.topic.to_string(), body));
        true
    }
}

impl Sent {
    /// Everything sent so far; forgets it.
    pub fn take(&self) -> Vec<(Option<String>, String, Value)> {
        std::mem::take(&mut *self.0.lock())
    }

    /// The last message on a topic ending in `suffix`: (to whom, body).
    pub fn last_on(&self, suffix: &str) -> Option<(Option<String>, Value)> {
        self.0
            .lock()
            .iter()
            .rev()
            .find(|(_, t, _)| t.ends_with(suffix))
            .map(|(c, _, b)| (c.clone(), b.clone()))
    }
}
