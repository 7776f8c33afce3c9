use super::*;
use serde_json::json;

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn parse(v: Value) -> Template {
    Template::parse(&v.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

/// The parse error of `v`, which must start with `path: ` and contain `needle`.
fn refused(v: Value, path: &str, needle: &str) {
    let err = Template::parse(&v.to_string()).expect_err("should be refused");
    assert!(
        err.0.starts_with(&format!("{path}: ")),
        "expected path {path:?} in {:?}",
        err.0
    );
    assert!(err.0.contains(needle), "expected {needle:?} in {:?}", err.0);
}

/// A template with `name` as the thing's ThingName.
fn thing_named(name: Value) -> Value {
    json!({
        "Parameters": {"A": {"Type": "String"}, "B": {"Type": "String", "Default": "b"}},
        "Mappings": {"Regions": {"eu": {"group": "europe"}, "us": {"group": "americas"}}},
        "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": name}}}
    })
}

fn thing_name(template: &Template, p: &BTreeMap<String, String>) -> Result<String, EvalError> {
    template
        .evaluate(p)
        .map(|plan| plan.thing.expect("a thing").name)
}

fn fleet_sample() -> Value {
    json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": "fleet provisioning by claim",
        "Parameters": {
            "SerialNumber": {"Type": "String"},
            "ModelType": {"Type": "String", "Default": "basic"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}
        },
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "OverrideSettings": {
                    "AttributePayload": "MERGE",
                    "ThingTypeName": "REPLACE",
                    "ThingGroups": "DO_NOTHING"
                },
                "Properties": {
                    "ThingName": {"Fn::Join": ["", ["ThingPrefix_", {"Ref": "SerialNumber"}]]},
                    "AttributePayload": {"version": "v1", "serialNumber": {"Ref": "SerialNumber"}},
                    "ThingTypeName": "sensor",
                    "ThingGroups": ["v1-lightbulbs", "WA"]
                }
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {
                    "CertificateId": {"Ref": "AWS::IoT::Certificate::Id"},
                    "Status": "Active"
                }
            },
            "policy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {
                    "PolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [{
                            "Effect": "Allow",
                            "Action": ["iot:Connect", "iot:Publish"],
                            "Resource": ["*"]
                        }]
                    }
                }
            }
        },
        "DeviceConfiguration": {
            "FallbackUrl": "https://www.example.com/test-site",
            "Model": {"Ref": "ModelType"}
        }
    })
}

