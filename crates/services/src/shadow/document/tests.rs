use super::*;
use proptest::prelude::*;

const T: u64 = 1_700_000_000;

fn update(current: Option<&Shadow>, body: Value) -> Result<Updated, ShadowError> {
    let req = parse_update(body.to_string().as_bytes(), &Limits::default()).map_err(|(e, _)| e)?;
    apply_update(current, &req, &Limits::default(), T)
}

fn shadow_after(bodies: &[Value]) -> Shadow {
    let mut s: Option<Shadow> = None;
    for b in bodies {
        s = Some(update(s.as_ref(), b.clone()).unwrap().shadow);
    }
    s.unwrap()
}

fn err(body: &[u8]) -> (u16, String, Option<String>) {
    let (e, token) = parse_update(body, &Limits::default()).unwrap_err();
    (e.code, e.message, token)
}

#[test]
fn a_first_update_creates_version_1_and_answers_with_only_the_sections_sent() {
    let u = update(
        None,
        json!({"state": {"desired": {"color": "red"}}, "clientToken": "t1"}),
    )
    .unwrap();
    assert_eq!(u.shadow.version, 1);
    assert_eq!(
        u.accepted,
        json!({"state": {"desired": {"color": "red"}},
               "metadata": {"desired": {"color": {"timestamp": T}}},
               "version": 1, "timestamp": T, "clientToken": "t1"})
    );
    // desired without reported: the whole desired is the delta, with desired's metadata.
    assert_eq!(
        u.delta.unwrap(),
        json!({"state": {"color": "red"}, "metadata": {"color": {"timestamp": T}},
               "version": 1, "timestamp": T, "clientToken": "t1"})
    );
    // a new shadow has no `previous`.
    assert!(u.documents.get("previous").is_none());
    assert_eq!(u.documents["current"]["version"], 1);
    assert_eq!(u.documents["clientToken"], "t1");
}

#[test]
fn nested_objects_merge_and_null_deletes_a_key() {
    let s = shadow_after(&[
        json!({"state": {"reported": {"lights": {"color": "red", "on": true}, "fw": 1}}}),
        json!({"state": {"reported": {"lights": {"color": "blue"}, "fw": null}}}),
    ]);
    assert_eq!(
        Value::Object(s.reported.clone()),
        json!({"lights": {"color": "blue", "on": true}})
    );
    assert_eq!(
        Value::Object(s.meta_reported.clone()),
        json!({"lights": {"color": {"timestamp": T}, "on": {"timestamp": T}}})
    );
    assert_eq!(s.version, 2);
}

#[test]
fn a_null_section_clears_it_and_state_null_clears_all_but_keeps_the_shadow() {
    let s = shadow_after(&[
        json!({"state": {"desired": {"a": 1}, "reported": {"a": 2}}}),
        json!({"state": {"desired": null}}),
    ]);
    assert!(s.desired.is_empty());
    assert_eq!(Value::Object(s.reported.clone()), json!({"a": 2}));
    // moto's capture of real AWS: `state: null` is accepted, bumps the version, and
    // answers state null with a bare metadata timestamp.
    let u = update(Some(&s), json!({"state": null})).unwrap();
    assert_eq!(
        u.accepted,
        json!({"state": null, "metadata": {"timestamp": T}, "version": 3, "timestamp": T})
    );
    assert!(u.shadow.exists());
    assert!(u.shadow.desired.is_empty() && u.shadow.reported.is_empty());
    assert!(u.delta.is_none());
    assert_eq!(
        u.shadow.get_answer(None, T),
        json!({"state": {}, "metadata": {}, "version": 3, "timestamp": T})
    );
}

#[test]
fn empty_objects_are_values_but_an_empty_section_changes_nothing() {
    // AWS (moto#8823): {"d": {}} stores d as {}; "reported": {} is a no-op.
    let s = shadow_after(&[json!({"state": {"reported": {"a": 1, "d": {}}}})]);
    assert_eq!(Value::Object(s.reported.clone()), json!({"a": 1, "d": {}}));
    let u = update(Some(&s), json!({"state": {"reported": {}}})).unwrap();
    assert_eq!(u.shadow.reported, s.reported);
    assert_eq!(u.shadow.version, 2);
}

