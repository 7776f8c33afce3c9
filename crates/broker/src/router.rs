//! The subscription index: for a published topic, which subscriptions match.
//!
//! Every PUBLISH goes through [`Router::matches`], so its shape follows one rule of the
//! architecture: no lock that every publish contends on. The index is a trie of filter
//! levels split into shards:
//!
//! - filters whose first level is a literal (`acct7/dev42/#`) live in one of
//!   [`SHARDS`] tries, chosen by hashing that first level;
//! - filters whose first level is `+` or `#` live in one separate wildcard trie.
//!
//! Each shard has its own `RwLock`, on its own cache line. A publish read-locks the
//! shard of its topic's first level and then the wildcard shard, one after the other,
//! never both at once; it skips the wildcard shard when it is empty, and for topics
//! starting with `$`, which MQTT says leading wildcards never match. Subscribing
//! write-locks one shard only.
//!
//! Within a trie node, literal children are in a hash map, while the `+` child and the
//! subscriptions of `…/#` filters have their own slots, so matching never hashes a
//! wildcard. Matching reads the topic level by level with no allocation per level.
//! The walk recurses for the first levels and switches to an explicit stack below
//! that, and trie nodes are freed without recursion, so a client allowed very deep
//! filters cannot overflow the stack.
//!
//! The router is generic over the per-subscription value (QoS, options, a queue
//! handle…) so it knows nothing of sessions. Filters and topics are assumed to have
//! been validated by [`fleetcore_core::topic`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

/// Identifies the owner of a subscription (a session), as the caller numbers them.
pub type SubscriberId = u64;

/// Number of shards for filters with a literal first level.
pub const SHARDS: usize = 32;

/// Below this depth matching recurses; deeper, it continues with a heap stack. Low in
/// tests so that both paths are exercised by short topics.
const RECURSION_LIMIT: usize = if cfg!(test) { 2 } else { 32 };

/// One subscription that matched a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<V> {
    /// Who subscribed.
    pub subscriber: SubscriberId,
    /// The shared-subscription group, `None` for an ordinary subscription. The caller
    /// picks one member per group.
    pub group: Option<Arc<str>>,
    /// The value given to [`Router::subscribe`].
    pub value: V,
}

/// The subscription index. `Send + Sync` when `V` is; share it behind an `Arc`.
pub struct Router<V> {
    shards: Box<[Shard<V>]>,
    wildcard: Shard<V>,
    /// Subscriptions in `wildcard`, so a publish can skip locking it when there are none.
    wildcard_len: AtomicUsize,
    len: AtomicUsize,
    /// Told when a (filter, share group) gets its first subscriber here, or loses its
    /// last: the node's interest, which a cluster fabric advertises to other nodes.
    interest: Option<InterestHook>,
}

/// Called with (filter, share group, on) under the shard's lock: it must not block
/// or touch the router.
pub type InterestHook = Box<dyn Fn(&str, Option<&str>, bool) + Send + Sync>;

/// A trie behind its own lock, aligned so that two shards never share a cache line
/// (taking a read lock writes to the lock word).
#[repr(align(128))]
struct Shard<V>(RwLock<Node<V>>);

impl<V> Shard<V> {
    fn new() -> Self {
        Shard(RwLock::new(Node::default()))
    }
}

struct Node<V> {
    /// Children by literal level.
    children: Children<V>,
    /// The `+` child.
    plus: Option<Box<Node<V>>>,
    /// Subscriptions whose filter ends at this node.
    exact: Vec<Sub<V>>,
    /// Subscriptions whose filter is this node's path followed by `/#` (or is `#`, at
    /// the root of the wildcard shard). They match this node and everything below.
    multi: Vec<Sub<V>>,
}

/// A node's literal children: a map made when the first child comes (most
/// nodes of a fleet's trie are leaves: a device's own level), boxed so a leaf
/// carries 8 bytes for it, not 48.
#[allow(clippy::box_collection)] // 8 bytes inline where a map is 48
struct Children<V>(Option<Box<HashMap<Box<str>, Node<V>>>>);

