// Cost of the subscription index and the retained index at fleet scale.
//
// The shape is the product's: one `acct{a}/dev{d}/#` subscription per device, 100,000
// devices over 1,000 accounts, plus a few backend subscriptions with wildcards. Every
// publish pays `Router::matches`; every SUBSCRIBE pays `RetainedTree::matching`.
//
//     cargo bench -p fleetcore-broker --bench router
//
// (Plain `//` comments: this file is also `include!`d by out-of-tree harnesses.)

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use fleetcore_broker::retained::RetainedTree;
use fleetcore_broker::router::{Match, Router};

const DEVICES: u64 = 100_000;
const ACCOUNTS: u64 = 1_000;

/// What a subscription carries in the broker is small (QoS, options); a `u8` stands in.
type Value = u8;

fn fleet_router() -> Router<Value> {
    let router = Router::new();
    for i in 0..DEVICES {
        router.subscribe(&format!("acct{}/dev{i}/#", i % ACCOUNTS), None, i, 1);
    }
    // Backend and operator subscriptions.
    router.subscribe("+/+/telemetry", None, DEVICES, 0);
    router.subscribe("+/+/telemetry", Some("ingest"), DEVICES + 1, 0);
    router.subscribe("+/+/telemetry", Some("ingest"), DEVICES + 2, 0);
    router.subscribe("acct7/#", None, DEVICES + 3, 1);
    router.subscribe("acct42/+/lifecycle", None, DEVICES + 4, 1);
    router
}

fn bench_matches(c: &mut Criterion) {
    let router = fleet_router();
    let mut group = c.benchmark_group("router/matches (100k subs)");
    let cases = [
        // One device's subscription; walks the wildcard shard too, which matches nothing.
        ("targeted device", "acct42/dev42042/configurationChanges", 1),
        // Literal first level that no filter has.
        ("no match", "acct5000/dev1/configurationChanges", 0),
        // The device itself plus the three `+/+/telemetry` backends.
        ("telemetry", "acct42/dev42042/telemetry", 4),
        // `$` topics skip the wildcard shard entirely.
        (
            "$aws topic, no match",
            "$aws/things/dev42042/shadow/update",
            0,
        ),
    ];
    for (name, topic, expected) in cases {
        let mut out: Vec<Match<Value>> = Vec::with_capacity(16);
        router.matches(topic, &mut out);
        assert_eq!(out.len(), expected, "{topic}");
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                router.matches(black_box(topic), &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn bench_subscribe(c: &mut Criterion) {
    let router = fleet_router();
    c.bench_function("router/subscribe+unsubscribe (100k subs)", |b| {
        b.iter(|| {
            // A new device's filter: creates and then prunes one trie node.
            let filter = black_box("acct42/dev100042/#");
            router.subscribe(filter, None, DEVICES + 10, 1);
            router.unsubscribe(filter, None, DEVICES + 10)
        })
    });
}

fn bench_retained(c: &mut Criterion) {
    let mut tree: RetainedTree<Value> = RetainedTree::new();
    for i in 0..DEVICES {
        tree.insert(
            &format!("acct{}/dev{i}/configurationChanges", i % ACCOUNTS),
            1,
        );
    }
    tree.insert("acct42/dev42042/shadow/reported", 1);
    tree.insert("acct42/dev42042/firmware/version", 1);
    let mut group = c.benchmark_group("retained/matching (100k topics)");
    // A device subscribing to its own subtree: 3 topics.
    // An account-wide wildcard: 100 devices of the account.
    let cases = [
        ("device subtree", "acct42/dev42042/#", 3),
        (
            "account, one topic per device",
            "acct42/+/configurationChanges",
            100,
        ),
    ];
    for (name, filter, expected) in cases {
        let mut out = Vec::with_capacity(128);
        tree.matching(filter, &mut out);
        assert_eq!(out.len(), expected, "{filter}");
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                tree.matching(black_box(filter), &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
    // What a retained publish pays in the tree: a new device's first retained message
    // (and its delete), and a newer message for a topic already retained.
    let mut group = c.benchmark_group("retained/publish (100k topics)");
    group.bench_function("insert+remove new topic", |b| {
        b.iter(|| {
            let topic = black_box("acct42/dev100042/configurationChanges");
            tree.insert(topic, 1);
            tree.remove(topic)
        })
    });
    group.bench_function("replace existing topic", |b| {
        b.iter(|| tree.insert(black_box("acct42/dev42042/configurationChanges"), 2))
    });
    group.finish();
}

criterion_group!(benches, bench_matches, bench_subscribe, bench_retained);
criterion_main!(benches);
