//! The AWS IoT Core policy language, as fleetcore enforces it: parse and validate policy
//! documents, compile their resources, substitute a connection's policy variables, and
//! decide Allow or Deny for an (action, resource) pair. Pure: no I/O, no async.
//!
//! # Layout
//! - `document`: [`Policy::parse`], JSON to validated statements, and the checks that make
//!   a [`PolicyError`] name the statement and field at fault.
//! - `error`: [`PolicyError`].
//! - `action`: [`Action`], which resource type each action is checked against, and how
//!   `Action` entries (`iot:Publish`, `iot:*`, `*`) are read.
//! - `resource`: ARNs (`arn:aws:iot:<region>:<account>:<type>/<name>`) into a type and a
//!   pattern of literal runs, `*`, `?` and variable slots.
//! - `vars`: the policy variables and [`Vars`], their values for one connection.
//! - `matcher`: the final, non-allocating wildcard matchers.
//! - `bound`: [`Bound`], all of a principal's policies bound to its [`Vars`] and grouped by
//!   action, and the [`Decision`] it gives.
//!
//! # Use
//! Parse each policy once when it is created or changed. When a connection authenticates,
//! bind the policies attached to its certificate with [`Bound::new`], then ask
//! [`Bound::decide`] on every CONNECT, SUBSCRIBE, PUBLISH and delivery. A `Deny` that
//! matches beats every `Allow`; nothing is allowed unless some `Allow` matches.
//!
//! ```
//! use fleetcore_policy::{Action, Bound, Policy, Vars};
//!
//! let policy = Policy::parse(r#"{
//!     "Version": "2012-10-17",
//!     "Statement": {
//!         "Effect": "Allow",
//!         "Action": ["iot:Publish", "iot:Receive"],
//!         "Resource": "arn:aws:iot:*:*:topic/devices/${iot:ClientId}/*"
//!     }
//! }"#).unwrap();
//! let vars = Vars { client_id: Some("sensor-1".into()), ..Vars::default() };
//! let bound = Bound::new(&[&policy], &vars);
//! assert!(bound.allows(Action::Publish, "devices/sensor-1/temperature"));
//! assert!(!bound.allows(Action::Publish, "devices/sensor-2/temperature"));
//! ```
#![forbid(unsafe_code)]

mod action;
mod bound;
mod document;
mod error;
mod matcher;
mod resource;
mod vars;

#[cfg(test)]
mod tests;

pub use action::{Action, UnknownAction};
pub use bound::{Bound, Decision};
pub use document::Policy;
pub use error::PolicyError;
pub use vars::{Vars, CERT_ATTRIBUTES};