#[test]
fn fleet_provisioning_sample() {
    let template = parse(fleet_sample());
    let p = params(&[
        ("SerialNumber", "123"),
        ("AWS::IoT::Certificate::Id", "abc123"),
        ("Unrelated", "ignored"),
    ]);
    let plan = template.evaluate(&p).unwrap();
    let thing = plan.thing.unwrap();
    assert_eq!(thing.name, "ThingPrefix_123");
    assert_eq!(
        thing.attributes,
        BTreeMap::from([
            ("serialNumber".to_string(), "123".to_string()),
            ("version".to_string(), "v1".to_string())
        ])
    );
    assert_eq!(thing.thing_type.as_deref(), Some("sensor"));
    assert_eq!(thing.groups, ["v1-lightbulbs", "WA"]);
    assert_eq!(thing.attributes_override, Override::Merge);
    assert_eq!(thing.thing_type_override, Override::Replace);
    assert_eq!(thing.groups_override, Override::DoNothing);
    assert_eq!(
        plan.certificate,
        Some(CertPlan {
            certificate_id: "abc123".into(),
            active: true,
            status_override: Override::DoNothing
        })
    );
    let [PolicyPlan::Document { name, document }] = plan.policies.as_slice() else {
        panic!("{:?}", plan.policies)
    };
    let doc: Value = serde_json::from_str(document).unwrap();
    assert_eq!(doc["Statement"][0]["Action"][1], "iot:Publish");
    assert_eq!(name, &sha256_hex(document));
    assert_eq!(name.len(), 64);
    assert!(name.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(
        plan.device_configuration,
        BTreeMap::from([
            (
                "FallbackUrl".to_string(),
                "https://www.example.com/test-site".to_string()
            ),
            ("Model".to_string(), "basic".to_string())
        ])
    );
    assert_eq!(
        template.referenced_parameters(),
        BTreeSet::from([
            "AWS::IoT::Certificate::Id".to_string(),
            "ModelType".to_string(),
            "SerialNumber".to_string()
        ])
    );
    assert_eq!(
        template.declared_parameters().get("ModelType"),
        Some(&Some("basic".to_string()))
    );
    assert_eq!(
        template.declared_parameters().get("SerialNumber"),
        Some(&None)
    );
    assert_eq!(template.source(), fleet_sample().to_string());
}

#[test]
fn sha256_is_the_known_digest() {
    assert_eq!(
        sha256_hex("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
}

#[test]
fn same_document_same_policy_name_different_document_different_name() {
    let template = parse(fleet_sample());
    let p = params(&[("SerialNumber", "1"), ("AWS::IoT::Certificate::Id", "c")]);
    let a = template.evaluate(&p).unwrap().policies;
    let b = template
        .evaluate(&params(&[
            ("SerialNumber", "2"),
            ("AWS::IoT::Certificate::Id", "d"),
        ]))
        .unwrap()
        .policies;
    assert_eq!(a, b);
    let mut other = fleet_sample();
    other["Resources"]["policy"]["Properties"]["PolicyDocument"]["Version"] = json!("2012-10-18");
    let c = parse(other).evaluate(&p).unwrap().policies;
    assert_ne!(a, c);
}

#[test]
fn jitp_template_with_common_name() {
    let template = parse(json!({
        "Parameters": {
            "AWS::IoT::Certificate::CommonName": {"Type": "String"},
            "AWS::IoT::Certificate::Country": {"Type": "String"},
            "AWS::IoT::Certificate::Id": {"Type": "String"}
        },
        "Resources": {
            "thing": {
                "Type": "AWS::IoT::Thing",
                "Properties": {
                    "ThingName": {"Ref": "AWS::IoT::Certificate::CommonName"},
                    "AttributePayload": {"country": {"Ref": "AWS::IoT::Certificate::Country"}, "version": "v1"}
                }
            },
            "certificate": {
                "Type": "AWS::IoT::Certificate",
                "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": "ACTIVE"}
            },
            "policy": {
                "Type": "AWS::IoT::Policy",
                "Properties": {
                    "PolicyDocument": "{ \"Version\": \"2012-10-17\", \"Statement\": [{ \"Effect\": \"Allow\", \"Action\": [\"iot:Publish\"], \"Resource\": [\"arn:aws:iot:us-east-1:123456789012:topic/foo/bar\"] }] }"
                }
            }
        }
    }));
    let plan = template
        .evaluate(&params(&[
            ("AWS::IoT::Certificate::CommonName", "sensor-7"),
            ("AWS::IoT::Certificate::Country", "DE"),
            ("AWS::IoT::Certificate::Id", "f00d"),
        ]))
        .unwrap();
    let thing = plan.thing.unwrap();
    assert_eq!(thing.name, "sensor-7");
    assert_eq!(thing.attributes["country"], "DE");
    assert_eq!(plan.certificate.unwrap().certificate_id, "f00d");
    // A string document is kept as written: its hash is of the text given.
    let PolicyPlan::Document { name, document } = &plan.policies[0] else {
        panic!()
    };
    assert!(document.starts_with("{ \"Version\""));
    assert_eq!(name, &sha256_hex(document));
}

#[test]
fn system_parameters_need_no_declaration_but_must_be_given() {
    let template = parse(thing_named(
        json!({"Ref": "AWS::IoT::Certificate::SerialNumber"}),
    ));
    assert_eq!(
        thing_name(
            &template,
            &params(&[("AWS::IoT::Certificate::SerialNumber", "0a1b")])
        )
        .unwrap(),
        "0a1b"
    );
    let err = thing_name(&template, &params(&[])).unwrap_err();
    assert_eq!(
        err.0,
        "parameter \"AWS::IoT::Certificate::SerialNumber\" is required by Resources.thing.Properties.ThingName but was not given"
    );
}

#[test]
fn ref_defaults_and_supplied_values() {
    let template = parse(thing_named(json!({"Ref": "B"})));
    assert_eq!(thing_name(&template, &params(&[])).unwrap(), "b");
    assert_eq!(
        thing_name(&template, &params(&[("B", "given")])).unwrap(),
        "given"
    );
}

#[test]
fn missing_parameter_is_named_with_where_it_is_needed() {
    let template = parse(thing_named(
        json!({"Fn::Join": ["-", [{"Ref": "A"}, {"Ref": "B"}]]}),
    ));
    let err = thing_name(&template, &params(&[("B", "x")])).unwrap_err();
    assert_eq!(
        err.0,
        "parameter \"A\" is required by Resources.thing.Properties.ThingName but was not given"
    );
    assert_eq!(err.to_string(), err.0);
    assert_eq!(
        thing_name(&template, &params(&[("A", "a")])).unwrap(),
        "a-b"
    );
}

#[test]
fn join() {
    let template = parse(thing_named(
        json!({"Fn::Join": [":", ["x", {"Ref": "A"}, {"Fn::Join": ["", ["y", "z"]]}]]}),
    ));
    assert_eq!(
        thing_name(&template, &params(&[("A", "1")])).unwrap(),
        "x:1:yz"
    );
}

#[test]
fn sub_plain_form() {
    let template = parse(thing_named(json!({"Fn::Sub": "dev-${A}_${B}"})));
    assert_eq!(
        thing_name(&template, &params(&[("A", "1")])).unwrap(),
        "dev-1_b"
    );
    assert_eq!(
        template.referenced_parameters(),
        BTreeSet::from(["A".to_string(), "B".to_string()])
    );
}

#[test]
fn sub_with_variables_and_escape() {
    let template = parse(json!({
        "Parameters": {"A": {"Type": "String"}},
        "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
            "ThingName": {"Fn::Sub": ["${Prefix}-${A}", {"Prefix": {"Fn::Join": ["", ["p", {"Ref": "A"}]]}, "Unused": {"Ref": "AWS::IoT::Certificate::Id"}}]}
        }}},
        "DeviceConfiguration": {"literal": {"Fn::Sub": "${!NotAVar} and ${A}"}}
    }));
    let plan = template.evaluate(&params(&[("A", "7")])).unwrap();
    assert_eq!(plan.thing.unwrap().name, "p7-7");
    assert_eq!(plan.device_configuration["literal"], "${NotAVar} and 7");
    // The unused variable's reference is not counted.
    assert_eq!(
        template.referenced_parameters(),
        BTreeSet::from(["A".to_string()])
    );
}

