//! Policy actions (`iot:Connect`, ...), the resource type each one is checked against, and
//! how `Action` entries of a statement (names and wildcards) are read.

use std::fmt;
use std::str::FromStr;

use crate::matcher::{Matcher, Tok};

/// An operation a client asks to perform, as named in a policy's `Action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// `iot:Connect`: connect with a client id (resource `client/<client id>`).
    Connect,
    /// `iot:Publish`: publish to a topic (resource `topic/<topic>`).
    Publish,
    /// `iot:Receive`: have a message delivered from a topic, checked on every delivery
    /// (resource `topic/<topic>`).
    Receive,
    /// `iot:RetainPublish`: publish with the RETAIN flag set (resource `topic/<topic>`).
    RetainPublish,
    /// `iot:Subscribe`: subscribe with a topic filter (resource `topicfilter/<filter>`).
    Subscribe,
    /// `iot:GetThingShadow` (resource `thing/<thing name>[/<shadow name>]`).
    GetThingShadow,
    /// `iot:UpdateThingShadow` (resource `thing/<thing name>[/<shadow name>]`).
    UpdateThingShadow,
    /// `iot:DeleteThingShadow` (resource `thing/<thing name>[/<shadow name>]`).
    DeleteThingShadow,
}

/// The resource types of IoT Core ARNs (`arn:aws:iot:<region>:<account>:<type>/<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResourceKind {
    Client,
    Topic,
    TopicFilter,
    Thing,
}

impl ResourceKind {
    /// Recognises the `<type>` of an ARN; type names are case-sensitive, as in IoT Core.
    pub(crate) fn from_arn_type(t: &str) -> Option<ResourceKind> {
        match t {
            "client" => Some(ResourceKind::Client),
            "topic" => Some(ResourceKind::Topic),
            "topicfilter" => Some(ResourceKind::TopicFilter),
            "thing" => Some(ResourceKind::Thing),
            _ => None,
        }
    }
}

impl Action {
    /// Every action fleetcore enforces, in declaration order.
    pub const ALL: [Action; 8] = [
        Action::Connect,
        Action::Publish,
        Action::Receive,
        Action::RetainPublish,
        Action::Subscribe,
        Action::GetThingShadow,
        Action::UpdateThingShadow,
        Action::DeleteThingShadow,
    ];

