//! Provisioning's registry side: a certificate registered together with the records
//! of whoever issued it, and one atomic step that gives a PENDING_ACTIVATION
//! certificate its thing, groups and policies and activates it (IoT Core's
//! RegisterThing). What a template asks for is decided by the caller; this module
//! checks it against the registry and applies all of it in one commit, or nothing.

use std::collections::{BTreeMap, BTreeSet};

use fleetcore_core::storage::RecordOp;
use fleetcore_core::time::now_ms;

use super::groups::Groups;
use super::{
    compile, del, not_found, put, valid_attributes, valid_policy_name, valid_thing_name,
    CertRecord, CertState, NewCert, PolicyRecord, PolicyVersion, Registry, RegistryError,
    RegistryEvent, Result, Thing, CERT, POLICY, POLICY_ATTACHMENT, THING, THING_ATTACHMENT,
};

/// What to do with a property of a thing that exists already (IoT Core's
/// `OverrideSettings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExisting {
    /// Keep the existing value (`DO_NOTHING`).
    Keep,
    /// Replace it (`REPLACE`).
    Replace,
    /// Add to it: attributes merged, groups joined (`MERGE`).
    Merge,
    /// Refuse the whole provisioning if it differs (`FAIL`).
    Fail,
}

/// The thing a provisioning names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionThing {
    pub name: String,
    pub thing_type: Option<String>,
    pub attributes: BTreeMap<String, String>,
    /// Static groups to be a member of; each must exist.
    pub groups: Vec<String>,
    pub on_existing_attributes: OnExisting,
    pub on_existing_type: OnExisting,
    pub on_existing_groups: OnExisting,
}

/// A policy to attach to the certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionPolicy {
    /// An existing policy, by name.
    Existing(String),
    /// A policy made from `document` unless one of that name exists (the name is the
    /// document's hash, so an existing one holds the same document).
    Document { name: String, document: String },
}

/// One RegisterThing: the certificate (which must be PENDING_ACTIVATION) becomes
/// ACTIVE (or INACTIVE), attached to the thing and the policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provision {
    pub cert_id: String,
    /// Registers this certificate (id `cert_id`, which must be unknown) in the same
    /// commit, as just-in-time provisioning does; `None`: it is registered already.
    pub register: Option<NewCert>,
    pub activate: bool,
    pub thing: Option<ProvisionThing>,
    pub policies: Vec<ProvisionPolicy>,
    /// The caller's own records, written in the same commit (e.g. the ownership
    /// token's pending record, deleted).
    pub extra: Vec<RecordOp>,
}

/// What a provisioning did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub thing: Option<String>,
    pub thing_created: bool,
    pub policies_created: Vec<String>,
    pub state: CertState,
}

impl Registry {
    /// As [`Registry::register_certificate`], writing `extra` records in the same
    /// commit (a provisioning service's record of the certificate's deadline).
    pub async fn register_certificate_with(
        &self,
        c: NewCert,
        state: CertState,
        extra: Vec<RecordOp>,
    ) -> Result<CertRecord> {
        let (guard, keys) = self.reserve(vec![cert_key(&c.id)], |_| Vec::new()).await;
        if self.state.read().certs.contains_key(&c.id) {
            return Err(RegistryError::Conflict(format!(
                "certificate {} is already registered",
                c.id
            )));
        }
        let rec = cert_record(c, state, now_ms());
        let mut ops = vec![put(CERT, &rec.id, &rec)];
        ops.extend(extra);
        self.apply_pipelined(guard, keys, ops, |st| {
            st.certs.insert(rec.id.clone(), rec.clone());
        })
        .await?;
        Ok(rec)
    }

