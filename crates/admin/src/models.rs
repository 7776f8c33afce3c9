//! The admin API's contract as types: every request body the registry routes accept
//! and every answer they give, shared by the server ([`crate::api`]) and the CLI
//! (`fleetcore thing|cert|policy|ca|token`). A field renamed here changes both sides at
//! once, or neither compiles.
//!
//! Requests refuse unknown fields (a typo is a 400, not a silently ignored option);
//! answers accept them, so an older CLI reads a newer server. Optional fields are left
//! out of the JSON when empty, as the API has always written them.

use std::collections::BTreeMap;

use fleetcore_identity::registry::{CertState, GroupInfo, PolicyRecord, Thing};
use fleetcore_services::jobs::store::FailureType;
use fleetcore_services::provisioning::store::Hook;
use serde::{Deserialize, Serialize};
use serde_json::Value;

fn is_false(b: &bool) -> bool {
    !*b
}

// ----- errors --------------------------------------------------------------------

/// Every error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// `InvalidRequest`, `ResourceNotFound`, `Unauthorized`, ... (docs/admin-api.md).
    pub code: String,
    pub message: String,
}

// ----- things --------------------------------------------------------------------

/// `POST /things`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewThing {
    pub name: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// `PATCH /things/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThingUpdate {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub thing_type: Option<String>,
    /// `None` leaves them; with `merge` false the given map replaces them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<BTreeMap<String, String>>,
    /// As IoT Core's `attributePayload.merge`: false replaces the attributes.
    #[serde(default)]
    pub merge: bool,
}

/// `GET /things`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThingList {
    pub things: Vec<Thing>,
}

/// `GET /things/{name}`: the thing and the certificates attached to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThingDetail {
    #[serde(flatten)]
    pub thing: Thing,
    #[serde(default)]
    pub principals: Vec<String>,
}

// ----- thing groups --------------------------------------------------------------

/// `POST /thing-groups`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    pub name: String,
    /// Fixed at creation; absent (or empty) for a root group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// `PATCH /thing-groups/{name}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupUpdate {
    /// `""` removes the description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<BTreeMap<String, String>>,
    /// As IoT Core's `attributePayload.merge`: false replaces the attributes.
    #[serde(default)]
    pub merge: bool,
}

/// `GET /thing-groups`; one group is a [`GroupInfo`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupList {
    pub thing_groups: Vec<GroupInfo>,
}

/// `GET /thing-groups/{name}/things`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupMembers {
    pub thing_group: String,
    pub recursive: bool,
    pub things: Vec<String>,
}

/// `GET /things/{thing}/thing-groups`: the groups it is a direct member of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupsOfThing {
    pub thing: String,
    pub thing_groups: Vec<String>,
}

// ----- certificates --------------------------------------------------------------

/// `POST /certificates/create`: a key pair made by the server, the key handed back once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateCert {
    /// The CN, and the thing the certificate is attached to.
    pub thing: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<u32>,
}

/// `POST /certificates/from-csr`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFromCsr {
    pub csr_pem: String,
    /// The CN to sign and the thing to attach; absent, the CSR's CN names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<u32>,
}

/// `POST /certificates/register`: a certificate signed by the fleetcore CA or a
/// registered CA.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterCert {
    pub certificate_pem: String,
    /// `ACTIVE` (default), `INACTIVE` or `PENDING_ACTIVATION`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thing: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
}

/// The answer to `create` and `from-csr`: the certificate (and, from `create`, its
/// private key, which the server does not keep) with the CA that signed it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedCert {
    pub certificate_id: String,
    pub certificate_pem: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    pub ca_pem: String,
}

/// `PUT /certificates/{id}/state`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateChange {
    /// `ACTIVE`, `INACTIVE`, `REVOKED` or `PENDING_ACTIVATION`.
    pub state: String,
}

