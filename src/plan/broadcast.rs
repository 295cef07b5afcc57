//! Broadcasts: one JSON message per committed transaction, for caches inside app processes.
//!
//! # Message (one line of JSON; field order as shown)
//! ```json
//! {"prev_lsn":"0/1A2B3C0","lsn":"0/1A2B4D8","commit_time":"2026-11-22T10:00:00.123456Z",
//!  "xid":1234,"changes":[{"table":"public.articles","op":"update","pk":{"id":7},
//!  "keys":["article:7"],"deps":["id:article:7"]}]}
//! ```
//! - `lsn`: the transaction's commit LSN; `prev_lsn`: the `lsn` of the previous message walsweep
//!   published (`null` for the first). A client that did not see `prev_lsn` as its last `lsn`
//!   missed messages (Pub/Sub drops them while it is disconnected) and must drop its cache.
//! - `pk`: the replica identity columns (typed as in JSON mirrors); `keys` and `deps`: what the
//!   `[[table]]` rules invalidated for that change. TRUNCATE has `"op":"truncate"` and no `pk`.
//! - A transaction with more than `max_changes_per_message` changes lists none: `"changes":[]`,
//!   `"truncated":true` and `"counts":{"public.articles":5000}`: drop those tables.
//! - After a gap in the stream (slot lost and recreated), and whenever walsweep creates the slot
//!   (first start, restored or moved database), walsweep sends `{"reset":true,...}`: drop
//!   everything; the chain starts again (`prev_lsn` null).
//!
//! Redis side (`redis::broadcast`): each message is published by one Lua call that also records
//! the LSN, so a redelivered transaction (at-least-once delivery) is not published twice.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::config::BroadcastConfig;
use crate::pg::pgoutput::TupleValue;
use crate::pg::Lsn;
use crate::plan::rules::EffectRef;
use crate::plan::{Op, RelationInfo, RowChange};
use crate::value::{decode_text, iso_utc, TypeRegistry, Value};

/// One entry of `changes`. Fields serialize in declaration order, the documented one.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Change {
    table: String,
    op: &'static str,
    /// `None` for TRUNCATE, which names no row.
    #[serde(flatten)]
    row: Option<RowListing>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct RowListing {
    pk: serde_json::Map<String, serde_json::Value>,
    keys: Vec<String>,
    deps: Vec<String>,
}

/// A message without `prev_lsn` (the Lua script prepends it). Fields serialize in declaration
/// order, the documented one.
#[derive(Serialize)]
struct MessageBody<'a> {
    lsn: String,
    commit_time: String,
    xid: u32,
    changes: &'a [Change],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    counts: Option<&'a BTreeMap<String, u64>>,
}

/// The message after a gap. Fields in the order the messages have always had (`json!` sorted
/// them), so clients that compare text see no change.
#[derive(Serialize)]
struct ResetBody<'a> {
    /// `null`: a reset belongs to no transaction.
    lsn: (),
    reason: &'a str,
    reset: bool,
}

/// The broadcast part of one transaction's plan.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct BroadcastPlan {
    /// Each change, in commit order (empty once `truncated`).
    changes: Vec<Change>,
    /// Changes per table, always counted.
    counts: BTreeMap<String, u64>,
    truncated: bool,
    limit: usize,
}