    /// Deletes certificate `id` if it is still PENDING_ACTIVATION with nothing
    /// attached, writing `extra` in the same commit; `extra` alone is written when the
    /// certificate is gone or was provisioned meanwhile. Returns whether it was deleted.
    pub async fn delete_unclaimed_certificate(
        &self,
        id: &str,
        extra: Vec<RecordOp>,
    ) -> Result<bool> {
        let _w = self.exclusive().await;
        let unclaimed = {
            let st = self.state.read();
            st.certs
                .get(id)
                .is_some_and(|c| c.state == CertState::PendingActivation)
                && st.cert_policies.get(id).is_none_or(|s| s.is_empty())
                && st.cert_things.get(id).is_none_or(|s| s.is_empty())
        };
        let mut ops = extra;
        if unclaimed {
            ops.push(del(CERT, id));
        }
        if ops.is_empty() {
            return Ok(false);
        }
        self.apply(ops, |st| {
            if unclaimed {
                st.certs.remove(id);
            }
        })
        .await?;
        Ok(unclaimed)
    }

    /// Whether `thing` is attached to certificate `cert_id`.
    pub fn is_attached(&self, cert_id: &str, thing: &str) -> bool {
        self.state
            .read()
            .cert_things
            .get(cert_id)
            .is_some_and(|t| t.contains(thing))
    }