#[test]
fn delta_takes_desired_only_and_reported_only_keys_never_appear() {
    let s = shadow_after(&[json!({"state": {
        "desired": {"a": 1, "b": 2, "n": {"x": 1, "y": {"z": 3}}},
        "reported": {"a": 1, "c": 9, "n": {"x": 1, "y": {"z": 4}}}
    }})]);
    assert_eq!(
        Value::Object(s.delta()),
        json!({"b": 2, "n": {"y": {"z": 3}}})
    );
    // reported-only document: no delta at all (moto#7695).
    let r = shadow_after(&[json!({"state": {"reported": {"a": 1}}})]);
    assert!(r.delta().is_empty());
    assert!(r.get_answer(None, T)["state"].get("delta").is_none());
}

#[test]
fn a_reported_update_that_leaves_a_difference_publishes_the_whole_delta() {
    let s = shadow_after(&[json!({"state": {"desired": {"Status": "Great", "x": 1}}})]);
    let u = update(
        Some(&s),
        json!({"state": {"reported": {"Status": "Awful", "x": 1}}, "clientToken": "r"}),
    )
    .unwrap();
    let d = u.delta.unwrap();
    assert_eq!(d["state"], json!({"Status": "Great"}));
    assert_eq!(d["clientToken"], "r");
    // once in sync, no delta
    let u = update(
        Some(&u.shadow),
        json!({"state": {"reported": {"Status": "Great"}}}),
    )
    .unwrap();
    assert!(u.delta.is_none());
}

#[test]
fn arrays_are_replaced_whole_and_compared_whole() {
    let s = shadow_after(&[
        json!({"state": {"desired": {"l": [1, 2, 3]}, "reported": {"l": [1, 2, 3]}}}),
        json!({"state": {"desired": {"l": [4]}}}),
    ]);
    assert_eq!(s.desired["l"], json!([4]));
    assert_eq!(Value::Object(s.delta()), json!({"l": [4]}));
}

#[test]
fn numbers_compare_by_value() {
    let s = shadow_after(&[json!({"state": {"desired": {"t": 1}, "reported": {"t": 1.0}}})]);
    assert!(s.delta().is_empty());
}

#[test]
fn a_type_change_replaces_the_value_and_its_metadata() {
    let s = shadow_after(&[
        json!({"state": {"reported": {"a": {"b": 1}}}}),
        json!({"state": {"reported": {"a": 5}}}),
        json!({"state": {"reported": {"a": {"c": {"d": null, "e": 2}}}}}),
    ]);
    assert_eq!(
        Value::Object(s.reported.clone()),
        json!({"a": {"c": {"e": 2}}})
    );
    assert_eq!(
        Value::Object(s.meta_reported.clone()),
        json!({"a": {"c": {"e": {"timestamp": T}}}})
    );
}

#[test]
fn version_mismatch_is_409_and_a_matching_version_is_accepted() {
    let s = shadow_after(&[json!({"state": {"reported": {"a": 1}}})]);
    let e = update(
        Some(&s),
        json!({"state": {"reported": {"a": 2}}, "version": 7}),
    )
    .unwrap_err();
    assert_eq!((e.code, e.message.as_str()), (409, "Version conflict"));
    let u = update(
        Some(&s),
        json!({"state": {"reported": {"a": 2}}, "version": 1}),
    )
    .unwrap();
    assert_eq!(u.shadow.version, 2);
    let e = update(None, json!({"state": {}, "version": 3})).unwrap_err();
    assert_eq!(e.code, 409);
}

#[test]
fn delete_keeps_the_version_and_a_new_shadow_continues_it() {
    let s = shadow_after(&[
        json!({"state": {"reported": {"a": 1}}}),
        json!({"state": {"reported": {"a": 2}}}),
    ]);
    let (tomb, answer) =
        apply_delete(Some(&s), Some("d"), T, || ShadowError::not_found("t", None)).unwrap();
    assert_eq!(
        answer,
        json!({"version": 2, "timestamp": T, "clientToken": "d"})
    );
    assert!(!tomb.exists());
    let e = apply_delete(Some(&tomb), None, T, || ShadowError::not_found("t", None)).unwrap_err();
    assert_eq!(e.code, 404);
    let u = update(Some(&tomb), json!({"state": {"reported": {"b": 1}}})).unwrap();
    assert_eq!(u.shadow.version, 3);
    assert!(u.documents.get("previous").is_none());
    assert_eq!(Value::Object(u.shadow.reported.clone()), json!({"b": 1}));
    // After 48 hours the numbering starts again.
    let old = Shadow {
        deleted_at: Some(T - VERSION_MEMORY_SECS - 1),
        ..tomb
    };
    assert_eq!(old.current_version(T), 0);
}