#[test]
fn split_and_select() {
    let template = parse(thing_named(
        json!({"Fn::Select": [1, {"Fn::Split": ["/", {"Ref": "A"}]}]}),
    ));
    assert_eq!(
        thing_name(&template, &params(&[("A", "x/y/z")])).unwrap(),
        "y"
    );
    let err = thing_name(&template, &params(&[("A", "x")])).unwrap_err();
    assert!(
        err.0.starts_with("Resources.thing.Properties.ThingName: "),
        "{err}"
    );
    assert!(err.0.contains("out of range"), "{err}");

    // A numeric-string index, and one from a parameter.
    let template = parse(thing_named(json!({"Fn::Select": ["0", ["a", "b"]]})));
    assert_eq!(thing_name(&template, &params(&[])).unwrap(), "a");
    let template = parse(thing_named(
        json!({"Fn::Select": [{"Ref": "A"}, ["a", "b"]]}),
    ));
    assert_eq!(thing_name(&template, &params(&[("A", "1")])).unwrap(), "b");
    let err = thing_name(&template, &params(&[("A", "one")])).unwrap_err();
    assert!(err.0.contains("not a whole number"), "{err}");
}

#[test]
fn split_gives_thing_groups() {
    let template = parse(json!({
        "Parameters": {"Groups": {"Type": "String"}},
        "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {
            "ThingName": "t1",
            "ThingGroups": {"Fn::Split": [",", {"Ref": "Groups"}]}
        }}}
    }));
    let plan = template.evaluate(&params(&[("Groups", "a,b,a")])).unwrap();
    assert_eq!(plan.thing.unwrap().groups, ["a", "b"]);
    let err = template
        .evaluate(&params(&[("Groups", "a,,b")]))
        .unwrap_err();
    assert!(
        err.0.starts_with(
            "Resources.thing.Properties.ThingGroups: \"\" is not a valid thing group name"
        ),
        "{err}"
    );
}

