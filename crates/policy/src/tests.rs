//! Whole-policy behaviour: the project's own agent policy, IoT Core's documented examples
//! (rewritten), variable injection, and the errors a policy author sees.

use crate::{Action, Bound, Decision, Policy, PolicyError, Vars};

fn policy(json: &str) -> Policy {
    match Policy::parse(json) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn error(json: &str) -> PolicyError {
    match Policy::parse(json) {
        Ok(p) => panic!("accepted: {p:?}"),
        Err(e) => e,
    }
}

fn thing(name: &str) -> Vars {
    Vars {
        client_id: Some(name.into()),
        thing_name: Some(name.into()),
        thing_attached: Some(true),
        ..Vars::default()
    }
}

/// The shared `agent` policy from iot-core-semantics.md.
const AGENT: &str = r#"{ "Version": "2012-10-17",
  "Statement": [
    { "Effect": "Allow", "Action": "iot:Connect",
      "Resource": "arn:aws:iot:*:*:client/${iot:Connection.Thing.ThingName}" },
    { "Effect": "Allow", "Action": "iot:Subscribe",
      "Resource": "arn:aws:iot:*:*:topicfilter/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*" },
    { "Effect": "Allow", "Action": ["iot:Receive", "iot:Publish"],
      "Resource": "arn:aws:iot:*:*:topic/${iot:Connection.Thing.Attributes[account]}/${iot:Connection.Thing.ThingName}/*" } ] }"#;

fn computer_a() -> Vars {
    Vars {
        thing_attributes: vec![("account".into(), "customer-b".into())],
        ..thing("computer-a")
    }
}

#[test]
fn agent_connects_only_as_its_own_thing() {
    let b = Bound::new(&[&policy(AGENT)], &computer_a());
    assert_eq!(b.decide(Action::Connect, "computer-a"), Decision::Allow);
    assert_eq!(
        b.decide(Action::Connect, "computer-b"),
        Decision::ImplicitDeny
    );
    assert!(!b.allows(Action::Connect, "computer-a2"));
}

#[test]
fn agent_subscribes_only_under_its_account_and_name() {
    let b = Bound::new(&[&policy(AGENT)], &computer_a());
    // `*` in the policy spans `#` in the filter: `#` is just a character there.
    assert!(b.allows(Action::Subscribe, "customer-b/computer-a/#"));
    assert!(b.allows(Action::Subscribe, "customer-b/computer-a/+/status"));
    assert!(!b.allows(Action::Subscribe, "customer-b/computer-b/#"));
    assert!(!b.allows(Action::Subscribe, "customer-b/#"));
    assert!(!b.allows(Action::Subscribe, "customer-b/+/#"));
    assert!(!b.allows(Action::Subscribe, "#"));
    assert!(!b.allows(Action::Subscribe, "customer-b/computer-a"));
}

#[test]
fn agent_publishes_and_receives_on_its_own_topics_only() {
    let b = Bound::new(&[&policy(AGENT)], &computer_a());
    for action in [Action::Publish, Action::Receive] {
        assert!(b.allows(action, "customer-b/computer-a/configurationChanges"));
        assert!(b.allows(action, "customer-b/computer-a/a/b/c"));
        assert!(!b.allows(action, "customer-b/computer-b/configurationChanges"));
        assert!(!b.allows(action, "customer-c/computer-a/configurationChanges"));
        assert!(!b.allows(action, "customer-b/computer-a"));
    }
    // Retained publishes need their own grant, and topics are not filters.
    assert_eq!(
        b.decide(Action::RetainPublish, "customer-b/computer-a/x"),
        Decision::ImplicitDeny
    );
    assert!(!b.allows(Action::Subscribe, "customer-b/computer-a-x/#"));
}

#[test]
fn agent_without_an_account_attribute_gets_only_connect() {
    let b = Bound::new(&[&policy(AGENT)], &thing("computer-a"));
    assert!(b.allows(Action::Connect, "computer-a"));
    assert!(!b.allows(Action::Subscribe, "customer-b/computer-a/#"));
    assert!(!b.allows(Action::Publish, "/computer-a/x"));
    assert!(!b.allows(
        Action::Publish,
        "${iot:Connection.Thing.Attributes[account]}/computer-a/x"
    ));
}

