//! The retained-message index: the last retained message of each topic, found by
//! subscription filter.
//!
//! When a client subscribes, it must receive at once every retained message its
//! filter matches; with a fleet's worth of retained configuration (one or more topics
//! per device) that lookup must cost what the filter selects, not what the broker
//! holds. So retained messages sit in a trie of topic levels and [`RetainedTree::matching`]
//! walks it by the filter: a literal level is one map lookup, `+` visits the children
//! of one node, and only `#` visits a whole subtree — the part the filter asked for.
//!
//! Each node with a message keeps the full topic as an `Arc<str>`, so results carry
//! their topic without rebuilding strings from levels.
//!
//! The admin API lists retained topics a page at a time in topic order
//! ([`RetainedTree::after`]); the trie's children are hashed, not ordered, so the tree
//! also keeps the set of its topics in a `BTreeSet` (the same `Arc<str>`s, one pointer
//! each). Only a retained publish to a new topic, or a delete, touches it; matching on
//! subscribe and replacing a topic's message never do.
//!
//! The tree is not synchronized: retained messages change far less often than they are
//! published through, and the broker wraps the tree in its own lock. It holds only
//! what is in memory; durability is the store's job. Topics and filters are assumed to
//! have been validated by [`fleetcore_core::topic`]. No operation recurses per level, so a very
//! deep topic cannot overflow the stack.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;
use std::sync::Arc;

use fleetcore_core::message::Message;

/// What the broker retains per topic: the message, and when it was stored (kept on disk
/// with it; IoT Core's `lastModifiedTime`).
#[derive(Debug, Clone)]
pub struct Retained {
    pub msg: Arc<Message>,
    /// Unix milliseconds.
    pub stored_at_ms: u64,
}

/// Retained messages by topic. Not synchronized; see the module docs.
pub struct RetainedTree<V> {
    root: Node<V>,
    /// Every topic with a value, in order, for paging.
    topics: BTreeSet<Arc<str>>,
}

struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    /// The full topic of this node and its retained value.
    value: Option<(Arc<str>, V)>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            value: None,
        }
    }
}

impl<V> Drop for Node<V> {
    // The derived drop recurses once per level; see the module docs.
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut pending: Vec<Node<V>> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut node) = pending.pop() {
            pending.extend(node.children.drain().map(|(_, n)| n));
        }
    }
}