impl BroadcastPlan {
    pub(crate) fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.changes.len()
    }

    /// `change` is built only when the message still has room for it.
    fn push(&mut self, table: &str, change: impl FnOnce() -> Change) {
        *self.counts.entry(table.to_string()).or_default() += 1;
        if self.truncated {
            return;
        }
        if self.changes.len() >= self.limit.max(1) {
            // Memory stays bounded for huge transactions; the counts say what to drop.
            self.truncated = true;
            self.changes = Vec::new();
            return;
        }
        self.changes.push(change());
    }

    pub(crate) fn merge(&mut self, later: BroadcastPlan) {
        if self.limit == 0 {
            self.limit = later.limit;
        }
        if later.truncated {
            self.truncated = true;
            self.changes = Vec::new();
        }
        for (table, n) in later.counts {
            *self.counts.entry(table).or_default() += n;
        }
        if !self.truncated {
            if self.changes.len() + later.changes.len() > self.limit.max(1) {
                self.truncated = true;
                self.changes = Vec::new();
            } else {
                self.changes.extend(later.changes);
            }
        }
    }

    /// The message without `prev_lsn` (the Lua script prepends it): `{"lsn":...}`.
    pub(crate) fn message_body(
        &self,
        commit_lsn: Lsn,
        commit_time_unix_micros: i64,
        xid: u32,
    ) -> String {
        serde_json::to_string(&MessageBody {
            lsn: commit_lsn.to_string(),
            commit_time: iso_utc(commit_time_unix_micros),
            xid,
            changes: &self.changes,
            truncated: self.truncated,
            counts: self.truncated.then_some(&self.counts),
        })
        .expect("a broadcast message has only string map keys, so it always serializes")
    }
}

/// The body of the message sent after a gap in the stream.
pub(crate) fn reset_body(reason: &str) -> String {
    serde_json::to_string(&ResetBody {
        lsn: (),
        reason,
        reset: true,
    })
    .expect("a reset message has no maps, so it always serializes")
}

/// Adds what a broadcast lists for one invalidation: keys and dependencies as rendered,
/// table-wide ones as `prefix*` (what a client matches its entries against).
pub(crate) fn list_effect(effect: EffectRef<'_>, keys: &mut Vec<String>, deps: &mut Vec<String>) {
    match effect {
        EffectRef::UnlinkKey(k) => keys.push(k.to_string()),
        EffectRef::InvalidateDep(d) => deps.push(d.to_string()),
        EffectRef::UnlinkKeysWithPrefix { prefix, .. } => keys.push(format!("{prefix}*")),
        EffectRef::InvalidateDepsWithPrefix { prefix, .. } => deps.push(format!("{prefix}*")),
    }
}

/// `items` without repeats, first occurrence kept: an UPDATE that keeps the key renders the
/// same key for the old and the new row.
fn distinct(items: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    items
        .iter()
        .filter(|i| seen.insert(i.as_str()))
        .cloned()
        .collect()
}

/// Decides which changes are broadcast and renders each.
pub(crate) struct BroadcastPlanner {
    tables: Option<HashSet<String>>,
    limit: usize,
    types: TypeRegistry,
}

impl BroadcastPlanner {
    pub(crate) fn new(config: &BroadcastConfig) -> Self {
        BroadcastPlanner {
            tables: config.tables.as_ref().map(|t| {
                t.iter()
                    .map(|n| {
                        if n.contains('.') {
                            n.clone()
                        } else {
                            format!("public.{n}")
                        }
                    })
                    .collect()
            }),
            limit: config.max_changes_per_message,
            types: TypeRegistry::new(),
        }
    }

    /// Without `[broadcast] tables`, broadcasts cover the `[[table]]`s (`followed`), never
    /// other tables the publication may hold: their rows are not the config's to publish.
    pub(crate) fn defaulting_to(mut self, followed: &[String]) -> Self {
        if self.tables.is_none() {
            self.tables = Some(followed.iter().cloned().collect());
        }
        self
    }

    /// Enums, domains and arrays of them, so primary keys are typed like built-in values.
    pub(crate) fn register_types(&mut self, types: &TypeRegistry) {
        self.types = types.clone();
    }

    pub(crate) fn follows(&self, relation: &RelationInfo) -> bool {
        self.tables
            .as_ref()
            .is_none_or(|t| t.contains(&relation.qualified_name))
    }

    pub(crate) fn add_change(
        &self,
        change: &RowChange<'_>,
        keys: &[String],
        deps: &[String],
        plan: &mut BroadcastPlan,
    ) {
        plan.limit = self.limit;
        let table = &change.relation.qualified_name;
        plan.push(table, || self.change_entry(change, keys, deps));
    }

