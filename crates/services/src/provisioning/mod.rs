//! Fleet provisioning (IoT Core's `$aws/certificates/...` and
//! `$aws/provisioning-templates/...`): agents installed with a shared claim certificate
//! get their own certificate, thing and policy over MQTT.
//!
//! - [`template`]: provisioning templates (IoT Core's JSON), validated at creation and
//!   evaluated with a request's parameters into a [`template::Plan`].

pub mod template;
