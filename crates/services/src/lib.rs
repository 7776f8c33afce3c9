//! fleetcore's device services: what the AWS IoT Device SDKs speak on `$aws/...` topics.
//!
//! Each service is one folder behind one interface, `fleetcore_core::service::TopicService`;
//! the broker's engine dispatches authorized publishes to the service whose filter
//! matches and feeds every service its events. Services depend on the core (and the
//! identity plane when they need it), never on the broker.
//!
//! # Layout
//! - [`events`]: lifecycle events (`$aws/events/presence/...`,
//!   `$aws/events/subscriptions/...`), made from the engine's events.
#![forbid(unsafe_code)]

pub mod events;
