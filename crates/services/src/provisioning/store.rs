//! Provisioning's records: templates, certificates waiting for RegisterThing, the
//! CAs that provision just in time, and the token key.

use std::collections::BTreeMap;

use fleetcore_core::service::Record;
use fleetcore_core::storage::RecordOp;
use serde::{Deserialize, Serialize};

pub const TEMPLATE: &str = "provisioning-template";
pub const PENDING: &str = "provisioning-pending";
pub const CA_TEMPLATE: &str = "provisioning-ca-template";
pub const KEY: &str = "provisioning-key";

/// IoT Core's template types: fleet provisioning by claim, or just in time at
/// a device's first connection (attached to a registered CA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TemplateType {
    #[default]
    FleetProvisioning,
    Jitp,
}

impl std::fmt::Display for TemplateType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TemplateType::FleetProvisioning => "FLEET_PROVISIONING",
            TemplateType::Jitp => "JITP",
        })
    }
}

/// The pre-provisioning hook of a template: an HTTP(S) endpoint asked before a
/// thing is registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// `http://` or `https://` URL that takes a POST.
    pub url: String,
}

/// A stored template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The template JSON as given.
    pub body: String,
    pub enabled: bool,
    #[serde(default)]
    pub template_type: TemplateType,
    #[serde(default)]
    pub hook: Option<Hook>,
    pub version: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// A certificate made by CreateKeysAndCertificate or CreateCertificateFromCsr that
/// waits for RegisterThing; deleted (with the certificate, if still unclaimed) at
/// `expires_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub cert_id: String,
    /// The claim certificate's id, or the client id of a connection without one.
    pub claimant: String,
    pub client_id: String,
    pub expires_ms: u64,
}

/// What was on disk at start.
#[derive(Default)]
pub struct Loaded {
    pub templates: Vec<TemplateRecord>,
    pub pending: Vec<Pending>,
    /// CA id -> JITP template name.
    pub ca_templates: BTreeMap<String, String>,
    pub key: Option<Vec<u8>>,
}

pub fn load(records: &[Record]) -> Loaded {
    let mut out = Loaded::default();
    for (kind, key, value, _) in records {
        let ok = match kind.as_str() {
            TEMPLATE => serde_json::from_slice::<TemplateRecord>(value)
                .map(|t| out.templates.push(t))
                .is_ok(),
            PENDING => serde_json::from_slice::<Pending>(value)
                .map(|p| out.pending.push(p))
                .is_ok(),
            CA_TEMPLATE => serde_json::from_slice::<String>(value)
                .map(|t| {
                    out.ca_templates.insert(key.clone(), t);
                })
                .is_ok(),
            KEY => {
                out.key = Some(value.clone());
                value.len() >= 32
            }
            _ => continue,
        };
        if !ok {
            tracing::warn!(kind = %kind, key = %key, "skipping unreadable provisioning record");
        }
    }
    out
}

pub fn put<T: Serialize>(kind: &'static str, key: &str, value: &T) -> RecordOp {
    RecordOp::Put {
        kind,
        key: key.to_owned(),
        value: serde_json::to_vec(value).unwrap_or_default(),
    }
}

pub fn del(kind: &'static str, key: &str) -> RecordOp {
    RecordOp::Delete {
        kind,
        key: key.to_owned(),
    }
}

pub fn put_key(secret: &[u8]) -> RecordOp {
    RecordOp::Put {
        kind: KEY,
        key: "current".to_owned(),
        value: secret.to_vec(),
    }
}