#[test]
fn explicit_deny_beats_allow_for_named_clients() {
    // IoT Core's connect example: two client ids are refused, every registered thing may
    // connect under its own name.
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Deny", "Action": ["iot:Connect"], "Resource": [
                "arn:aws:iot:us-east-1:123456789012:client/client1",
                "arn:aws:iot:us-east-1:123456789012:client/client2"]},
            {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": [
                "arn:aws:iot:us-east-1:123456789012:client/${iot:Connection.Thing.ThingName}"]}]}"#,
    );
    let b = Bound::new(&[&p], &thing("client1"));
    assert_eq!(b.decide(Action::Connect, "client1"), Decision::ExplicitDeny);
    let b = Bound::new(&[&p], &thing("lamp-7"));
    assert_eq!(b.decide(Action::Connect, "lamp-7"), Decision::Allow);
    assert_eq!(b.decide(Action::Connect, "lamp-8"), Decision::ImplicitDeny);
    assert_eq!(b.decide(Action::Connect, "client2"), Decision::ExplicitDeny);
}

#[test]
fn a_deny_in_another_attached_policy_still_wins() {
    let allow = policy(
        r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow",
            "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/department/*"}}"#,
    );
    let deny = policy(
        r#"{"Version": "2012-10-17", "Statement": {"Effect": "Deny",
            "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/department/admins/*"}}"#,
    );
    let b = Bound::new(&[&allow, &deny], &Vars::default());
    assert_eq!(
        b.decide(Action::Publish, "department/sales/report"),
        Decision::Allow
    );
    assert_eq!(
        b.decide(Action::Publish, "department/admins/passwords"),
        Decision::ExplicitDeny
    );
    // The deny is about publishing only.
    let both = Bound::new(&[&deny, &allow], &Vars::default());
    assert_eq!(
        both.decide(Action::Receive, "department/admins/x"),
        Decision::ImplicitDeny
    );
}

#[test]
fn mqtt_wildcards_in_a_policy_are_literal() {
    // IoT Core's example: this grants exactly the filter `foo/+/bar`, nothing it would match.
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["iot:Connect"], "Resource": ["*"]},
            {"Effect": "Allow", "Action": ["iot:Subscribe"],
             "Resource": ["arn:aws:iot:us-east-1:123456789012:topicfilter/foo/+/bar"]}]}"#,
    );
    let b = Bound::new(&[&p], &Vars::default());
    assert!(b.allows(Action::Subscribe, "foo/+/bar"));
    assert!(!b.allows(Action::Subscribe, "foo/baz/bar"));
    assert!(!b.allows(Action::Subscribe, "foo/#"));
    assert!(b.allows(Action::Connect, "anyone"));
}

#[test]
fn question_mark_matches_exactly_one_character() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow",
            "Action": ["iot:Subscribe", "iot:Publish"],
            "Resource": ["arn:aws:iot:*:*:topicfilter/some/sensor???/topic",
                         "arn:aws:iot:*:*:topic/some/?????/topic"]}}"#,
    );
    let b = Bound::new(&[&p], &Vars::default());
    assert!(b.allows(Action::Subscribe, "some/sensor123/topic"));
    assert!(b.allows(Action::Subscribe, "some/sensor+/#/topic"));
    assert!(!b.allows(Action::Subscribe, "some/sensor12/topic"));
    assert!(!b.allows(Action::Subscribe, "some/sensor1234/topic"));
    assert!(b.allows(Action::Publish, "some/abcde/topic"));
    assert!(!b.allows(Action::Publish, "some/abcd/topic"));
    // A topic resource does not grant Subscribe, nor a topicfilter one Publish.
    assert!(!b.allows(Action::Publish, "some/sensor123/topic"));
    assert!(!b.allows(Action::Subscribe, "some/abcde/topic"));
}

#[test]
fn iot_star_on_every_resource_allows_everything() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["iot:*"], "Resource": ["*"]}]}"#,
    );
    let b = Bound::new(&[&p], &Vars::default());
    for action in Action::ALL {
        assert!(b.allows(action, "any/thing/#"), "{action}");
    }
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow",
            "Action": "*", "Resource": "arn:aws:iot:us-east-1:123456789012:*"}}"#,
    );
    let b = Bound::new(&[&p], &Vars::default());
    assert!(b.allows(Action::DeleteThingShadow, "t1"));
}

