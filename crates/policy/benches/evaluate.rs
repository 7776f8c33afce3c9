// Cost of the IoT Core policy evaluator on the product's shape: the seed's agent
// policies (config/examples/agent-thing-policy.json, bound through the thing name and its
// `account` attribute, and agent-policy.json, bound through the certificate's CN and OU).
// `Bound::new` runs once per connection (and when a policy changes); `Bound::decide` on
// every CONNECT, SUBSCRIBE, PUBLISH and delivery.
//
//     cargo bench -p fleetcore-policy --bench evaluate

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use fleetcore_policy::{Action, Bound, Decision, Policy, Vars};

const THING_POLICY: &str = include_str!("../../../config/examples/agent-thing-policy.json");
const CERT_POLICY: &str = include_str!("../../../config/examples/agent-policy.json");

fn thing_vars() -> Vars {
    Vars {
        client_id: Some("dev42042".into()),
        thing_name: Some("dev42042".into()),
        thing_type: Some("agent".into()),
        thing_attributes: vec![("account".into(), "acct42".into())],
        thing_attached: Some(true),
        cert_subject: vec![("CN".into(), "dev42042".into())],
        cert_issuer: vec![("CN".into(), "fleetcore CA".into())],
        cert_serial: Some("0a1b2c3d".into()),
    }
}

fn cert_vars() -> Vars {
    Vars {
        client_id: Some("dev42042".into()),
        cert_subject: vec![
            ("CN".into(), "dev42042".into()),
            ("OU".into(), "acct42".into()),
        ],
        ..Vars::default()
    }
}

fn bench_decide(c: &mut Criterion) {
    for (group_name, doc, vars) in [
        ("policy/agent-thing-policy", THING_POLICY, thing_vars()),
        (
            "policy/agent-policy (certificate CN/OU)",
            CERT_POLICY,
            cert_vars(),
        ),
    ] {
        let policy = Policy::parse(doc).expect("seed policy parses");
        let bound = Bound::new(&[&policy], &vars);
        let cases = [
            ("connect, allowed", Action::Connect, "dev42042", true),
            (
                "connect, other client id",
                Action::Connect,
                "dev42043",
                false,
            ),
            (
                "subscribe own filter",
                Action::Subscribe,
                "acct42/dev42042/#",
                true,
            ),
            (
                "publish own topic",
                Action::Publish,
                "acct42/dev42042/telemetry",
                true,
            ),
            (
                "receive own order",
                Action::Receive,
                "acct42/dev42042/configurationChanges",
                true,
            ),
            (
                "receive other device's topic",
                Action::Receive,
                "acct42/dev42043/configurationChanges",
                false,
            ),
        ];
        let mut group = c.benchmark_group(group_name);
        for (name, action, resource, allowed) in cases {
            assert_eq!(
                bound.decide(action, resource) == Decision::Allow,
                allowed,
                "{name}"
            );
            group.bench_function(name, |b| {
                b.iter(|| bound.decide(black_box(action), black_box(resource)))
            });
        }
        group.bench_function("bind (once per connection)", |b| {
            b.iter(|| Bound::new(&[black_box(&policy)], black_box(&vars)))
        });
        group.finish();
    }
    c.bench_function("policy/parse agent-thing-policy", |b| {
        b.iter(|| Policy::parse(black_box(THING_POLICY)).unwrap())
    });
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
