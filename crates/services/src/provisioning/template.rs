//! Provisioning templates in IoT Core's JSON form: [`Template::parse`] validates
//! everything that does not depend on parameter values, [`Template::evaluate`] turns a
//! request's parameters into a [`Plan`] the caller applies. Pure: no I/O, no registry.
//!
//! Supported: `Parameters` (Type `String`), `Mappings`, `DeviceConfiguration` (flat,
//! strings), at most one `AWS::IoT::Thing`, at most one `AWS::IoT::Certificate` (by
//! `CertificateId`), up to [`MAX_POLICIES`] `AWS::IoT::Policy`, `OverrideSettings`,
//! and the intrinsics `Ref`, `Fn::Join`, `Fn::Sub`, `Fn::Split`, `Fn::Select`,
//! `Fn::FindInMap`. Errors name where in the template they are, as a dotted path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use fleetcore_identity::names::{is_valid_thing_name, THING_NAME_RULE};
use serde::Serialize;
use serde_json::{Map, Value};

#[cfg(test)]
mod tests;

/// The most `AWS::IoT::Policy` resources one template may have.
pub const MAX_POLICIES: usize = 10;

/// A template refused at [`Template::parse`]; the message starts with the path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(pub String);

/// A template that could not be evaluated with the given parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError(pub String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateError {}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EvalError {}

/// What the caller does with the template's resources, in order: thing, certificate,
/// policies (attached to the certificate), then answer with the device configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub thing: Option<ThingPlan>,
    pub certificate: Option<CertPlan>,
    pub policies: Vec<PolicyPlan>,
    pub device_configuration: BTreeMap<String, String>,
}

/// The thing to create, or to update per the overrides when it exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThingPlan {
    pub name: String,
    pub attributes: BTreeMap<String, String>,
    pub thing_type: Option<String>,
    pub groups: Vec<String>,
    pub attributes_override: Override,
    pub thing_type_override: Override,
    pub groups_override: Override,
}

/// What to do with a property of a resource that already exists. Absent from the
/// template it is [`Override::DoNothing`]: the existing value is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Override {
    DoNothing,
    Replace,
    Fail,
    Merge,
}

/// The certificate the template refers to; the caller checks `certificate_id` is the
/// requester's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertPlan {
    pub certificate_id: String,
    pub active: bool,
    pub status_override: Override,
}

/// A policy to attach to the certificate: an existing one by name, or a document
/// named by the hex SHA-256 of its text (created if absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PolicyPlan {
    Existing { name: String },
    Document { name: String, document: String },
}

/// A parsed, validated provisioning template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parameters: BTreeMap<String, Option<String>>,
    mappings: Mappings,
    thing: Option<ThingRes>,
    certificate: Option<CertRes>,
    policies: Vec<PolicyRes>,
    device_configuration: Vec<(String, StrExpr)>,
    referenced: BTreeSet<String>,
}

type Mappings = BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>;

/// An expression giving a string.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StrExpr {
    Lit(String),
    Ref(String),
    Join {
        sep: String,
        list: ListExpr,
    },
    /// `Fn::Sub`, its variables already substituted in.
    Concat(Vec<StrExpr>),
    Select {
        index: Index,
        list: ListExpr,
    },
    FindInMap(Box<[StrExpr; 3]>),
}

