//! [`Bound`]: every policy of one principal with the connection's variables substituted,
//! grouped by action, and the [`Decision`] it gives for a request.

use std::sync::Arc;

use crate::action::Action;
use crate::document::{Effect, Policy};
use crate::matcher::Matcher;
use crate::vars::Vars;

/// The outcome of an authorization check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Decision {
    /// Some `Allow` statement matches and no `Deny` does.
    Allow,
    /// A `Deny` statement matches; it overrides every `Allow`.
    ExplicitDeny,
    /// No statement matches: everything not allowed is denied.
    ImplicitDeny,
}

/// How many actions a [`Bound`] keeps rules for.
const ACTIONS: usize = Action::ALL.len();

/// The matchers of one action.
#[derive(Debug, Clone, Default)]
struct Rules {
    deny: Box<[Arc<Matcher>]>,
    allow: Box<[Arc<Matcher>]>,
}

/// Policies (all attached to one principal) with variables substituted: made once per
/// connection (and again when its policies or registry data change), then asked on every
/// CONNECT, SUBSCRIBE, PUBLISH and delivery.
#[derive(Debug, Clone, Default)]
pub struct Bound {
    rules: [Rules; ACTIONS],
}

impl Bound {
    /// Substitutes `vars` into every resource of `policies` and keeps, per action, the
    /// resources of the right type. A resource whose variable has no (safe) value is left
    /// out: its statement can never match it, whether it allows or denies.
    pub fn new(policies: &[&Policy], vars: &Vars) -> Bound {
        let mut deny: [Vec<Arc<Matcher>>; ACTIONS] = Default::default();
        let mut allow: [Vec<Arc<Matcher>>; ACTIONS] = Default::default();
        for statement in policies.iter().flat_map(|p| &p.statements) {
            let lists = match statement.effect {
                Effect::Allow => &mut allow,
                Effect::Deny => &mut deny,
            };
            for resource in &statement.resources {
                let actions = statement
                    .actions
                    .iter()
                    .filter(|a| resource.kind.is_none_or(|k| k == a.resource_kind()));
                let mut matcher = None;
                for action in actions {
                    // Bind lazily, once per resource, shared by all its actions.
                    let m = match &matcher {
                        Some(m) => Arc::clone(m),
                        None => match resource.pattern.bind(vars) {
                            Some(m) => matcher.insert(m).clone(),
                            None => break,
                        },
                    };
                    push(&mut lists[action.index()], m);
                }
            }
        }
        let mut rules: [Rules; ACTIONS] = Default::default();
        for (i, r) in rules.iter_mut().enumerate() {
            r.deny = std::mem::take(&mut deny[i]).into_boxed_slice();
            r.allow = std::mem::take(&mut allow[i]).into_boxed_slice();
        }
        Bound { rules }
    }

    /// Decides `action` on `name`: the resource without its ARN prefix and type, that is the
    /// client id for Connect, the topic for Publish/Receive/RetainPublish, the topic filter
    /// for Subscribe, and the thing name (`thing` or `thing/shadow` for a named shadow) for
    /// the shadow actions. Never allocates.
    pub fn decide(&self, action: Action, name: &str) -> Decision {
        let rules = &self.rules[action.index()];
        if rules.deny.iter().any(|m| m.matches(name)) {
            Decision::ExplicitDeny
        } else if rules.allow.iter().any(|m| m.matches(name)) {
            Decision::Allow
        } else {
            Decision::ImplicitDeny
        }
    }

    /// Whether `action` on `name` is allowed; see [`Bound::decide`].
    pub fn allows(&self, action: Action, name: &str) -> bool {
        self.decide(action, name) == Decision::Allow
    }
}

/// Adds a matcher to one action's list, skipping duplicates (the same statement in two
/// policies) and collapsing the list to a single `Everything` once one is present.
fn push(list: &mut Vec<Arc<Matcher>>, m: Arc<Matcher>) {
    if list.first().is_some_and(|f| **f == Matcher::Everything) {
        return;
    }
    if *m == Matcher::Everything {
        list.clear();
        list.push(m);
        return;
    }
    if !list.contains(&m) {
        list.push(m);
    }
}
