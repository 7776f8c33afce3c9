//! Merge + delta of a realistic agent shadow: a ~2 KB document (nested configuration
//! in `desired`, inventory and status in `reported`), updated by a small `reported`
//! change, as an agent does after applying an order.
//!
//! Run: `cargo bench -p fleetcore-services --bench shadow_document`.

use criterion::{criterion_group, criterion_main, Criterion};
use fleetcore_services::shadow::document::{apply_update, parse_update, Limits, Shadow};
use serde_json::{json, Value};

fn agent_state() -> (Value, Value) {
    let mut services = serde_json::Map::new();
    for i in 0..12 {
        services.insert(
            format!("svc-{i}"),
            json!({"enabled": i % 3 != 0, "interval_s": 60 * (i + 1), "args": ["--quiet", format!("--id={i}")]}),
        );
    }
    let desired = json!({
        "agent": {"version": "4.12.0", "channel": "stable", "log_level": "info"},
        "schedule": {"inventory": "0 */6 * * *", "patch_window": {"day": "sun", "start": "02:00", "hours": 3}},
        "services": services,
    });
    let mut disks = Vec::new();
    for i in 0..4 {
        disks.push(json!({"dev": format!("/dev/sd{i}"), "size_gb": 512, "free_gb": 100 + i}));
    }
    let reported = json!({
        "agent": {"version": "4.11.2", "channel": "stable", "log_level": "info"},
        "host": {"os": "Windows Server 2022", "build": "20348.2227", "cpu": "Xeon Gold 6338", "cores": 16, "ram_gb": 64},
        "disks": disks,
        "last_inventory": 1_764_000_000u64,
        "services": {"svc-0": {"enabled": false, "interval_s": 60, "args": ["--quiet", "--id=0"]}},
    });
    (desired, reported)
}

fn bench(c: &mut Criterion) {
    let limits = Limits::default();
    let (desired, reported) = agent_state();
    let first = json!({"state": {"desired": desired, "reported": reported}}).to_string();
    let req = parse_update(first.as_bytes(), &limits).unwrap();
    let shadow: Shadow = apply_update(None, &req, &limits, 1).unwrap().shadow;
    eprintln!("document state: {} bytes", shadow.state_bytes());
    let change = json!({"state": {"reported": {"agent": {"version": "4.12.0"}, "last_inventory": 1_764_000_360u64}}, "clientToken": "0f8c3c55-1f7e-4c39-9d0e-2f1f4c3b8f11"}).to_string();
    c.bench_function(
        "shadow: parse + merge + delta + answers (2 KB document)",
        |b| {
            b.iter(|| {
                let req = parse_update(change.as_bytes(), &limits).unwrap();
                apply_update(Some(&shadow), &req, &limits, 2).unwrap()
            })
        },
    );
    c.bench_function("shadow: delta only (2 KB document)", |b| {
        b.iter(|| shadow.delta())
    });
    c.bench_function("shadow: get answer (2 KB document)", |b| {
        b.iter(|| shadow.get_answer(Some("t"), 2).to_string())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