/// A certificate as the API shows it (without its PEM).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertView {
    pub id: String,
    pub subject: String,
    pub subject_cn: Option<String>,
    pub issuer: String,
    pub serial: String,
    pub state: CertState,
    pub not_after_ms: u64,
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

/// `GET /certificates`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertList {
    pub certificates: Vec<CertView>,
}

/// `GET /certificates/{id}`: the certificate with its PEM and what it is attached to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertDetail {
    #[serde(flatten)]
    pub cert: CertView,
    pub pem: String,
    #[serde(default)]
    pub policies: Vec<String>,
    #[serde(default)]
    pub things: Vec<String>,
}

// ----- policies ------------------------------------------------------------------

/// `POST /policies`. The document is JSON, or its JSON text (IoT Core's form).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPolicy {
    pub name: String,
    pub document: Value,
}

/// `POST /policies/{name}/versions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPolicyVersion {
    pub document: Value,
    /// As IoT Core's `setAsDefault`: false keeps the current default.
    #[serde(default, skip_serializing_if = "is_false")]
    pub set_as_default: bool,
}

/// `PUT /policies/{name}/default-version`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultVersion {
    pub version: u32,
}

/// `GET /policies`; a single policy is a [`PolicyRecord`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyList {
    pub policies: Vec<PolicyRecord>,
}

// ----- CAs -----------------------------------------------------------------------

/// `POST /cas`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCa {
    pub certificate_pem: String,
}

/// A CA the TLS listeners trust.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaView {
    pub id: String,
    pub subject: String,
    pub created_ms: u64,
    /// `fleetcore` (its own CA) or `registered`; absent in the answer to `POST /cas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// `GET /cas`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaList {
    pub cas: Vec<CaView>,
}

// ----- device tokens -------------------------------------------------------------

/// `POST /tokens`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub thing: String,
    /// `"90s"`, `"30m"`, `"1h"`, `"2d"`, or a number of seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_id: Option<String>,
}

/// The answer to `POST /tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedTokenView {
    pub token: String,
    pub thing: String,
    pub certificate_id: String,
    pub key_id: String,
    pub issued_at: String,
    pub expires_at: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
}

/// A token signing key (`GET /tokens/keys`, `POST /tokens/keys/rotate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenKeyView {
    pub key_id: String,
    pub created: String,
    pub created_ms: u64,
    /// The key new tokens are signed with.
    pub signing: bool,
    /// Ed25519, base64url.
    pub public_key: String,
    /// For a retired key: until when tokens it signed are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_until_ms: Option<u64>,
}

/// `GET /tokens/keys`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenKeyList {
    pub keys: Vec<TokenKeyView>,
}

// ----- jobs ----------------------------------------------------------------------
//
// Requests in IoT Core's camelCase. The answers are the jobs service's documents in IoT
// Core's shapes (`jobId`, `executionSummaries`, ...), the same the `$aws/things/.../jobs`
// topics carry, and are read as JSON.

/// `PUT /jobs/{job}` (CreateJob).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateJob {
    /// Thing names, thing ARNs or thing group ARNs.
    pub targets: Vec<String>,
    /// The job document: a JSON object, or a string holding one (IoT Core's form).
    pub document: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `SNAPSHOT` (default) or `CONTINUOUS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_selection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_config: Option<TimeoutConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_executions_rollout_config: Option<RolloutConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_config: Option<AbortConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_executions_retry_config: Option<RetryConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortConfig {
    pub criteria_list: Vec<AbortCriterion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortCriterion {
    /// Only `CANCEL` exists.
    pub action: String,
    pub failure_type: FailureType,
    pub min_number_of_executed_things: u64,
    pub threshold_percentage: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryConfig {
    pub criteria_list: Vec<RetryCriterion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryCriterion {
    pub failure_type: FailureType,
    pub number_of_retries: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TimeoutConfig {
    pub in_progress_timeout_in_minutes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RolloutConfig {
    pub maximum_per_minute: Option<u32>,
}

/// `PUT /jobs/{job}/cancel` and `PUT /things/{thing}/jobs/{job}/cancel` (the latter reads
/// only `force`); an empty body is `{}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CancelJob {
    /// Also cancel executions IN_PROGRESS.
    #[serde(default, skip_serializing_if = "is_false")]
    pub force: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<String>,
}