impl<V> Children<V> {
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn get(&self, level: &str) -> Option<&Node<V>> {
        self.0.as_ref()?.get(level)
    }

    fn get_mut(&mut self, level: &str) -> Option<&mut Node<V>> {
        self.0.as_mut()?.get_mut(level)
    }

    /// The child at `level`, made if missing.
    fn entry(&mut self, level: &str) -> &mut Node<V> {
        self.0
            .get_or_insert_with(Default::default)
            .entry(level.into())
            .or_default()
    }

    /// Removes a child; the map goes with the last one.
    fn remove(&mut self, level: &str) {
        if let Some(m) = &mut self.0 {
            m.remove(level);
            if m.is_empty() {
                self.0 = None;
            }
        }
    }

    /// Takes every child out.
    fn drain(&mut self) -> impl Iterator<Item = Node<V>> {
        self.0.take().into_iter().flat_map(|m| m.into_values())
    }
}

#[cfg(test)]
impl<V> std::ops::Index<&str> for Children<V> {
    type Output = Node<V>;
    fn index(&self, level: &str) -> &Node<V> {
        self.get(level).expect("no such child")
    }
}

struct Sub<V> {
    subscriber: SubscriberId,
    group: Option<Arc<str>>,
    value: V,
}

impl<V> Sub<V> {
    fn is(&self, subscriber: SubscriberId, group: Option<&str>) -> bool {
        self.subscriber == subscriber && self.group.as_deref() == group
    }
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: Children(None),
            plus: None,
            exact: Vec::new(),
            multi: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.multi.is_empty()
    }

    /// Whether this node must survive when the single path through it to a removed
    /// subscription is pruned: it holds subscriptions or leads elsewhere too.
    fn is_needed_besides_one_edge(&self) -> bool {
        !self.exact.is_empty()
            || !self.multi.is_empty()
            || self.children.len() + usize::from(self.plus.is_some()) > 1
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<V>> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }
}

impl<V> Drop for Node<V> {
    // The derived drop recurses once per level; a trie built from a filter with
    // tens of thousands of levels would overflow the stack.
    fn drop(&mut self) {
        if self.children.is_empty() && self.plus.is_none() {
            return;
        }
        let mut pending: Vec<Node<V>> = self.children.drain().collect();
        pending.extend(self.plus.take().map(|n| *n));
        while let Some(mut node) = pending.pop() {
            pending.extend(node.children.drain());
            pending.extend(node.plus.take().map(|n| *n));
        }
    }
}

/// Where a filter's subscription list sits: the trie path, and whether the filter
/// ended in `#`.
fn split_filter(filter: &str) -> (Option<&str>, bool) {
    if filter == "#" {
        (None, true)
    } else if let Some(path) = filter.strip_suffix("/#") {
        (Some(path), true)
    } else {
        (Some(filter), false)
    }
}

fn levels(path: Option<&str>) -> impl Iterator<Item = &str> {
    path.into_iter().flat_map(|p| p.split('/'))
}

/// The first level of a topic or filter.
fn first_level(s: &str) -> &str {
    match s.bytes().position(|b| b == b'/') {
        Some(i) => &s[..i],
        None => s,
    }
}

/// Splits the level starting at byte `pos` off `topic`: the level, and where the next
/// one starts (`None` when this is the last).
fn next_level(topic: &str, pos: usize) -> (&str, Option<usize>) {
    let rest = &topic[pos..];
    match rest.bytes().position(|b| b == b'/') {
        Some(i) => (&rest[..i], Some(pos + i + 1)),
        None => (rest, None),
    }
}

fn push_all<V: Clone>(subs: &[Sub<V>], out: &mut Vec<Match<V>>) {
    out.extend(subs.iter().map(|s| Match {
        subscriber: s.subscriber,
        group: s.group.clone(),
        value: s.value.clone(),
    }));
}

/// Where a walk goes on from a node: its children matching the next topic level, and
/// where the level after that starts.
struct Next<'n, V> {
    literal: Option<&'n Node<V>>,
    plus: Option<&'n Node<V>>,
    pos: Option<usize>,
}

