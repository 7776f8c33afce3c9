//! Static thing groups, with IoT Core's rules: a group has one parent at most, fixed
//! when it is made; a hierarchy is at most [`MAX_DEPTH`] deep and a group has at most
//! [`MAX_CHILDREN`] direct children; a thing is in at most [`MAX_GROUPS_PER_THING`]
//! groups, never in two of the same hierarchy (two groups with the same root).
//!
//! [`Groups`] is the part of the registry's state that holds them: the rules are
//! checked here, on memory, before the registry writes anything; the registry's one
//! `apply` path writes the records (kinds [`GROUP`] and [`MEMBERSHIP`]) and then
//! changes memory through the methods below.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{
    del, not_found, put, valid_attributes, Registry, RegistryError, RegistryEvent, Result,
};
use fleetcore_core::storage::RecordOp;
use fleetcore_core::time::now_ms;

/// Record kind of a group: key = its name, value = the [`ThingGroup`] as JSON.
pub(super) const GROUP: &str = "thing-group";
/// Record kind of a membership: key = `group/thing` (neither name can hold a `/`).
pub(super) const MEMBERSHIP: &str = "thing-group-member";

/// Levels a hierarchy may have, a root group being level 1 (IoT Core's limit).
pub const MAX_DEPTH: usize = 7;
/// Direct child groups a group may have (IoT Core's limit).
pub const MAX_CHILDREN: usize = 100;
/// Groups a thing may be in (IoT Core's limit).
pub const MAX_GROUPS_PER_THING: usize = 10;
/// The longest description, in characters (IoT Core's `thingGroupDescription`).
pub const MAX_DESCRIPTION: usize = 2028;

/// A static thing group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThingGroup {
    pub name: String,
    /// The parent group, fixed at creation; `None` for a root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// 1 at creation, incremented on every update.
    pub version: u64,
    pub created_ms: u64,
}

/// Where a group stands in its hierarchy, for describing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    #[serde(flatten)]
    pub group: ThingGroup,
    /// The root of its hierarchy (itself for a root).
    pub root: String,
    /// From the root down to the group itself.
    pub path: Vec<String>,
    /// 1 for a root group.
    pub depth: usize,
    /// Its direct child groups, sorted.
    pub children: Vec<String>,
    /// How many things are direct members.
    pub member_count: usize,
}

/// The groups, their hierarchy and memberships (part of the registry's state).
#[derive(Default, Clone)]
pub(super) struct Groups {
    groups: BTreeMap<String, ThingGroup>,
    /// group -> its direct child groups (derived from the parents).
    children: BTreeMap<String, BTreeSet<String>>,
    /// group -> its direct member things.
    members: BTreeMap<String, BTreeSet<String>>,
    /// thing -> the groups it is a direct member of.
    of_thing: BTreeMap<String, BTreeSet<String>>,
}

pub(super) fn valid_group_name(name: &str) -> Result<()> {
    if crate::names::is_valid_thing_name(name) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!(
            "thing group name {name:?} must be 1-128 characters of a-z A-Z 0-9 : _ -"
        )))
    }
}

pub(super) fn valid_description(d: &str) -> Result<()> {
    if d.chars().count() > MAX_DESCRIPTION || d.chars().any(char::is_control) {
        return Err(RegistryError::Invalid(format!(
            "a thing group description is at most {MAX_DESCRIPTION} characters, without control characters"
        )));
    }
    Ok(())
}

fn membership_key(group: &str, thing: &str) -> String {
    format!("{group}/{thing}")
}

impl Groups {
    /// Takes one stored record of kind [`GROUP`] or [`MEMBERSHIP`] at load; `false` for
    /// one that does not read. Call [`Groups::settle`] once every record is in.
    pub(super) fn load(&mut self, kind: &str, key: &str, value: &[u8]) -> bool {
        if kind == GROUP {
            match serde_json::from_slice::<ThingGroup>(value) {
                Ok(g) if g.name == key => {
                    self.groups.insert(key.to_owned(), g);
                    true
                }
                _ => false,
            }
        } else {
            match key.split_once('/') {
                Some((group, thing)) => {
                    self.link(group, thing);
                    true
                }
                None => false,
            }
        }
    }