    /// Applies one provisioning in a single commit: creates or updates the thing, its
    /// group memberships and the policies, attaches thing and policies to the
    /// certificate and moves it out of PENDING_ACTIVATION. Refused as a whole, with
    /// nothing written, when the certificate is not PENDING_ACTIVATION, a named
    /// policy or group does not exist, a limit would be broken, or an `OnExisting::Fail`
    /// property differs ([`RegistryError::Conflict`]).
    pub async fn provision(&self, p: Provision) -> Result<Provisioned> {
        // Pipelined: provisionings of other certificates and things validate and
        // submit while this one is written. A policy made from a document is reserved
        // only while it does not exist yet (the first of a storm makes it).
        let mut keys = vec![cert_key(&p.cert_id)];
        if let Some(t) = &p.thing {
            keys.push(format!("thing:{}", t.name));
        }
        let (guard, keys) = self
            .reserve(keys, |st| {
                p.policies
                    .iter()
                    .filter_map(|pol| match pol {
                        ProvisionPolicy::Document { name, .. }
                            if !st.policies.contains_key(name) =>
                        {
                            Some(format!("policy:{name}"))
                        }
                        _ => None,
                    })
                    .collect()
            })
            .await;
        let now = now_ms();
        let mut ops = Vec::new();
        let mut new_policies: Vec<(PolicyRecord, std::sync::Arc<fleetcore_policy::Policy>)> =
            Vec::new();
        let mut policy_names = BTreeSet::new();
        let mut thing_out: Option<Thing> = None;
        let mut thing_created = false;
        let mut joined: Vec<String> = Vec::new();
        let mut left: Vec<String> = Vec::new();
        let mut cert = {
            let st = self.state.read();
            let cert = match &p.register {
                Some(c) => {
                    if c.id != p.cert_id || st.certs.contains_key(&c.id) {
                        return Err(RegistryError::Conflict(format!(
                            "certificate {} is already registered",
                            c.id
                        )));
                    }
                    cert_record(c.clone(), CertState::PendingActivation, now)
                }
                None => st
                    .certs
                    .get(&p.cert_id)
                    .cloned()
                    .ok_or_else(|| not_found("certificate", &p.cert_id))?,
            };
            if cert.state != CertState::PendingActivation {
                return Err(RegistryError::Conflict(format!(
                    "certificate {} is {}; only a PENDING_ACTIVATION certificate can be provisioned",
                    cert.id, cert.state
                )));
            }
            for pol in &p.policies {
                match pol {
                    ProvisionPolicy::Existing(name) => {
                        if !st.policies.contains_key(name) {
                            return Err(not_found("policy", name));
                        }
                        policy_names.insert(name.clone());
                    }
                    ProvisionPolicy::Document { name, document } => {
                        valid_policy_name(name)?;
                        if !st.policies.contains_key(name)
                            && !new_policies.iter().any(|(r, _)| &r.name == name)
                        {
                            let compiled = compile(name, document)?;
                            let rec = PolicyRecord {
                                name: name.clone(),
                                versions: BTreeMap::from([(
                                    1,
                                    PolicyVersion {
                                        document: document.clone(),
                                        created_ms: now,
                                    },
                                )]),
                                default_version: 1,
                                created_ms: now,
                            };
                            ops.push(put(POLICY, name, &rec));
                            new_policies.push((rec, compiled));
                        }
                        policy_names.insert(name.clone());
                    }
                }
            }
            if let Some(t) = &p.thing {
                valid_thing_name(&t.name)?;
                let existing = st.things.get(&t.name);
                let thing = match existing {
                    None => {
                        thing_created = true;
                        Thing {
                            name: t.name.clone(),
                            thing_type: t.thing_type.clone(),
                            attributes: t.attributes.clone(),
                            version: 1,
                            created_ms: now,
                        }
                    }
                    Some(old) => {
                        let mut thing = old.clone();
                        thing.attributes = resolve_map(
                            &old.attributes,
                            &t.attributes,
                            t.on_existing_attributes,
                            &t.name,
                        )?;
                        if t.thing_type != old.thing_type && t.thing_type.is_some() {
                            match t.on_existing_type {
                                OnExisting::Keep => {}
                                OnExisting::Replace | OnExisting::Merge => {
                                    thing.thing_type = t.thing_type.clone()
                                }
                                OnExisting::Fail => {
                                    return Err(conflict(&t.name, "ThingTypeName"));
                                }
                            }
                        }
                        if thing != *old {
                            thing.version += 1;
                        }
                        thing
                    }
                };
                valid_attributes(&thing.attributes)?;
                if existing != Some(&thing) {
                    ops.push(put(THING, &thing.name, &thing));
                }
                let current: BTreeSet<String> = st.groups.of_thing(&t.name).into_iter().collect();
                let wanted: BTreeSet<String> = t.groups.iter().cloned().collect();
                for g in &wanted {
                    if st.groups.get(g).is_none() {
                        return Err(not_found("thing group", g));
                    }
                }
                let mode = if thing_created {
                    OnExisting::Merge
                } else {
                    t.on_existing_groups
                };
                let (add, remove): (Vec<String>, Vec<String>) = match mode {
                    OnExisting::Keep => (Vec::new(), Vec::new()),
                    OnExisting::Merge => {
                        (wanted.difference(&current).cloned().collect(), Vec::new())
                    }
                    OnExisting::Replace => (
                        wanted.difference(&current).cloned().collect(),
                        current.difference(&wanted).cloned().collect(),
                    ),
                    OnExisting::Fail => {
                        if !wanted.is_empty() && wanted != current {
                            return Err(conflict(&t.name, "ThingGroups"));
                        }
                        (Vec::new(), Vec::new())
                    }
                };
                if !add.is_empty() || !remove.is_empty() {
                    // Worked out on a copy (only when there is something to change:
                    // the copy holds every group), so every limit is checked against
                    // the memberships as they will be.
                    let mut groups = st.groups.clone();
                    for g in &remove {
                        groups.unlink(g, &t.name);
                        ops.push(Groups::del_membership(g, &t.name));
                    }
                    for g in &add {
                        groups.check_add(g, &t.name)?;
                        groups.link(g, &t.name);
                        ops.push(Groups::put_membership(g, &t.name));
                    }
                }
                joined = add;
                left = remove;
                let key = format!("{}/{}", p.cert_id, t.name);
                ops.push(put(THING_ATTACHMENT, &key, &true));
                thing_out = Some(thing);
            }
            cert
        };
        for name in &policy_names {
            ops.push(put(
                POLICY_ATTACHMENT,
                &format!("{}/{name}", p.cert_id),
                &true,
            ));
        }
        cert.state = if p.activate {
            CertState::Active
        } else {
            CertState::Inactive
        };
        cert.updated_ms = now;
        ops.push(put(CERT, &cert.id, &cert));
        ops.extend(p.extra);
        let thing_name = thing_out.as_ref().map(|t| t.name.clone());
        let state = cert.state;
        let policies_created: Vec<String> =
            new_policies.iter().map(|(r, _)| r.name.clone()).collect();
        self.apply_pipelined(guard, keys, ops, |st| {
            for (rec, compiled) in new_policies {
                st.policies.insert(rec.name.clone(), (rec, compiled));
            }
            if let Some(t) = thing_out {
                // The memberships as validated on a copy, applied to the groups as
                // they are now (other pipelined provisionings may have changed other
                // things' memberships meanwhile).
                for g in &left {
                    st.groups.unlink(g, &t.name);
                }
                for g in &joined {
                    st.groups.link(g, &t.name);
                }
                st.cert_things
                    .entry(cert.id.clone())
                    .or_default()
                    .insert(t.name.clone());
                st.things.insert(t.name.clone(), t);
            }
            st.cert_policies
                .entry(cert.id.clone())
                .or_default()
                .extend(policy_names);
            st.certs.insert(cert.id.clone(), cert);
        })
        .await?;
        if let Some(thing) = &thing_name {
            for (group, added) in joined
                .into_iter()
                .map(|g| (g, true))
                .chain(left.into_iter().map(|g| (g, false)))
            {
                self.tell(RegistryEvent::GroupMembershipChanged {
                    group,
                    thing: thing.clone(),
                    added,
                });
            }
        }
        Ok(Provisioned {
            thing: thing_name,
            thing_created,
            policies_created,
            state,
        })
    }
}

