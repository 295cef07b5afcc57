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
use std::fmt::Write as _;

use crate::config::BroadcastConfig;
use crate::pg::pgoutput::TupleValue;
use crate::pg::Lsn;
use crate::plan::rules::Effect;
use crate::plan::{Op, RelationInfo, RowChange};
use crate::value::{decode_text, iso_utc, TypeRegistry, Value};

/// The broadcast part of one transaction's plan.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BroadcastPlan {
    /// Each change as a JSON object, in commit order (empty once `truncated`).
    changes: Vec<String>,
    /// Changes per table, always counted.
    counts: BTreeMap<String, u64>,
    truncated: bool,
    limit: usize,
}

impl BroadcastPlan {
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    fn push(&mut self, table: &str, change: String) {
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
        self.changes.push(change);
    }

    pub fn merge(&mut self, later: BroadcastPlan) {
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
    pub fn message_body(&self, commit_lsn: Lsn, commit_time_unix_micros: i64, xid: u32) -> String {
        let mut out =
            String::with_capacity(64 + self.changes.iter().map(|c| c.len() + 1).sum::<usize>());
        let _ = write!(
            out,
            "{{\"lsn\":\"{commit_lsn}\",\"commit_time\":{},\"xid\":{xid},\"changes\":[",
            serde_json::Value::String(iso_utc(commit_time_unix_micros))
        );
        for (i, change) in self.changes.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(change);
        }
        out.push(']');
        if self.truncated {
            let counts = serde_json::to_string(&self.counts).unwrap_or_else(|_| "{}".into());
            let _ = write!(out, ",\"truncated\":true,\"counts\":{counts}");
        }
        out.push('}');
        out
    }
}

/// The body of the message sent after a gap in the stream.
pub fn reset_body(reason: &str) -> String {
    serde_json::json!({ "lsn": null, "reset": true, "reason": reason }).to_string()
}

/// Adds what a broadcast lists for one invalidation: keys and dependencies as rendered,
/// table-wide ones as `prefix*` (what a client matches its entries against).
pub fn list_effect(effect: &Effect, keys: &mut Vec<String>, deps: &mut Vec<String>) {
    match effect {
        Effect::UnlinkKey(k) => keys.push(k.clone()),
        Effect::InvalidateDep(d) => deps.push(d.clone()),
        Effect::UnlinkKeysWithPrefix { prefix, .. } => keys.push(format!("{prefix}*")),
        Effect::InvalidateDepsWithPrefix { prefix, .. } => deps.push(format!("{prefix}*")),
    }
}

/// `items` without repeats, first occurrence kept: an UPDATE that keeps the key renders the
/// same key for the old and the new row.
fn distinct(items: &[String]) -> Vec<&String> {
    let mut seen = HashSet::new();
    items.iter().filter(|i| seen.insert(i.as_str())).collect()
}

/// Decides which changes are broadcast and renders each.
pub struct BroadcastPlanner {
    tables: Option<HashSet<String>>,
    limit: usize,
    types: TypeRegistry,
}

impl BroadcastPlanner {
    pub fn new(config: &BroadcastConfig) -> Self {
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
    pub fn defaulting_to(mut self, followed: &[String]) -> Self {
        if self.tables.is_none() {
            self.tables = Some(followed.iter().cloned().collect());
        }
        self
    }

    /// Enums, domains and arrays of them, so primary keys are typed like built-in values.
    pub fn register_types(&mut self, types: &TypeRegistry) {
        self.types = types.clone();
    }

    pub fn follows(&self, relation: &RelationInfo) -> bool {
        self.tables
            .as_ref()
            .is_none_or(|t| t.contains(&relation.qualified_name))
    }

    pub fn add_change(
        &self,
        change: &RowChange<'_>,
        keys: &[String],
        deps: &[String],
        plan: &mut BroadcastPlan,
    ) {
        plan.limit = self.limit;
        let table = &change.relation.qualified_name;
        if plan.truncated || plan.changes.len() >= self.limit {
            plan.push(table, String::new());
            return;
        }
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
        // Written by hand to keep the documented field order.
        let entry = format!(
            "{{\"table\":{},\"op\":\"{}\",\"pk\":{},\"keys\":{},\"deps\":{}}}",
            serde_json::Value::String(table.clone()),
            change.op.as_str(),
            serde_json::Value::Object(pk),
            serde_json::json!(distinct(keys)),
            serde_json::json!(distinct(deps)),
        );
        plan.push(table, entry);
    }

    pub fn add_truncate(&self, relation: &RelationInfo, plan: &mut BroadcastPlan) {
        plan.limit = self.limit;
        let entry = format!(
            "{{\"table\":{},\"op\":\"{}\"}}",
            serde_json::Value::String(relation.qualified_name.clone()),
            Op::Truncate.as_str()
        );
        plan.push(&relation.qualified_name, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_transactions_list_counts_only() {
        let mut plan = BroadcastPlan {
            limit: 2,
            ..Default::default()
        };
        for _ in 0..3 {
            plan.push("public.a", "{}".into());
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
        a.push("t", "1".into());
        let mut b = BroadcastPlan {
            limit: 10,
            ..Default::default()
        };
        b.push("t", "2".into());
        a.merge(b);
        assert_eq!(a.changes, vec!["1".to_string(), "2".to_string()]);
        assert_eq!(a.counts["t"], 2);
    }
}
