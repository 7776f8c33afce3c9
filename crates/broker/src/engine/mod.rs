//! The engine: the state every connection shares, and the operations on it.
//!
//! - [`hub`]: publish and fan-out (shared groups, retained messages, durable copies for
//!   offline sessions), the session lifecycle (attach, takeover, detach, expiry), wills,
//!   certificate kicks, trust reloads, shutdown.
//! - [`certs`]: which live connections authenticated with which certificate (for kicks).
//! - [`undo`]: a store commit that takes its change back from memory if it fails.
//! - [`services`]: the `$aws/...` service host: dispatch of authorized publishes, events.
//! - [`retained_api`]: the hub's answers to the admin API's retained-message endpoints
//!   (a page in topic order, one message, a delete that is an MQTT delete).

pub mod certs;
pub mod hub;
pub mod retained_api;
pub mod services;
pub mod undo;

#[cfg(test)]
mod lifecycle_tests;
