//! IoT Core's retained-message APIs (the `iotdata` ListRetainedMessages and
//! GetRetainedMessage), with IoT Core's paths and bodies, plus one fleetcore extension:
//! `DELETE /retainedMessage/{topic}`, which is an MQTT delete (a zero-byte retained
//! publish through the broker's own publish path, on disk before the answer).
//!
//! Pages are in ascending byte order of the topic. The `nextToken` is the last topic of
//! the page, base64url: opaque to clients, and stable: a page after a token starts after
//! that topic whatever was retained or deleted meanwhile, so no topic that stayed
//! retained is skipped or repeated.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use fleetcore_broker::engine::retained_api::{check_topic, RetainedDeleteError, RetainedInfo};
use fleetcore_core::encoding::{b64_encode, b64url_decode_vec, b64url_encode};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::{AdminState, ApiError, PathArgs};

/// `maxResults` when the request gives none.
pub const DEFAULT_MAX_RESULTS: usize = 50;
/// The largest `maxResults`, as in IoT Core.
pub const MAX_MAX_RESULTS: usize = 200;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct ListQuery {
    #[serde(default)]
    max_results: Option<String>,
    #[serde(default)]
    next_token: Option<String>,
}

/// `maxResults`: a whole number from 1 to [`MAX_MAX_RESULTS`]; absent is
/// [`DEFAULT_MAX_RESULTS`].
pub fn parse_max_results(text: Option<&str>) -> Result<usize, String> {
    let Some(text) = text else {
        return Ok(DEFAULT_MAX_RESULTS);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_MAX_RESULTS).contains(&n) => Ok(n),
        _ => Err(format!(
            "maxResults {text:?}: expected a whole number from 1 to {MAX_MAX_RESULTS}"
        )),
    }
}

/// The token that continues a listing after `topic`.
pub fn page_token(topic: &str) -> String {
    b64url_encode(topic.as_bytes())
}

/// The topic a [`page_token`] stands for; an error for anything no page could have
/// returned (not base64url, not UTF-8, not a topic name).
pub fn token_topic(token: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "nextToken {token:?} is not a token this API returned; pass the nextToken of \
             the previous page as it came, or none for the first page"
        )
    };
    let bytes = b64url_decode_vec(token.as_bytes()).ok_or_else(bad)?;
    let topic = String::from_utf8(bytes).map_err(|_| bad())?;
    check_topic(&topic).map_err(|_| bad())?;
    Ok(topic)
}

/// IoT Core's `userProperties`: base64 of a JSON array of one-key objects, in the order
/// the publisher sent them (a key may repeat); `None` without any.
pub fn user_properties_blob(msg: &RetainedInfo) -> Option<String> {
    let props = &msg.msg.properties.user_properties;
    if props.is_empty() {
        return None;
    }
    let list: Vec<Value> = props
        .iter()
        .map(|p| {
            let mut one = Map::new();
            one.insert(p.name.to_string(), Value::String(p.value.to_string()));
            Value::Object(one)
        })
        .collect();
    Some(b64_encode(Value::Array(list).to_string().as_bytes()))
}

/// `GET /retainedMessage`: ListRetainedMessages.
pub(crate) async fn list(
    State(st): State<Arc<AdminState>>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let limit = parse_max_results(q.max_results.as_deref()).map_err(ApiError::invalid)?;
    let after = match q.next_token.as_deref() {
        Some(t) => Some(token_topic(t).map_err(ApiError::invalid)?),
        None => None,
    };
    let (page, more) = st.hub.retained_page(after.as_deref(), limit);
    let topics: Vec<Value> = page
        .iter()
        .map(|r| {
            json!({
                "topic": &*r.msg.topic,
                "payloadSize": r.msg.payload.len(),
                "qos": r.msg.qos as u8,
                "lastModifiedTime": r.stored_at_ms,
            })
        })
        .collect();
    let mut body = json!({ "retainedTopics": topics });
    if let (true, Some(last)) = (more, page.last()) {
        body["nextToken"] = json!(page_token(&last.msg.topic));
    }
    Ok(Json(body))
}

fn checked(topic: &str) -> Result<(), ApiError> {
    check_topic(topic).map_err(|e| ApiError::invalid(format!("topic {topic:?}: {e}")))
}

fn not_retained(topic: &str) -> ApiError {
    ApiError::not_found(format!("no retained message on topic {topic:?}"))
}

/// `GET /retainedMessage/{topic}`: GetRetainedMessage.
pub(crate) async fn get_one(
    State(st): State<Arc<AdminState>>,
    PathArgs(topic): PathArgs<String>,
) -> Result<Json<Value>, ApiError> {
    checked(&topic)?;
    let r = st
        .hub
        .retained_get(&topic)
        .ok_or_else(|| not_retained(&topic))?;
    let mut body = json!({
        "topic": topic,
        "payload": b64_encode(&r.msg.payload),
        "qos": r.msg.qos as u8,
        "lastModifiedTime": r.stored_at_ms,
    });
    if let Some(props) = user_properties_blob(&r) {
        body["userProperties"] = json!(props);
    }
    Ok(Json(body))
}