/// Work left in [`RetainedTree::matching`].
enum Step<'n, V> {
    /// Match the filter from byte `pos` (`None`: the filter is used up) at this node.
    Walk(&'n Node<V>, Option<usize>),
    /// Everything at and below this node matches (the filter's `#`).
    All(&'n Node<V>),
}

/// Splits the level starting at byte `pos` off `s`: the level, and where the next one
/// starts (`None` when this is the last).
fn next_level(s: &str, pos: usize) -> (&str, Option<usize>) {
    let rest = &s[pos..];
    match rest.bytes().position(|b| b == b'/') {
        Some(i) => (&rest[..i], Some(pos + i + 1)),
        None => (rest, None),
    }
}

impl<V: Clone> RetainedTree<V> {
    /// An empty tree.
    pub fn new() -> Self {
        RetainedTree {
            root: Node::default(),
            topics: BTreeSet::new(),
        }
    }

    /// Sets the retained value of `topic`, returning the one it replaces.
    pub fn insert(&mut self, topic: &str, value: V) -> Option<V> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        match &mut node.value {
            Some((_, old)) => Some(std::mem::replace(old, value)),
            empty => {
                let topic: Arc<str> = Arc::from(topic);
                self.topics.insert(topic.clone());
                *empty = Some((topic, value));
                None
            }
        }
    }

    /// Removes the retained value of `topic` and returns it. Nodes left empty are freed.
    pub fn remove(&mut self, topic: &str) -> Option<V> {
        // Walk down remembering the deepest node that has to stay even if everything
        // below it on this path goes.
        let mut node = &mut self.root;
        let mut keep_depth = 0;
        for (depth, level) in topic.split('/').enumerate() {
            if node.value.is_some() || node.children.len() > 1 {
                keep_depth = depth;
            }
            node = node.children.get_mut(level)?;
        }
        let (_, old) = node.value.take()?;
        self.topics.remove(topic);
        if node.children.is_empty() {
            // Cut the edge below the node that stays; the chain under it is empty.
            let mut levels = topic.split('/');
            let mut node = &mut self.root;
            for level in levels.by_ref().take(keep_depth) {
                match node.children.get_mut(level) {
                    Some(child) => node = child,
                    None => return Some(old),
                }
            }
            if let Some(level) = levels.next() {
                node.children.remove(level);
            }
        }
        Some(old)
    }

    /// The retained value of `topic`.
    pub fn get(&self, topic: &str) -> Option<&V> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.value.as_ref().map(|(_, v)| v)
    }

    /// Appends `(topic, value)` for every retained topic that `filter` matches, by the
    /// MQTT rules (`+`, `#`, and topics starting with `$` not matched by a leading
    /// wildcard). `filter` is a topic filter without any `$share/{group}/` prefix.
    /// The order is unspecified.
    pub fn matching(&self, filter: &str, out: &mut Vec<(Arc<str>, V)>) {
        let mut stack = vec![Step::Walk(&self.root, Some(0))];
        while let Some(step) = stack.pop() {
            match step {
                Step::All(node) => {
                    out.extend(node.value.clone());
                    stack.extend(node.children.values().map(Step::All));
                }
                Step::Walk(node, None) => out.extend(node.value.clone()),
                Step::Walk(node, Some(pos)) => {
                    let (level, next) = next_level(filter, pos);
                    // At the root, a wildcard must not select `$` topics.
                    let eligible = |key: &str| pos != 0 || !key.starts_with('$');
                    match level {
                        "#" => {
                            out.extend(node.value.clone());
                            stack.extend(
                                node.children
                                    .iter()
                                    .filter(|(k, _)| eligible(k))
                                    .map(|(_, child)| Step::All(child)),
                            );
                        }
                        "+" => stack.extend(
                            node.children
                                .iter()
                                .filter(|(k, _)| eligible(k))
                                .map(|(_, child)| Step::Walk(child, next)),
                        ),
                        literal => {
                            if let Some(child) = node.children.get(literal) {
                                stack.push(Step::Walk(child, next));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every retained topic after `after` (all with `None`), in ascending byte order of
    /// the topic, with its value: a page is `after(last_of_previous).take(n)`.
    pub fn after<'a>(
        &'a self,
        after: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a V)> + 'a {
        let start = match after {
            Some(t) => Bound::Excluded(t),
            None => Bound::Unbounded,
        };
        self.topics
            .range::<str, _>((start, Bound::Unbounded))
            .filter_map(|topic| Some((topic, self.get(topic)?)))
    }

    /// The number of retained topics.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    /// Whether no topic has a retained value.
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }
}

impl<V: Clone> Default for RetainedTree<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> fmt::Debug for RetainedTree<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedTree")
            .field("len", &self.topics.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcore_core::topic::filter_matches;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn matching(tree: &RetainedTree<u32>, filter: &str) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        tree.matching(filter, &mut out);
        for (topic, v) in &out {
            assert_eq!(
                tree.get(topic),
                Some(v),
                "returned topic must be the full topic"
            );
        }
        let mut v: Vec<_> = out.into_iter().map(|(t, v)| (t.to_string(), v)).collect();
        v.sort();
        v
    }

    fn topics(tree: &RetainedTree<u32>, filter: &str) -> Vec<String> {
        matching(tree, filter).into_iter().map(|(t, _)| t).collect()
    }

    fn tree_of(topics: &[&str]) -> RetainedTree<u32> {
        let mut t = RetainedTree::new();
        for (i, topic) in topics.iter().enumerate() {
            t.insert(topic, i as u32);
        }
        t
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut t = RetainedTree::new();
        assert!(t.is_empty());
        assert_eq!(t.insert("a/b", 1), None);
        assert_eq!(t.insert("a/b", 2), Some(1));
        assert_eq!(t.insert("a", 3), None);
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("a/b"), Some(&2));
        assert_eq!(t.get("a"), Some(&3));
        assert_eq!(t.get("a/b/c"), None);
        assert_eq!(t.get("a/"), None);
        assert_eq!(t.remove("a/b/c"), None);
        assert_eq!(t.remove("a/b"), Some(2));
        assert_eq!(t.remove("a/b"), None);
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove("a"), Some(3));
        assert!(t.is_empty());
        assert!(t.root.children.is_empty());
    }

    #[test]
    fn remove_prunes_only_empty_nodes() {
        let mut t = tree_of(&["a/b/c/d", "a/b", "a/x"]);
        assert_eq!(t.remove("a/b/c/d"), Some(0));
        assert!(t.root.children["a"].children["b"].children.is_empty());
        assert_eq!(t.get("a/b"), Some(&1));
        assert_eq!(t.remove("a/x"), Some(2));
        assert_eq!(t.root.children["a"].children.len(), 1);
        assert_eq!(t.remove("a/b"), Some(1));
        assert!(t.root.children.is_empty());
    }

    #[test]
    fn device_filter_gets_its_retained_configuration() {
        let t = tree_of(&[
            "customer-b/computer-a/configurationChanges",
            "customer-b/computer-a/shadow/reported",
            "customer-b/computer-ab/configurationChanges",
            "customer-b/computer-b/configurationChanges",
            "customer-c/computer-a/configurationChanges",
        ]);
        assert_eq!(
            topics(&t, "customer-b/computer-a/#"),
            [
                "customer-b/computer-a/configurationChanges",
                "customer-b/computer-a/shadow/reported"
            ]
        );
        assert_eq!(
            topics(&t, "+/computer-a/configurationChanges"),
            [
                "customer-b/computer-a/configurationChanges",
                "customer-c/computer-a/configurationChanges"
            ]
        );
        assert!(topics(&t, "customer-b/computer-z/#").is_empty());
    }

    #[test]
    fn wildcards_follow_mqtt_rules() {
        let t = tree_of(&[
            "sport",
            "sport/",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "/finance",
            "a//b",
            "$SYS/monitor/Clients",
            "$SYS",
        ]);
        assert_eq!(
            topics(&t, "sport/tennis/player1/#"),
            ["sport/tennis/player1", "sport/tennis/player1/ranking"]
        );
        assert_eq!(topics(&t, "sport/#").len(), 4);
        assert_eq!(topics(&t, "sport/+"), ["sport/"]);
        assert_eq!(topics(&t, "+/+"), ["/finance", "sport/"]);
        assert_eq!(topics(&t, "/+"), ["/finance"]);
        assert_eq!(topics(&t, "+"), ["sport"]);
        assert_eq!(topics(&t, "a/+/b"), ["a//b"]);
        assert_eq!(topics(&t, "#").len(), 6);
        assert!(topics(&t, "+/monitor/Clients").is_empty());
        assert_eq!(topics(&t, "$SYS/#"), ["$SYS", "$SYS/monitor/Clients"]);
        assert_eq!(topics(&t, "$SYS/monitor/+"), ["$SYS/monitor/Clients"]);
    }

    fn page(tree: &RetainedTree<u32>, after: Option<&str>, n: usize) -> Vec<String> {
        tree.after(after)
            .take(n)
            .map(|(t, _)| t.to_string())
            .collect()
    }

    #[test]
    fn pages_follow_byte_order_of_the_whole_topic() {
        // Level order would put "a/b" before "a-b"; byte order puts '-' (0x2D) before
        // '/' (0x2F). Pages follow the latter, as the token is the last topic.
        let mut t = tree_of(&["a/b", "a-b", "a", "$aws/x", "b", "a//c", "/lead"]);
        assert_eq!(
            page(&t, None, 10),
            ["$aws/x", "/lead", "a", "a-b", "a//c", "a/b", "b"]
        );
        assert_eq!(page(&t, None, 2), ["$aws/x", "/lead"]);
        assert_eq!(page(&t, Some("/lead"), 2), ["a", "a-b"]);
        assert_eq!(page(&t, Some("a-b"), 2), ["a//c", "a/b"]);
        assert_eq!(page(&t, Some("a/b"), 2), ["b"]);
        assert!(page(&t, Some("b"), 2).is_empty());
        // A topic that is no longer there still resumes at the right place.
        assert_eq!(page(&t, Some("a-a"), 1), ["a-b"]);
        assert_eq!(t.remove("a-b"), Some(1));
        assert_eq!(page(&t, Some("a"), 2), ["a//c", "a/b"]);
        // Replacing a value keeps one entry per topic.
        t.insert("a", 42);
        assert_eq!(t.len(), 6);
        assert_eq!(t.after(Some("/lead")).next(), Some((&Arc::from("a"), &42)));
    }

    #[test]
    fn very_deep_topics_neither_overflow_nor_leak() {
        let deep = vec!["a"; 100_000].join("/");
        let mut t = RetainedTree::new();
        t.insert(&deep, 1);
        t.insert("a", 2);
        assert_eq!(matching(&t, "#").len(), 2);
        assert_eq!(matching(&t, &deep), [(deep.clone(), 1)]);
        assert_eq!(t.remove(&deep), Some(1));
        t.insert(&deep, 3);
        drop(t);
    }

    // --- property test against the reference matcher ---

    fn topic_strategy() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "$x", "", "c"]);
        prop::collection::vec(level, 1..5)
            .prop_map(|l| l.join("/"))
            .prop_filter("empty topic", |t| !t.is_empty())
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "$x", "", "+", "c"]);
        (prop::collection::vec(level, 0..5), any::<bool>()).prop_filter_map(
            "empty filter",
            |(mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                let filter = levels.join("/");
                (!filter.is_empty()).then_some(filter)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn retained_matching_agrees_with_reference_matcher(
            inserts in prop::collection::vec(topic_strategy(), 0..40),
            removals in prop::collection::vec(topic_strategy(), 0..20),
            filters in prop::collection::vec(filter_strategy(), 1..20),
        ) {
            let mut tree = RetainedTree::new();
            let mut model: BTreeMap<String, u32> = BTreeMap::new();
            for (n, topic) in inserts.iter().enumerate() {
                prop_assert_eq!(tree.insert(topic, n as u32), model.insert(topic.clone(), n as u32));
            }
            for topic in &removals {
                prop_assert_eq!(tree.remove(topic), model.remove(topic));
            }
            prop_assert_eq!(tree.len(), model.len());
            let ordered: Vec<(String, u32)> =
                tree.after(None).map(|(t, v)| (t.to_string(), *v)).collect();
            let expected: Vec<(String, u32)> =
                model.iter().map(|(t, v)| (t.clone(), *v)).collect();
            prop_assert_eq!(ordered, expected);
            for (topic, v) in &model {
                prop_assert_eq!(tree.get(topic), Some(v));
            }
            for filter in &filters {
                let expected: Vec<(String, u32)> = model
                    .iter()
                    .filter(|(t, _)| filter_matches(filter, t))
                    .map(|(t, v)| (t.clone(), *v))
                    .collect();
                prop_assert_eq!(matching(&tree, filter), expected, "filter {}", filter);
            }
            let remaining: Vec<String> = model.keys().cloned().collect();
            for topic in remaining {
                prop_assert!(tree.remove(&topic).is_some());
            }
            prop_assert!(tree.is_empty());
            prop_assert!(tree.root.children.is_empty(), "trie nodes left behind");
        }
    }
}