fn cert_key(id: &str) -> String {
    format!("cert:{id}")
}

fn cert_record(c: NewCert, state: CertState, now: u64) -> CertRecord {
    CertRecord {
        id: c.id,
        pem: c.pem,
        subject: c.subject,
        subject_cn: c.subject_cn,
        issuer: c.issuer,
        serial: c.serial,
        not_after_ms: c.not_after_ms,
        state,
        created_ms: now,
        updated_ms: now,
        revoked_ms: (state == CertState::Revoked).then_some(now),
    }
}

fn conflict(thing: &str, property: &str) -> RegistryError {
    RegistryError::Conflict(format!(
        "thing {thing:?} exists with a different {property} and the template says FAIL for it"
    ))
}

fn resolve_map(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
    mode: OnExisting,
    thing: &str,
) -> Result<BTreeMap<String, String>> {
    Ok(match mode {
        OnExisting::Keep => old.clone(),
        OnExisting::Replace => new.clone(),
        OnExisting::Merge => {
            let mut m = old.clone();
            m.extend(new.iter().map(|(k, v)| (k.clone(), v.clone())));
            m
        }
        OnExisting::Fail => {
            if !new.is_empty() && new != old {
                return Err(conflict(thing, "AttributePayload"));
            }
            old.clone()
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fleetcore_core::principal::ClientCert;
    use fleetcore_policy::Action;
    use fleetcore_store::Store;
    use parking_lot::Mutex;

    use super::*;
    use crate::token::TokenConfig;

    const DOC: &str = r#"{"Version":"2012-10-17","Statement":[
        {"Effect":"Allow","Action":"iot:Connect","Resource":"arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}"},
        {"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:*:*:topic/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*"}]}"#;

    fn open(dir: &std::path::Path) -> Registry {
        let (store, loaded) = Store::open(&dir.join("s.redb"), Default::default()).unwrap();
        Registry::new(Arc::new(store), &loaded.records, TokenConfig::default())
    }

    fn new_cert(id: &str) -> NewCert {
        NewCert {
            id: id.into(),
            pem: String::new(),
            subject: "CN=fleetcore provisioned device".into(),
            subject_cn: Some("fleetcore provisioned device".into()),
            issuer: "CN=test".into(),
            serial: "01".into(),
            not_after_ms: u64::MAX,
        }
    }

    fn thing(name: &str, attrs: &[(&str, &str)], groups: &[&str]) -> ProvisionThing {
        ProvisionThing {
            name: name.into(),
            thing_type: None,
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            on_existing_attributes: OnExisting::Keep,
            on_existing_type: OnExisting::Keep,
            on_existing_groups: OnExisting::Keep,
        }
    }

    fn provision(
        cert: &str,
        t: Option<ProvisionThing>,
        policies: Vec<ProvisionPolicy>,
    ) -> Provision {
        Provision {
            cert_id: cert.into(),
            register: None,
            activate: true,
            thing: t,
            policies,
            extra: Vec::new(),
        }
    }

    async fn pending(reg: &Registry, id: &str) {
        reg.register_certificate_with(new_cert(id), CertState::PendingActivation, Vec::new())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_pending_certificate_gets_thing_groups_and_policy_in_one_step_that_survives_a_restart(
    ) {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path());
        reg.create_group("site-1", None, None, BTreeMap::new())
            .await
            .unwrap();
        pending(&reg, "c1").await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        reg.on_event(move |e| s.lock().push(e.clone()));
        let doc = ProvisionPolicy::Document {
            name: "p-hash".into(),
            document: DOC.into(),
        };
        let done = reg
            .provision(provision(
                "c1",
                Some(thing("agent-1", &[("account", "customer-a")], &["site-1"])),
                vec![doc],
            ))
            .await
            .unwrap();
        assert!(done.thing_created);
        assert_eq!(done.state, CertState::Active);
        assert_eq!(done.policies_created, vec!["p-hash".to_string()]);
        assert_eq!(
            *seen.lock(),
            vec![RegistryEvent::GroupMembershipChanged {
                group: "site-1".into(),
                thing: "agent-1".into(),
                added: true
            }]
        );
        drop(reg);
        let reg = open(dir.path());
        assert_eq!(reg.certificate_state("c1"), Some(CertState::Active));
        assert_eq!(reg.certificate_things("c1"), vec!["agent-1".to_string()]);
        assert_eq!(reg.certificate_policies("c1"), vec!["p-hash".to_string()]);
        assert_eq!(reg.thing_groups("agent-1"), vec!["site-1".to_string()]);
        // The thing variables bind through the client id: the CN names no thing.
        let cert = ClientCert {
            subject_cn: Some("fleetcore provisioned device".into()),
            fingerprint: "c1".into(),
            ..ClientCert::default()
        };
        let authz = reg.resolve(&cert, "agent-1").unwrap();
        assert!(authz.allows(Action::Connect, "agent-1"));
        assert!(authz.allows(Action::Publish, "customer-a/agent-1/status"));
        assert!(!authz.allows(Action::Publish, "customer-b/agent-1/status"));
        let other = reg.resolve(&cert, "agent-2").unwrap();
        assert!(!other.allows(Action::Connect, "agent-2"));
    }

    #[tokio::test]
    async fn nothing_is_written_when_any_part_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path());
        pending(&reg, "c1").await;
        let missing_policy = reg
            .provision(provision(
                "c1",
                Some(thing("agent-1", &[], &[])),
                vec![ProvisionPolicy::Existing("nope".into())],
            ))
            .await
            .unwrap_err();
        assert!(
            matches!(missing_policy, RegistryError::NotFound(_)),
            "{missing_policy}"
        );
        let missing_group = reg
            .provision(provision(
                "c1",
                Some(thing("agent-1", &[], &["no-group"])),
                vec![],
            ))
            .await
            .unwrap_err();
        assert!(
            missing_group.to_string().contains("no-group"),
            "{missing_group}"
        );
        let bad_doc = reg
            .provision(provision(
                "c1",
                Some(thing("agent-1", &[], &[])),
                vec![ProvisionPolicy::Document {
                    name: "x".into(),
                    document: "{}".into(),
                }],
            ))
            .await
            .unwrap_err();
        assert!(matches!(bad_doc, RegistryError::Invalid(_)), "{bad_doc}");
        assert!(reg.thing("agent-1").is_none());
        assert_eq!(
            reg.certificate_state("c1"),
            Some(CertState::PendingActivation)
        );
        assert!(reg.policy("x").is_none());
        // Only a PENDING_ACTIVATION certificate: the second use of one is refused.
        reg.provision(provision("c1", Some(thing("agent-1", &[], &[])), vec![]))
            .await
            .unwrap();
        let again = reg
            .provision(provision("c1", Some(thing("agent-1", &[], &[])), vec![]))
            .await
            .unwrap_err();
        assert!(matches!(again, RegistryError::Conflict(_)), "{again}");
    }

    #[tokio::test]
    async fn override_settings_decide_what_happens_to_an_existing_thing() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path());
        let attrs = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        reg.create_thing(
            "agent-1",
            Some("agent".into()),
            attrs(&[("a", "1"), ("b", "2")]),
        )
        .await
        .unwrap();
        for (i, (mode, expect)) in [
            (OnExisting::Keep, attrs(&[("a", "1"), ("b", "2")])),
            (
                OnExisting::Merge,
                attrs(&[("a", "9"), ("b", "2"), ("c", "3")]),
            ),
            (OnExisting::Replace, attrs(&[("a", "9"), ("c", "3")])),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("c{i}");
            pending(&reg, &id).await;
            let mut t = thing("agent-1", &[("a", "9"), ("c", "3")], &[]);
            t.on_existing_attributes = mode;
            let done = reg
                .provision(provision(&id, Some(t), vec![]))
                .await
                .unwrap();
            assert!(!done.thing_created);
            assert_eq!(reg.thing("agent-1").unwrap().attributes, expect, "{mode:?}");
        }
        pending(&reg, "cf").await;
        let mut t = thing("agent-1", &[("a", "other")], &[]);
        t.on_existing_attributes = OnExisting::Fail;
        let e = reg
            .provision(provision("cf", Some(t), vec![]))
            .await
            .unwrap_err();
        assert!(
            matches!(e, RegistryError::Conflict(_)) && e.to_string().contains("AttributePayload"),
            "{e}"
        );
        assert_eq!(
            reg.certificate_state("cf"),
            Some(CertState::PendingActivation)
        );
    }

    #[tokio::test]
    async fn registering_with_the_provisioning_and_deleting_unclaimed_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let reg = open(dir.path());
        // JITP: registered and provisioned in one commit.
        let mut p = provision("j1", Some(thing("legacy-1", &[], &[])), vec![]);
        p.register = Some(new_cert("j1"));
        reg.provision(p.clone()).await.unwrap();
        assert_eq!(reg.certificate_state("j1"), Some(CertState::Active));
        let twice = reg.provision(p).await.unwrap_err();
        assert!(matches!(twice, RegistryError::Conflict(_)), "{twice}");
        // An unclaimed pending certificate goes; a provisioned one stays.
        pending(&reg, "u1").await;
        assert!(reg
            .delete_unclaimed_certificate("u1", Vec::new())
            .await
            .unwrap());
        assert!(reg.certificate("u1").is_none());
        assert!(!reg
            .delete_unclaimed_certificate("j1", Vec::new())
            .await
            .unwrap());
        assert!(reg.certificate("j1").is_some());
    }
}