// ----- provisioning templates ------------------------------------------------------
//
// Requests in IoT Core's camelCase; the template views are IoT Core's shapes
// (`templateName`, `defaultVersionId`, ...) and are read as JSON.

/// `POST /provisioning-templates` (CreateProvisioningTemplate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateTemplate {
    pub template_name: String,
    /// The template JSON, as a string (IoT Core's form) or an object.
    pub template_body: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// `FLEET_PROVISIONING` (default) or `JITP`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub template_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_provisioning_hook: Option<Hook>,
    /// IoT Core's; there is no IAM role here. Accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_role_arn: Option<String>,
}

/// `PATCH /provisioning-templates/{name}`: what is given changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_body: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub template_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_provisioning_hook: Option<Hook>,
    /// True removes the hook.
    #[serde(default, skip_serializing_if = "is_false")]
    pub remove_pre_provisioning_hook: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning_role_arn: Option<String>,
}

/// `POST /provisioning-templates/{name}/claim-certificates`; an empty body is `{}`. The
/// answer is an [`IssuedCert`] with `policy_name` and `template_name`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewClaimCert {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<u32>,
}

/// `PUT /cas/{id}/provisioning-template`: the JITP template of a registered CA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CaTemplate {
    pub template_name: String,
}

// ----- health --------------------------------------------------------------------

/// `GET /healthz` (no token needed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub connections: usize,
    pub sessions: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_write_only_what_is_set_and_refuse_unknown_fields() {
        let t = NewThing {
            name: "dev-1".into(),
            ..NewThing::default()
        };
        assert_eq!(serde_json::to_value(&t).unwrap(), json!({"name": "dev-1"}));
        let c = CertFromCsr {
            csr_pem: "PEM".into(),
            thing: Some("dev-1".into()),
            policies: vec!["agent".into()],
            state: None,
            days: Some(30),
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(
            v,
            json!({"csr_pem": "PEM", "thing": "dev-1", "policies": ["agent"], "days": 30})
        );
        assert_eq!(serde_json::from_value::<CertFromCsr>(v).unwrap(), c);
        let typo = json!({"name": "x", "atributes": {}});
        let err = serde_json::from_value::<NewThing>(typo).unwrap_err();
        assert!(err.to_string().contains("atributes"), "{err}");
        let typo = json!({"certificate_pem": "PEM", "polices": []});
        assert!(serde_json::from_value::<RegisterCert>(typo).is_err());
    }

    #[test]
    fn answers_read_back_what_they_wrote() {
        let detail = ThingDetail {
            thing: Thing {
                name: "dev-1".into(),
                thing_type: Some("agent".into()),
                attributes: BTreeMap::from([("site".into(), "paris".into())]),
                version: 2,
                created_ms: 1,
            },
            principals: vec!["abc".into()],
        };
        let v = serde_json::to_value(&detail).unwrap();
        assert_eq!(v["type"], "agent");
        assert_eq!(v["principals"], json!(["abc"]));
        assert_eq!(serde_json::from_value::<ThingDetail>(v).unwrap(), detail);
        let key = TokenKeyView {
            key_id: "k1".into(),
            created: "2026-12-04T00:00:00Z".into(),
            created_ms: 5,
            signing: true,
            public_key: "pk".into(),
            verify_until: None,
            verify_until_ms: None,
        };
        let v = serde_json::to_value(&key).unwrap();
        assert!(v.get("verify_until").is_none(), "{v}");
        assert_eq!(serde_json::from_value::<TokenKeyView>(v).unwrap(), key);
    }
}
