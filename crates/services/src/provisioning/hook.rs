//! The pre-provisioning hook: an HTTP(S) endpoint a template names, asked before
//! RegisterThing changes anything (IoT Core's pre-provisioning Lambda, with the same
//! request and answer JSON).
//!
//! Request (POST, `application/json`): `{"claimCertificateId", "certificateId",
//! "certificatePem", "templateArn", "clientId", "parameters"}`. Answer:
//! `{"allowProvisioning": bool, "parameterOverrides": {name: string}}` with status
//! 200. Anything else — another status, a body that does not read, `allowProvisioning`
//! not `true`, no answer within the timeout (5 s) — denies.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

/// What the hook is asked.
#[derive(Debug, Clone)]
pub struct HookRequest {
    pub claim_certificate_id: String,
    pub certificate_id: String,
    pub certificate_pem: String,
    pub template_arn: String,
    pub client_id: String,
    pub parameters: BTreeMap<String, String>,
}

/// What it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookAnswer {
    Allow(BTreeMap<String, String>),
    /// Denied, with why (for the log and the device's errorMessage).
    Deny(String),
}

/// Asks the hook at `url`; never takes longer than `timeout`.
pub async fn ask(url: &str, req: &HookRequest, timeout: Duration) -> HookAnswer {
    let body = json!({
        "claimCertificateId": req.claim_certificate_id,
        "certificateId": req.certificate_id,
        "certificatePem": req.certificate_pem,
        "templateArn": req.template_arn,
        "clientId": req.client_id,
        "parameters": req.parameters,
    })
    .to_string();
    let url = url.to_owned();
    let call = tokio::task::spawn_blocking(move || post(&url, &body, timeout));
    // The blocking call has its own deadline; this one bounds the task as well.
    match tokio::time::timeout(timeout + Duration::from_millis(200), call).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => HookAnswer::Deny(format!("pre-provisioning hook task failed: {e}")),
        Err(_) => HookAnswer::Deny(format!(
            "pre-provisioning hook did not answer within {} ms",
            timeout.as_millis()
        )),
    }
}

fn post(url: &str, body: &str, timeout: Duration) -> HookAnswer {
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .build(),
    );
    let resp = match agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)
    {
        Ok(r) => r,
        Err(ureq::Error::Timeout(_)) => {
            return HookAnswer::Deny(format!(
                "pre-provisioning hook did not answer within {} ms",
                timeout.as_millis()
            ))
        }
        Err(e) => return HookAnswer::Deny(format!("pre-provisioning hook unreachable: {e}")),
    };
    let status = resp.status().as_u16();
    if status != 200 {
        return HookAnswer::Deny(format!("pre-provisioning hook answered HTTP {status}"));
    }
    let text = match resp
        .into_body()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
    {
        Ok(t) => t,
        Err(e) => return HookAnswer::Deny(format!("pre-provisioning hook answer unreadable: {e}")),
    };
    decide(&text)
}

/// Reads the hook's answer body.
pub fn decide(text: &str) -> HookAnswer {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return HookAnswer::Deny("pre-provisioning hook answer is not JSON".into());
    };
    if v.get("allowProvisioning") != Some(&Value::Bool(true)) {
        return HookAnswer::Deny("the pre-provisioning hook denied provisioning".into());
    }
    let mut overrides = BTreeMap::new();
    match v.get("parameterOverrides") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, val) in m {
                match val {
                    Value::String(s) => {
                        overrides.insert(k.clone(), s.clone());
                    }
                    _ => {
                        return HookAnswer::Deny(format!(
                            "pre-provisioning hook: parameterOverrides.{k} is not a string"
                        ))
                    }
                }
            }
        }
        Some(_) => {
            return HookAnswer::Deny(
                "pre-provisioning hook: parameterOverrides is not an object".into(),
            )
        }
    }
    HookAnswer::Allow(overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_explicit_true_allows_and_overrides_must_be_strings() {
        assert_eq!(
            decide(r#"{"allowProvisioning":true,"parameterOverrides":{"A":"1"}}"#),
            HookAnswer::Allow(BTreeMap::from([("A".into(), "1".into())]))
        );
        assert_eq!(
            decide(r#"{"allowProvisioning":true}"#),
            HookAnswer::Allow(BTreeMap::new())
        );
        for deny in [
            r#"{"allowProvisioning":false}"#,
            r#"{"allowProvisioning":"true"}"#,
            r#"{}"#,
            "not json",
            r#"{"allowProvisioning":true,"parameterOverrides":{"A":1}}"#,
            r#"{"allowProvisioning":true,"parameterOverrides":[]}"#,
        ] {
            assert!(matches!(decide(deny), HookAnswer::Deny(_)), "{deny}");
        }
    }
}
