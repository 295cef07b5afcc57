//! Mirrors: rows kept current in Redis (adjust mode) instead of invalidated.
//!
//! `[[table.mirror]]` config is compiled here (`MirrorRule`); `planner` turns row changes into
//! ordered `plan::MirrorOp`s; `redis::mirror` writes them, one atomic Lua call per group of
//! rows, with each row's sorted-set index moves in the same call.
//!
//! # Layout (owned by walsweep, documented in the README)
//! - `format = "json"`: the key holds one JSON object, column name to typed value
//!   (`value::Value::to_json`).
//! - `format = "hash"`: one field per column; strings as they are, other values as their JSON
//!   text; a NULL column has no field.
//! - `[[table.mirror.index]]`: a sorted set per rendered index key; member = rendered member
//!   template, score = the score expression (`score`).

pub(crate) mod plan;
pub(crate) mod planner;
pub(crate) mod score;
pub(crate) mod spill;

use std::sync::Arc;

use crate::config::score::{ScoreExpr, ScoreParseError};
use crate::config::template::{Template, TemplateError};
use crate::config::{MirrorConfig, MirrorFormat, TableConfig};

pub(crate) use plan::{MirrorOp, MirrorPlan, RowWrite};
/// Ops the sink reads back from a spill file at a time: one round trip's worth.
pub(crate) const SPILL_READ_OPS: usize = 6_400;
pub(crate) use planner::MirrorPlanner;

/// How the sink writes one mirror's rows (carried with each op, so the sink needs no config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteMode {
    pub(crate) format: MirrorFormat,
    pub(crate) only_if_present: bool,
    /// 0 = no expiry.
    pub(crate) ttl_seconds: u64,
}

/// A compiled `[[table.mirror.index]]`.
#[derive(Debug, Clone)]
pub(crate) struct IndexRule {
    pub(crate) index: usize,
    pub(crate) key: Template,
    pub(crate) member: Template,
    pub(crate) score: ScoreExpr,
    pub(crate) retention_seconds: Option<u64>,
}

/// A compiled `[[table.mirror]]`.
#[derive(Debug, Clone)]
pub(crate) struct MirrorRule {
    /// Index of the `[[table]]` entry and of the mirror within it.
    pub(crate) table: usize,
    pub(crate) index: usize,
    /// `schema.table`.
    pub(crate) table_name: String,
    pub(crate) key: Template,
    pub(crate) columns: Option<Vec<String>>,
    pub(crate) mode: WriteMode,
    pub(crate) indexes: Vec<IndexRule>,
}

#[derive(Debug, thiserror::Error)]
pub enum MirrorRuleError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Score(#[from] ScoreParseError),
}

impl MirrorRule {
    pub(crate) fn compile(
        table: usize,
        index: usize,
        table_name: &str,
        config: &MirrorConfig,
    ) -> Result<MirrorRule, MirrorRuleError> {
        Ok(MirrorRule {
            table,
            index,
            table_name: table_name.to_string(),
            key: Template::parse(&config.key)?,
            columns: config.columns.clone(),
            mode: WriteMode {
                format: config.format,
                only_if_present: config.only_if_present,
                ttl_seconds: config.ttl_seconds.unwrap_or(0),
            },
            indexes: config
                .index
                .iter()
                .enumerate()
                .map(|(k, i)| {
                    Ok(IndexRule {
                        index: k,
                        key: Template::parse(&i.key)?,
                        member: Template::parse(&i.member)?,
                        score: ScoreExpr::parse(&i.score)?,
                        retention_seconds: i.retention_seconds,
                    })
                })
                .collect::<Result<_, MirrorRuleError>>()?,
        })
    }

    /// Every key prefix this mirror writes under: what TRUNCATE and a reset clear.
    pub(crate) fn prefixes(&self) -> Vec<String> {
        let mut out = vec![self.key.literal_prefix().to_string()];
        out.extend(
            self.indexes
                .iter()
                .map(|i| i.key.literal_prefix().to_string()),
        );
        out
    }

    /// Every column this mirror reads, with what needs it (for `check`).
    pub(crate) fn referenced_columns(&self) -> Vec<(String, String)> {
        self.columns_named(true)
    }

    /// Columns whose old value must be known to find a row's previous key or index entry on
    /// UPDATE and DELETE: key, index key and member columns (scores are overwritten in place).
    pub(crate) fn identity_columns(&self) -> Vec<(String, String)> {
        self.columns_named(false)
    }

    /// Template columns, plus the stored and score columns when `all`.
    fn columns_named(&self, all: bool) -> Vec<(String, String)> {
        let at = format!("mirror[{}]", self.index);
        let mut out: Vec<(String, String)> = self
            .key
            .columns()
            .map(|c| (c.to_string(), format!("{at}.key {:?}", self.key.source)))
            .collect();
        if all {
            for c in self.columns.iter().flatten() {
                out.push((c.clone(), format!("{at}.columns")));
            }
        }
        for i in &self.indexes {
            let at = format!("{at}.index[{}]", i.index);
            for c in i.key.columns() {
                out.push((c.to_string(), format!("{at}.key {:?}", i.key.source)));
            }
            for c in i.member.columns() {
                out.push((c.to_string(), format!("{at}.member {:?}", i.member.source)));
            }
            if all {
                for c in i.score.columns() {
                    out.push((c.clone(), format!("{at}.score {:?}", i.score.source())));
                }
            }
        }
        out
    }
}

/// Every mirror of the config, in `[[table]]` order.
pub(crate) fn compile_all(tables: &[TableConfig]) -> Result<Vec<Arc<MirrorRule>>, MirrorRuleError> {
    let mut out = Vec::new();
    for (t, table) in tables.iter().enumerate() {
        let name = if table.name.contains('.') {
            table.name.clone()
        } else {
            format!("public.{}", table.name)
        };
        for (m, config) in table.mirror.iter().enumerate() {
            out.push(Arc::new(MirrorRule::compile(t, m, &name, config)?));
        }
    }
    Ok(out)
}