#[test]
fn find_in_map() {
    let template = parse(thing_named(
        json!({"Fn::FindInMap": ["Regions", {"Ref": "A"}, "group"]}),
    ));
    assert_eq!(
        thing_name(&template, &params(&[("A", "eu")])).unwrap(),
        "europe"
    );
    assert_eq!(
        thing_name(&template, &params(&[("A", "us")])).unwrap(),
        "americas"
    );
    let err = thing_name(&template, &params(&[("A", "asia")])).unwrap_err();
    assert_eq!(
        err.0,
        "Resources.thing.Properties.ThingName: Fn::FindInMap: Mappings.Regions.asia.group does not exist"
    );
}

#[test]
fn invalid_thing_name_from_parameters_is_named() {
    let template = parse(thing_named(json!({"Ref": "A"})));
    let err = thing_name(&template, &params(&[("A", "bad/name")])).unwrap_err();
    assert!(
        err.0.starts_with(
            "Resources.thing.Properties.ThingName: \"bad/name\" is not a valid thing name"
        ),
        "{err}"
    );
    let long = "x".repeat(129);
    assert!(thing_name(&template, &params(&[("A", &long)])).is_err());
    assert!(thing_name(&template, &params(&[("A", "")])).is_err());
}

#[test]
fn certificate_status_and_override() {
    let template = |status: Value| {
        json!({"Resources": {"cert": {
            "Type": "AWS::IoT::Certificate",
            "OverrideSettings": {"Status": "REPLACE"},
            "Properties": {"CertificateId": {"Ref": "AWS::IoT::Certificate::Id"}, "Status": status}
        }}})
    };
    let p = params(&[("AWS::IoT::Certificate::Id", "c1")]);
    let cert = parse(template(json!("inactive")))
        .evaluate(&p)
        .unwrap()
        .certificate
        .unwrap();
    assert!(!cert.active);
    assert_eq!(cert.status_override, Override::Replace);
    let cert = parse(template(json!("Active")))
        .evaluate(&p)
        .unwrap()
        .certificate
        .unwrap();
    assert!(cert.active);
    refused(
        template(json!("REVOKED")),
        "Resources.cert.Properties.Status",
        "ACTIVE or INACTIVE",
    );
    // Default: active, DO_NOTHING.
    let cert = parse(
        json!({"Resources": {"cert": {"Type": "AWS::IoT::Certificate",
        "Properties": {"CertificateId": "c2"}}}}),
    )
    .evaluate(&p)
    .unwrap()
    .certificate
    .unwrap();
    assert_eq!(
        cert,
        CertPlan {
            certificate_id: "c2".into(),
            active: true,
            status_override: Override::DoNothing
        }
    );
}

#[test]
fn existing_policy_by_name() {
    let template = parse(json!({
        "Parameters": {"P": {"Type": "String", "Default": "fleet-default"}},
        "Resources": {
            "p1": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": {"Ref": "P"}}},
            "p2": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": {"Fn::Sub": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"iot:Connect\",\"Resource\":\"client/${AWS::IoT::Certificate::CommonName}\"}]}"}}}
        }
    }));
    let plan = template
        .evaluate(&params(&[("AWS::IoT::Certificate::CommonName", "cn1")]))
        .unwrap();
    assert_eq!(plan.thing, None);
    assert_eq!(
        plan.policies[0],
        PolicyPlan::Existing {
            name: "fleet-default".into()
        }
    );
    let PolicyPlan::Document { document, .. } = &plan.policies[1] else {
        panic!()
    };
    assert!(document.contains("client/cn1"), "{document}");
    let err = template
        .evaluate(&params(&[
            ("P", "no spaces allowed"),
            ("AWS::IoT::Certificate::CommonName", "cn1"),
        ]))
        .unwrap_err();
    assert!(
        err.0.starts_with("Resources.p1.Properties.PolicyName: "),
        "{err}"
    );
}

