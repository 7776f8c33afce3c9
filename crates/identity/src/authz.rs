//! Authorization of one connection: IoT Core policy decisions.
//!
//! A connection is bound once, when its client id is known, to the policies
//! that apply to it, with its policy variables substituted
//! (`${iot:ClientId}`, `${iot:Certificate.Subject.CommonName}`, ...). After
//! that every check is a lookup in the bound matchers, without allocation.
//! The broker asks at CONNECT (`iot:Connect`, and `iot:Publish` for the
//! will), on every SUBSCRIBE filter, every PUBLISH (plus `iot:RetainPublish`
//! for retained ones), and on every delivery (`iot:Receive`), so a policy
//! change reaches live sessions.

use fleetcore_policy::{Action, Bound, Policy, Vars};

use fleetcore_core::principal::ClientCert;

/// What one connection may do.
#[derive(Debug, Clone)]
pub enum Authz {
    /// No policy applies (a development listener): everything is allowed.
    AllowAll,
    /// The policies bound to this connection's variables.
    Bound(Box<Bound>),
}

impl Authz {
    /// Binds `policies` to already-collected policy variables.
    pub fn bind_vars(policies: &[&Policy], vars: &Vars) -> Authz {
        Authz::Bound(Box::new(Bound::new(policies, vars)))
    }

    /// Binds `policies` for a client with this id and (optional) certificate.
    pub fn bind(policies: &[&Policy], client_id: &str, cert: Option<&ClientCert>) -> Authz {
        let mut vars = Vars {
            client_id: Some(client_id.to_owned()),
            ..Vars::default()
        };
        if let Some(c) = cert {
            vars.cert_subject = c.attributes.clone();
            vars.cert_issuer = c.issuer_attributes.clone();
            vars.cert_serial = Some(c.serial.clone());
        }
        Authz::Bound(Box::new(Bound::new(policies, &vars)))
    }

    pub fn allows(&self, action: Action, name: &str) -> bool {
        match self {
            Authz::AllowAll => true,
            Authz::Bound(b) => b.allows(action, name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_policy_substitutes_client_id_and_certificate_cn() {
        let policy = Policy::parse(
            r#"{"Version":"2012-10-17","Statement":[
              {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/${iot:Certificate.Subject.CommonName}"},
              {"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/acct/${iot:ClientId}/*"}]}"#,
        )
        .unwrap();
        let cert = ClientCert {
            subject_cn: Some("dev-1".into()),
            attributes: vec![("CN".into(), "dev-1".into())],
            ..ClientCert::default()
        };
        let a = Authz::bind(&[&policy], "dev-1", Some(&cert));
        assert!(a.allows(Action::Connect, "dev-1"));
        assert!(!a.allows(Action::Connect, "dev-2"));
        assert!(a.allows(Action::Subscribe, "acct/dev-1/#"));
        assert!(!a.allows(Action::Subscribe, "acct/dev-2/#"));
        assert!(Authz::AllowAll.allows(Action::Publish, "anything"));
    }

    #[test]
    fn wildcard_client_id_cannot_widen_a_filter() {
        let policy = Policy::parse(
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:*:*:topicfilter/acct/${iot:ClientId}"}}"#,
        )
        .unwrap();
        let a = Authz::bind(&[&policy], "#", None);
        assert!(!a.allows(Action::Subscribe, "acct/#"));
    }
}