    /// The name used in policy documents, such as `iot:Connect`.
    pub fn name(self) -> &'static str {
        match self {
            Action::Connect => "iot:Connect",
            Action::Publish => "iot:Publish",
            Action::Receive => "iot:Receive",
            Action::RetainPublish => "iot:RetainPublish",
            Action::Subscribe => "iot:Subscribe",
            Action::GetThingShadow => "iot:GetThingShadow",
            Action::UpdateThingShadow => "iot:UpdateThingShadow",
            Action::DeleteThingShadow => "iot:DeleteThingShadow",
        }
    }

    /// The only resource type a statement can grant or deny this action on.
    pub(crate) fn resource_kind(self) -> ResourceKind {
        match self {
            Action::Connect => ResourceKind::Client,
            Action::Publish | Action::Receive | Action::RetainPublish => ResourceKind::Topic,
            Action::Subscribe => ResourceKind::TopicFilter,
            Action::GetThingShadow | Action::UpdateThingShadow | Action::DeleteThingShadow => {
                ResourceKind::Thing
            }
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of [`Action::from_str`]: the text is not exactly one action fleetcore enforces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an action fleetcore enforces")]
pub struct UnknownAction(pub String);

impl FromStr for Action {
    type Err = UnknownAction;

    /// Reads one action name, ignoring ASCII case as IoT Core does (`iot:connect`).
    /// Wildcards are only meaningful inside a policy and are not accepted here.
    fn from_str(s: &str) -> Result<Action, UnknownAction> {
        Action::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownAction(s.to_owned()))
    }
}

impl serde::Serialize for Action {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Action {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A set of actions, one bit per [`Action`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ActionSet(u8);

impl ActionSet {
    pub(crate) const ALL: ActionSet = ActionSet(0xff);

    pub(crate) fn insert(&mut self, a: Action) {
        self.0 |= 1 << a.index();
    }

    pub(crate) fn union(self, other: ActionSet) -> ActionSet {
        ActionSet(self.0 | other.0)
    }

    pub(crate) fn contains(self, a: Action) -> bool {
        self.0 & (1 << a.index()) != 0
    }

    pub(crate) fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().filter(move |a| self.contains(*a))
    }
}

/// Real IoT Core data-plane actions that fleetcore has no operation for. A policy copied
/// from AWS may name them; they are accepted and grant or deny nothing here.
const NOT_ENFORCED: &[&str] = &[
    "iot:GetRetainedMessage",
    "iot:ListRetainedMessages",
    "iot:ListNamedShadowsForThing",
    "iot:AssumeRoleWithCertificate",
    "iotjobsdata:DescribeJobExecution",
    "iotjobsdata:GetPendingJobExecutions",
    "iotjobsdata:StartNextPendingJobExecution",
    "iotjobsdata:UpdateJobExecution",
];

/// Reads one entry of a statement's `Action`: `*`, an action name (any ASCII case), or a
/// name with `*`/`?` wildcards such as `iot:*` or `iot:*ThingShadow`. The result may be
/// empty when the entry names only actions fleetcore does not enforce.
pub(crate) fn parse_action_entry(text: &str) -> Result<ActionSet, String> {
    if text == "*" {
        return Ok(ActionSet::ALL);
    }
    let Some((service, name)) = text.split_once(':') else {
        return Err(format!(
            "{text:?} is not an action: expected \"iot:<Name>\" such as \"iot:Connect\", or \"*\""
        ));
    };
    if !service.eq_ignore_ascii_case("iot") && !service.eq_ignore_ascii_case("iotjobsdata") {
        return Err(format!(
            "{text:?} is not an AWS IoT Core data-plane action (service must be \"iot\")"
        ));
    }
    let wanted = text.to_ascii_lowercase();
    let known = Action::ALL
        .iter()
        .map(|a| (a.name(), Some(*a)))
        .chain(NOT_ENFORCED.iter().map(|n| (*n, None)));

    let mut set = ActionSet::default();
    let mut any = false;
    if name.contains(['*', '?']) {
        let toks = wanted
            .bytes()
            .map(|b| match b {
                b'*' => Tok::Star,
                b'?' => Tok::One,
                b => Tok::Byte(b),
            })
            .collect();
        let pattern = Matcher::compile(toks);
        for (known_name, action) in known {
            if pattern.matches(&known_name.to_ascii_lowercase()) {
                any = true;
                if let Some(a) = action {
                    set.insert(a);
                }
            }
        }
        if !any {
            return Err(format!("{text:?} matches no AWS IoT Core action"));
        }
    } else {
        match known
            .into_iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(text))
        {
            Some((_, Some(a))) => set.insert(a),
            Some((_, None)) => {}
            None => {
                return Err(format!(
                    "unknown action {text:?} (fleetcore enforces {})",
                    Action::ALL.map(Action::name).join(", ")
                ))
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> Vec<Action> {
        parse_action_entry(text).unwrap().iter().collect()
    }

    #[test]
    fn names_parse_in_any_case() {
        assert_eq!(set("iot:Connect"), [Action::Connect]);
        assert_eq!(set("iot:connect"), [Action::Connect]);
        assert_eq!(set("IOT:RETAINPUBLISH"), [Action::RetainPublish]);
        assert_eq!("iot:subscribe".parse(), Ok(Action::Subscribe));
        assert!("iot:*".parse::<Action>().is_err());
    }

    #[test]
    fn wildcards_expand_to_every_matching_action() {
        assert_eq!(set("*"), Action::ALL);
        assert_eq!(set("iot:*"), Action::ALL);
        assert_eq!(
            set("iot:*ThingShadow"),
            [
                Action::GetThingShadow,
                Action::UpdateThingShadow,
                Action::DeleteThingShadow
            ]
        );
        assert_eq!(set("iot:?ublish"), [Action::Publish]);
        assert_eq!(set("iotjobsdata:*"), []);
    }

    #[test]
    fn actions_fleetcore_does_not_enforce_are_accepted_as_nothing() {
        assert_eq!(set("iot:GetRetainedMessage"), []);
        assert_eq!(set("iotjobsdata:DescribeJobExecution"), []);
    }

    #[test]
    fn unknown_actions_are_refused() {
        assert!(parse_action_entry("iot:Conect")
            .unwrap_err()
            .starts_with("unknown action \"iot:Conect\""));
        assert!(parse_action_entry("iot:Zap*").is_err());
        assert!(parse_action_entry("s3:GetObject").is_err());
        assert!(parse_action_entry("Connect").is_err());
    }

    #[test]
    fn serde_uses_policy_names() {
        let json = serde_json::to_string(&Action::UpdateThingShadow).unwrap();
        assert_eq!(json, "\"iot:UpdateThingShadow\"");
        let back: Action = serde_json::from_str(&json).unwrap();
        assert_eq!(back, Action::UpdateThingShadow);
    }
}