#[cfg(test)]
mod pipelining {
    use std::sync::Arc;
    use std::time::Duration;

    use fleetcore_core::storage::{Commit, RecordStore};
    use parking_lot::Mutex;
    use tokio::sync::oneshot;

    use super::*;
    use crate::token::TokenConfig;

    type Reply =
        oneshot::Sender<std::result::Result<Vec<u64>, fleetcore_core::storage::StoreError>>;

    /// A store whose commits resolve only when the test says so.
    #[derive(Default)]
    struct Gated {
        held: Mutex<Vec<(Vec<RecordOp>, Reply)>>,
    }

    impl RecordStore for Gated {
        fn submit_records(&self, ops: Vec<RecordOp>) -> fleetcore_core::storage::RecordCommit {
            let (tx, rx) = oneshot::channel();
            self.held.lock().push((ops, tx));
            Commit::waiting(rx)
        }
    }

    impl Gated {
        fn submitted(&self) -> usize {
            self.held.lock().len()
        }
        fn release_all(&self) {
            // Revisions 5, 6, ... for the writes of each submit.
            for (ops, tx) in self.held.lock().drain(..) {
                let writes = ops
                    .iter()
                    .filter(|op| !matches!(op, RecordOp::Expect { .. }))
                    .count() as u64;
                let _ = tx.send(Ok((5..5 + writes).collect()));
            }
        }
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("{what}");
    }

