//! A planner that records which rows a transaction touched, by table and identity key.
//! Small and rule-free: it is the plan tests and benchmarks use to see the stream itself.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::{Plan, Planner, RelationInfo, RowChange};
use crate::pg::pgoutput::TupleValue;

/// One touched row: table and the text of its identity columns (`None` for NULL or unknown).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TouchedRow {
    pub table: Arc<str>,
    pub key: Vec<Option<String>>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct TouchedRows {
    pub rows: BTreeSet<TouchedRow>,
    pub(crate) truncated: BTreeSet<Arc<str>>,
    pub(crate) messages: Vec<(String, Vec<u8>)>,
}

impl Plan for TouchedRows {
    fn merge(&mut self, later: Self) {
        self.rows.extend(later.rows);
        self.truncated.extend(later.truncated);
        self.messages.extend(later.messages);
    }

    fn effect_count(&self) -> usize {
        self.rows.len() + self.truncated.len() + self.messages.len()
    }

    fn absorbs(&self, later: &Self) -> bool {
        // Messages are a sequence: each one counts.
        later.messages.is_empty()
            && later.rows.is_subset(&self.rows)
            && later.truncated.is_subset(&self.truncated)
    }

    fn absorbing_part(&self) -> Self {
        TouchedRows {
            rows: self.rows.clone(),
            truncated: self.truncated.clone(),
            messages: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
pub struct TouchedRowsPlanner {
    /// Interned table names, so a million-row transaction holds one copy of each name.
    tables: std::collections::HashMap<u32, (Arc<str>, Vec<usize>)>,
}

impl TouchedRowsPlanner {
    fn table(&mut self, relation: &RelationInfo) -> (Arc<str>, Vec<usize>) {
        self.tables
            .entry(relation.oid)
            .or_insert_with(|| {
                (
                    Arc::from(relation.qualified_name.as_str()),
                    relation.key_indexes(),
                )
            })
            .clone()
    }
}

fn text(value: Option<&TupleValue<'_>>) -> Option<String> {
    match value {
        Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => {
            Some(String::from_utf8_lossy(b).into_owned())
        }
        _ => None,
    }
}

impl Planner for TouchedRowsPlanner {
    type Plan = TouchedRows;

    fn plan_change(&mut self, change: &RowChange<'_>, plan: &mut TouchedRows) {
        let (table, keys) = self.table(change.relation);
        if change.new.is_some() {
            let key = keys.iter().map(|&i| text(change.new_value(i))).collect();
            plan.rows.insert(TouchedRow {
                table: table.clone(),
                key,
            });
        }
        let old_key: Vec<Option<String>> =
            keys.iter().map(|&i| text(change.old_value(i))).collect();
        if old_key.iter().any(Option::is_some) {
            plan.rows.insert(TouchedRow {
                table,
                key: old_key,
            });
        }
    }

    fn plan_truncate(&mut self, relations: &[&RelationInfo], plan: &mut TouchedRows) {
        for relation in relations {
            let (table, _) = self.table(relation);
            plan.truncated.insert(table);
        }
    }

    fn plan_message(&mut self, prefix: &str, content: &[u8], plan: &mut TouchedRows) {
        plan.messages.push((prefix.to_string(), content.to_vec()));
    }

    fn relation_changed(&mut self, relation: &RelationInfo) {
        self.tables.remove(&relation.oid);
    }
}