/// Records the matches at `node`, which has consumed the topic up to byte `pos` (`None`:
/// the whole topic), and returns where to go on.
#[inline]
fn visit<'n, V: Clone>(
    node: &'n Node<V>,
    topic: &str,
    pos: Option<usize>,
    out: &mut Vec<Match<V>>,
) -> Option<Next<'n, V>> {
    push_all(&node.multi, out);
    let Some(pos) = pos else {
        push_all(&node.exact, out);
        return None;
    };
    let (level, next) = next_level(topic, pos);
    let literal = if node.children.is_empty() {
        None
    } else {
        node.children.get(level)
    };
    Some(Next {
        literal,
        plus: node.plus.as_deref(),
        pos: next,
    })
}

fn walk<V: Clone>(
    node: &Node<V>,
    topic: &str,
    pos: Option<usize>,
    depth: usize,
    out: &mut Vec<Match<V>>,
) {
    let Some(next) = visit(node, topic, pos, out) else {
        return;
    };
    for child in [next.literal, next.plus].into_iter().flatten() {
        if depth < RECURSION_LIMIT {
            walk(child, topic, next.pos, depth + 1, out);
        } else {
            walk_with_stack(child, topic, next.pos, out);
        }
    }
}

#[cold]
fn walk_with_stack<V: Clone>(
    node: &Node<V>,
    topic: &str,
    pos: Option<usize>,
    out: &mut Vec<Match<V>>,
) {
    let mut stack = vec![(node, pos)];
    while let Some((node, pos)) = stack.pop() {
        if let Some(next) = visit(node, topic, pos, out) {
            let children = [next.literal, next.plus].into_iter().flatten();
            stack.extend(children.map(|c| (c, next.pos)));
        }
    }
}

impl<V: Clone> Router<V> {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            shards: (0..SHARDS).map(|_| Shard::new()).collect(),
            wildcard: Shard::new(),
            wildcard_len: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            interest: None,
        }
    }

    /// A router that tells `hook` when a (filter, share group) gets its first
    /// subscriber or loses its last.
    pub fn with_interest(hook: InterestHook) -> Self {
        let mut r = Self::new();
        r.interest = Some(hook);
        r
    }

    /// Adds a subscription, or replaces the value of the one with the same filter,
    /// group and subscriber. Returns true if it replaced one.
    ///
    /// `filter` is the topic filter without any `$share/{group}/` prefix; `group` is
    /// the share name of a shared subscription.
    pub fn subscribe(
        &self,
        filter: &str,
        group: Option<&str>,
        subscriber: SubscriberId,
        value: V,
    ) -> bool {
        let (shard, is_wildcard) = self.shard_for_filter(filter);
        let (path, multi) = split_filter(filter);
        let mut root = shard.0.write();
        let mut node = &mut *root;
        for level in levels(path) {
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level)
            };
        }
        let subs = if multi {
            &mut node.multi
        } else {
            &mut node.exact
        };
        if let Some(existing) = subs.iter_mut().find(|s| s.is(subscriber, group)) {
            existing.value = value;
            return true;
        }
        let first = !subs.iter().any(|s| s.group.as_deref() == group);
        // Most filters have one subscriber (a device's own `account/device/#`):
        // grow by one, not to Vec's first step of four (256 bytes each).
        subs.reserve_exact(1);
        subs.push(Sub {
            subscriber,
            group: group.map(Arc::from),
            value,
        });
        self.len.fetch_add(1, Ordering::Relaxed);
        if is_wildcard {
            self.wildcard_len.fetch_add(1, Ordering::Release);
        }
        if first {
            if let Some(hook) = &self.interest {
                hook(filter, group, true);
            }
        }
        false
    }

    /// Removes the subscription with this filter, group and subscriber. Returns true
    /// if there was one. Trie nodes left empty are freed.
    pub fn unsubscribe(&self, filter: &str, group: Option<&str>, subscriber: SubscriberId) -> bool {
        let (shard, is_wildcard) = self.shard_for_filter(filter);
        let (path, multi) = split_filter(filter);
        let mut root = shard.0.write();

        // Walk down to the filter's node, remembering the deepest node on the way that
        // has to stay even if everything below it on this path goes.
        let mut node = &mut *root;
        let mut keep_depth = 0;
        let mut depth = 0;
        for level in levels(path) {
            if depth == 0 || node.is_needed_besides_one_edge() {
                keep_depth = depth;
            }
            node = match node.child_mut(level) {
                Some(child) => child,
                None => return false,
            };
            depth += 1;
        }
        let subs = if multi {
            &mut node.multi
        } else {
            &mut node.exact
        };
        let Some(i) = subs.iter().position(|s| s.is(subscriber, group)) else {
            return false;
        };
        subs.swap_remove(i);
        if !subs.iter().any(|s| s.group.as_deref() == group) {
            if let Some(hook) = &self.interest {
                hook(filter, group, false);
            }
        }
        self.len.fetch_sub(1, Ordering::Relaxed);
        if is_wildcard {
            self.wildcard_len.fetch_sub(1, Ordering::Relaxed);
        }

        if depth > 0 && node.is_empty() {
            // Cut the edge below the node that stays; the chain under it is empty.
            let mut node = &mut *root;
            let mut levels = levels(path);
            for level in levels.by_ref().take(keep_depth) {
                node = match node.child_mut(level) {
                    Some(child) => child,
                    None => return true,
                };
            }
            match levels.next() {
                Some("+") => node.plus = None,
                Some(level) => {
                    node.children.remove(level);
                }
                None => {}
            }
        }
        true
    }

    /// Appends every subscription matching `topic` to `out`, which is not cleared first.
    /// A subscriber with several matching filters appears once per filter. The order
    /// is unspecified.
    pub fn matches(&self, topic: &str, out: &mut Vec<Match<V>>) {
        let shard = &self.shards[shard_index(first_level(topic))];
        walk(&shard.0.read(), topic, Some(0), 0, out);
        if !topic.starts_with('$') && self.wildcard_len.load(Ordering::Acquire) != 0 {
            walk(&self.wildcard.0.read(), topic, Some(0), 0, out);
        }
    }

    /// The number of subscriptions.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Whether there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard_for_filter(&self, filter: &str) -> (&Shard<V>, bool) {
        match first_level(filter) {
            "+" | "#" => (&self.wildcard, true),
            first => (&self.shards[shard_index(first)], false),
        }
    }
}