/// `DELETE /retainedMessage/{topic}` (fleetcore extension): an MQTT delete.
pub(crate) async fn delete(
    State(st): State<Arc<AdminState>>,
    PathArgs(topic): PathArgs<String>,
) -> Result<Json<Value>, ApiError> {
    checked(&topic)?;
    match st.hub.retained_delete(&topic).await {
        Ok(true) => {
            tracing::info!(topic, "retained message deleted through the admin API");
            Ok(Json(json!({ "topic": topic, "deleted": true })))
        }
        Ok(false) => Err(not_retained(&topic)),
        Err(RetainedDeleteError::InvalidTopic(e)) => {
            Err(ApiError::invalid(format!("topic {topic:?}: {e}")))
        }
        Err(RetainedDeleteError::Store(e)) => Err(ApiError::unavailable(format!(
            "the retained message of {topic:?} was not deleted: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::extract::Request;
    use axum::http::StatusCode;
    use axum::Router;
    use fleetcore_broker::engine::hub::Hub;
    use fleetcore_core::encoding::b64_decode_vec;
    use fleetcore_core::message::Message;
    use fleetcore_identity::ca::{Ca, CaFiles};
    use mqtt_proto::v5::{PublishProperties, UserProperty};
    use mqtt_proto::{QoS, TopicName};
    use tower::ServiceExt;

    fn app(dir: &std::path::Path) -> (Router, Arc<Hub>) {
        let (store, loaded) =
            fleetcore_store::Store::open(&dir.join("s.redb"), Default::default()).unwrap();
        let hub = Hub::new(
            fleetcore_broker::Config::default(),
            store.storage(),
            loaded,
            Default::default(),
        );
        let names = ["localhost".to_string()];
        let (ca, _) = Ca::load_or_init(&CaFiles::in_dir(&dir.join("pki")), &names).unwrap();
        let state = AdminState {
            hub: hub.clone(),
            ca: Arc::new(ca),
            token: "secret".into(),
            client_cert_cn: None,
            metrics: None,
            shadows: None,
            jobs: None,
            provisioning: None,
        };
        (crate::api::router(state), hub)
    }

    async fn retain(hub: &Hub, topic: &str, payload: &[u8], qos: QoS, props: &[(&str, &str)]) {
        let properties = PublishProperties {
            user_properties: props
                .iter()
                .map(|(k, v)| UserProperty {
                    name: Arc::from(*k),
                    value: Arc::from(*v),
                })
                .collect(),
            ..Default::default()
        };
        let msg = Message::from_publish(
            TopicName::try_from(topic).unwrap(),
            bytes::Bytes::copy_from_slice(payload),
            qos,
            true,
            properties,
            0,
        );
        if let Some(commit) = hub.publish(msg).commit {
            commit.await.unwrap();
        }
    }

    async fn call(app: &Router, method: &str, uri: &str) -> (StatusCode, Value) {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", "Bearer secret")
            .body(Body::empty())
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn topics(page: &Value) -> Vec<String> {
        page["retainedTopics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["topic"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn max_results_is_a_whole_number_from_1_to_200() {
        assert_eq!(parse_max_results(None), Ok(DEFAULT_MAX_RESULTS));
        assert_eq!(parse_max_results(Some("1")), Ok(1));
        assert_eq!(parse_max_results(Some("200")), Ok(200));
        for bad in [
            "0",
            "201",
            "x",
            "",
            "-1",
            "2.5",
            " 5",
            "99999999999999999999999",
        ] {
            let e = parse_max_results(Some(bad)).unwrap_err();
            assert!(e.contains("1 to 200"), "{bad}: {e}");
        }
    }

    #[test]
    fn tokens_round_trip_and_foreign_ones_are_refused() {
        for topic in [
            "a",
            "acct/dev1/config",
            "/lead",
            "a//b",
            "$aws/things/x",
            "ü/€",
        ] {
            assert_eq!(token_topic(&page_token(topic)).as_deref(), Ok(topic));
        }
        // Not base64url; base64url of bytes that are not UTF-8; of the empty topic; of a
        // filter (no page returns one).
        let not_utf8 = b64url_encode(&[0xff, 0xfe]);
        let filter = page_token("a/+/b");
        for bad in ["x", "a=", "a b", "", not_utf8.as_str(), filter.as_str()] {
            let e = token_topic(bad).unwrap_err();
            assert!(e.contains("not a token this API returned"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn listing_pages_through_every_topic_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (app, hub) = app(dir.path());
        let (_, empty) = call(&app, "GET", "/retainedMessage").await;
        assert_eq!(empty, json!({"retainedTopics": []}));
        for t in ["e/5", "a/1", "c/3", "b/2", "d/4"] {
            retain(&hub, t, t.as_bytes(), QoS::Level1, &[]).await;
        }
        let mut seen = Vec::new();
        let mut uri = "/retainedMessage?maxResults=2".to_string();
        let mut pages = 0;
        loop {
            let (status, page) = call(&app, "GET", &uri).await;
            assert_eq!(status, StatusCode::OK, "{page}");
            pages += 1;
            let got = topics(&page);
            seen.extend(got.clone());
            match page.get("nextToken").and_then(Value::as_str) {
                Some(token) => {
                    assert_eq!(got.len(), 2);
                    uri = format!("/retainedMessage?maxResults=2&nextToken={token}");
                }
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, ["a/1", "b/2", "c/3", "d/4", "e/5"]);
        // Exactly a page's worth: no token pointing at an empty page.
        let (_, all) = call(&app, "GET", "/retainedMessage?maxResults=5").await;
        assert_eq!(topics(&all).len(), 5);
        assert!(all.get("nextToken").is_none(), "{all}");
        let entry = &all["retainedTopics"][0];
        assert_eq!(entry["payloadSize"], 3);
        assert_eq!(entry["qos"], 1);
        assert!(entry.get("payload").is_none(), "no payloads in a listing");
        // A token is a place, not a snapshot: a topic deleted after it was handed out
        // still resumes after it.
        let token = page_token("b/2");
        assert!(hub.retained_delete("b/2").await.unwrap());
        let (_, rest) = call(&app, "GET", &format!("/retainedMessage?nextToken={token}")).await;
        assert_eq!(topics(&rest), ["c/3", "d/4", "e/5"]);
    }

    #[tokio::test]
    async fn bad_paging_parameters_are_400() {
        let dir = tempfile::tempdir().unwrap();
        let (app, hub) = app(dir.path());
        retain(&hub, "a", b"x", QoS::Level0, &[]).await;
        for query in [
            "maxResults=0",
            "maxResults=201",
            "maxResults=x",
            "nextToken=%21%21",
            "nextToken=__8",
            "maxresults=2",
        ] {
            let (status, body) = call(&app, "GET", &format!("/retainedMessage?{query}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
            assert_eq!(body["error"]["code"], "InvalidRequest", "{query}");
        }
    }

    #[tokio::test]
    async fn one_message_with_slashes_raw_or_encoded() {
        let dir = tempfile::tempdir().unwrap();
        let (app, hub) = app(dir.path());
        let before = fleetcore_core::time::now_ms();
        retain(
            &hub,
            "acct/dev1/config",
            b"\x00\xffbin",
            QoS::Level1,
            &[("deviceName", "alpha"), ("deviceName", "beta")],
        )
        .await;
        let after = fleetcore_core::time::now_ms();
        retain(&hub, "/lead/x", b"y", QoS::Level0, &[]).await;
        for uri in [
            "/retainedMessage/acct/dev1/config",
            "/retainedMessage/acct%2Fdev1%2Fconfig",
            "/retainedMessage/acct%2fdev1/config",
        ] {
            let (status, body) = call(&app, "GET", uri).await;
            assert_eq!(status, StatusCode::OK, "{uri}: {body}");
            assert_eq!(body["topic"], "acct/dev1/config");
            let payload = b64_decode_vec(body["payload"].as_str().unwrap().as_bytes());
            assert_eq!(payload.as_deref(), Some(&b"\x00\xffbin"[..]));
            assert_eq!(body["qos"], 1);
            let at = body["lastModifiedTime"].as_u64().unwrap();
            assert!((before..=after).contains(&at), "{at}");
            let props = b64_decode_vec(body["userProperties"].as_str().unwrap().as_bytes());
            let props: Value = serde_json::from_slice(&props.unwrap()).unwrap();
            assert_eq!(
                props,
                json!([{"deviceName": "alpha"}, {"deviceName": "beta"}])
            );
        }
        for uri in ["/retainedMessage//lead/x", "/retainedMessage/%2Flead%2Fx"] {
            let (status, body) = call(&app, "GET", uri).await;
            assert_eq!(status, StatusCode::OK, "{uri}: {body}");
            assert_eq!(body["topic"], "/lead/x");
            assert_eq!(body["qos"], 0);
            assert!(body.get("userProperties").is_none(), "{body}");
        }
        let (status, body) = call(&app, "GET", "/retainedMessage/acct/dev2/config").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "NotFound");
        let (status, body) = call(&app, "GET", "/retainedMessage/acct/%2B/config").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    }

    #[tokio::test]
    async fn delete_removes_it_from_memory_and_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (app, hub) = app(dir.path());
        retain(&hub, "acct/dev1/config", b"x", QoS::Level1, &[]).await;
        retain(&hub, "acct/dev2/config", b"y", QoS::Level1, &[]).await;
        let (status, body) = call(&app, "DELETE", "/retainedMessage/acct/dev1/config").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!({"topic": "acct/dev1/config", "deleted": true}));
        let (status, _) = call(&app, "GET", "/retainedMessage/acct/dev1/config").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = call(&app, "DELETE", "/retainedMessage/acct/dev1/config").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // On disk before the answer: what a restart would load.
        let storage = hub.storage.clone();
        drop((app, hub));
        drop(storage);
        let (_, loaded) =
            fleetcore_store::Store::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        let left: Vec<&str> = loaded
            .retained
            .iter()
            .map(|r| r.msg.topic.as_str())
            .collect();
        assert_eq!(left, ["acct/dev2/config"]);
    }
}