#[test]
fn policy_document_object_with_intrinsics() {
    let template = parse(
        json!({"Resources": {"p": {"Type": "AWS::IoT::Policy", "Properties": {
            "PolicyDocument": {"Version": "2012-10-17", "Statement": [{
                "Effect": "Allow", "Action": "iot:Publish",
                "Resource": {"Fn::Join": ["", ["topic/", {"Ref": "AWS::IoT::Certificate::CommonName"}]]}
            }]}
        }}}}),
    );
    let plan = template
        .evaluate(&params(&[("AWS::IoT::Certificate::CommonName", "cn9")]))
        .unwrap();
    let PolicyPlan::Document { document, .. } = &plan.policies[0] else {
        panic!()
    };
    let doc: Value = serde_json::from_str(document).unwrap();
    assert_eq!(doc["Statement"][0]["Resource"], "topic/cn9");
}

#[test]
fn policy_document_from_parameter_checked_at_evaluation() {
    let template = parse(json!({
        "Parameters": {"Doc": {"Type": "String"}},
        "Resources": {"p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyDocument": {"Ref": "Doc"}}}}
    }));
    let err = template
        .evaluate(&params(&[("Doc", "not json")]))
        .unwrap_err();
    assert!(
        err.0.starts_with(
            "Resources.p.Properties.PolicyDocument: the policy document is not valid JSON"
        ),
        "{err}"
    );
    assert!(template.evaluate(&params(&[("Doc", "{}")])).is_ok());
}

#[test]
fn device_configuration_flat_vs_nested() {
    let base = |config: Value| {
        json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "t"}}},
               "DeviceConfiguration": config})
    };
    let plan = parse(base(
        json!({"a": "1", "b": {"Fn::Join": ["-", ["x", "y"]]}}),
    ))
    .evaluate(&params(&[]))
    .unwrap();
    assert_eq!(plan.device_configuration["b"], "x-y");
    refused(
        base(json!({"a": {"nested": "x"}})),
        "DeviceConfiguration.a",
        "nested objects are not allowed",
    );
    refused(
        base(json!({"a": ["x"]})),
        "DeviceConfiguration.a",
        "arrays are not allowed",
    );
    refused(
        base(json!({"a": 1})),
        "DeviceConfiguration.a",
        "expected a string",
    );
    refused(base(json!("x")), "DeviceConfiguration", "flat object");
}

#[test]
fn overrides_default_to_do_nothing() {
    let plan = parse(thing_named(json!("t")))
        .evaluate(&params(&[]))
        .unwrap();
    let thing = plan.thing.unwrap();
    assert_eq!(thing.attributes_override, Override::DoNothing);
    assert_eq!(thing.thing_type_override, Override::DoNothing);
    assert_eq!(thing.groups_override, Override::DoNothing);
    assert_eq!(thing.thing_type, None);
    assert!(thing.groups.is_empty());
}

#[test]
fn plan_serializes() {
    let plan = parse(fleet_sample())
        .evaluate(&params(&[
            ("SerialNumber", "1"),
            ("AWS::IoT::Certificate::Id", "c"),
        ]))
        .unwrap();
    let v = serde_json::to_value(&plan).unwrap();
    assert_eq!(v["thing"]["attributes_override"], "MERGE");
    assert_eq!(v["thing"]["groups_override"], "DO_NOTHING");
}

// ---------------------------------------------------------------------------
// Parse errors

#[test]
fn refuses_bad_json_and_wrong_top_level() {
    let err = Template::parse("{\"Resources\": ").unwrap_err();
    assert!(err.0.starts_with("template: not valid JSON"), "{err}");
    let err = Template::parse("[]").unwrap_err();
    assert!(
        err.0.starts_with("template: expected a JSON object"),
        "{err}"
    );
    let mut v = fleet_sample();
    v["Outputs"] = json!({});
    refused(v, "Outputs", "unknown top-level key");
    refused(json!({"Parameters": {}}), "Resources", "required");
    refused(json!({"Resources": {}}), "Resources", "no resource");
}

#[test]
fn refuses_unknown_resource_type_and_keys() {
    refused(
        json!({"Resources": {"cert": {"Type": "AWS::IoT::Widget", "Properties": {}}}}),
        "Resources.cert",
        "unknown resource type \"AWS::IoT::Widget\"",
    );
    refused(
        json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing", "DependsOn": "x", "Properties": {"ThingName": "t"}}}}),
        "Resources.thing.DependsOn",
        "unknown key",
    );
    refused(
        json!({"Resources": {"thing": {"Properties": {"ThingName": "t"}}}}),
        "Resources.thing.Type",
        "required",
    );
}