#[test]
fn a_resource_of_the_wrong_type_never_matches_its_action() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow",
            "Action": ["iot:Connect", "iot:Publish", "iot:GetThingShadow"],
            "Resource": "arn:aws:iot:*:*:topic/*"}}"#,
    );
    let b = Bound::new(&[&p], &Vars::default());
    assert!(b.allows(Action::Publish, "x"));
    assert!(!b.allows(Action::Connect, "x"));
    assert!(!b.allows(Action::GetThingShadow, "x"));
    assert!(!b.allows(Action::Receive, "x"));
}

#[test]
fn each_thing_reaches_only_its_own_shadow() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": ["iot:GetThingShadow", "iot:UpdateThingShadow"],
             "Resource": ["arn:aws:iot:*:*:thing/${iot:Connection.Thing.ThingName}",
                          "arn:aws:iot:*:*:thing/${iot:Connection.Thing.ThingName}/*"]},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": "arn:aws:iot:*:*:topic/$aws/things/${iot:Connection.Thing.ThingName}/shadow/*"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": "arn:aws:iot:*:*:topicfilter/$aws/things/${iot:Connection.Thing.ThingName}/shadow/*"}]}"#,
    );
    let b = Bound::new(&[&p], &thing("lamp-7"));
    assert!(b.allows(Action::GetThingShadow, "lamp-7"));
    assert!(b.allows(Action::UpdateThingShadow, "lamp-7/config"));
    assert!(!b.allows(Action::GetThingShadow, "lamp-8"));
    assert!(!b.allows(Action::DeleteThingShadow, "lamp-7"));
    assert!(b.allows(Action::Publish, "$aws/things/lamp-7/shadow/update"));
    assert!(b.allows(Action::Subscribe, "$aws/things/lamp-7/shadow/update/#"));
    assert!(!b.allows(Action::Subscribe, "$aws/things/+/shadow/update/#"));
    assert!(!b.allows(Action::Receive, "$aws/things/lamp-8/shadow/update/accepted"));
}

#[test]
fn certificate_variables_use_short_attribute_names() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect",
             "Resource": "arn:aws:iot:*:*:client/${iot:Certificate.Subject.CommonName}"},
            {"Effect": "Allow", "Action": "iot:Publish",
             "Resource": "arn:aws:iot:*:*:topic/${iot:Certificate.Subject.Organization}/${iot:Certificate.Issuer.CommonName}/${iot:Certificate.SerialNumber}"}]}"#,
    );
    let vars = Vars {
        cert_subject: vec![("O".into(), "acme".into()), ("CN".into(), "dev-9".into())],
        cert_issuer: vec![("CN".into(), "fleet-ca".into())],
        cert_serial: Some("0a1b".into()),
        ..Vars::default()
    };
    let b = Bound::new(&[&p], &vars);
    assert!(b.allows(Action::Connect, "dev-9"));
    assert!(b.allows(Action::Publish, "acme/fleet-ca/0a1b"));
    assert!(!b.allows(Action::Publish, "acme/fleet-ca/0a1c"));
}

#[test]
fn actions_are_read_in_any_case() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow",
            "Action": ["iot:connect", "IOT:Publish", "iot:GetRetainedMessage"], "Resource": "*"}}"#,
    );
    let b = Bound::new(&[&p], &Vars::default());
    assert!(b.allows(Action::Connect, "c"));
    assert!(b.allows(Action::Publish, "t"));
    assert!(!b.allows(Action::Receive, "t"));
}

#[test]
fn no_policy_denies_everything() {
    for b in [Bound::new(&[], &computer_a()), Bound::default()] {
        for action in Action::ALL {
            assert_eq!(b.decide(action, "x"), Decision::ImplicitDeny);
        }
    }
}

/// Client ids and thing names are chosen by whoever holds the certificate (or the
/// registry); none of these may widen a grant, and the unsubstituted text must not be
/// matchable either.
#[test]
fn wildcard_characters_in_variable_values_never_match() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect",
             "Resource": "arn:aws:iot:*:*:client/${iot:ClientId}"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": "arn:aws:iot:*:*:topic/dev/${iot:ClientId}"},
            {"Effect": "Allow", "Action": "iot:Subscribe",
             "Resource": ["arn:aws:iot:*:*:topicfilter/dev/${iot:ClientId}",
                          "arn:aws:iot:*:*:topicfilter/things/${iot:Connection.Thing.ThingName}/*"]}]}"#,
    );
    for id in ["+", "#", "*", "a/+", "${x}", "?", "a$b", "dev*"] {
        let vars = Vars {
            client_id: Some(id.into()),
            thing_name: Some(id.into()),
            ..Vars::default()
        };
        let b = Bound::new(&[&p], &vars);
        assert!(!b.allows(Action::Connect, id), "{id}");
        assert!(!b.allows(Action::Connect, "${iot:ClientId}"), "{id}");
        for action in [Action::Publish, Action::Receive, Action::Subscribe] {
            for name in [
                format!("dev/{id}"),
                "dev/${iot:ClientId}".to_owned(),
                "dev/anything".to_owned(),
                "dev/a/+".to_owned(),
                format!("things/{id}/x"),
                "things/${iot:Connection.Thing.ThingName}/x".to_owned(),
            ] {
                assert_eq!(
                    b.decide(action, &name),
                    Decision::ImplicitDeny,
                    "{id} {action} {name}"
                );
            }
        }
    }
    // The same policy works for an ordinary id.
    let b = Bound::new(&[&p], &thing("dev-1"));
    assert!(b.allows(Action::Connect, "dev-1"));
    assert!(b.allows(Action::Subscribe, "dev/dev-1"));
    assert!(b.allows(Action::Subscribe, "things/dev-1/#"));
}

#[test]
fn escapes_let_a_policy_name_wildcard_characters_literally() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Statement": {"Effect": "Allow",
            "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/odd/${*}/${?}/${$}{x}"}}"#,
    );
    let b = Bound::new(&[&p], &Vars::default());
    assert!(b.allows(Action::Publish, "odd/*/?/${x}"));
    assert!(!b.allows(Action::Publish, "odd/a/b/${x}"));
}

