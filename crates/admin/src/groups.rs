//! Static thing groups on the admin API, after IoT Core's CreateThingGroup,
//! DescribeThingGroup, ListThingGroups, UpdateThingGroup, DeleteThingGroup,
//! AddThingToThingGroup, RemoveThingFromThingGroup, ListThingsInThingGroup and
//! ListThingGroupsForThing, in this API's own style (snake_case JSON, the
//! `{"error": {"code", "message"}}` errors). The rules are the registry's
//! (`fleetcore_identity::registry::groups`); every change is on disk before the answer.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::Json;
use fleetcore_identity::registry::GroupInfo;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::{AdminState, ApiError, JsonBody, PathArgs, Shared};
use crate::models::{GroupList, GroupMembers, GroupUpdate, GroupsOfThing, NewGroup};

pub fn routes() -> Vec<(&'static str, MethodRouter<Shared>)> {
    vec![
        ("/thing-groups", post(create_group).get(list_groups)),
        (
            "/thing-groups/{name}",
            get(describe_group).patch(update_group).delete(delete_group),
        ),
        ("/thing-groups/{name}/things", get(group_things)),
        (
            "/thing-groups/{name}/things/{thing}",
            put(add_thing).delete(remove_thing),
        ),
        ("/things/{thing}/thing-groups", get(groups_of_thing)),
    ]
}

type ApiResult<T> = Result<T, ApiError>;

fn info(st: &AdminState, name: &str) -> ApiResult<GroupInfo> {
    st.hub
        .registry
        .group_info(name)
        .ok_or_else(|| ApiError::not_found(format!("thing group {name:?} not found")))
}

async fn create_group(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<NewGroup>,
) -> ApiResult<Response> {
    let parent = b.parent.filter(|p| !p.is_empty());
    let g = st
        .hub
        .registry
        .create_group(&b.name, parent.as_deref(), b.description, b.attributes)
        .await?;
    let body = info(&st, &g.name)?;
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

async fn list_groups(State(st): State<Shared>) -> Json<GroupList> {
    let reg = &st.hub.registry;
    let thing_groups = reg
        .groups()
        .iter()
        .filter_map(|g| reg.group_info(&g.name))
        .collect();
    Json(GroupList { thing_groups })
}

async fn describe_group(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Json<GroupInfo>> {
    Ok(Json(info(&st, &name)?))
}

async fn update_group(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
    JsonBody(b): JsonBody<GroupUpdate>,
) -> ApiResult<Json<GroupInfo>> {
    st.hub
        .registry
        .update_group(&name, b.description, b.attributes, b.merge)
        .await?;
    Ok(Json(info(&st, &name)?))
}

async fn delete_group(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
) -> ApiResult<Response> {
    st.hub.registry.delete_group(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MembersQuery {
    #[serde(default)]
    recursive: Option<String>,
}

async fn group_things(
    State(st): State<Shared>,
    PathArgs(name): PathArgs<String>,
    q: Result<Query<MembersQuery>, QueryRejection>,
) -> ApiResult<Json<GroupMembers>> {
    let Query(q) = q.map_err(|e| ApiError::invalid(e.body_text()))?;
    let recursive = match q.recursive.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "recursive={other:?}: expected true or false"
            )))
        }
    };
    let things = st
        .hub
        .registry
        .group_things(&name, recursive)
        .ok_or_else(|| ApiError::not_found(format!("thing group {name:?} not found")))?;
    Ok(Json(GroupMembers {
        thing_group: name,
        recursive,
        things,
    }))
}