/// An expression giving a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ListExpr {
    Items(Vec<StrExpr>),
    Split { sep: String, value: Box<StrExpr> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Index {
    Lit(usize),
    Expr(Box<StrExpr>),
}

/// A policy document written as a JSON object, possibly with intrinsics as values.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JsonExpr {
    Plain(Value),
    Array(Vec<JsonExpr>),
    Object(Vec<(String, JsonExpr)>),
    Str(StrExpr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ThingRes {
    logical: String,
    name: StrExpr,
    attributes: Vec<(String, StrExpr)>,
    thing_type: Option<StrExpr>,
    groups: Option<ListExpr>,
    attributes_override: Override,
    thing_type_override: Override,
    groups_override: Override,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct CertRes {
    logical: String,
    id: StrExpr,
    status: Option<StrExpr>,
    status_override: Override,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PolicyRes {
    Name { logical: String, name: StrExpr },
    Text { logical: String, document: StrExpr },
    Json { logical: String, document: JsonExpr },
}

type PResult<T> = Result<T, String>;

impl Template {
    /// Parses and validates `text`. Expressions that use no parameter are evaluated
    /// here too, so a literal bad thing name or status is refused now.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        parse(text).map_err(TemplateError)
    }

    /// Evaluates the template: `params` override the declared defaults and supply the
    /// system parameters (`AWS::IoT::Certificate::Id`, ...); undeclared ones are ignored.
    pub fn evaluate(&self, params: &BTreeMap<String, String>) -> Result<Plan, EvalError> {
        self.run(&Eval {
            params: Some(params),
            declared: &self.parameters,
            mappings: &self.mappings,
        })
        .map_err(EvalError)
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Every parameter the evaluated parts of the template refer to, declared or
    /// system (`AWS::...`).
    pub fn referenced_parameters(&self) -> BTreeSet<String> {
        self.referenced.clone()
    }

    /// The `Parameters` section: name → default.
    pub fn declared_parameters(&self) -> &BTreeMap<String, Option<String>> {
        &self.parameters
    }

    /// Builds the plan. With `ev.params == None` (the check at parse) expressions that
    /// need a parameter are unknown and skipped; the plan made then is thrown away.
    fn run(&self, ev: &Eval<'_>) -> PResult<Plan> {
        let thing = match &self.thing {
            Some(t) => Some(ev.thing(t)?),
            None => None,
        };
        let certificate = match &self.certificate {
            Some(c) => Some(ev.certificate(c)?),
            None => None,
        };
        let mut policies = Vec::with_capacity(self.policies.len());
        for p in &self.policies {
            policies.push(ev.policy(p)?);
        }
        let mut device_configuration = BTreeMap::new();
        for (key, expr) in &self.device_configuration {
            let value = ev.str(expr, &format!("DeviceConfiguration.{key}"))?;
            device_configuration.insert(key.clone(), value.unwrap_or_default());
        }
        Ok(Plan {
            thing,
            certificate,
            policies,
            device_configuration,
        })
    }
}

// ---------------------------------------------------------------------------
// Parsing

const TOP_LEVEL: [&str; 6] = [
    "Parameters",
    "Resources",
    "Mappings",
    "DeviceConfiguration",
    "AWSTemplateFormatVersion",
    "Description",
];

fn parse(text: &str) -> PResult<Template> {
    let root: Value =
        serde_json::from_str(text).map_err(|e| format!("template: not valid JSON: {e}"))?;
    let Value::Object(root) = root else {
        return Err(format!(
            "template: expected a JSON object, found {}",
            kind(&root)
        ));
    };
    if let Some(key) = root.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return Err(format!(
            "{key}: unknown top-level key (allowed: {})",
            TOP_LEVEL.join(", ")
        ));
    }
    let parameters = parse_parameters(root.get("Parameters"))?;
    let mappings = parse_mappings(root.get("Mappings"))?;
    let cx = Cx {
        declared: &parameters,
        mappings: &mappings,
    };
    let mut refs = BTreeSet::new();

    let resources = match root.get("Resources") {
        Some(Value::Object(r)) if !r.is_empty() => r,
        Some(Value::Object(_)) => return Err("Resources: has no resource".into()),
        Some(other) => {
            return Err(format!(
                "Resources: expected an object, found {}",
                kind(other)
            ))
        }
        None => return Err("Resources: required".into()),
    };
    let empty = Map::new();
    let mut thing: Option<ThingRes> = None;
    let mut certificate: Option<CertRes> = None;
    let mut policies = Vec::new();
    for (logical, resource) in resources {
        let at = format!("Resources.{logical}");
        let Value::Object(resource) = resource else {
            return Err(format!(
                "{at}: expected an object, found {}",
                kind(resource)
            ));
        };
        if let Some(key) = resource
            .keys()
            .find(|k| !matches!(k.as_str(), "Type" | "Properties" | "OverrideSettings"))
        {
            return Err(format!(
                "{at}.{key}: unknown key (a resource has Type, Properties, OverrideSettings)"
            ));
        }
        let ty = match resource.get("Type") {
            Some(Value::String(t)) => t.as_str(),
            Some(other) => {
                return Err(format!(
                    "{at}.Type: expected a string, found {}",
                    kind(other)
                ))
            }
            None => return Err(format!("{at}.Type: required")),
        };
        let props = match resource.get("Properties") {
            Some(Value::Object(p)) => p,
            Some(other) => {
                return Err(format!(
                    "{at}.Properties: expected an object, found {}",
                    kind(other)
                ))
            }
            None => &empty,
        };
        let overrides = resource.get("OverrideSettings");
        match ty {
            "AWS::IoT::Thing" => {
                if let Some(other) = &thing {
                    return Err(format!(
                        "{at}: a template has at most one AWS::IoT::Thing (Resources.{} is one)",
                        other.logical
                    ));
                }
                thing = Some(cx.thing(logical, props, overrides, &at, &mut refs)?);
            }
            "AWS::IoT::Certificate" => {
                if let Some(other) = &certificate {
                    return Err(format!(
                        "{at}: a template has at most one AWS::IoT::Certificate (Resources.{} is one)",
                        other.logical
                    ));
                }
                certificate = Some(cx.certificate(logical, props, overrides, &at, &mut refs)?);
            }
            "AWS::IoT::Policy" => {
                if overrides.is_some() {
                    return Err(format!(
                        "{at}.OverrideSettings: not allowed on AWS::IoT::Policy"
                    ));
                }
                if policies.len() == MAX_POLICIES {
                    return Err(format!(
                        "{at}: a template has at most {MAX_POLICIES} AWS::IoT::Policy resources"
                    ));
                }
                policies.push(cx.policy(logical, props, &at, &mut refs)?);
            }
            other => return Err(format!("{at}: unknown resource type {other:?}")),
        }
    }

    let mut device_configuration = Vec::new();
    match root.get("DeviceConfiguration") {
        None => {}
        Some(Value::Object(config)) if intrinsic(&root["DeviceConfiguration"]).is_none() => {
            for (key, value) in config {
                let at = format!("DeviceConfiguration.{key}");
                match value {
                    Value::Object(_) if intrinsic(value).is_none() => {
                        return Err(format!(
                            "{at}: nested objects are not allowed; DeviceConfiguration is a flat object of strings"
                        ))
                    }
                    Value::Array(_) => {
                        return Err(format!(
                            "{at}: arrays are not allowed; DeviceConfiguration is a flat object of strings"
                        ))
                    }
                    _ => device_configuration.push((key.clone(), cx.str(value, &at, &mut refs)?)),
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "DeviceConfiguration: expected a flat object of strings, found {}",
                kind(other)
            ))
        }
    }

    let template = Template {
        source: text.to_owned(),
        parameters,
        mappings,
        thing,
        certificate,
        policies,
        device_configuration,
        referenced: refs,
    };
    template.run(&Eval {
        params: None,
        declared: &template.parameters,
        mappings: &template.mappings,
    })?;
    Ok(template)
}

fn parse_parameters(v: Option<&Value>) -> PResult<BTreeMap<String, Option<String>>> {
    let mut out = BTreeMap::new();
    let params = match v {
        None => return Ok(out),
        Some(Value::Object(p)) => p,
        Some(other) => {
            return Err(format!(
                "Parameters: expected an object, found {}",
                kind(other)
            ))
        }
    };
    for (name, p) in params {
        let at = format!("Parameters.{name}");
        if name.is_empty() {
            return Err(format!("{at}: a parameter needs a name"));
        }
        let Value::Object(p) = p else {
            return Err(format!("{at}: expected an object, found {}", kind(p)));
        };
        if let Some(key) = p
            .keys()
            .find(|k| !matches!(k.as_str(), "Type" | "Default" | "Description"))
        {
            return Err(format!(
                "{at}.{key}: unknown key (a parameter has Type, Default, Description)"
            ));
        }
        match p.get("Type") {
            Some(Value::String(t)) if t == "String" => {}
            Some(other) => {
                return Err(format!(
                    "{at}.Type: only \"String\" is supported, found {other}"
                ))
            }
            None => return Err(format!("{at}.Type: required (\"String\")")),
        }
        let default = match p.get("Default") {
            None => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(other) => {
                return Err(format!(
                    "{at}.Default: expected a string, found {}",
                    kind(other)
                ))
            }
        };
        out.insert(name.clone(), default);
    }
    Ok(out)
}

fn parse_mappings(v: Option<&Value>) -> PResult<Mappings> {
    let mut out = Mappings::new();
    let maps = match v {
        None => return Ok(out),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(format!(
                "Mappings: expected an object, found {}",
                kind(other)
            ))
        }
    };
    for (map, tops) in maps {
        let at = format!("Mappings.{map}");
        let Value::Object(tops) = tops else {
            return Err(format!("{at}: expected an object, found {}", kind(tops)));
        };
        let mut parsed = BTreeMap::new();
        for (top, seconds) in tops {
            let at = format!("{at}.{top}");
            let Value::Object(seconds) = seconds else {
                return Err(format!("{at}: expected an object, found {}", kind(seconds)));
            };
            let mut inner = BTreeMap::new();
            for (second, value) in seconds {
                let Value::String(value) = value else {
                    return Err(format!(
                        "{at}.{second}: expected a string, found {} (Mappings hold plain strings)",
                        kind(value)
                    ));
                };
                inner.insert(second.clone(), value.clone());
            }
            parsed.insert(top.clone(), inner);
        }
        out.insert(map.clone(), parsed);
    }
    Ok(out)
}

/// `{"Ref": ...}` or `{"Fn::...": ...}`: the function's name and argument.
fn intrinsic(v: &Value) -> Option<(&str, &Value)> {
    let Value::Object(m) = v else { return None };
    if m.len() != 1 {
        return None;
    }
    let (key, arg) = m.iter().next()?;
    (key == "Ref" || key.starts_with("Fn::")).then_some((key.as_str(), arg))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_override(v: &Value, at: &str, merge_ok: bool) -> PResult<Override> {
    let o = match v.as_str() {
        Some("DO_NOTHING") => Override::DoNothing,
        Some("REPLACE") => Override::Replace,
        Some("FAIL") => Override::Fail,
        Some("MERGE") => Override::Merge,
        _ => {
            return Err(format!(
                "{at}: expected DO_NOTHING, REPLACE, FAIL or MERGE, found {v}"
            ))
        }
    };
    if o == Override::Merge && !merge_ok {
        return Err(format!(
            "{at}: MERGE applies only to AttributePayload and ThingGroups"
        ));
    }
    Ok(o)
}

/// `OverrideSettings` of a resource; `allowed` lists (property, MERGE allowed).
fn parse_overrides(
    v: Option<&Value>,
    at: &str,
    ty: &str,
    allowed: &[(&str, bool)],
) -> PResult<BTreeMap<String, Override>> {
    let mut out = BTreeMap::new();
    let at = format!("{at}.OverrideSettings");
    let settings = match v {
        None => return Ok(out),
        Some(Value::Object(s)) => s,
        Some(other) => return Err(format!("{at}: expected an object, found {}", kind(other))),
    };
    for (key, value) in settings {
        let Some(&(_, merge_ok)) = allowed.iter().find(|(name, _)| name == key) else {
            let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "{at}.{key}: cannot be overridden on {ty} (only {})",
                names.join(", ")
            ));
        };
        out.insert(
            key.clone(),
            parse_override(value, &format!("{at}.{key}"), merge_ok)?,
        );
    }
    Ok(out)
}

/// What parsing an expression needs to know: the declared parameters and mappings.
struct Cx<'a> {
    declared: &'a BTreeMap<String, Option<String>>,
    mappings: &'a Mappings,
}