    fn change_entry(&self, change: &RowChange<'_>, keys: &[String], deps: &[String]) -> Change {
        let mut pk = serde_json::Map::new();
        for i in change.relation.key_indexes() {
            let value = match change.op {
                Op::Delete => change.old_value(i),
                _ => change.new_value(i),
            };
            let column = &change.relation.columns[i];
            let json = match value {
                Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => {
                    match decode_text(column.type_oid, b, &self.types) {
                        Ok(v) => v.to_json(),
                        Err(_) => Value::Text(String::from_utf8_lossy(b).into_owned()).to_json(),
                    }
                }
                _ => serde_json::Value::Null,
            };
            pk.insert(column.name.clone(), json);
        }
        Change {
            table: change.relation.qualified_name.clone(),
            op: change.op.as_str(),
            row: Some(RowListing {
                pk,
                keys: distinct(keys),
                deps: distinct(deps),
            }),
        }
    }

    pub(crate) fn add_truncate(&self, relation: &RelationInfo, plan: &mut BroadcastPlan) {
        plan.limit = self.limit;
        plan.push(&relation.qualified_name, || Change {
            table: relation.qualified_name.clone(),
            op: Op::Truncate.as_str(),
            row: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn truncate_of(table: &str) -> Change {
        Change {
            table: table.into(),
            op: Op::Truncate.as_str(),
            row: None,
        }
    }

    #[test]
    fn messages_keep_their_documented_form() {
        let mut plan = BroadcastPlan {
            limit: 5,
            ..Default::default()
        };
        plan.push("public.a", || truncate_of("public.a"));
        plan.push("public.a", || Change {
            table: "public.a".into(),
            op: Op::Update.as_str(),
            row: Some(RowListing {
                pk: serde_json::Map::from_iter([("id".to_string(), 7.into())]),
                keys: vec!["a:7".into()],
                deps: vec![],
            }),
        });
        assert_eq!(
            plan.message_body(Lsn::from(0x1A2B4D8), 1_700_000_000_123_456, 1234),
            "{\"lsn\":\"0/1A2B4D8\",\"commit_time\":\"2023-11-14T22:13:20.123456Z\",\"xid\":1234,\
             \"changes\":[{\"table\":\"public.a\",\"op\":\"truncate\"},{\"table\":\"public.a\",\
             \"op\":\"update\",\"pk\":{\"id\":7},\"keys\":[\"a:7\"],\"deps\":[]}]}"
        );
        let mut plan = BroadcastPlan {
            limit: 1,
            ..Default::default()
        };
        for table in ["public.b", "public.a", "public.a"] {
            plan.push(table, || truncate_of(table));
        }
        assert_eq!(
            plan.message_body(Lsn::from(0x10), -1, 7),
            "{\"lsn\":\"0/10\",\"commit_time\":\"1969-12-31T23:59:59.999999Z\",\"xid\":7,\
             \"changes\":[],\"truncated\":true,\"counts\":{\"public.a\":2,\"public.b\":1}}"
        );
        assert_eq!(
            reset_body("slot \"walsweep\" lost"),
            "{\"lsn\":null,\"reason\":\"slot \\\"walsweep\\\" lost\",\"reset\":true}"
        );
    }

    #[test]
    fn large_transactions_list_counts_only() {
        let mut plan = BroadcastPlan {
            limit: 2,
            ..Default::default()
        };
        for _ in 0..3 {
            plan.push("public.a", || truncate_of("public.a"));
        }
        let body = plan.message_body(Lsn::from(0x10), 0, 7);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["truncated"], true);
        assert_eq!(json["counts"]["public.a"], 3);
        assert_eq!(json["changes"].as_array().unwrap().len(), 0);
        assert_eq!(json["lsn"], "0/10");
    }

    #[test]
    fn segments_merge_in_order() {
        let mut a = BroadcastPlan {
            limit: 10,
            ..Default::default()
        };
        a.push("t", || truncate_of("first"));
        let mut b = BroadcastPlan {
            limit: 10,
            ..Default::default()
        };
        b.push("t", || truncate_of("second"));
        a.merge(b);
        assert_eq!(a.changes, vec![truncate_of("first"), truncate_of("second")]);
        assert_eq!(a.counts["t"], 2);
    }
}
