//! `Bound::decide` runs on every publish and delivery: it must not touch the allocator.
//! A counting global allocator checks that, for every kind of compiled matcher.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use fleetcore_policy::{Action, Bound, Policy, Vars};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: forwards every call unchanged to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decide_does_not_allocate() {
    let policy = Policy::parse(
        r#"{"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "iot:Connect", "Resource": "arn:aws:iot:*:*:client/${iot:ClientId}"},
            {"Effect": "Allow", "Action": ["iot:Publish", "iot:Receive"],
             "Resource": ["arn:aws:iot:*:*:topic/fleet/${iot:ClientId}/*",
                          "arn:aws:iot:*:*:topic/*/status/????",
                          "arn:aws:iot:*:*:topic/broadcast/*/sé?/*"]},
            {"Effect": "Deny", "Action": "iot:Publish", "Resource": "arn:aws:iot:*:*:topic/fleet/*/secret*"},
            {"Effect": "Allow", "Action": "iot:Subscribe", "Resource": "*"}]}"#,
    )
    .unwrap();
    let vars = Vars {
        client_id: Some("dev-1".into()),
        ..Vars::default()
    };
    let bound = Bound::new(&[&policy], &vars);
    let requests = [
        (Action::Connect, "dev-1"),
        (Action::Connect, "dev-2"),
        (Action::Publish, "fleet/dev-1/telemetry"),
        (Action::Publish, "fleet/dev-1/secret/x"),
        (Action::Receive, "a/b/status/idle"),
        (Action::Receive, "broadcast/x/y/séz/w"),
        (Action::Receive, "broadcast/x/y/s/w"),
        (Action::Subscribe, "anything/#"),
        (Action::GetThingShadow, "dev-1"),
    ];
    let mut decisions = Vec::with_capacity(requests.len());

    COUNTING.with(|c| c.set(true));
    for (action, name) in requests {
        decisions.push(bound.decide(action, name));
    }
    COUNTING.with(|c| c.set(false));

    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), 0);
    let allowed: Vec<bool> = decisions
        .iter()
        .map(|d| *d == fleetcore_policy::Decision::Allow)
        .collect();
    assert_eq!(
        allowed,
        [true, false, true, false, true, true, false, true, false]
    );

    // The counter does see allocations made while counting.
    COUNTING.with(|c| c.set(true));
    drop(std::hint::black_box(Vec::<u8>::with_capacity(8)));
    COUNTING.with(|c| c.set(false));
    assert!(ALLOCATIONS.load(Ordering::Relaxed) > 0);
}
