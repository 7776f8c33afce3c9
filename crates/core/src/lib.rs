//! fleetcore's shared vocabulary, and the seams the other crates meet at. No I/O.
//!
//! # Layout
//! - [`protocol`]: MQTT framing, and MQTT 3.1/3.1.1 normalised into MQTT 5 shapes.
//! - [`topic`]: topic name and filter rules (validation, `$share`, `$` topics).
//! - [`message`]: a routed application message, shared by every subscriber it reaches.
//! - [`principal`]: what a verified client certificate says about its holder.
//! - [`fabric`]: what a cluster needs from the engine (interest, forwarding, control);
//!   [`fabric::Standalone`] for one node.
//! - [`service`]: the `$aws/...` service seam: `TopicService`, `Publisher`, engine `Event`s.
//! - [`storage`]: the durable records, [`storage::Commit`], and the record-store seam.
//! - [`encoding`]: hex, the SHA-256 certificate id, base64url (one copy each).
//! - [`time`]: unix time, RFC 3339 text.
#![forbid(unsafe_code)]

pub mod encoding;
pub mod fabric;
pub mod message;
pub mod principal;
pub mod protocol;
pub mod service;
pub mod storage;
pub mod time;
pub mod topic;