#[test]
fn documents_carry_previous_and_current_without_delta() {
    let s = shadow_after(&[json!({"state": {"desired": {"a": 1}}})]);
    let u = update(Some(&s), json!({"state": {"reported": {"a": 2}}})).unwrap();
    assert_eq!(
        u.documents["previous"],
        json!({"state": {"desired": {"a": 1}}, "metadata": {"desired": {"a": {"timestamp": T}}}, "version": 1})
    );
    assert_eq!(u.documents["current"]["version"], 2);
    assert!(u.documents["current"]["state"].get("delta").is_none());
}

#[test]
fn accepted_metadata_covers_deleted_keys_and_cleared_sections() {
    let s = shadow_after(&[json!({"state": {"desired": {"a": 1, "b": 2}}})]);
    let u = update(
        Some(&s),
        json!({"state": {"desired": {"a": null}, "reported": null}}),
    )
    .unwrap();
    assert_eq!(
        u.accepted["state"],
        json!({"desired": {"a": null}, "reported": null})
    );
    assert_eq!(
        u.accepted["metadata"],
        json!({"desired": {"a": {"timestamp": T}}, "reported": {"timestamp": T}})
    );
}

#[test]
fn bad_requests_get_iot_cores_codes_and_messages() {
    assert_eq!(err(b"{nope").0, 400);
    assert_eq!(err(b"{nope").1, "Invalid JSON");
    assert_eq!(err(b"[1]").1, "Invalid JSON");
    assert_eq!(err(b"").1, "Missing update payload");
    assert_eq!(err(&[0xff, 0xfe]).0, 415);
    let (code, msg, token) = err(br#"{"clientToken":"t"}"#);
    assert_eq!(
        (code, msg.as_str(), token.as_deref()),
        (400, "Missing required node: state", Some("t"))
    );
    assert_eq!(err(br#"{"state":1}"#).1, "State node must be an object");
    assert_eq!(
        err(br#"{"state":{"desired":[1]}}"#).1,
        "Desired node must be an object"
    );
    assert_eq!(
        err(br#"{"state":{"reported":"x"}}"#).1,
        "Reported node must be an object"
    );
    assert_eq!(
        err(br#"{"state":{"delta":{}}}"#).1,
        "State contains an invalid node: 'delta'"
    );
    assert_eq!(err(br#"{"state":{},"version":-1}"#).1, "Invalid version");
    assert_eq!(err(br#"{"state":{},"version":"1"}"#).1, "Invalid version");
    let long = format!(r#"{{"state":{{}},"clientToken":"{}"}}"#, "x".repeat(65));
    let (code, msg, token) = err(long.as_bytes());
    assert_eq!(
        (code, msg.as_str(), token),
        (400, "Invalid clientToken", None)
    );
    assert_eq!(
        err(br#"{"state":{},"clientToken":5}"#).1,
        "Invalid clientToken"
    );
    assert!(err(br#"{"state":{"desired":{"a":[1,null]}}}"#)
        .1
        .contains("may not contain null"));
    assert!(err(br#"{"state":{"desired":{"a":{"b":[[null]]}}}}"#)
        .1
        .contains("may not contain null"));
}

#[test]
fn nesting_is_counted_from_the_first_key_under_a_section() {
    let nest = |levels: usize| {
        let mut v = json!(1);
        for _ in 0..levels {
            v = json!({ "k": v });
        }
        json!({"state": {"desired": v}}).to_string()
    };
    // {"k":1} under desired is level 1; six levels pass, seven do not.
    assert!(parse_update(nest(6).as_bytes(), &Limits::default()).is_ok());
    let (code, msg, _) = err(nest(7).as_bytes());
    assert_eq!(code, 400);
    assert_eq!(
        msg,
        "JSON contains too many levels of nesting; maximum is 6"
    );
}

#[test]
fn state_over_the_size_limit_is_413_and_metadata_does_not_count() {
    let big = "x".repeat(8 * 1024);
    let e = update(None, json!({"state": {"reported": {"a": big}}})).unwrap_err();
    assert_eq!(e.code, 413);
    assert_eq!(e.message, "The payload exceeds the maximum size allowed");
    // Many small keys: metadata is several times the state, only the state counts.
    let mut m = Map::new();
    for i in 0..400 {
        m.insert(format!("k{i}"), json!(i));
    }
    let u = update(None, json!({"state": {"reported": m}})).unwrap();
    assert!(u.shadow.state_bytes() <= 8 * 1024);
}

#[test]
fn get_and_delete_tokens_come_from_any_json_body() {
    assert_eq!(request_token(b"").unwrap(), None);
    assert_eq!(request_token(b"not json").unwrap(), None);
    assert_eq!(request_token(b"{}").unwrap(), None);
    assert_eq!(
        request_token(br#"{"clientToken":"abc"}"#).unwrap(),
        Some("abc".into())
    );
    assert_eq!(
        request_token(br#"{"clientToken":7}"#).unwrap_err().code,
        400
    );
}

#[test]
fn error_bodies_echo_the_token_and_carry_seconds() {
    assert_eq!(
        ShadowError::version_conflict().to_json(Some("t"), T),
        json!({"code": 409, "message": "Version conflict", "timestamp": T, "clientToken": "t"})
    );
    assert!(ShadowError::internal()
        .to_json(None, T)
        .get("clientToken")
        .is_none());
}

#[test]
fn names_follow_iot_cores_pattern() {
    assert!(valid_name("dev-1:a_b", 128));
    for bad in ["", "a/b", "a+b", "a#", "a b", "é"] {
        assert!(!valid_name(bad, 128), "{bad:?}");
    }
    assert!(valid_name(&"a".repeat(64), 64));
    assert!(!valid_name(&"a".repeat(65), 64));
}

#[test]
fn a_stored_shadow_round_trips() {
    let s = shadow_after(&[json!({"state": {"desired": {"a": [1]}, "reported": {"b": {"c": 1}}}})]);
    let bytes = serde_json::to_vec(&s).unwrap();
    assert_eq!(serde_json::from_slice::<Shadow>(&bytes).unwrap(), s);
}

// ----- properties ------------------------------------------------------------

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::from),
        (-5i64..5).prop_map(Value::from),
        "[a-c]{0,2}".prop_map(Value::from),
        prop::collection::vec(0i64..3, 0..3).prop_map(Value::from),
    ]
}

fn tree() -> impl Strategy<Value = Map<String, Value>> {
    let value = leaf().prop_recursive(3, 16, 3, |inner| {
        prop::collection::btree_map("[a-d]", inner, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    });
    prop::collection::btree_map("[a-d]", value, 0..4).prop_map(|m| m.into_iter().collect())
}

/// A patch: like a tree, with nulls sprinkled in as deletions.
fn patch() -> impl Strategy<Value = Map<String, Value>> {
    let value = prop_oneof![leaf(), Just(Value::Null)].prop_recursive(3, 16, 3, |inner| {
        prop::collection::btree_map("[a-d]", inner, 0..3)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    });
    prop::collection::btree_map("[a-d]", value, 0..4).prop_map(|m| m.into_iter().collect())
}

fn holds_null(m: &Map<String, Value>) -> bool {
    m.values().any(|v| match v {
        Value::Null => true,
        Value::Object(m) => holds_null(m),
        _ => false,
    })
}

/// Metadata mirrors state: an object for every object, a timestamp at every leaf.
fn mirrors(state: &Map<String, Value>, meta: &Map<String, Value>) -> bool {
    state.len() == meta.len()
        && state.iter().all(|(k, v)| match (v, meta.get(k)) {
            (Value::Object(s), Some(Value::Object(m))) => mirrors(s, m),
            (_, Some(m)) => *m == json!({ "timestamp": T }),
            _ => false,
        })
}

proptest! {
    #[test]
    fn merging_keeps_metadata_a_mirror_and_stores_no_null(base in tree(), p in patch()) {
        let mut state = Map::new();
        let mut meta = Map::new();
        merge(&mut state, &mut meta, &base, T);
        merge(&mut state, &mut meta, &p, T);
        prop_assert!(mirrors(&state, &meta));
        prop_assert!(!holds_null(&state));
    }

    #[test]
    fn merging_a_tree_into_itself_changes_nothing(base in tree()) {
        let mut state = Map::new();
        let mut meta = Map::new();
        merge(&mut state, &mut meta, &base, T);
        let once = state.clone();
        merge(&mut state, &mut meta, &base, T);
        prop_assert_eq!(once, state);
    }

    #[test]
    fn after_reporting_the_delta_desired_and_reported_agree(d in tree(), r in tree()) {
        let dl = delta(&d, &r);
        let mut reported = r.clone();
        let mut meta = Map::new();
        merge(&mut reported, &mut meta, &dl, T);
        prop_assert!(delta(&d, &reported).is_empty());
    }

    #[test]
    fn the_delta_holds_only_desired_keys(d in tree(), r in tree()) {
        for k in delta(&d, &r).keys() {
            prop_assert!(d.contains_key(k));
        }
        prop_assert!(delta(&d, &d).is_empty());
    }
}
