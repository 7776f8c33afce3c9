//! fleetcore's control plane.
//!
//! # Layout
//! - [`api`]: the admin HTTP API (axum) of `docs/admin-api.md`: things, certificates,
//!   policies, CAs, CRL, `/metrics`, `/healthz`, behind a bearer token. It talks to the
//!   broker only through the [`Hub`](fleetcore_broker::engine::hub::Hub)'s registry (whose
//!   events the engine acts on) and its connection and session counts.
//! - [`models`]: the request and answer types of the registry routes, shared with the
//!   CLI.
//! - [`shadow`]: the Device Shadow HTTP data plane (`/things/{thing}/shadow`,
//!   `ListNamedShadowsForThing`), answered by the shadow service.
//! - [`groups`]: static thing groups (`/thing-groups`, `/things/{thing}/thing-groups`),
//!   answered by the registry.
//! - [`jobs`]: the Jobs control plane (`/jobs`, `/things/{thing}/jobs`), answered by
//!   the jobs service.
//! - [`retained`]: IoT Core's retained-message APIs (`GET /retainedMessage[/{topic}]`)
//!   and fleetcore's `DELETE /retainedMessage/{topic}`, through the hub's
//!   `retained_page`/`retained_get`/`retained_delete`.
//! - [`openapi`]: the OpenAPI 3.1 description served at `/openapi.json`.
//! - [`token`]: the admin token file (made once, mode 0600).
//! - [`tls`]: TLS for the admin API (`[admin] tls = true`), with optional admin client
//!   certificates.

#![forbid(unsafe_code)]

pub mod api;
pub mod groups;
pub mod jobs;
pub mod models;
pub mod openapi;
pub mod provisioning;
pub mod retained;
pub mod shadow;
pub mod tls;
pub mod token;