async fn add_thing(
    State(st): State<Shared>,
    PathArgs((name, thing)): PathArgs<(String, String)>,
) -> ApiResult<Response> {
    st.hub.registry.add_thing_to_group(&name, &thing).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn remove_thing(
    State(st): State<Shared>,
    PathArgs((name, thing)): PathArgs<(String, String)>,
) -> ApiResult<Response> {
    st.hub
        .registry
        .remove_thing_from_group(&name, &thing)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn groups_of_thing(
    State(st): State<Shared>,
    PathArgs(thing): PathArgs<String>,
) -> ApiResult<Json<GroupsOfThing>> {
    let reg = &st.hub.registry;
    if reg.thing(&thing).is_none() {
        return Err(ApiError::not_found(format!("thing {thing:?} not found")));
    }
    let thing_groups = reg.thing_groups(&thing);
    Ok(Json(GroupsOfThing {
        thing,
        thing_groups,
    }))
}

/// The OpenAPI paths of these routes.
pub fn openapi_paths() -> Value {
    let name = json!({"name": "name", "in": "path", "required": true, "description": "thing group name", "schema": {"type": "string"}});
    let thing = json!({"name": "thing", "in": "path", "required": true, "description": "thing name", "schema": {"type": "string"}});
    let recursive = json!({"name": "recursive", "in": "query", "required": false,
        "description": "true: the things of the group and of every group below it, each once",
        "schema": {"type": "boolean", "default": false}});
    let err = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let ok = |schema: &str| json!({"description": "success", "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let body = |schema: &str| json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}});
    let unauthorized =
        err("Unauthorized: missing or wrong bearer token (and no admin client certificate)");
    let unavailable = err("StoreUnavailable: the change could not be written");
    let missing = err("NotFound: no such thing group (or thing)");
    json!({
        "/thing-groups": {
            "post": {"summary": "CreateThingGroup: a static group, under an existing parent if given (fixed from then on)",
                "requestBody": body("NewThingGroup"),
                "responses": {"201": ok("ThingGroupDetail"), "401": unauthorized,
                    "400": err("InvalidRequest: bad name, description or attributes"),
                    "404": err("NotFound: the parent does not exist"),
                    "409": err("Conflict: the name exists, the parent is at depth 7, or the parent has 100 child groups"),
                    "503": unavailable}},
            "get": {"summary": "ListThingGroups, by name",
                "responses": {"200": ok("ThingGroupList"), "401": unauthorized}},
        },
        "/thing-groups/{name}": {
            "parameters": [name],
            "get": {"summary": "DescribeThingGroup: with its root, path, depth, child groups and member count",
                "responses": {"200": ok("ThingGroupDetail"), "401": unauthorized, "404": missing}},
            "patch": {"summary": "UpdateThingGroup: description and attributes (the parent cannot change)",
                "requestBody": body("ThingGroupUpdate"),
                "responses": {"200": ok("ThingGroupDetail"), "401": unauthorized,
                    "400": err("InvalidRequest: bad description or attributes"), "404": missing, "503": unavailable}},
            "delete": {"summary": "DeleteThingGroup, with its memberships; refused while it has child groups",
                "responses": {"204": {"description": "deleted"}, "401": unauthorized, "404": missing,
                    "409": err("Conflict: the group has child groups"), "503": unavailable}},
        },
        "/thing-groups/{name}/things": {
            "parameters": [name],
            "get": {"summary": "ListThingsInThingGroup: direct members, or with recursive=true those of every group below too",
                "parameters": [recursive],
                "responses": {"200": ok("ThingGroupMembers"), "401": unauthorized,
                    "400": err("InvalidRequest: recursive is not true or false"), "404": missing}},
        },
        "/thing-groups/{name}/things/{thing}": {
            "parameters": [name, thing],
            "put": {"summary": "AddThingToThingGroup (a member already: nothing changes)",
                "responses": {"204": {"description": "the thing is a member"}, "401": unauthorized, "404": missing,
                    "409": err("Conflict: the thing is in 10 groups already, or in another group of the same hierarchy"),
                    "503": unavailable}},
            "delete": {"summary": "RemoveThingFromThingGroup",
                "responses": {"204": {"description": "removed"}, "401": unauthorized,
                    "404": err("NotFound: no such group, or the thing is not a direct member"), "503": unavailable}},
        },
        "/things/{thing}/thing-groups": {
            "parameters": [thing],
            "get": {"summary": "ListThingGroupsForThing: the groups a thing is a direct member of",
                "responses": {"200": ok("ThingGroupsOfThing"), "401": unauthorized, "404": err("NotFound: no such thing")}},
        },
    })
}

/// The OpenAPI schemas these routes use.
pub fn openapi_schemas() -> Value {
    let str_map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let name = json!({"type": "string", "pattern": "^[a-zA-Z0-9:_-]{1,128}$"});
    let detail = json!({
        "name": name, "parent": {"type": "string", "description": "absent for a root group"},
        "description": {"type": "string"}, "attributes": str_map,
        "version": {"type": "integer", "description": "1 at creation, +1 on every update"},
        "created_ms": {"type": "integer"},
        "root": {"type": "string"}, "path": {"type": "array", "items": {"type": "string"}, "description": "from the root down to the group"},
        "depth": {"type": "integer", "minimum": 1, "maximum": 7}, "children": strings,
        "member_count": {"type": "integer", "description": "direct members"},
    });
    json!({
        "NewThingGroup": {"type": "object", "required": ["name"], "additionalProperties": false, "properties": {
            "name": name, "parent": {"type": "string"},
            "description": {"type": "string", "maxLength": 2028}, "attributes": str_map}},
        "ThingGroupUpdate": {"type": "object", "additionalProperties": false, "properties": {
            "description": {"type": "string", "maxLength": 2028, "description": "\"\" removes the description"},
            "attributes": str_map,
            "merge": {"type": "boolean", "default": false, "description": "true: merge into the attributes, an attribute set to \"\" is removed; false: replace them"}}},
        "ThingGroupDetail": {"type": "object",
            "required": ["name", "attributes", "version", "created_ms", "root", "path", "depth", "children", "member_count"],
            "properties": detail},
        "ThingGroupList": {"type": "object", "required": ["thing_groups"], "properties": {
            "thing_groups": {"type": "array", "items": {"$ref": "#/components/schemas/ThingGroupDetail"}}}},
        "ThingGroupMembers": {"type": "object", "required": ["thing_group", "recursive", "things"], "properties": {
            "thing_group": {"type": "string"}, "recursive": {"type": "boolean"}, "things": strings}},
        "ThingGroupsOfThing": {"type": "object", "required": ["thing", "thing_groups"], "properties": {
            "thing": {"type": "string"}, "thing_groups": strings}},
    })
}
