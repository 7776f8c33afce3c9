//! The policy document: JSON read into statements, every field validated, every resource
//! compiled. [`Policy::parse`] is the only way to get a [`Policy`].

use serde_json::{Map, Value};

use crate::action::{parse_action_entry, ActionSet};
use crate::error::PolicyError;
use crate::resource::Resource;

/// The only policy language version IoT Core accepts with policy variables.
const VERSION: &str = "2012-10-17";

/// A parsed, validated, compiled policy document. Bind it to a connection's variables with
/// [`crate::Bound::new`] to ask for decisions.
#[derive(Debug, Clone)]
pub struct Policy {
    pub(crate) statements: Vec<Statement>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub(crate) struct Statement {
    pub(crate) effect: Effect,
    pub(crate) actions: ActionSet,
    pub(crate) resources: Vec<Resource>,
}

impl Policy {
    /// Reads an IoT Core policy document. Refuses, with the statement and field named,
    /// anything fleetcore would not enforce exactly as written: another `Version`, unknown
    /// keys, `NotAction`/`NotResource`/`Condition`, unknown actions or variables, resources
    /// that are not IoT Core ARNs.
    pub fn parse(json: &str) -> Result<Policy, PolicyError> {
        let doc: Value = serde_json::from_str(json)
            .map_err(|e| PolicyError::document("document", format!("not valid JSON: {e}")))?;
        let Value::Object(doc) = doc else {
            return Err(PolicyError::document(
                "document",
                format!("must be a JSON object, not {}", kind(&doc)),
            ));
        };
        for key in doc.keys() {
            if !matches!(key.as_str(), "Version" | "Statement" | "Id") {
                return Err(PolicyError::document(
                    "document",
                    format!(
                        "unknown key {key:?}{} (a policy has Version, Statement and optionally Id)",
                        case_hint(key, &["Version", "Statement", "Id"])
                    ),
                ));
            }
        }
        match doc.get("Version") {
            Some(Value::String(v)) if v == VERSION => {}
            Some(Value::String(v)) => {
                return Err(PolicyError::document(
                    "Version",
                    format!("{v:?} is not supported: use {VERSION:?}"),
                ))
            }
            Some(other) => {
                return Err(PolicyError::document(
                    "Version",
                    format!("must be the string {VERSION:?}, not {}", kind(other)),
                ))
            }
            None => {
                return Err(PolicyError::document(
                    "Version",
                    format!("missing: add \"Version\": {VERSION:?}"),
                ))
            }
        }
        if let Some(id) = doc.get("Id") {
            if !id.is_string() {
                return Err(PolicyError::document(
                    "Id",
                    format!("must be a string, not {}", kind(id)),
                ));
            }
        }
        let statements: Vec<&Value> = match doc.get("Statement") {
            Some(Value::Array(list)) if list.is_empty() => {
                return Err(PolicyError::document("Statement", "empty list"))
            }
            Some(Value::Array(list)) => list.iter().collect(),
            Some(one @ Value::Object(_)) => vec![one],
            Some(other) => {
                return Err(PolicyError::document(
                    "Statement",
                    format!(
                        "must be an object or a list of objects, not {}",
                        kind(other)
                    ),
                ))
            }
            None => return Err(PolicyError::document("Statement", "missing")),
        };
        let statements = statements
            .into_iter()
            .enumerate()
            .map(|(i, s)| match s {
                Value::Object(s) => Statement::parse(i, s),
                other => Err(PolicyError {
                    statement: Some(i),
                    sid: None,
                    field: "Statement",
                    message: format!("must be an object, not {}", kind(other)),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { statements })
    }
}

impl Statement {
    fn parse(index: usize, s: &Map<String, Value>) -> Result<Statement, PolicyError> {
        let sid = match s.get("Sid") {
            None => None,
            Some(Value::String(sid)) => Some(sid.clone()),
            Some(other) => {
                return Err(PolicyError {
                    statement: Some(index),
                    sid: None,
                    field: "Sid",
                    message: format!("must be a string, not {}", kind(other)),
                })
            }
        };
        let err = |field: &'static str, message: String| PolicyError {
            statement: Some(index),
            sid: sid.clone(),
            field,
            message,
        };

        for key in s.keys() {
            match key.as_str() {
                "Sid" | "Effect" | "Action" | "Resource" => {}
                "NotAction" => {
                    return Err(err(
                        "NotAction",
                        "not supported by fleetcore: list the actions in Action".into(),
                    ))
                }
                "NotResource" => {
                    return Err(err(
                        "NotResource",
                        "not supported by fleetcore: list the resources in Resource".into(),
                    ))
                }
                "Condition" => {
                    return Err(err(
                        "Condition",
                        "not supported by fleetcore: express the restriction in Resource, with policy variables".into(),
                    ))
                }
                other => {
                    return Err(err(
                        "Statement",
                        format!(
                            "unknown key {other:?}{} (a statement has Effect, Action, Resource and optionally Sid)",
                            case_hint(other, &["Sid", "Effect", "Action", "Resource"])
                        ),
                    ))
                }
            }
        }

        let effect = match s.get("Effect") {
            Some(Value::String(e)) if e == "Allow" => Effect::Allow,
            Some(Value::String(e)) if e == "Deny" => Effect::Deny,
            Some(Value::String(e)) => {
                return Err(err("Effect", format!("{e:?} is not \"Allow\" or \"Deny\"")))
            }
            Some(other) => {
                return Err(err(
                    "Effect",
                    format!("must be \"Allow\" or \"Deny\", not {}", kind(other)),
                ))
            }
            None => return Err(err("Effect", "missing: \"Allow\" or \"Deny\"".into())),
        };

        let mut actions = ActionSet::default();
        for entry in strings(s.get("Action")).map_err(|m| err("Action", m))? {
            actions = actions.union(parse_action_entry(entry).map_err(|m| err("Action", m))?);
        }

        let resources = strings(s.get("Resource"))
            .map_err(|m| err("Resource", m))?
            .into_iter()
            .map(|r| Resource::parse(r).map_err(|m| err("Resource", m)))
            .collect::<Result<Vec<_>, _>>()?;

        Ok(Statement {
            effect,
            actions,
            resources,
        })
    }
}

/// A field that holds a string or a non-empty list of strings.
fn strings(v: Option<&Value>) -> Result<Vec<&str>, String> {
    match v {
        None => Err("missing".into()),
        Some(Value::String(s)) => Ok(vec![s.as_str()]),
        Some(Value::Array(list)) if list.is_empty() => Err("empty list".into()),
        Some(Value::Array(list)) => list
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(format!("entry {i} must be a string, not {}", kind(other))),
            })
            .collect(),
        Some(other) => Err(format!(
            "must be a string or a list of strings, not {}",
            kind(other)
        )),
    }
}

/// `(did you mean "Effect"?)` when `key` differs from a known key only in case.
fn case_hint(key: &str, known: &[&str]) -> String {
    known
        .iter()
        .find(|k| k.eq_ignore_ascii_case(key))
        .map(|k| format!(" (keys are case-sensitive: did you mean {k:?}?)"))
        .unwrap_or_default()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