impl<V: Clone> Default for Router<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> fmt::Debug for Router<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("len", &self.len.load(Ordering::Relaxed))
            .field("wildcard_len", &self.wildcard_len.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// FNV-1a of the first level. Deterministic on purpose: it only spreads lock traffic,
/// so a client that crafts colliding first levels gains nothing but contention with
/// itself; the maps inside the nodes keep std's randomly keyed hasher.
fn shard_index(first_level: &str) -> usize {
    let mut h: u32 = 0x811c_9dc5;
    for &b in first_level.as_bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h as usize % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcore_core::topic::filter_matches;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn matched(router: &Router<u32>, topic: &str) -> Vec<(SubscriberId, Option<String>, u32)> {
        let mut out = Vec::new();
        router.matches(topic, &mut out);
        let mut v: Vec<_> = out
            .into_iter()
            .map(|m| (m.subscriber, m.group.map(|g| g.to_string()), m.value))
            .collect();
        v.sort();
        v
    }

    fn values(router: &Router<u32>, topic: &str) -> Vec<u32> {
        let mut v: Vec<u32> = matched(router, topic).into_iter().map(|m| m.2).collect();
        v.sort();
        v
    }

    #[test]
    fn device_subscription_gets_its_own_topics_only() {
        let r = Router::new();
        r.subscribe("customer-b/computer-a/#", None, 1, 10);
        r.subscribe("customer-b/computer-b/#", None, 2, 20);
        assert_eq!(
            values(&r, "customer-b/computer-a/configurationChanges"),
            [10]
        );
        assert_eq!(values(&r, "customer-b/computer-a"), [10]);
        assert_eq!(values(&r, "customer-b/computer-b/x/y/z"), [20]);
        assert!(values(&r, "customer-b/computer-c/x").is_empty());
        assert!(values(&r, "customer-b").is_empty());
        assert!(values(&r, "nobody").is_empty());
    }

    #[test]
    fn wildcards_follow_mqtt_rules() {
        let r = Router::new();
        r.subscribe("sport/tennis/player1/#", None, 1, 1);
        r.subscribe("sport/+", None, 1, 2);
        r.subscribe("+/+", None, 1, 3);
        r.subscribe("/+", None, 1, 4);
        r.subscribe("+", None, 1, 5);
        r.subscribe("#", None, 1, 6);
        r.subscribe("sport/tennis/+", None, 1, 7);
        assert_eq!(values(&r, "sport/tennis/player1"), [1, 6, 7]);
        assert_eq!(values(&r, "sport/tennis/player1/score/wimbledon"), [1, 6]);
        assert_eq!(values(&r, "sport"), [5, 6]);
        assert_eq!(values(&r, "sport/"), [2, 3, 6]);
        assert_eq!(values(&r, "/finance"), [3, 4, 6]);
        assert_eq!(values(&r, "a//b"), [6]);
    }

    #[test]
    fn dollar_topics_skip_leading_wildcards() {
        let r = Router::new();
        r.subscribe("#", None, 1, 1);
        r.subscribe("+/monitor/Clients", None, 1, 2);
        r.subscribe("$SYS/#", None, 1, 3);
        r.subscribe("$SYS/monitor/+", None, 1, 4);
        r.subscribe("a/+", None, 1, 5);
        assert_eq!(values(&r, "$SYS/monitor/Clients"), [3, 4]);
        assert_eq!(values(&r, "x/monitor/Clients"), [1, 2]);
        assert_eq!(values(&r, "a/$x"), [1, 5]);
    }

    #[test]
    fn same_filter_group_and_subscriber_replaces() {
        let r = Router::new();
        assert!(!r.subscribe("a/b", None, 1, 1));
        assert!(r.subscribe("a/b", None, 1, 2));
        assert!(!r.subscribe("a/b", Some("g"), 1, 3));
        assert!(!r.subscribe("a/b", None, 2, 4));
        assert!(!r.subscribe("a/+", None, 1, 5));
        assert_eq!(r.len(), 4);
        assert_eq!(
            matched(&r, "a/b"),
            [
                (1, None, 2),
                (1, None, 5),
                (1, Some("g".to_owned()), 3),
                (2, None, 4)
            ]
        );
    }

    #[test]
    fn unsubscribe_removes_exactly_one_and_prunes() {
        let r = Router::new();
        r.subscribe("a/b/c", None, 1, 1);
        r.subscribe("a/b/c", Some("g"), 1, 2);
        r.subscribe("a/b/#", None, 1, 3);
        r.subscribe("+/b/#", None, 1, 4);
        assert!(!r.unsubscribe("a/b/c", None, 2));
        assert!(!r.unsubscribe("a/b/c", Some("h"), 1));
        assert!(!r.unsubscribe("a/b", None, 1));
        assert!(!r.unsubscribe("a/x/c", None, 1));
        assert!(r.unsubscribe("a/b/c", None, 1));
        assert!(!r.unsubscribe("a/b/c", None, 1));
        assert_eq!(values(&r, "a/b/c"), [2, 3, 4]);
        assert!(r.unsubscribe("a/b/#", None, 1));
        assert!(r.unsubscribe("a/b/c", Some("g"), 1));
        assert!(r.unsubscribe("+/b/#", None, 1));
        assert!(r.is_empty());
        for shard in r.shards.iter().chain([&r.wildcard]) {
            assert!(shard.0.read().is_empty(), "trie nodes left behind");
        }
    }

    #[test]
    fn pruning_keeps_nodes_still_in_use() {
        let r = Router::new();
        r.subscribe("a/b/c/d", None, 1, 1);
        r.subscribe("a/b", None, 1, 2);
        r.subscribe("a/+/c", None, 1, 3);
        assert!(r.unsubscribe("a/b/c/d", None, 1));
        {
            let shard = r.shards[shard_index("a")].0.read();
            let a = &shard.children["a"];
            assert!(a.children["b"].children.is_empty());
            assert!(a.plus.is_some());
        }
        assert_eq!(values(&r, "a/b"), [2]);
        assert_eq!(values(&r, "a/x/c"), [3]);
        assert!(r.unsubscribe("a/b", None, 1));
        assert!(r.shards[shard_index("a")].0.read().children["a"]
            .children
            .is_empty());
        assert!(r.unsubscribe("a/+/c", None, 1));
        assert!(r.shards[shard_index("a")].0.read().is_empty());
    }

    #[test]
    fn first_levels_spread_over_shards() {
        let used: std::collections::HashSet<usize> = (0..1000)
            .map(|i| shard_index(&format!("acct{i}")))
            .collect();
        assert_eq!(used.len(), SHARDS);
        assert_eq!(std::mem::align_of::<Shard<u8>>(), 128);
    }

    #[test]
    fn very_deep_filters_neither_overflow_nor_leak() {
        // 100k levels: recursion per level in matching, pruning or dropping would
        // overflow the 2 MiB stack of a test thread.
        let deep_filter = vec!["a"; 100_000].join("/");
        let deep_plus = vec!["+"; 100_000].join("/");
        let r = Router::new();
        r.subscribe(&deep_filter, None, 1, 1);
        r.subscribe(&deep_plus, None, 1, 2);
        r.subscribe(&format!("{deep_filter}/#"), None, 1, 3);
        assert_eq!(values(&r, &deep_filter), [1, 2, 3]);
        assert!(r.unsubscribe(&deep_filter, None, 1));
        assert!(r.unsubscribe(&format!("{deep_filter}/#"), None, 1));
        assert_eq!(values(&r, &deep_filter), [2]);
        drop(r);
    }

    #[test]
    fn router_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Router<u32>>();
        assert_send_sync::<Router<Arc<String>>>();
    }

    #[test]
    fn concurrent_subscribers_and_publishers() {
        use std::thread;
        let r: Arc<Router<u32>> = Arc::new(Router::new());
        // Permanent subscriptions every publisher must always see.
        r.subscribe("fleet/+/status", None, 0, 0);
        r.subscribe("#", None, 0, 1);
        let writers: Vec<_> = (1..=2u64)
            .map(|w| {
                let r = Arc::clone(&r);
                thread::spawn(move || {
                    for round in 0..200 {
                        for i in 0..20u32 {
                            let filter = format!("fleet/dev{i}/#");
                            r.subscribe(&filter, None, w, i);
                            if round % 2 == 0 {
                                r.subscribe("+/dev1/status", Some("g"), w, i);
                            }
                        }
                        for i in 0..20u32 {
                            assert!(r.unsubscribe(&format!("fleet/dev{i}/#"), None, w));
                        }
                        r.unsubscribe("+/dev1/status", Some("g"), w);
                    }
                })
            })
            .collect();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let r = Arc::clone(&r);
                thread::spawn(move || {
                    let mut out = Vec::new();
                    for n in 0..20_000u32 {
                        out.clear();
                        r.matches(&format!("fleet/dev{}/status", n % 20), &mut out);
                        let permanent = out.iter().filter(|m| m.subscriber == 0).count();
                        assert_eq!(permanent, 2);
                        assert!(out.len() <= 2 + 2 * 2);
                    }
                })
            })
            .collect();
        for t in writers.into_iter().chain(readers) {
            t.join().expect("thread panicked");
        }
        assert_eq!(r.len(), 2);
    }

    // --- property test against the reference matcher ---

    fn filter_strategy() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "$x", "", "+", "c"]);
        (prop::collection::vec(level, 0..5), any::<bool>()).prop_filter_map(
            "empty filter",
            |(levels, hash)| {
                let mut levels: Vec<&str> = levels;
                if hash {
                    levels.push("#");
                }
                let filter = levels.join("/");
                (!filter.is_empty()).then_some(filter)
            },
        )
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        let level = prop::sample::select(vec!["a", "b", "$x", "", "c"]);
        prop::collection::vec(level, 1..6)
            .prop_map(|l| l.join("/"))
            .prop_filter("empty topic", |t| !t.is_empty())
    }

    type Key = (String, Option<String>, SubscriberId);

    fn sub_strategy() -> impl Strategy<Value = Key> {
        (
            filter_strategy(),
            prop::option::of(prop::sample::select(vec!["g", "h"]).prop_map(String::from)),
            0..3u64,
        )
    }

    fn reference(
        model: &BTreeMap<Key, u32>,
        topic: &str,
    ) -> Vec<(SubscriberId, Option<String>, u32)> {
        let mut v: Vec<_> = model
            .iter()
            .filter(|((f, _, _), _)| filter_matches(f, topic))
            .map(|((_, g, s), v)| (*s, g.clone(), *v))
            .collect();
        v.sort();
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn router_agrees_with_reference_matcher(
            subs in prop::collection::vec(sub_strategy(), 0..40),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
            extra_removals in prop::collection::vec(sub_strategy(), 0..10),
            topics in prop::collection::vec(topic_strategy(), 1..20),
        ) {
            let router = Router::new();
            let mut model: BTreeMap<Key, u32> = BTreeMap::new();
            for (n, key) in subs.iter().enumerate() {
                let n = n as u32;
                let replaced = router.subscribe(&key.0, key.1.as_deref(), key.2, n);
                prop_assert_eq!(replaced, model.insert(key.clone(), n).is_some());
            }
            prop_assert_eq!(router.len(), model.len());
            for topic in &topics {
                prop_assert_eq!(matched(&router, topic), reference(&model, topic), "topic {}", topic);
            }
            for idx in removals {
                if subs.is_empty() { break; }
                let key = idx.get(&subs);
                let removed = router.unsubscribe(&key.0, key.1.as_deref(), key.2);
                prop_assert_eq!(removed, model.remove(key).is_some());
            }
            for key in &extra_removals {
                let removed = router.unsubscribe(&key.0, key.1.as_deref(), key.2);
                prop_assert_eq!(removed, model.remove(key).is_some());
            }
            prop_assert_eq!(router.len(), model.len());
            for topic in &topics {
                prop_assert_eq!(matched(&router, topic), reference(&model, topic), "topic {}", topic);
            }
            for key in model.keys() {
                prop_assert!(router.unsubscribe(&key.0, key.1.as_deref(), key.2));
            }
            prop_assert!(router.is_empty());
            for shard in router.shards.iter().chain([&router.wildcard]) {
                prop_assert!(shard.0.read().is_empty(), "trie nodes left behind");
            }
            prop_assert_eq!(router.wildcard_len.load(Ordering::Relaxed), 0);
        }
    }

    #[test]
    fn interest_is_told_at_the_first_subscriber_and_after_the_last() {
        use std::sync::Mutex;
        type Seen = Vec<(String, Option<String>, bool)>;
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let s = seen.clone();
        let r: Router<u32> = Router::with_interest(Box::new(move |f, g, on| {
            s.lock()
                .unwrap()
                .push((f.to_string(), g.map(str::to_string), on))
        }));
        let take = || std::mem::take(&mut *seen.lock().unwrap());
        r.subscribe("a/#", None, 1, 1);
        r.subscribe("a/#", None, 2, 2); // a second subscriber: no news
        r.subscribe("a/#", None, 1, 3); // a replacement: no news
        r.subscribe("a/#", Some("g"), 3, 4); // a share group is its own interest
        assert_eq!(
            take(),
            [
                ("a/#".into(), None, true),
                ("a/#".into(), Some("g".into()), true)
            ]
        );
        r.unsubscribe("a/#", None, 1);
        assert!(take().is_empty(), "subscriber 2 is still there");
        r.unsubscribe("a/#", None, 2);
        r.unsubscribe("a/#", None, 2); // not there any more: no news
        r.unsubscribe("a/#", Some("g"), 3);
        assert_eq!(
            take(),
            [
                ("a/#".into(), None, false),
                ("a/#".into(), Some("g".into()), false)
            ]
        );
    }
}