    fn new_cert(id: &str) -> NewCert {
        NewCert {
            id: id.into(),
            pem: String::new(),
            subject: "CN=x".into(),
            subject_cn: None,
            issuer: "CN=test".into(),
            serial: "01".into(),
            not_after_ms: u64::MAX,
        }
    }

    /// What another node stored for a record this registry is writing waits for the
    /// write to end, then goes in only if its revision is later: memory follows the
    /// store's order, not the order the changes happened to arrive in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_from_another_node_to_a_record_being_written_waits_and_the_later_one_wins() {
        let thing = |attr: &str| {
            serde_json::to_vec(&Thing {
                name: "t".into(),
                thing_type: None,
                attributes: BTreeMap::from([(attr.to_string(), "1".to_string())]),
                version: 9,
                created_ms: 1,
            })
            .unwrap()
        };
        for (revision, other_wins) in [(100, true), (3, false)] {
            let store = Arc::new(Gated::default());
            let reg = Arc::new(Registry::new(store.clone(), &[], TokenConfig::default()));
            let writer = reg.clone();
            let write =
                tokio::spawn(async move { writer.create_thing("t", None, BTreeMap::new()).await });
            until("the create is submitted", || store.submitted() == 1).await;
            // Expected to be new: the registry had no record of it.
            assert!(store.held.lock()[0].0.contains(&RecordOp::Expect {
                kind: THING,
                key: "t".into(),
                revision: None,
            }));
            let g = reg.generation();
            reg.apply_stored(THING, "t", Some(&thing("other")), revision);
            assert!(
                reg.thing("t").is_none(),
                "applied while this node was writing it"
            );
            assert_eq!(reg.generation(), g);
            store.release_all();
            write.await.unwrap().unwrap();
            // This node's create got revision 5.
            let t = reg.thing("t").unwrap();
            assert_eq!(t.attributes.contains_key("other"), other_wins, "{t:?}");
            // A change older than what memory holds is dropped, the same one again too.
            reg.apply_stored(THING, "t", Some(&thing("older")), 4);
            assert!(!reg.thing("t").unwrap().attributes.contains_key("older"));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provisionings_of_other_things_are_submitted_while_one_is_written_and_others_wait() {
        let store = Arc::new(Gated::default());
        let reg = Arc::new(Registry::new(store.clone(), &[], TokenConfig::default()));
        // Two certificates registered at once: both submitted before either is on disk.
        let (a, b) = (reg.clone(), reg.clone());
        let ta = tokio::spawn(async move {
            a.register_certificate_with(new_cert("c1"), CertState::PendingActivation, vec![])
                .await
        });
        let tb = tokio::spawn(async move {
            b.register_certificate_with(new_cert("c2"), CertState::PendingActivation, vec![])
                .await
        });
        until("both submitted", || store.submitted() == 2).await;
        // Not applied before it is on disk.
        assert!(reg.certificate("c1").is_none() && reg.certificate("c2").is_none());
        // An ordinary change waits for them: nothing more is submitted.
        let c = reg.clone();
        let tc = tokio::spawn(async move { c.create_thing("other", None, BTreeMap::new()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.submitted(), 2);
        store.release_all();
        ta.await.unwrap().unwrap();
        tb.await.unwrap().unwrap();
        until("the ordinary change submitted", || store.submitted() == 1).await;
        store.release_all();
        tc.await.unwrap().unwrap();
        assert_eq!(
            reg.certificate_state("c1"),
            Some(CertState::PendingActivation)
        );

        // The same certificate twice at once: the second waits for the first and is
        // then refused (the key is reserved until the first is applied).
        let prov = |cert: &str, thing: &str| Provision {
            cert_id: cert.into(),
            register: None,
            activate: true,
            thing: Some(ProvisionThing {
                name: thing.into(),
                thing_type: None,
                attributes: BTreeMap::new(),
                groups: vec![],
                on_existing_attributes: OnExisting::Keep,
                on_existing_type: OnExisting::Keep,
                on_existing_groups: OnExisting::Keep,
            }),
            policies: vec![],
            extra: vec![],
        };
        let (a, b) = (reg.clone(), reg.clone());
        let (pa, pb) = (prov("c1", "t1"), prov("c1", "t1"));
        let ta = tokio::spawn(async move { a.provision(pa).await });
        until("first submitted", || store.submitted() == 1).await;
        let tb = tokio::spawn(async move { b.provision(pb).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.submitted(), 1, "the second waits for the first");
        store.release_all();
        ta.await.unwrap().unwrap();
        let second = tb.await.unwrap().unwrap_err();
        assert!(matches!(second, RegistryError::Conflict(_)), "{second}");
        // Another certificate and thing meanwhile: submitted at once.
        let a = reg.clone();
        let ta = tokio::spawn(async move { a.provision(prov("c2", "t2")).await });
        until("submitted", || store.submitted() == 1).await;
        store.release_all();
        ta.await.unwrap().unwrap();
        assert!(reg.is_attached("c1", "t1") && reg.is_attached("c2", "t2"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_at_once_each_get_their_thing_group_and_the_one_shared_policy() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let (store, loaded) =
                fleetcore_store::Store::open(&dir.path().join("s.redb"), Default::default())
                    .unwrap();
            (
                Arc::new(Registry::new(
                    Arc::new(store.clone()),
                    &loaded.records,
                    TokenConfig::default(),
                )),
                store,
            )
        };
        let (reg, store) = open();
        reg.create_group("site-1", None, None, BTreeMap::new())
            .await
            .unwrap();
        let doc = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#;
        let n = 40;
        let mut tasks = Vec::new();
        for i in 0..n {
            let reg = reg.clone();
            tasks.push(tokio::spawn(async move {
                let cert = format!("c{i}");
                reg.register_certificate_with(
                    new_cert(&cert),
                    CertState::PendingActivation,
                    vec![],
                )
                .await?;
                reg.provision(Provision {
                    cert_id: cert,
                    register: None,
                    activate: true,
                    thing: Some(ProvisionThing {
                        name: format!("agent-{i}"),
                        thing_type: None,
                        attributes: BTreeMap::new(),
                        groups: vec!["site-1".into()],
                        on_existing_attributes: OnExisting::Keep,
                        on_existing_type: OnExisting::Keep,
                        on_existing_groups: OnExisting::Keep,
                    }),
                    policies: vec![ProvisionPolicy::Document {
                        name: "shared".into(),
                        document: doc.into(),
                    }],
                    extra: vec![],
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let check = |reg: &Registry| {
            assert_eq!(reg.group_things("site-1", false).unwrap().len(), n);
            assert_eq!(reg.policies().len(), 1);
            for i in 0..n {
                let cert = format!("c{i}");
                assert_eq!(reg.certificate_state(&cert), Some(CertState::Active));
                assert!(reg.is_attached(&cert, &format!("agent-{i}")));
                assert_eq!(reg.certificate_policies(&cert), vec!["shared".to_string()]);
            }
        };
        check(&reg);
        let commits = store.commit_count();
        println!("{} commits for {} changes", commits, 2 * n + 1);
        drop((reg, store));
        let (reg, _store) = open();
        check(&reg);
    }
}