impl Cx<'_> {
    fn reference(&self, name: &str, at: &str, refs: &mut BTreeSet<String>) -> PResult<StrExpr> {
        if self.declared.contains_key(name) || name.starts_with("AWS::") {
            refs.insert(name.to_owned());
            Ok(StrExpr::Ref(name.to_owned()))
        } else {
            Err(format!(
                "{at}: unknown parameter {name:?} (neither declared in Parameters nor a system parameter AWS::...)"
            ))
        }
    }

    /// A string, or an intrinsic function giving one.
    fn str(&self, v: &Value, at: &str, refs: &mut BTreeSet<String>) -> PResult<StrExpr> {
        match v {
            Value::String(s) => Ok(StrExpr::Lit(s.clone())),
            _ => match intrinsic(v) {
                Some((name, arg)) => self.function(name, arg, at, refs),
                None => Err(format!(
                    "{at}: expected a string or an intrinsic function, found {}",
                    kind(v)
                )),
            },
        }
    }

    fn function(
        &self,
        name: &str,
        arg: &Value,
        at: &str,
        refs: &mut BTreeSet<String>,
    ) -> PResult<StrExpr> {
        match name {
            "Ref" => match arg {
                Value::String(param) => self.reference(param, at, refs),
                _ => Err(format!("{at}: Ref needs a parameter name")),
            },
            "Fn::Join" => match arg.as_array().map(Vec::as_slice) {
                Some([Value::String(sep), list]) => Ok(StrExpr::Join {
                    sep: sep.clone(),
                    list: self.list(list, &format!("{at}.Fn::Join[1]"), refs)?,
                }),
                _ => Err(format!("{at}: Fn::Join needs [separator, [values]]")),
            },
            "Fn::Sub" => match arg {
                Value::String(text) => self.sub(text, &BTreeMap::new(), at, refs),
                Value::Array(a) => match a.as_slice() {
                    [Value::String(text), Value::Object(vars)] => {
                        let mut parsed = BTreeMap::new();
                        for (var, value) in vars {
                            let mut var_refs = BTreeSet::new();
                            let expr =
                                self.str(value, &format!("{at}.Fn::Sub[1].{var}"), &mut var_refs)?;
                            parsed.insert(var.clone(), (expr, var_refs));
                        }
                        self.sub(text, &parsed, at, refs)
                    }
                    _ => Err(format!(
                        "{at}: Fn::Sub needs \"text\" or [\"text\", {{variables}}]"
                    )),
                },
                _ => Err(format!(
                    "{at}: Fn::Sub needs \"text\" or [\"text\", {{variables}}]"
                )),
            },
            "Fn::Split" => Err(format!(
                "{at}: Fn::Split gives a list; use it inside Fn::Select or Fn::Join, or as ThingGroups"
            )),
            "Fn::Select" => match arg.as_array().map(Vec::as_slice) {
                Some([index, list]) => {
                    let index = match index {
                        Value::Number(n) => Index::Lit(
                            n.as_u64()
                                .and_then(|n| usize::try_from(n).ok())
                                .ok_or_else(|| {
                                    format!("{at}: Fn::Select index {n} is not a whole number")
                                })?,
                        ),
                        Value::String(s) => Index::Lit(s.trim().parse().map_err(|_| {
                            format!("{at}: Fn::Select index {s:?} is not a whole number")
                        })?),
                        other => Index::Expr(Box::new(self.str(
                            other,
                            &format!("{at}.Fn::Select[0]"),
                            refs,
                        )?)),
                    };
                    let list = self.list(list, &format!("{at}.Fn::Select[1]"), refs)?;
                    Ok(StrExpr::Select { index, list })
                }
                _ => Err(format!("{at}: Fn::Select needs [index, list]")),
            },
            "Fn::FindInMap" => match arg.as_array().map(Vec::as_slice) {
                Some([map, top, second]) => {
                    let map = self.str(map, &format!("{at}.Fn::FindInMap[0]"), refs)?;
                    if let StrExpr::Lit(m) = &map {
                        if !self.mappings.contains_key(m) {
                            return Err(format!("{at}: Fn::FindInMap: no mapping {m:?} in Mappings"));
                        }
                    }
                    let top = self.str(top, &format!("{at}.Fn::FindInMap[1]"), refs)?;
                    let second = self.str(second, &format!("{at}.Fn::FindInMap[2]"), refs)?;
                    Ok(StrExpr::FindInMap(Box::new([map, top, second])))
                }
                _ => Err(format!(
                    "{at}: Fn::FindInMap needs [MapName, TopLevelKey, SecondLevelKey]"
                )),
            },
            other => Err(format!("{at}: unknown intrinsic function {other:?}")),
        }
    }

    /// `Fn::Sub` text: `${Name}` is a variable or a parameter, `${!Text}` is `${Text}`.
    fn sub(
        &self,
        text: &str,
        vars: &BTreeMap<String, (StrExpr, BTreeSet<String>)>,
        at: &str,
        refs: &mut BTreeSet<String>,
    ) -> PResult<StrExpr> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find("${") {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            if let Some(escaped) = after.strip_prefix('!') {
                lit.push_str("${");
                rest = escaped;
                continue;
            }
            let Some(end) = after.find('}') else {
                return Err(format!("{at}: Fn::Sub has a \"${{\" without its \"}}\""));
            };
            let name = &after[..end];
            if name.is_empty() {
                return Err(format!("{at}: Fn::Sub has an empty \"${{}}\""));
            }
            if !lit.is_empty() {
                parts.push(StrExpr::Lit(std::mem::take(&mut lit)));
            }
            match vars.get(name) {
                Some((expr, var_refs)) => {
                    refs.extend(var_refs.iter().cloned());
                    parts.push(expr.clone());
                }
                None => parts.push(self.reference(name, at, refs)?),
            }
            rest = &after[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(StrExpr::Lit(lit));
        }
        Ok(StrExpr::Concat(parts))
    }

    /// A JSON array of strings/intrinsics, or `Fn::Split`.
    fn list(&self, v: &Value, at: &str, refs: &mut BTreeSet<String>) -> PResult<ListExpr> {
        match v {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.str(item, &format!("{at}[{i}]"), refs)?);
                }
                Ok(ListExpr::Items(out))
            }
            _ => match intrinsic(v) {
                Some(("Fn::Split", arg)) => match arg.as_array().map(Vec::as_slice) {
                    Some([Value::String(sep), value]) if !sep.is_empty() => Ok(ListExpr::Split {
                        sep: sep.clone(),
                        value: Box::new(self.str(value, &format!("{at}.Fn::Split[1]"), refs)?),
                    }),
                    _ => Err(format!(
                        "{at}: Fn::Split needs [separator, value], the separator a non-empty string"
                    )),
                },
                Some((name, _)) => Err(format!(
                    "{at}: expected a list ([...] or Fn::Split), found {name}, which gives a string"
                )),
                None => Err(format!(
                    "{at}: expected a list ([...] or Fn::Split), found {}",
                    kind(v)
                )),
            },
        }
    }

    /// An `AWS::IoT::Policy` document given as a JSON object; intrinsics may stand
    /// for string values.
    fn json(&self, v: &Value, at: &str, refs: &mut BTreeSet<String>) -> PResult<JsonExpr> {
        match v {
            Value::Object(_) if intrinsic(v).is_some() => Ok(JsonExpr::Str(self.str(v, at, refs)?)),
            Value::Object(m) => {
                let mut out = Vec::with_capacity(m.len());
                for (k, value) in m {
                    out.push((k.clone(), self.json(value, &format!("{at}.{k}"), refs)?));
                }
                Ok(JsonExpr::Object(out))
            }
            Value::Array(a) => {
                let mut out = Vec::with_capacity(a.len());
                for (i, value) in a.iter().enumerate() {
                    out.push(self.json(value, &format!("{at}[{i}]"), refs)?);
                }
                Ok(JsonExpr::Array(out))
            }
            other => Ok(JsonExpr::Plain(other.clone())),
        }
    }

    /// `AWS::IoT::Thing`. `BillingGroup` is accepted and ignored: fleetcore has no
    /// billing groups.
    fn thing(
        &self,
        logical: &str,
        props: &Map<String, Value>,
        overrides: Option<&Value>,
        at: &str,
        refs: &mut BTreeSet<String>,
    ) -> PResult<ThingRes> {
        let mut name = None;
        let mut attributes = Vec::new();
        let mut thing_type = None;
        let mut groups = None;
        for (key, value) in props {
            let at = format!("{at}.Properties.{key}");
            match key.as_str() {
                "ThingName" => name = Some(self.str(value, &at, refs)?),
                "AttributePayload" => {
                    let Value::Object(attrs) = value else {
                        return Err(format!(
                            "{at}: expected an object of attribute names to strings, found {}",
                            kind(value)
                        ));
                    };
                    if intrinsic(value).is_some() {
                        return Err(format!(
                            "{at}: expected an object of attribute names to strings, found an intrinsic function"
                        ));
                    }
                    for (attr, v) in attrs {
                        attributes
                            .push((attr.clone(), self.str(v, &format!("{at}.{attr}"), refs)?));
                    }
                }
                "ThingTypeName" => thing_type = Some(self.str(value, &at, refs)?),
                "ThingGroups" => groups = Some(self.list(value, &at, refs)?),
                "BillingGroup" => {}
                _ => return Err(format!("{at}: unknown property of AWS::IoT::Thing")),
            }
        }
        let name = name.ok_or_else(|| format!("{at}.Properties.ThingName: required"))?;
        let overrides = parse_overrides(
            overrides,
            at,
            "AWS::IoT::Thing",
            &[
                ("AttributePayload", true),
                ("ThingTypeName", false),
                ("ThingGroups", true),
            ],
        )?;
        let get = |k: &str| overrides.get(k).copied().unwrap_or(Override::DoNothing);
        Ok(ThingRes {
            logical: logical.to_owned(),
            name,
            attributes,
            thing_type,
            groups,
            attributes_override: get("AttributePayload"),
            thing_type_override: get("ThingTypeName"),
            groups_override: get("ThingGroups"),
        })
    }

    fn certificate(
        &self,
        logical: &str,
        props: &Map<String, Value>,
        overrides: Option<&Value>,
        at: &str,
        refs: &mut BTreeSet<String>,
    ) -> PResult<CertRes> {
        let mut id = None;
        let mut status = None;
        for (key, value) in props {
            let at = format!("{at}.Properties.{key}");
            match key.as_str() {
                "CertificateId" => id = Some(self.str(value, &at, refs)?),
                "Status" => status = Some(self.str(value, &at, refs)?),
                "CertificateSigningRequest" | "CertificatePem" | "CACertificatePem" => {
                    return Err(format!(
                        "{at}: not supported in fleet provisioning; use CertificateId"
                    ))
                }
                _ => return Err(format!("{at}: unknown property of AWS::IoT::Certificate")),
            }
        }
        let id = id.ok_or_else(|| format!("{at}.Properties.CertificateId: required"))?;
        let overrides =
            parse_overrides(overrides, at, "AWS::IoT::Certificate", &[("Status", false)])?;
        Ok(CertRes {
            logical: logical.to_owned(),
            id,
            status,
            status_override: overrides
                .get("Status")
                .copied()
                .unwrap_or(Override::DoNothing),
        })
    }

    fn policy(
        &self,
        logical: &str,
        props: &Map<String, Value>,
        at: &str,
        refs: &mut BTreeSet<String>,
    ) -> PResult<PolicyRes> {
        if let Some(key) = props
            .keys()
            .find(|k| !matches!(k.as_str(), "PolicyName" | "PolicyDocument"))
        {
            return Err(format!(
                "{at}.Properties.{key}: unknown property of AWS::IoT::Policy"
            ));
        }
        let logical = logical.to_owned();
        match (props.get("PolicyName"), props.get("PolicyDocument")) {
            (Some(_), Some(_)) => Err(format!(
                "{at}.Properties: PolicyName and PolicyDocument together; give one"
            )),
            (None, None) => Err(format!(
                "{at}.Properties: needs PolicyName (an existing policy) or PolicyDocument"
            )),
            (Some(name), None) => Ok(PolicyRes::Name {
                logical,
                name: self.str(name, &format!("{at}.Properties.PolicyName"), refs)?,
            }),
            (None, Some(doc)) => {
                let at = format!("{at}.Properties.PolicyDocument");
                match doc {
                    Value::Object(_) if intrinsic(doc).is_none() => Ok(PolicyRes::Json {
                        logical,
                        document: self.json(doc, &at, refs)?,
                    }),
                    Value::String(_) | Value::Object(_) => Ok(PolicyRes::Text {
                        logical,
                        document: self.str(doc, &at, refs)?,
                    }),
                    other => Err(format!(
                        "{at}: expected a JSON string or a JSON object, found {}",
                        kind(other)
                    )),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Evaluation

/// Evaluation of expressions. `Ok(None)` is "unknown": at parse (`params: None`) every
/// parameter is, so only what needs none is checked then.
struct Eval<'a> {
    params: Option<&'a BTreeMap<String, String>>,
    declared: &'a BTreeMap<String, Option<String>>,
    mappings: &'a Mappings,
}

type Out<T> = PResult<Option<T>>;

impl Eval<'_> {
    fn param(&self, name: &str, at: &str) -> Out<String> {
        let Some(params) = self.params else {
            return Ok(None);
        };
        // Parse admitted only declared and system names, so whatever is supplied under
        // `name` is meant for it.
        match params
            .get(name)
            .or_else(|| self.declared.get(name).and_then(Option::as_ref))
        {
            Some(value) => Ok(Some(value.clone())),
            None => Err(format!(
                "parameter {name:?} is required by {at} but was not given"
            )),
        }
    }

    fn str(&self, e: &StrExpr, at: &str) -> Out<String> {
        match e {
            StrExpr::Lit(s) => Ok(Some(s.clone())),
            StrExpr::Ref(name) => self.param(name, at),
            StrExpr::Join { sep, list } => Ok(self.list(list, at)?.map(|l| l.join(sep))),
            StrExpr::Concat(parts) => {
                let mut out = Some(String::new());
                for part in parts {
                    match (self.str(part, at)?, &mut out) {
                        (Some(v), Some(out)) => out.push_str(&v),
                        _ => out = None,
                    }
                }
                Ok(out)
            }
            StrExpr::Select { index, list } => {
                let index = match index {
                    Index::Lit(i) => Some(*i),
                    Index::Expr(e) => match self.str(e, at)? {
                        Some(s) => Some(s.trim().parse::<usize>().map_err(|_| {
                            format!("{at}: Fn::Select index {s:?} is not a whole number")
                        })?),
                        None => None,
                    },
                };
                let list = self.list(list, at)?;
                let (Some(index), Some(list)) = (index, list) else {
                    return Ok(None);
                };
                match list.get(index) {
                    Some(v) => Ok(Some(v.clone())),
                    None => Err(format!(
                        "{at}: Fn::Select index {index} is out of range for a list of {}",
                        list.len()
                    )),
                }
            }
            StrExpr::FindInMap(args) => {
                let [map, top, second] = args.as_ref();
                let (Some(map), Some(top), Some(second)) = (
                    self.str(map, at)?,
                    self.str(top, at)?,
                    self.str(second, at)?,
                ) else {
                    return Ok(None);
                };
                self.mappings
                    .get(&map)
                    .and_then(|m| m.get(&top))
                    .and_then(|m| m.get(&second))
                    .map(|v| Some(v.clone()))
                    .ok_or_else(|| {
                        format!("{at}: Fn::FindInMap: Mappings.{map}.{top}.{second} does not exist")
                    })
            }
        }
    }

    fn list(&self, l: &ListExpr, at: &str) -> Out<Vec<String>> {
        match l {
            ListExpr::Items(items) => {
                let mut out = Some(Vec::with_capacity(items.len()));
                for item in items {
                    match (self.str(item, at)?, &mut out) {
                        (Some(v), Some(out)) => out.push(v),
                        _ => out = None,
                    }
                }
                Ok(out)
            }
            ListExpr::Split { sep, value } => Ok(self
                .str(value, at)?
                .map(|v| v.split(sep.as_str()).map(str::to_owned).collect())),
        }
    }

    fn json(&self, j: &JsonExpr, at: &str) -> Out<Value> {
        Ok(match j {
            JsonExpr::Plain(v) => Some(v.clone()),
            JsonExpr::Str(e) => self.str(e, at)?.map(Value::String),
            JsonExpr::Array(items) => {
                let mut out = Some(Vec::with_capacity(items.len()));
                for item in items {
                    match (self.json(item, at)?, &mut out) {
                        (Some(v), Some(out)) => out.push(v),
                        _ => out = None,
                    }
                }
                out.map(Value::Array)
            }
            JsonExpr::Object(members) => {
                let mut out = Some(Map::new());
                for (k, item) in members {
                    match (self.json(item, at)?, &mut out) {
                        (Some(v), Some(out)) => {
                            out.insert(k.clone(), v);
                        }
                        _ => out = None,
                    }
                }
                out.map(Value::Object)
            }
        })
    }

    /// A name by IoT Core's thing-name rule (also that of thing types and groups).
    fn name(&self, e: &StrExpr, at: &str, what: &str) -> Out<String> {
        let value = self.str(e, at)?;
        if let Some(v) = &value {
            if !is_valid_thing_name(v) {
                return Err(format!(
                    "{at}: {v:?} is not a valid {what} ({THING_NAME_RULE})"
                ));
            }
        }
        Ok(value)
    }

    fn thing(&self, t: &ThingRes) -> PResult<ThingPlan> {
        let at = format!("Resources.{}.Properties", t.logical);
        let name = self.name(&t.name, &format!("{at}.ThingName"), "thing name")?;
        let mut attributes = BTreeMap::new();
        for (attr, e) in &t.attributes {
            let value = self.str(e, &format!("{at}.AttributePayload.{attr}"))?;
            attributes.insert(attr.clone(), value.unwrap_or_default());
        }
        let thing_type = match &t.thing_type {
            Some(e) => Some(
                self.name(e, &format!("{at}.ThingTypeName"), "thing type name")?
                    .unwrap_or_default(),
            ),
            None => None,
        };
        let mut groups = Vec::new();
        if let Some(l) = &t.groups {
            let at = format!("{at}.ThingGroups");
            for g in self.list(l, &at)?.unwrap_or_default() {
                if !is_valid_thing_name(&g) {
                    return Err(format!(
                        "{at}: {g:?} is not a valid thing group name ({THING_NAME_RULE})"
                    ));
                }
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
        Ok(ThingPlan {
            name: name.unwrap_or_default(),
            attributes,
            thing_type,
            groups,
            attributes_override: t.attributes_override,
            thing_type_override: t.thing_type_override,
            groups_override: t.groups_override,
        })
    }

    fn certificate(&self, c: &CertRes) -> PResult<CertPlan> {
        let at = format!("Resources.{}.Properties", c.logical);
        let certificate_id = self
            .str(&c.id, &format!("{at}.CertificateId"))?
            .unwrap_or_default();
        let active = match &c.status {
            None => true,
            Some(e) => {
                let at = format!("{at}.Status");
                match self.str(e, &at)? {
                    None => true,
                    Some(s) if s.eq_ignore_ascii_case("ACTIVE") => true,
                    Some(s) if s.eq_ignore_ascii_case("INACTIVE") => false,
                    Some(s) => {
                        return Err(format!("{at}: expected ACTIVE or INACTIVE, found {s:?}"))
                    }
                }
            }
        };
        Ok(CertPlan {
            certificate_id,
            active,
            status_override: c.status_override,
        })
    }

    /// The plan of a policy; at parse an unknown one is a placeholder.
    fn policy(&self, p: &PolicyRes) -> PResult<PolicyPlan> {
        let unknown = || PolicyPlan::Existing {
            name: String::new(),
        };
        let document = match p {
            PolicyRes::Name { logical, name } => {
                let at = format!("Resources.{logical}.Properties.PolicyName");
                let Some(name) = self.str(name, &at)? else {
                    return Ok(unknown());
                };
                if !is_valid_policy_name(&name) {
                    return Err(format!(
                        "{at}: {name:?} is not a valid policy name (1-128 characters of a-z A-Z 0-9 _ + = , . @ -)"
                    ));
                }
                return Ok(PolicyPlan::Existing { name });
            }
            PolicyRes::Text { logical, document } => {
                let at = format!("Resources.{logical}.Properties.PolicyDocument");
                let Some(text) = self.str(document, &at)? else {
                    return Ok(unknown());
                };
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(_)) => {}
                    Ok(other) => {
                        return Err(format!(
                            "{at}: the policy document must be a JSON object, found {}",
                            kind(&other)
                        ))
                    }
                    Err(e) => {
                        return Err(format!("{at}: the policy document is not valid JSON: {e}"))
                    }
                }
                text
            }
            PolicyRes::Json { logical, document } => {
                let at = format!("Resources.{logical}.Properties.PolicyDocument");
                match self.json(document, &at)? {
                    Some(value) => value.to_string(),
                    None => return Ok(unknown()),
                }
            }
        };
        Ok(PolicyPlan::Document {
            name: sha256_hex(&document),
            document,
        })
    }
}

/// IoT Core's policy-name rule: 1-128 characters of `[\w+=,.@-]`.
fn is_valid_policy_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_+=,.@-".contains(&b))
}

fn sha256_hex(text: &str) -> String {
    use fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
