//! Shadows on the record-store contract: one record of kind `shadow` per document,
//! keyed `thing` (classic) or `thing/name` (named; neither name may hold `/`), its value
//! the [`Shadow`] as JSON. A deleted shadow stays as a tombstone carrying its version
//! for 48 hours (IoT Core continues the numbering within that time); older tombstones
//! are removed at start.

use std::collections::HashMap;

use fleetcore_core::storage::RecordOp;

use super::document::{Shadow, VERSION_MEMORY_SECS};

/// The record kind of shadows.
pub const KIND: &str = "shadow";

/// Which document: a thing's classic shadow (`name: None`) or one of its named ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub thing: String,
    pub name: Option<String>,
}

impl Key {
    pub fn record_key(&self) -> String {
        match &self.name {
            None => self.thing.clone(),
            Some(n) => format!("{}/{n}", self.thing),
        }
    }

    pub fn parse(record_key: &str) -> Key {
        match record_key.split_once('/') {
            None => Key {
                thing: record_key.to_string(),
                name: None,
            },
            Some((thing, name)) => Key {
                thing: thing.to_string(),
                name: Some(name.to_string()),
            },
        }
    }
}

/// The op that writes `shadow` (a live one or a tombstone).
/// The ops that write `shadow` if its record is still at `revision` (`None`: there is
/// none), so an update made on another node meanwhile is not overwritten.
pub fn put(key: &Key, shadow: &Shadow, revision: Option<u64>) -> Result<Vec<RecordOp>, String> {
    Ok(vec![
        RecordOp::Expect {
            kind: KIND,
            key: key.record_key(),
            revision,
        },
        RecordOp::Put {
            kind: KIND,
            key: key.record_key(),
            value: serde_json::to_vec(shadow).map_err(|e| e.to_string())?,
        },
    ])
}

/// The shadows among the loaded records with their record revisions, and the ops that
/// remove tombstones older than 48 hours. A record that does not decode is skipped with
/// an error in the log (it stays on disk until that shadow is written again).
#[allow(clippy::type_complexity)]
pub fn load(
    records: &[fleetcore_core::service::Record],
    now: u64,
) -> (HashMap<Key, (Shadow, u64)>, Vec<RecordOp>) {
    let mut out = HashMap::new();
    let mut stale = Vec::new();
    for (kind, key, value, revision) in records {
        if kind != KIND {
            continue;
        }
        match serde_json::from_slice::<Shadow>(value) {
            Ok(s) => {
                if s.deleted_at
                    .is_some_and(|at| now.saturating_sub(at) >= VERSION_MEMORY_SECS)
                {
                    stale.push(RecordOp::Delete {
                        kind: KIND,
                        key: key.clone(),
                    });
                } else {
                    out.insert(Key::parse(key), (s, *revision));
                }
            }
            Err(e) => {
                tracing::error!(key = %key, error = %e, "shadow record does not decode; skipped");
            }
        }
    }
    (out, stale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_loading_drops_old_tombstones() {
        for k in [
            Key {
                thing: "t".into(),
                name: None,
            },
            Key {
                thing: "t".into(),
                name: Some("n".into()),
            },
        ] {
            assert_eq!(Key::parse(&k.record_key()), k);
        }
        let live = Shadow {
            version: 3,
            ..Shadow::default()
        };
        let fresh = Shadow {
            version: 4,
            deleted_at: Some(1_000),
            ..Shadow::default()
        };
        let old = Shadow {
            version: 5,
            deleted_at: Some(1),
            ..Shadow::default()
        };
        let rec = |k: &str, s: &Shadow| {
            (
                KIND.to_string(),
                k.to_string(),
                serde_json::to_vec(s).unwrap(),
                7,
            )
        };
        let records = vec![
            rec("a", &live),
            rec("a/n", &fresh),
            rec("b", &old),
            ("thing".to_string(), "a".to_string(), b"{}".to_vec(), 8),
            (KIND.to_string(), "c".to_string(), b"not json".to_vec(), 9),
        ];
        let (loaded, stale) = load(&records, 1 + VERSION_MEMORY_SECS);
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded[&Key::parse("a")].0.version, 3);
        assert_eq!(loaded[&Key::parse("a/n")].0.version, 4);
        assert_eq!(loaded[&Key::parse("a")].1, 7);
        assert_eq!(
            stale,
            vec![RecordOp::Delete {
                kind: KIND,
                key: "b".into()
            }]
        );
    }
}