#[test]
fn refuses_unknown_properties() {
    refused(
        thing_named_with(json!({"ThingName": "t", "Colour": "red"})),
        "Resources.thing.Properties.Colour",
        "unknown property of AWS::IoT::Thing",
    );
    refused(
        json!({"Resources": {"p": {"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": "x", "Extra": 1}}}}),
        "Resources.p.Properties.Extra",
        "unknown property of AWS::IoT::Policy",
    );
    refused(
        json!({"Resources": {"c": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": "x", "Extra": 1}}}}),
        "Resources.c.Properties.Extra",
        "unknown property of AWS::IoT::Certificate",
    );
}

fn thing_named_with(props: Value) -> Value {
    json!({
        "Parameters": {"A": {"Type": "String"}},
        "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": props}}
    })
}

#[test]
fn thing_shapes() {
    refused(
        thing_named_with(json!({"AttributePayload": {}})),
        "Resources.thing.Properties.ThingName",
        "required",
    );
    refused(
        thing_named_with(json!({"ThingName": "t", "AttributePayload": {"a": {"b": "c"}}})),
        "Resources.thing.Properties.AttributePayload.a",
        "expected a string or an intrinsic function",
    );
    refused(
        thing_named_with(json!({"ThingName": "t", "AttributePayload": ["a"]})),
        "Resources.thing.Properties.AttributePayload",
        "expected an object",
    );
    refused(
        thing_named_with(json!({"ThingName": "t", "ThingGroups": "g"})),
        "Resources.thing.Properties.ThingGroups",
        "expected a list",
    );
    refused(
        thing_named_with(json!({"ThingName": "t", "ThingGroups": {"Ref": "A"}})),
        "Resources.thing.Properties.ThingGroups",
        "expected a list",
    );
    refused(
        thing_named_with(json!({"ThingName": 5})),
        "Resources.thing.Properties.ThingName",
        "found a number",
    );
    // A literal bad name is caught at parse.
    refused(
        thing_named_with(json!({"ThingName": "has space"})),
        "Resources.thing.Properties.ThingName",
        "not a valid thing name",
    );
    // BillingGroup is accepted and ignored.
    let plan = parse(thing_named_with(
        json!({"ThingName": "t", "BillingGroup": "bg"}),
    ))
    .evaluate(&params(&[]))
    .unwrap();
    assert_eq!(plan.thing.unwrap().name, "t");
}

#[test]
fn at_most_one_thing_and_certificate_and_ten_policies() {
    refused(
        json!({"Resources": {
            "a": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "a"}},
            "b": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "b"}}
        }}),
        "Resources.b",
        "at most one AWS::IoT::Thing",
    );
    refused(
        json!({"Resources": {
            "a": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": "a"}},
            "b": {"Type": "AWS::IoT::Certificate", "Properties": {"CertificateId": "b"}}
        }}),
        "Resources.b",
        "at most one AWS::IoT::Certificate",
    );
    let policies = |n: usize| {
        let mut r = Map::new();
        for i in 0..n {
            r.insert(
                format!("p{i:02}"),
                json!({"Type": "AWS::IoT::Policy", "Properties": {"PolicyName": format!("p{i}")}}),
            );
        }
        json!({ "Resources": r })
    };
    assert_eq!(
        parse(policies(10))
            .evaluate(&params(&[]))
            .unwrap()
            .policies
            .len(),
        10
    );
    refused(policies(11), "Resources.p10", "at most 10");
}

#[test]
fn certificate_refusals() {
    for prop in [
        "CertificateSigningRequest",
        "CertificatePem",
        "CACertificatePem",
    ] {
        refused(
            json!({"Resources": {"c": {"Type": "AWS::IoT::Certificate", "Properties": {prop: "x"}}}}),
            &format!("Resources.c.Properties.{prop}"),
            "not supported in fleet provisioning; use CertificateId",
        );
    }
    refused(
        json!({"Resources": {"c": {"Type": "AWS::IoT::Certificate", "Properties": {"Status": "ACTIVE"}}}}),
        "Resources.c.Properties.CertificateId",
        "required",
    );
}