#[test]
fn a_statement_may_be_a_single_object_and_keep_its_sid() {
    let p = policy(
        r#"{"Version": "2012-10-17", "Id": "agents", "Statement":
            {"Sid": "connect", "Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}}"#,
    );
    assert!(Bound::new(&[&p], &Vars::default()).allows(Action::Connect, "x"));
}

// ---- errors -------------------------------------------------------------------------

const OK_STATEMENT: &str = r#"{"Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}"#;

fn with_second_statement(statement: &str) -> String {
    format!(r#"{{"Version": "2012-10-17", "Statement": [{OK_STATEMENT}, {statement}]}}"#)
}

#[test]
fn a_version_other_than_2012_10_17_is_refused() {
    let e = error(r#"{"Version": "2008-10-17", "Statement": []}"#);
    assert_eq!(
        e.to_string(),
        "Version: \"2008-10-17\" is not supported: use \"2012-10-17\""
    );
    assert_eq!(e.statement, None);
    assert_eq!(e.field, "Version");
    let e = error(&format!(r#"{{"Statement": [{OK_STATEMENT}]}}"#));
    assert_eq!(
        e.to_string(),
        "Version: missing: add \"Version\": \"2012-10-17\""
    );
}

#[test]
fn a_missing_effect_names_the_statement_and_field() {
    let e = error(&with_second_statement(
        r#"{"Sid": "agent", "Action": "iot:Connect", "Resource": "*"}"#,
    ));
    assert_eq!(
        e.to_string(),
        "Statement[1] (Sid \"agent\"): Effect: missing: \"Allow\" or \"Deny\""
    );
    assert_eq!(
        (e.statement, e.sid.as_deref(), e.field),
        (Some(1), Some("agent"), "Effect")
    );
    let e = error(&with_second_statement(
        r#"{"Effect": "allow", "Action": "iot:Connect", "Resource": "*"}"#,
    ));
    assert_eq!(
        e.to_string(),
        "Statement[1]: Effect: \"allow\" is not \"Allow\" or \"Deny\""
    );
}

#[test]
fn an_unknown_action_is_refused() {
    let e = error(&with_second_statement(
        r#"{"Sid": "agent", "Effect": "Allow", "Action": ["iot:Publish", "iot:Conect"], "Resource": "*"}"#,
    ));
    assert_eq!(e.field, "Action");
    assert!(
        e.to_string()
            .starts_with("Statement[1] (Sid \"agent\"): Action: unknown action \"iot:Conect\" (fleetcore enforces iot:Connect, "),
        "{e}"
    );
}

#[test]
fn a_bad_arn_type_is_refused() {
    let e = error(&with_second_statement(
        r#"{"Sid": "agent", "Effect": "Allow", "Action": "iot:Publish", "Resource": ["arn:aws:iot:*:*:topic/a", "arn:aws:iot:*:*:topik/a"]}"#,
    ));
    assert_eq!(
        e.to_string(),
        "Statement[1] (Sid \"agent\"): Resource: \"arn:aws:iot:*:*:topik/a\" is not a client/, topic/, topicfilter/ or thing/ resource"
    );
}

#[test]
fn an_unknown_variable_is_refused() {
    let e = error(&with_second_statement(
        r#"{"Effect": "Allow", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/${iot:Connection.Thing.Name}/*"}"#,
    ));
    assert_eq!(
        e.to_string(),
        "Statement[1]: Resource: \"arn:aws:iot:*:*:topic/${iot:Connection.Thing.Name}/*\": unknown policy variable ${iot:Connection.Thing.Name}"
    );
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let e = error(&with_second_statement(
        r#"{"Effect": "Allow", "Action": "iot:Publish", "Resource": "*", "Resorce": "*"}"#,
    ));
    assert_eq!(
        e.to_string(),
        "Statement[1]: Statement: unknown key \"Resorce\" (a statement has Effect, Action, Resource and optionally Sid)"
    );
    let e = error(&with_second_statement(
        r#"{"effect": "Allow", "Action": "iot:Publish", "Resource": "*"}"#,
    ));
    assert!(e
        .to_string()
        .contains("unknown key \"effect\" (keys are case-sensitive: did you mean \"Effect\"?)"));
    let e = error(&format!(
        r#"{{"Version": "2012-10-17", "Statment": [{OK_STATEMENT}]}}"#
    ));
    assert_eq!(e.field, "document");
    assert!(e
        .to_string()
        .starts_with("document: unknown key \"Statment\""));
}

#[test]
fn not_action_not_resource_and_condition_are_refused_as_unsupported() {
    for (key, value) in [
        ("NotAction", r#""iot:Connect""#),
        ("NotResource", r#""*""#),
        (
            "Condition",
            r#"{"Bool": {"iot:Connection.Thing.IsAttached": "true"}}"#,
        ),
    ] {
        let e = error(&with_second_statement(&format!(
            r#"{{"Sid": "s", "Effect": "Allow", "Action": "iot:Connect", "Resource": "*", "{key}": {value}}}"#
        )));
        assert_eq!(e.field, key);
        assert!(
            e.to_string().starts_with(&format!(
                "Statement[1] (Sid \"s\"): {key}: not supported by fleetcore"
            )),
            "{e}"
        );
    }
}

#[test]
fn empty_lists_and_wrong_types_are_refused() {
    let cases = [
        (
            r#"{"Version": "2012-10-17", "Statement": []}"#.to_owned(),
            "Statement: empty list",
        ),
        (
            with_second_statement(r#"{"Effect": "Allow", "Action": [], "Resource": "*"}"#),
            "Statement[1]: Action: empty list",
        ),
        (
            with_second_statement(
                r#"{"Effect": "Allow", "Action": "iot:Connect", "Resource": []}"#,
            ),
            "Statement[1]: Resource: empty list",
        ),
        (
            with_second_statement(r#"{"Effect": "Allow", "Action": "iot:Connect"}"#),
            "Statement[1]: Resource: missing",
        ),
        (
            with_second_statement(r#"{"Effect": "Allow", "Action": [1], "Resource": "*"}"#),
            "Statement[1]: Action: entry 0 must be a string, not a number",
        ),
        (
            with_second_statement(r#""iot:Connect""#),
            "Statement[1]: Statement: must be an object, not a string",
        ),
        (
            with_second_statement(
                r#"{"Sid": 7, "Effect": "Allow", "Action": "iot:Connect", "Resource": "*"}"#,
            ),
            "Statement[1]: Sid: must be a string, not a number",
        ),
        (
            r#"[]"#.to_owned(),
            "document: must be a JSON object, not a list",
        ),
    ];
    for (json, expected) in cases {
        assert_eq!(error(&json).to_string(), expected, "{json}");
    }
    assert!(error("{\"Version\": ")
        .to_string()
        .starts_with("document: not valid JSON: "));
}
