//! fleetcore's shared vocabulary, and the seams the other crates meet at. No I/O.
//!
//! # Layout
//! - [`encoding`]: hex, the SHA-256 certificate id, base64url (one copy each).
//! - [`time`]: the [`time::Clock`] seam, unix time, RFC 3339 text.
#![forbid(unsafe_code)]

pub mod encoding;
pub mod time;