    /// After loading: builds the child index and forgets, with a warning, what no
    /// change of ours leaves behind but a damaged store could: a membership of an
    /// unknown group or thing. A group whose parent is missing counts as a root.
    pub(super) fn settle(&mut self, thing_exists: impl Fn(&str) -> bool) {
        self.children.clear();
        for g in self.groups.values() {
            if let Some(p) = &g.parent {
                if self.groups.contains_key(p) {
                    self.children
                        .entry(p.clone())
                        .or_default()
                        .insert(g.name.clone());
                } else {
                    tracing::warn!(group = %g.name, parent = %p, "thing group's parent is not stored; treating it as a root");
                }
            }
        }
        let stale: Vec<(String, String)> = self
            .members
            .iter()
            .flat_map(|(g, things)| things.iter().map(move |t| (g.clone(), t.clone())))
            .filter(|(g, t)| !self.groups.contains_key(g) || !thing_exists(t))
            .collect();
        for (g, t) in stale {
            tracing::warn!(group = %g, thing = %t, "skipping a membership of an unknown thing group or thing");
            self.unlink(&g, &t);
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&ThingGroup> {
        self.groups.get(name)
    }

    pub(super) fn all(&self) -> Vec<ThingGroup> {
        self.groups.values().cloned().collect()
    }

    /// The parent of `name`, if it has one that exists.
    fn parent(&self, name: &str) -> Option<&str> {
        self.groups
            .get(name)?
            .parent
            .as_deref()
            .filter(|p| self.groups.contains_key(*p))
    }

    /// From the root down to `name`; `None` for an unknown group.
    pub(super) fn path(&self, name: &str) -> Option<Vec<String>> {
        self.groups.get(name)?;
        let mut path = vec![name.to_owned()];
        let mut at = name;
        // Parents are fixed at creation and exist then, so the chain ends; the bound
        // only guards against a store edited by hand into a loop.
        while let Some(p) = self.parent(at) {
            if path.len() > MAX_DEPTH * 2 {
                break;
            }
            path.push(p.to_owned());
            at = p;
        }
        path.reverse();
        Some(path)
    }

    fn root(&self, name: &str) -> Option<String> {
        self.path(name).and_then(|p| p.into_iter().next())
    }

    pub(super) fn info(&self, name: &str) -> Option<GroupInfo> {
        let group = self.groups.get(name)?.clone();
        let path = self.path(name)?;
        Some(GroupInfo {
            root: path[0].clone(),
            depth: path.len(),
            path,
            children: self.children_of(name),
            member_count: self.members.get(name).map_or(0, BTreeSet::len),
            group,
        })
    }

    pub(super) fn children_of(&self, name: &str) -> Vec<String> {
        self.children
            .get(name)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The things in `name` (and, with `recursive`, in every group below it), each
    /// once, sorted; `None` for an unknown group.
    pub(super) fn things(&self, name: &str, recursive: bool) -> Option<Vec<String>> {
        self.groups.get(name)?;
        let mut out: BTreeSet<&String> = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        let mut seen = BTreeSet::new();
        while let Some(g) = todo.pop() {
            if !seen.insert(g.clone()) {
                continue;
            }
            if let Some(m) = self.members.get(&g) {
                out.extend(m.iter());
            }
            if recursive {
                todo.extend(self.children_of(&g));
            }
        }
        Some(out.into_iter().cloned().collect())
    }

    /// The groups `thing` is a direct member of, sorted.
    pub(super) fn of_thing(&self, thing: &str) -> Vec<String> {
        self.of_thing
            .get(thing)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub(super) fn is_member(&self, group: &str, thing: &str) -> bool {
        self.members.get(group).is_some_and(|m| m.contains(thing))
    }

    // ----- checks (before anything is written) ---------------------------------

    /// Why a group `name` under `parent` cannot be made, if it cannot.
    pub(super) fn check_create(&self, name: &str, parent: Option<&str>) -> Result<()> {
        if self.groups.contains_key(name) {
            return Err(RegistryError::Conflict(format!(
                "thing group {name:?} already exists"
            )));
        }
        let Some(parent) = parent else {
            return Ok(());
        };
        let path = self
            .path(parent)
            .ok_or_else(|| not_found("parent thing group", parent))?;
        if path.len() >= MAX_DEPTH {
            return Err(RegistryError::Conflict(format!(
                "thing group {parent:?} is at depth {} ({}); a hierarchy is at most {MAX_DEPTH} levels deep",
                path.len(),
                path.join(" > ")
            )));
        }
        let siblings = self.children.get(parent).map_or(0, BTreeSet::len);
        if siblings >= MAX_CHILDREN {
            return Err(RegistryError::Conflict(format!(
                "thing group {parent:?} already has {siblings} child groups; a group has at most {MAX_CHILDREN}"
            )));
        }
        Ok(())
    }

    /// Why `thing` cannot join `group`, if it cannot (the group exists).
    pub(super) fn check_add(&self, group: &str, thing: &str) -> Result<()> {
        let root = self
            .root(group)
            .ok_or_else(|| not_found("thing group", group))?;
        let current = self.of_thing.get(thing);
        let count = current.map_or(0, BTreeSet::len);
        if count >= MAX_GROUPS_PER_THING {
            return Err(RegistryError::Conflict(format!(
                "thing {thing:?} is already in {count} thing groups; a thing can be in at most {MAX_GROUPS_PER_THING}"
            )));
        }
        if let Some(same) = current
            .into_iter()
            .flatten()
            .find(|g| self.root(g).as_deref() == Some(root.as_str()))
        {
            return Err(RegistryError::Conflict(format!(
                "thing {thing:?} is already in thing group {same:?} of the same hierarchy (root {root:?}); \
                 a thing can be in only one group of a hierarchy"
            )));
        }
        Ok(())
    }

    /// Why `name` cannot be deleted, if it cannot (it exists).
    pub(super) fn check_delete(&self, name: &str) -> Result<()> {
        if let Some(c) = self.children.get(name).filter(|c| !c.is_empty()) {
            let list: Vec<&str> = c.iter().map(String::as_str).collect();
            return Err(RegistryError::Conflict(format!(
                "thing group {name:?} has child groups ({}); delete them first",
                list.join(", ")
            )));
        }
        Ok(())
    }

    // ----- records -------------------------------------------------------------

    pub(super) fn put_group(g: &ThingGroup) -> RecordOp {
        put(GROUP, &g.name, g)
    }

    pub(super) fn del_group(name: &str) -> RecordOp {
        del(GROUP, name)
    }

    pub(super) fn put_membership(group: &str, thing: &str) -> RecordOp {
        put(MEMBERSHIP, &membership_key(group, thing), &true)
    }

    pub(super) fn del_membership(group: &str, thing: &str) -> RecordOp {
        del(MEMBERSHIP, &membership_key(group, thing))
    }

    // ----- changes to memory (after the records are on disk) -------------------

    /// Puts a group in (new or updated; its parent never changes).
    pub(super) fn insert(&mut self, g: ThingGroup) {
        if let Some(p) = &g.parent {
            self.children
                .entry(p.clone())
                .or_default()
                .insert(g.name.clone());
        }
        self.groups.insert(g.name.clone(), g);
    }

    /// Takes a group out with its memberships; returns the things that were in it.
    pub(super) fn remove(&mut self, name: &str) -> Vec<String> {
        let things: Vec<String> = self
            .members
            .get(name)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        for t in &things {
            self.unlink(name, t);
        }
        if let Some(g) = self.groups.remove(name) {
            if let Some(p) = g.parent {
                if let Some(c) = self.children.get_mut(&p) {
                    c.remove(name);
                    if c.is_empty() {
                        self.children.remove(&p);
                    }
                }
            }
        }
        self.children.remove(name);
        things
    }

    pub(super) fn link(&mut self, group: &str, thing: &str) {
        self.members
            .entry(group.to_owned())
            .or_default()
            .insert(thing.to_owned());
        self.of_thing
            .entry(thing.to_owned())
            .or_default()
            .insert(group.to_owned());
    }

    pub(super) fn unlink(&mut self, group: &str, thing: &str) {
        if let Some(m) = self.members.get_mut(group) {
            m.remove(thing);
            if m.is_empty() {
                self.members.remove(group);
            }
        }
        if let Some(g) = self.of_thing.get_mut(thing) {
            g.remove(group);
            if g.is_empty() {
                self.of_thing.remove(thing);
            }
        }
    }
}

/// Static thing groups (see the module doc for the rules). Every change is on disk
/// before it returns and in memory before its events are told.
impl Registry {
    /// Makes a group, under `parent` if given (which must exist; fixed from now on).
    pub async fn create_group(
        &self,
        name: &str,
        parent: Option<&str>,
        description: Option<String>,
        attributes: BTreeMap<String, String>,
    ) -> Result<ThingGroup> {
        valid_group_name(name)?;
        let description = description.filter(|d| !d.is_empty());
        if let Some(d) = &description {
            valid_description(d)?;
        }
        valid_attributes(&attributes)?;
        let _w = self.exclusive().await;
        self.state.read().groups.check_create(name, parent)?;
        let group = ThingGroup {
            name: name.to_owned(),
            parent: parent.map(str::to_owned),
            description,
            attributes,
            version: 1,
            created_ms: now_ms(),
        };
        self.apply(vec![Groups::put_group(&group)], |st| {
            st.groups.insert(group.clone())
        })
        .await?;
        Ok(group)
    }

    /// Replaces the description (when given; "" removes it) and merges (or, with
    /// `merge` false, replaces) the attributes; an attribute set to "" is removed on
    /// merge. The parent cannot change.
    pub async fn update_group(
        &self,
        name: &str,
        description: Option<String>,
        attributes: Option<BTreeMap<String, String>>,
        merge: bool,
    ) -> Result<ThingGroup> {
        let _w = self.exclusive().await;
        let mut group = self
            .group(name)
            .ok_or_else(|| not_found("thing group", name))?;
        if let Some(d) = description {
            valid_description(&d)?;
            group.description = (!d.is_empty()).then_some(d);
        }
        if let Some(attrs) = attributes {
            if merge {
                for (k, v) in attrs {
                    if v.is_empty() {
                        group.attributes.remove(&k);
                    } else {
                        group.attributes.insert(k, v);
                    }
                }
            } else {
                group.attributes = attrs;
            }
        }
        valid_attributes(&group.attributes)?;
        group.version += 1;
        self.apply(vec![Groups::put_group(&group)], |st| {
            st.groups.insert(group.clone())
        })
        .await?;
        Ok(group)
    }

    /// Deletes a group that has no child groups, with its memberships (each told as
    /// [`RegistryEvent::GroupMembershipChanged`] with `added: false`).
    pub async fn delete_group(&self, name: &str) -> Result<()> {
        let _w = self.exclusive().await;
        let things = {
            let st = self.state.read();
            if st.groups.get(name).is_none() {
                return Err(not_found("thing group", name));
            }
            st.groups.check_delete(name)?;
            st.groups.things(name, false).unwrap_or_default()
        };
        let mut ops = vec![Groups::del_group(name)];
        ops.extend(things.iter().map(|t| Groups::del_membership(name, t)));
        self.apply(ops, |st| {
            st.groups.remove(name);
        })
        .await?;
        for thing in things {
            self.tell(RegistryEvent::GroupMembershipChanged {
                group: name.to_owned(),
                thing,
                added: false,
            });
        }
        Ok(())
    }

    /// Adds a thing to a group; `Ok(false)` when it was a member already (nothing is
    /// written or told). Refused past [`MAX_GROUPS_PER_THING`] groups or for a second
    /// group of the same hierarchy.
    pub async fn add_thing_to_group(&self, group: &str, thing: &str) -> Result<bool> {
        let _w = self.exclusive().await;
        {
            let st = self.state.read();
            if st.groups.get(group).is_none() {
                return Err(not_found("thing group", group));
            }
            if !st.things.contains_key(thing) {
                return Err(not_found("thing", thing));
            }
            if st.groups.is_member(group, thing) {
                return Ok(false);
            }
            st.groups.check_add(group, thing)?;
        }
        self.apply(vec![Groups::put_membership(group, thing)], |st| {
            st.groups.link(group, thing)
        })
        .await?;
        self.tell(RegistryEvent::GroupMembershipChanged {
            group: group.to_owned(),
            thing: thing.to_owned(),
            added: true,
        });
        Ok(true)
    }

    /// Takes a thing out of a group it is a direct member of.
    pub async fn remove_thing_from_group(&self, group: &str, thing: &str) -> Result<()> {
        let _w = self.exclusive().await;
        {
            let st = self.state.read();
            if st.groups.get(group).is_none() {
                return Err(not_found("thing group", group));
            }
            if !st.groups.is_member(group, thing) {
                return Err(RegistryError::NotFound(format!(
                    "thing {thing:?} is not a member of thing group {group:?}"
                )));
            }
        }
        self.apply(vec![Groups::del_membership(group, thing)], |st| {
            st.groups.unlink(group, thing)
        })
        .await?;
        self.tell(RegistryEvent::GroupMembershipChanged {
            group: group.to_owned(),
            thing: thing.to_owned(),
            added: false,
        });
        Ok(())
    }

    pub fn group(&self, name: &str) -> Option<ThingGroup> {
        self.state.read().groups.get(name).cloned()
    }

    /// Every group, by name.
    pub fn groups(&self) -> Vec<ThingGroup> {
        self.state.read().groups.all()
    }

    /// A group with its place in the hierarchy, children and member count.
    pub fn group_info(&self, name: &str) -> Option<GroupInfo> {
        self.state.read().groups.info(name)
    }

    /// From the root of its hierarchy down to the group itself; `None` for an unknown
    /// group. A thing added to a group is in every group of this path, recursively.
    pub fn group_path(&self, name: &str) -> Option<Vec<String>> {
        self.state.read().groups.path(name)
    }

    /// The things of a group: its direct members, or with `recursive` those of the
    /// group and of every group below it, each once; sorted. `None` for an unknown
    /// group.
    pub fn group_things(&self, name: &str, recursive: bool) -> Option<Vec<String>> {
        self.state.read().groups.things(name, recursive)
    }

    /// The groups a thing is a direct member of, sorted (empty for an unknown thing).
    pub fn thing_groups(&self, thing: &str) -> Vec<String> {
        self.state.read().groups.of_thing(thing)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use fleetcore_store::Store;
    use parking_lot::Mutex;

    use super::*;
    use crate::token::TokenConfig;

    fn open(dir: &std::path::Path) -> (Registry, Store) {
        let (store, loaded) = Store::open(&dir.join("s.redb"), Default::default()).unwrap();
        let reg = Registry::new(
            Arc::new(store.clone()),
            &loaded.records,
            TokenConfig::default(),
        );
        (reg, store)
    }

    async fn group(reg: &Registry, name: &str, parent: Option<&str>) -> ThingGroup {
        reg.create_group(name, parent, None, BTreeMap::new())
            .await
            .unwrap()
    }

    async fn things(reg: &Registry, names: &[&str]) {
        for t in names {
            reg.create_thing(t, None, BTreeMap::new()).await.unwrap();
        }
    }

    fn conflict(e: RegistryError, needle: &str) {
        assert!(matches!(e, RegistryError::Conflict(_)), "{e:?}");
        assert!(e.to_string().contains(needle), "{e}");
    }

    fn events(reg: &Registry) -> Arc<Mutex<Vec<RegistryEvent>>> {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        reg.on_event(move |ev| s.lock().push(ev.clone()));
        seen
    }

    fn changed(group: &str, thing: &str, added: bool) -> RegistryEvent {
        RegistryEvent::GroupMembershipChanged {
            group: group.into(),
            thing: thing.into(),
            added,
        }
    }

    #[tokio::test]
    async fn a_group_is_made_under_an_existing_parent_with_a_valid_name_once() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path());
        let root = reg
            .create_group(
                "fleet",
                None,
                Some("all agents".into()),
                BTreeMap::from([("owner".into(), "ops".into())]),
            )
            .await
            .unwrap();
        assert_eq!((root.version, root.parent.as_deref()), (1, None));
        assert_eq!(root.description.as_deref(), Some("all agents"));
        for bad in ["", "a/b", "a b", "a#", &"g".repeat(129)] {
            let e = reg
                .create_group(bad, None, None, BTreeMap::new())
                .await
                .unwrap_err();
            assert!(matches!(e, RegistryError::Invalid(_)), "{bad:?}: {e}");
        }
        let e = reg
            .create_group("x", Some("nowhere"), None, BTreeMap::new())
            .await
            .unwrap_err();
        assert_eq!(
            e,
            RegistryError::NotFound("parent thing group \"nowhere\" not found".into())
        );
        assert!(reg.group("x").is_none(), "nothing made for a refusal");
        let e = reg
            .create_group("x", None, Some("a\nb".into()), BTreeMap::new())
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::Invalid(_)), "{e}");
        group(&reg, "eu", Some("fleet")).await;
        // The same name again, even under another parent, is a conflict: a name is
        // made once, and its parent with it.
        conflict(
            reg.create_group("eu", None, None, BTreeMap::new())
                .await
                .unwrap_err(),
            "already exists",
        );
        assert_eq!(reg.group("eu").unwrap().parent.as_deref(), Some("fleet"));
        let info = reg.group_info("fleet").unwrap();
        assert_eq!(
            (info.root.as_str(), info.depth, info.children.clone()),
            ("fleet", 1, vec!["eu".to_string()])
        );
        let names: Vec<String> = reg.groups().into_iter().map(|g| g.name).collect();
        assert_eq!(names, ["eu", "fleet"]);
    }

    #[tokio::test]
    async fn a_hierarchy_is_at_most_seven_deep() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path());
        let mut parent: Option<String> = None;
        for level in 1..=MAX_DEPTH {
            let name = format!("l{level}");
            group(&reg, &name, parent.as_deref()).await;
            parent = Some(name);
        }
        let info = reg.group_info("l7").unwrap();
        assert_eq!(info.depth, 7);
        assert_eq!(info.path, ["l1", "l2", "l3", "l4", "l5", "l6", "l7"]);
        assert_eq!(info.root, "l1");
        conflict(
            reg.create_group("l8", Some("l7"), None, BTreeMap::new())
                .await
                .unwrap_err(),
            "at most 7 levels",
        );
        // Beside the deepest level is still fine.
        group(&reg, "l7b", Some("l6")).await;
    }

    #[tokio::test]
    async fn a_group_has_at_most_a_hundred_children() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path());
        group(&reg, "parent", None).await;
        for i in 0..MAX_CHILDREN {
            group(&reg, &format!("c{i}"), Some("parent")).await;
        }
        conflict(
            reg.create_group("one-more", Some("parent"), None, BTreeMap::new())
                .await
                .unwrap_err(),
            "already has 100 child groups",
        );
        assert_eq!(reg.group_info("parent").unwrap().children.len(), 100);
        // Room again after one is deleted.
        reg.delete_group("c0").await.unwrap();
        group(&reg, "one-more", Some("parent")).await;
    }

    #[tokio::test]
    async fn a_thing_is_in_at_most_ten_groups_and_one_per_hierarchy() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path());
        things(&reg, &["t"]).await;
        for i in 0..MAX_GROUPS_PER_THING {
            group(&reg, &format!("g{i}"), None).await;
            assert!(reg.add_thing_to_group(&format!("g{i}"), "t").await.unwrap());
        }
        group(&reg, "g10", None).await;
        conflict(
            reg.add_thing_to_group("g10", "t").await.unwrap_err(),
            "at most 10",
        );
        assert_eq!(reg.thing_groups("t").len(), 10);
        // Adding again to a group it is in changes nothing.
        assert!(!reg.add_thing_to_group("g3", "t").await.unwrap());

        // The same hierarchy: a group below g0, or below that, is refused...
        group(&reg, "g0-child", Some("g0")).await;
        group(&reg, "g0-grandchild", Some("g0-child")).await;
        reg.remove_thing_from_group("g9", "t").await.unwrap();
        conflict(
            reg.add_thing_to_group("g0-grandchild", "t")
                .await
                .unwrap_err(),
            "same hierarchy (root \"g0\")",
        );
        // ...as is the root when the thing is in a group below it.
        reg.remove_thing_from_group("g0", "t").await.unwrap();
        reg.add_thing_to_group("g0-grandchild", "t").await.unwrap();
        conflict(
            reg.add_thing_to_group("g0", "t").await.unwrap_err(),
            "\"g0-grandchild\" of the same hierarchy",
        );
        // Unknown group, unknown thing, not a member.
        let e = reg.add_thing_to_group("nope", "t").await.unwrap_err();
        assert!(matches!(e, RegistryError::NotFound(_)), "{e}");
        let e = reg.add_thing_to_group("g9", "nobody").await.unwrap_err();
        assert_eq!(
            e,
            RegistryError::NotFound("thing \"nobody\" not found".into())
        );
        let e = reg.remove_thing_from_group("g9", "t").await.unwrap_err();
        assert!(e.to_string().contains("not a member"), "{e}");
    }

    #[tokio::test]
    async fn recursive_members_are_the_group_and_its_descendants_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path());
        things(&reg, &["a", "b", "c", "d", "e"]).await;
        group(&reg, "root", None).await;
        group(&reg, "left", Some("root")).await;
        group(&reg, "right", Some("root")).await;
        group(&reg, "deep", Some("left")).await;
        group(&reg, "other", None).await;
        reg.add_thing_to_group("root", "c").await.unwrap();
        reg.add_thing_to_group("left", "b").await.unwrap();
        reg.add_thing_to_group("deep", "a").await.unwrap();
        reg.add_thing_to_group("right", "d").await.unwrap();
        // Also in another hierarchy: counted once wherever it is.
        reg.add_thing_to_group("other", "a").await.unwrap();
        reg.add_thing_to_group("other", "e").await.unwrap();

        let of = |g: &str, r: bool| reg.group_things(g, r).unwrap();
        assert_eq!(of("root", false), ["c"]);
        assert_eq!(of("root", true), ["a", "b", "c", "d"]);
        assert_eq!(of("left", true), ["a", "b"]);
        assert_eq!(of("deep", true), ["a"]);
        assert_eq!(of("other", true), ["a", "e"]);
        assert_eq!(reg.group_things("missing", true), None);
        assert_eq!(reg.thing_groups("a"), ["deep", "other"]);
        assert!(reg.thing_groups("nobody").is_empty());
        assert_eq!(
            reg.group_path("deep").unwrap(),
            ["root", "left", "deep"].map(String::from)
        );
        assert_eq!(reg.group_info("root").unwrap().member_count, 1);
    }

    #[tokio::test]
    async fn a_group_with_children_stays_and_a_deleted_group_takes_its_memberships() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path());
        things(&reg, &["a", "b"]).await;
        group(&reg, "parent", None).await;
        group(&reg, "child", Some("parent")).await;
        reg.add_thing_to_group("child", "a").await.unwrap();
        reg.add_thing_to_group("child", "b").await.unwrap();
        let seen = events(&reg);
        conflict(
            reg.delete_group("parent").await.unwrap_err(),
            "has child groups (child)",
        );
        reg.delete_group("child").await.unwrap();
        assert_eq!(
            *seen.lock(),
            [changed("child", "a", false), changed("child", "b", false)]
        );
        assert!(reg.thing_groups("a").is_empty());
        assert!(reg.group_info("parent").unwrap().children.is_empty());
        reg.delete_group("parent").await.unwrap();
        assert!(reg.groups().is_empty());
        let e = reg.delete_group("parent").await.unwrap_err();
        assert!(matches!(e, RegistryError::NotFound(_)), "{e}");
        // A group made again with the same name starts empty.
        group(&reg, "child", None).await;
        assert_eq!(
            reg.group_things("child", true).unwrap(),
            Vec::<String>::new()
        );
    }

    #[tokio::test]
    async fn membership_changes_are_told_after_they_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path());
        things(&reg, &["a"]).await;
        group(&reg, "g", None).await;
        let seen = events(&reg);
        let r = Arc::new(reg);
        let r2 = r.clone();
        let observed = Arc::new(Mutex::new(Vec::new()));
        let o = observed.clone();
        // A listener reading the registry sees the change already made.
        r.on_event(move |_| o.lock().push(r2.thing_groups("a")));
        r.add_thing_to_group("g", "a").await.unwrap();
        assert!(!r.add_thing_to_group("g", "a").await.unwrap());
        r.remove_thing_from_group("g", "a").await.unwrap();
        assert_eq!(
            *seen.lock(),
            [changed("g", "a", true), changed("g", "a", false)]
        );
        assert_eq!(*observed.lock(), [vec!["g".to_string()], vec![]]);
    }

    #[tokio::test]
    async fn deleting_a_thing_takes_it_out_of_its_groups() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, store) = open(dir.path());
        things(&reg, &["a", "b"]).await;
        group(&reg, "g1", None).await;
        group(&reg, "g2", None).await;
        for g in ["g1", "g2"] {
            reg.add_thing_to_group(g, "a").await.unwrap();
        }
        reg.add_thing_to_group("g1", "b").await.unwrap();
        let seen = events(&reg);
        reg.delete_thing("a").await.unwrap();
        assert_eq!(
            *seen.lock(),
            [changed("g1", "a", false), changed("g2", "a", false)]
        );
        assert_eq!(reg.group_things("g1", false).unwrap(), ["b"]);
        assert!(reg.group_things("g2", false).unwrap().is_empty());
        // A new thing of the same name is in no group, also after a reopen (the
        // membership records went with the thing).
        things(&reg, &["a"]).await;
        assert!(reg.thing_groups("a").is_empty());
        drop(reg);
        drop(store);
        let (reg, _store) = open(dir.path());
        assert!(reg.thing_groups("a").is_empty());
        assert_eq!(reg.thing_groups("b"), ["g1"]);
    }

    #[tokio::test]
    async fn groups_and_memberships_are_rebuilt_from_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, store) = open(dir.path());
        things(&reg, &["a", "b"]).await;
        let mut parent: Option<String> = None;
        for level in 1..=MAX_DEPTH {
            let name = format!("l{level}");
            group(&reg, &name, parent.as_deref()).await;
            parent = Some(name);
        }
        reg.add_thing_to_group("l7", "a").await.unwrap();
        reg.add_thing_to_group("l3", "b").await.unwrap();
        let updated = reg
            .update_group(
                "l1",
                Some("top".into()),
                Some(BTreeMap::from([("k".into(), "v".into())])),
                true,
            )
            .await
            .unwrap();
        assert_eq!(updated.version, 2);
        let before: Vec<GroupInfo> = reg
            .groups()
            .iter()
            .map(|g| reg.group_info(&g.name).unwrap())
            .collect();
        drop(reg);
        drop(store);

        let (reg, _store) = open(dir.path());
        let after: Vec<GroupInfo> = reg
            .groups()
            .iter()
            .map(|g| reg.group_info(&g.name).unwrap())
            .collect();
        assert_eq!(after, before);
        assert_eq!(after.len(), 7);
        assert_eq!(reg.group("l1").unwrap().description.as_deref(), Some("top"));
        assert_eq!(reg.group_things("l1", true).unwrap(), ["a", "b"]);
        assert_eq!(reg.thing_groups("a"), ["l7"]);
        // The rules hold on what was loaded.
        conflict(
            reg.create_group("l8", Some("l7"), None, BTreeMap::new())
                .await
                .unwrap_err(),
            "at most 7 levels",
        );
        conflict(
            reg.add_thing_to_group("l1", "a").await.unwrap_err(),
            "same hierarchy",
        );
    }

    #[tokio::test]
    async fn stale_or_unreadable_group_records_are_skipped_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(&dir.path().join("s.redb"), Default::default()).unwrap();
        use fleetcore_core::storage::RecordStore as _;
        let g = ThingGroup {
            name: "g".into(),
            parent: None,
            description: None,
            attributes: BTreeMap::new(),
            version: 1,
            created_ms: 1,
        };
        let thing = crate::registry::Thing {
            name: "t".into(),
            thing_type: None,
            attributes: BTreeMap::new(),
            version: 1,
            created_ms: 1,
        };
        store
            .submit_records(vec![
                Groups::put_group(&g),
                put(GROUP, "misnamed", &g),
                put(GROUP, "garbage", &"not a group"),
                put(super::super::THING, "t", &thing),
                Groups::put_membership("g", "t"),
                Groups::put_membership("g", "ghost"),
                Groups::put_membership("gone", "t"),
                put(MEMBERSHIP, "no-slash", &true),
            ])
            .await
            .unwrap();
        drop(store);
        let (reg, _store) = open(dir.path());
        let names: Vec<String> = reg.groups().into_iter().map(|g| g.name).collect();
        assert_eq!(names, ["g"]);
        assert_eq!(reg.group_things("g", true).unwrap(), ["t"]);
        assert_eq!(reg.thing_groups("t"), ["g"]);
    }

    #[tokio::test]
    async fn updating_a_group_changes_its_description_and_attributes_only() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _store) = open(dir.path());
        group(&reg, "p", None).await;
        reg.create_group(
            "g",
            Some("p"),
            Some("first".into()),
            BTreeMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]),
        )
        .await
        .unwrap();
        let g = reg
            .update_group(
                "g",
                None,
                Some(BTreeMap::from([
                    ("a".into(), "".into()),
                    ("c".into(), "3".into()),
                ])),
                true,
            )
            .await
            .unwrap();
        assert_eq!(
            g.attributes,
            BTreeMap::from([("b".into(), "2".into()), ("c".into(), "3".into())])
        );
        assert_eq!((g.version, g.description.as_deref()), (2, Some("first")));
        assert_eq!(g.parent.as_deref(), Some("p"), "the parent is kept");
        let g = reg
            .update_group("g", Some(String::new()), Some(BTreeMap::new()), false)
            .await
            .unwrap();
        assert_eq!((g.version, g.description, g.attributes.len()), (3, None, 0));
        let e = reg
            .update_group("nope", None, None, true)
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::NotFound(_)), "{e}");
    }
}