#[test]
fn override_settings_refusals() {
    let thing = |o: Value| {
        json!({"Resources": {"thing": {"Type": "AWS::IoT::Thing", "OverrideSettings": o,
            "Properties": {"ThingName": "t"}}}})
    };
    refused(
        thing(json!({"ThingName": "REPLACE"})),
        "Resources.thing.OverrideSettings.ThingName",
        "cannot be overridden",
    );
    refused(
        thing(json!({"ThingTypeName": "MERGE"})),
        "Resources.thing.OverrideSettings.ThingTypeName",
        "MERGE applies only to AttributePayload and ThingGroups",
    );
    refused(
        thing(json!({"ThingGroups": "OVERWRITE"})),
        "Resources.thing.OverrideSettings.ThingGroups",
        "expected DO_NOTHING, REPLACE, FAIL or MERGE",
    );
    refused(
        thing(json!("REPLACE")),
        "Resources.thing.OverrideSettings",
        "expected an object",
    );
    let p = parse(thing(json!({"ThingGroups": "FAIL"})))
        .evaluate(&params(&[]))
        .unwrap();
    assert_eq!(p.thing.unwrap().groups_override, Override::Fail);
    refused(
        json!({"Resources": {"c": {"Type": "AWS::IoT::Certificate", "OverrideSettings": {"Status": "MERGE"},
            "Properties": {"CertificateId": "x"}}}}),
        "Resources.c.OverrideSettings.Status",
        "MERGE applies only",
    );
    refused(
        json!({"Resources": {"c": {"Type": "AWS::IoT::Certificate", "OverrideSettings": {"CertificateId": "REPLACE"},
            "Properties": {"CertificateId": "x"}}}}),
        "Resources.c.OverrideSettings.CertificateId",
        "cannot be overridden",
    );
    refused(
        json!({"Resources": {"p": {"Type": "AWS::IoT::Policy", "OverrideSettings": {},
            "Properties": {"PolicyName": "x"}}}}),
        "Resources.p.OverrideSettings",
        "not allowed on AWS::IoT::Policy",
    );
}

#[test]
fn policy_refusals() {
    let policy = |props: Value| json!({"Resources": {"p": {"Type": "AWS::IoT::Policy", "Properties": props}}});
    refused(
        policy(json!({"PolicyName": "a", "PolicyDocument": "{}"})),
        "Resources.p.Properties",
        "PolicyName and PolicyDocument together",
    );
    refused(
        policy(json!({})),
        "Resources.p.Properties",
        "needs PolicyName",
    );
    refused(
        policy(json!({"PolicyDocument": "{not json"})),
        "Resources.p.Properties.PolicyDocument",
        "not valid JSON",
    );
    refused(
        policy(json!({"PolicyDocument": "[1]"})),
        "Resources.p.Properties.PolicyDocument",
        "must be a JSON object",
    );
    refused(
        policy(json!({"PolicyDocument": 3})),
        "Resources.p.Properties.PolicyDocument",
        "expected a JSON string or a JSON object",
    );
    refused(
        policy(
            json!({"PolicyDocument": {"Statement": [{"Resource": {"Fn::GetAtt": ["a", "b"]}}]}}),
        ),
        "Resources.p.Properties.PolicyDocument.Statement[0].Resource",
        "unknown intrinsic function \"Fn::GetAtt\"",
    );
}

#[test]
fn ref_to_undeclared_names_is_refused() {
    refused(
        thing_named(json!({"Ref": "SerialNumber"})),
        "Resources.thing.Properties.ThingName",
        "unknown parameter \"SerialNumber\"",
    );
    refused(
        thing_named(json!({"Fn::Join": ["", ["a", {"Ref": "Nope"}]]})),
        "Resources.thing.Properties.ThingName.Fn::Join[1][1]",
        "unknown parameter \"Nope\"",
    );
    refused(
        thing_named(json!({"Fn::Sub": "x-${Nope}"})),
        "Resources.thing.Properties.ThingName",
        "unknown parameter \"Nope\"",
    );
    refused(
        thing_named(json!({"Ref": 3})),
        "Resources.thing.Properties.ThingName",
        "Ref needs a parameter name",
    );
}

