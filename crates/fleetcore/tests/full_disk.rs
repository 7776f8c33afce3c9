//! A full disk: retained QoS 1 publishes that cannot be stored are refused (0x80) and
//! change nothing, neither on disk nor in memory; the broker serves again once space is
//! freed. The data directory is a 12 MiB tmpfs this test mounts (CI runs as root); part
//! of it is taken by a ballast file that is deleted to free space.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(dir: &Path, size: &str) -> Mount {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .expect("run mount");
    assert!(
        out.status.success(),
        "this test mounts a small tmpfs as the data directory and needs root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Mount(dir.to_path_buf())
}

fn copy_dir(from: &Path, to: &Path) {
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            fs::create_dir_all(&target).unwrap();
            copy_dir(&e.path(), &target);
        } else {
            fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// The retained topics a fresh subscriber to `fill/#` is given.
fn retained_topics(broker: &TestBroker) -> BTreeSet<String> {
    retained_under(broker, "fill/#")
        .into_iter()
        .map(|(topic, _)| topic)
        .collect()
}

/// Publishes `count` retained QoS 1 messages of `size` bytes to `fill/{prefix}{i}`;
/// the topics acknowledged with success and the number refused.
fn publish_retained(
    broker: &TestBroker,
    prefix: &str,
    count: usize,
    size: usize,
) -> (BTreeSet<String>, usize) {
    let payload = "x".repeat(size);
    let topic = format!("fill/{prefix}{{i}}");
    let count_s = count.to_string();
    let mut p = paho(
        "publish.py",
        &with(
            &broker.paho_tcp(),
            &[
                "--protocol",
                "5",
                "--topic",
                &topic,
                "--payload",
                &payload,
                "--count",
                &count_s,
                "--retain",
                "--max-inflight",
                "1",
            ],
        ),
    );
    p.wait_exit(std::time::Duration::from_secs(60));
    let mut acked = BTreeSet::new();
    let mut refused = 0;
    for ev in p.events() {
        match ev.kind.as_str() {
            "ack" => {
                acked.insert(ev.get("topic").to_string());
            }
            "nack" => {
                assert_eq!(ev.get("reason_code"), "128", "{}", p.transcript());
                refused += 1;
            }
            _ => {}
        }
    }
    assert_eq!(acked.len() + refused, count, "{}", p.transcript());
    (acked, refused)
}

#[test]
fn refused_publishes_on_a_full_disk_change_nothing_and_the_broker_recovers() {
    let mut broker = TestBroker::start(BrokerOpts::new());
    broker.terminate();
    // The data directory moves onto a 12 MiB tmpfs.
    let data = broker.data_dir();
    let saved = data.with_file_name("data.saved");
    fs::rename(&data, &saved).unwrap();
    fs::create_dir(&data).unwrap();
    let _mount = mount_tmpfs(&data, "12m");
    copy_dir(&saved, &data);
    let ballast = data.join("ballast");
    fs::write(&ballast, vec![0u8; 4 << 20]).unwrap();
    broker.restart();

    // 400 x 32 KiB is more than the ~8 MiB left: the first ones are stored, then the
    // disk is full and every further one is refused.
    let (acked, refused) = publish_retained(&broker, "a", 400, 32 * 1024);
    assert!(!acked.is_empty(), "nothing could be stored at all");
    assert!(refused > 0, "the disk never filled up");
    assert!(
        broker.log().contains("the disk holding the store is full"),
        "the operator is not told the disk is full\n{}",
        broker.log_tail()
    );
    // Memory is not ahead of the disk: exactly the acknowledged ones are retained.
    assert_eq!(retained_topics(&broker), acked);

    // Space is freed: the broker stores again, without a restart.
    fs::remove_file(&ballast).unwrap();
    let (more, refused_after) = publish_retained(&broker, "b", 5, 1024);
    assert_eq!((more.len(), refused_after), (5, 0));
    let mut expected = acked.clone();
    expected.extend(more);
    assert_eq!(retained_topics(&broker), expected);

    // And what is on disk is what was acknowledged.
    broker.kill9();
    broker.restart();
    assert_eq!(retained_topics(&broker), expected);
    broker.terminate();
}
