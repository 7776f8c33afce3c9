//! Who a peer is and what it may do: fleetcore's identity plane.
//!
//! # Layout
//! - [`registry`]: things, certificates, policies (compiled once), CAs, attachments and
//!   token signing keys, kept in memory and written through the core's `RecordStore`;
//!   identity resolution at CONNECT (certificate or token); a generation counter;
//!   static thing groups ([`registry::groups`]).
//! - [`authz`]: one connection's bound policies, IoT Core decisions without allocation.
//! - [`token`]: signed device tokens (MQTT password), their keys and lifetimes.
//! - [`ca`]: the certificate authority: the CA and server certificate, signing device
//!   CSRs, creating keys and certificates, CRLs, reading certificates made elsewhere.
//! - [`jit`]: the seam just-in-time provisioning plugs into at CONNECT.
//! - [`names`]: the thing-name rule shared by the registry and the CA.
#![forbid(unsafe_code)]

pub mod authz;
pub mod ca;
pub mod jit;
pub mod names;
pub mod registry;
pub mod token;