#[test]
fn intrinsic_shape_errors_name_the_path() {
    let at = "Resources.thing.Properties.ThingName";
    refused(
        thing_named(json!({"Fn::Join": ["", "notalist"]})),
        &format!("{at}.Fn::Join[1]"),
        "expected a list",
    );
    refused(
        thing_named(json!({"Fn::Join": "x"})),
        at,
        "Fn::Join needs [separator, [values]]",
    );
    refused(thing_named(json!({"Fn::Sub": 1})), at, "Fn::Sub needs");
    refused(thing_named(json!({"Fn::Sub": "a${A"})), at, "without its");
    refused(thing_named(json!({"Fn::Sub": "a${}"})), at, "empty");
    refused(
        thing_named(json!({"Fn::Split": [",", "a,b"]})),
        at,
        "Fn::Split gives a list",
    );
    refused(
        thing_named(json!({"Fn::Select": [0, {"Fn::Split": ["", "ab"]}]})),
        &format!("{at}.Fn::Select[1]"),
        "Fn::Split needs [separator, value]",
    );
    refused(
        thing_named(json!({"Fn::Select": [-1, ["a"]]})),
        at,
        "not a whole number",
    );
    refused(
        thing_named(json!({"Fn::Select": ["x", ["a"]]})),
        at,
        "not a whole number",
    );
    refused(
        thing_named(json!({"Fn::Select": [3, ["a", "b"]]})),
        at,
        "out of range",
    );
    refused(
        thing_named(json!({"Fn::Select": [0]})),
        at,
        "Fn::Select needs [index, list]",
    );
    refused(
        thing_named(json!({"Fn::FindInMap": ["Nope", "eu", "group"]})),
        at,
        "no mapping \"Nope\"",
    );
    refused(
        thing_named(json!({"Fn::FindInMap": ["Regions", "eu"]})),
        at,
        "Fn::FindInMap needs",
    );
    refused(
        thing_named(json!({"Fn::FindInMap": ["Regions", "asia", "group"]})),
        at,
        "Mappings.Regions.asia.group does not exist",
    );
    refused(
        thing_named(json!({"Fn::If": ["c", "a", "b"]})),
        at,
        "unknown intrinsic function \"Fn::If\"",
    );
    refused(
        thing_named(json!({"Fn::Join": ["", [{"Fn::GetAtt": ["x", "y"]}]]})),
        &format!("{at}.Fn::Join[1][0]"),
        "unknown intrinsic function \"Fn::GetAtt\"",
    );
    refused(
        thing_named(json!({"Fn::Sub": ["${X}", {"X": {"Fn::Base64": "a"}}]})),
        &format!("{at}.Fn::Sub[1].X"),
        "unknown intrinsic function \"Fn::Base64\"",
    );
}

#[test]
fn parameter_and_mapping_shapes() {
    let with = |params: Value, mappings: Value| {
        json!({"Parameters": params, "Mappings": mappings,
               "Resources": {"thing": {"Type": "AWS::IoT::Thing", "Properties": {"ThingName": "t"}}}})
    };
    refused(
        with(json!({"N": {"Type": "Number"}}), json!({})),
        "Parameters.N.Type",
        "only \"String\" is supported",
    );
    refused(
        with(json!({"N": {}}), json!({})),
        "Parameters.N.Type",
        "required",
    );
    refused(
        with(json!({"N": {"Type": "String", "Default": 3}}), json!({})),
        "Parameters.N.Default",
        "expected a string",
    );
    refused(
        with(
            json!({"N": {"Type": "String", "AllowedValues": ["a"]}}),
            json!({}),
        ),
        "Parameters.N.AllowedValues",
        "unknown key",
    );
    refused(
        with(json!({}), json!({"M": {"k": {"s": {"Ref": "N"}}}})),
        "Mappings.M.k.s",
        "expected a string",
    );
    refused(
        with(json!({}), json!({"M": {"k": ["a"]}})),
        "Mappings.M.k",
        "expected an object",
    );
    refused(
        with(json!({}), json!({"M": 1})),
        "Mappings.M",
        "expected an object",
    );
    // Described parameters are fine.
    parse(with(
        json!({"N": {"Type": "String", "Description": "a name"}}),
        json!({}),
    ));
}
