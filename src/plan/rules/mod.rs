//! Rules: the `[[table]]` config turned into a `Planner` that maps each row change to effects
//! (keys, matroska dependency sets and scopes), plus transactional hints.
//!
//! Config is compiled once (`Rules`); column positions are bound once per Relation message
//! (`BoundTable`), so per row there are only index lookups and string building.

pub(crate) mod effect;
mod effect_set;
pub(crate) mod hint;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::template::{Segment, Template, TemplateError};
use crate::config::{Config, OpName, TableConfig};
use crate::pg::pgoutput::TupleValue;
use crate::plan::{Op, Planner, RelationInfo, RowChange};
use crate::value::{python_repr, python_str, TypeRegistry, PYTHON_NONE};
pub(crate) use effect::SizeHint;
pub use effect::{Effect, EffectPlan, EffectRef, EffectSet, FallbackCause};
pub(crate) use effect_set::union;
use jiff::tz::TimeZone;

/// Prefix of `pg_logical_emit_message` payloads walsweep acts on.
pub(crate) const HINT_PREFIX: &str = "walsweep";

/// Which part of the config produced an effect (for `explain` and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Index of the `[[table]]` entry.
    pub(crate) table: usize,
    pub(crate) rule: RuleRef,
    /// Old row, new row, or the whole table.
    pub(crate) side: Side,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RuleRef {
    Key(usize),
    Dep(usize),
    Scope(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Old,
    New,
    Table,
}

impl Side {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Old => "old row",
            Side::New => "new row",
            Side::Table => "whole table",
        }
    }
}

/// A compiled `[[table.scope]]`.
#[derive(Debug, Clone)]
pub(crate) struct ScopeRule {
    pub(crate) name: String,
    /// Sorted, as matroska-cache sorts the condition's items.
    pub(crate) columns: Vec<String>,
}

impl ScopeRule {
    pub(crate) fn invalidate_all(&self) -> String {
        format!("condition:{}::InvalidateAll", self.name)
    }
}

/// A compiled `[[table]]`.
#[derive(Debug, Clone)]
pub(crate) struct TableRule {
    pub(crate) index: usize,
    pub(crate) name: String,
    pub(crate) keys: Vec<Template>,
    pub(crate) deps: Vec<Template>,
    pub(crate) columns: Option<Vec<String>>,
    pub(crate) ops: HashSet<Op>,
    pub(crate) scopes: Vec<ScopeRule>,
}

/// All rules, by qualified table name.
#[derive(Debug, Clone)]
pub struct Rules {
    pub(crate) tables: Vec<TableRule>,
    /// The app's session TimeZone (`matroska.timezone`), for timestamptz in scopes and deps.
    pub(crate) timezone: TimeZone,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            tables: Vec::new(),
            timezone: TimeZone::UTC,
        }
    }
}

/// Why the rules of a config do not compile.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("matroska.timezone: {0}")]
    TimeZone(String),
}

fn op_of(name: OpName) -> Op {
    match name {
        OpName::Insert => Op::Insert,
        OpName::Update => Op::Update,
        OpName::Delete => Op::Delete,
        OpName::Truncate => Op::Truncate,
    }
}

impl TableRule {
    /// Compiles one entry; templates were validated with the config, so parsing succeeds.
    pub(crate) fn compile(index: usize, table: &TableConfig) -> Result<TableRule, TemplateError> {
        let name = if table.name.contains('.') {
            table.name.clone()
        } else {
            format!("public.{}", table.name)
        };
        let ops = match &table.ops {
            Some(ops) => ops.iter().map(|o| op_of(*o)).collect(),
            None => [Op::Insert, Op::Update, Op::Delete, Op::Truncate].into(),
        };
        let mut scopes: Vec<ScopeRule> = table
            .scope
            .iter()
            .map(|s| {
                let mut columns = s.columns.clone();
                columns.sort();
                ScopeRule {
                    name: s.name.clone(),
                    columns,
                }
            })
            .collect();
        scopes.dedup_by(|a, b| a.name == b.name && a.columns == b.columns);
        Ok(TableRule {
            index,
            name,
            keys: table
                .keys
                .iter()
                .map(|k| Template::parse(k))
                .collect::<Result<_, _>>()?,
            deps: table
                .deps
                .iter()
                .map(|d| Template::parse(d))
                .collect::<Result<_, _>>()?,
            columns: table.columns.clone(),
            ops,
            scopes,
        })
    }

    /// Every column the rules read from a row, with what needs it (for `check`).
    pub(crate) fn referenced_columns(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (i, k) in self.keys.iter().enumerate() {
            for c in k.columns() {
                out.push((c.to_string(), format!("keys[{i}] {:?}", k.source)));
            }
        }
        for (i, d) in self.deps.iter().enumerate() {
            for c in d.columns() {
                out.push((c.to_string(), format!("deps[{i}] {:?}", d.source)));
            }
        }
        for (i, s) in self.scopes.iter().enumerate() {
            for c in &s.columns {
                out.push((c.clone(), format!("scope[{i}] {:?}", s.name)));
            }
        }
        for c in self.columns.iter().flatten() {
            out.push((c.clone(), "columns".to_string()));
        }
        out
    }
}

impl Rules {
    pub fn from_config(config: &Config) -> Result<Rules, RulesError> {
        Ok(Rules {
            tables: config
                .tables
                .iter()
                .enumerate()
                .map(|(i, t)| TableRule::compile(i, t))
                .collect::<Result<_, _>>()?,
            timezone: config.matroska.timezone().map_err(RulesError::TimeZone)?,
        })
    }
}

impl Rules {
    /// Everything these rules can ever invalidate, as table-wide effects: what a cache that
    /// missed changes must drop (after a lost slot was recreated).
    pub fn reset_plan(&self) -> EffectPlan {
        let cause = FallbackCause::SlotRecreated;
        let mut plan = EffectPlan::default();
        for table in &self.tables {
            for key in &table.keys {
                plan.add_ref(EffectRef::UnlinkKeysWithPrefix {
                    prefix: key.literal_prefix(),
                    cause,
                });
            }
            for dep in &table.deps {
                plan.add_ref(EffectRef::InvalidateDepsWithPrefix {
                    prefix: dep.literal_prefix(),
                    cause,
                });
            }
            for scope in &table.scopes {
                plan.add_ref(EffectRef::InvalidateDepsWithPrefix {
                    prefix: &format!("condition:{}:", scope.name),
                    cause,
                });
            }
        }
        plan
    }
}

/// A template with its columns resolved to positions in one relation.
#[derive(Debug, Clone)]
pub(crate) struct BoundTemplate {
    pub(crate) index: usize,
    pub(crate) template: Template,
    /// Position of each column segment, in order; `None` when the table lacks the column.
    positions: Vec<Option<usize>>,
}

#[derive(Debug, Clone)]
struct BoundScope {
    index: usize,
    rule: ScopeRule,
    positions: Vec<Option<usize>>,
}

/// A table rule bound to a relation's current shape.
#[derive(Debug, Clone)]
struct BoundTable {
    rule: Arc<TableRule>,
    keys: Vec<BoundTemplate>,
    deps: Vec<BoundTemplate>,
    /// Positions of `columns`; `None` entries (unknown columns) count as changed.
    watched: Option<Vec<Option<usize>>>,
    scopes: Vec<BoundScope>,
    type_oids: Vec<u32>,
}

pub(crate) fn bind_template(
    index: usize,
    template: &Template,
    relation: &RelationInfo,
) -> BoundTemplate {
    BoundTemplate {
        index,
        template: template.clone(),
        positions: template
            .columns()
            .map(|c| relation.column_index(c))
            .collect(),
    }
}

impl BoundTable {
    fn bind(rule: Arc<TableRule>, relation: &RelationInfo) -> BoundTable {
        BoundTable {
            keys: rule
                .keys
                .iter()
                .enumerate()
                .map(|(i, t)| bind_template(i, t, relation))
                .collect(),
            deps: rule
                .deps
                .iter()
                .enumerate()
                .map(|(i, t)| bind_template(i, t, relation))
                .collect(),
            watched: rule
                .columns
                .as_ref()
                .map(|cols| cols.iter().map(|c| relation.column_index(c)).collect()),
            scopes: rule
                .scopes
                .iter()
                .enumerate()
                .map(|(i, s)| BoundScope {
                    index: i,
                    rule: s.clone(),
                    positions: s.columns.iter().map(|c| relation.column_index(c)).collect(),
                })
                .collect(),
            type_oids: relation.columns.iter().map(|c| c.type_oid).collect(),
            rule,
        }
    }
}

/// A column value on one side of a change.
enum Cell<'a> {
    Text(std::borrow::Cow<'a, str>),
    Null,
    Unknown(FallbackCause),
}

fn cell<'a>(change: &RowChange<'a>, side: Side, position: Option<usize>) -> Cell<'a> {
    let Some(i) = position else {
        return Cell::Unknown(FallbackCause::UnknownColumn);
    };
    let (value, unknown) = match side {
        Side::Old => (change.old_value(i), FallbackCause::UnknownOldValue),
        _ => (change.new_value(i), FallbackCause::UnknownNewValue),
    };
    match value {
        Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => match std::str::from_utf8(b) {
            Ok(text) => Cell::Text(std::borrow::Cow::Borrowed(text)),
            // A lossy rendering would name a key no app wrote: invalidate table-wide instead.
            Err(_) => Cell::Unknown(FallbackCause::NonUtf8Value),
        },
        Some(TupleValue::Null) => Cell::Null,
        Some(TupleValue::UnchangedToast) | None => Cell::Unknown(unknown),
    }
}

/// How a rendered template turned out.
pub(crate) enum Rendered {
    Value(String),
    /// A NULL in a key template: no such key exists.
    Absent,
    Unknown(FallbackCause),
}

/// How a template prints its values.
pub(crate) struct ValueFormat<'a> {
    /// The relation's column types, by position.
    pub(crate) type_oids: &'a [u32],
    /// Enums and domains, resolved by the stream.
    pub(crate) types: &'a TypeRegistry,
    /// The app's session TimeZone, for Python's `str()` of a timestamptz.
    pub(crate) zone: &'a TimeZone,
    /// Python's `str()` of each value (dependencies, scopes); otherwise the text Postgres
    /// prints (keys, mirrors).
    pub(crate) python: bool,
}

impl<'a> ValueFormat<'a> {
    /// Postgres's text: no time zone is ever consulted.
    pub(crate) fn text(type_oids: &'a [u32], types: &'a TypeRegistry) -> Self {
        static UTC: TimeZone = TimeZone::UTC;
        ValueFormat {
            type_oids,
            types,
            zone: &UTC,
            python: false,
        }
    }
}

/// `bound` rendered from one side of `change`.
pub(crate) fn render(
    bound: &BoundTemplate,
    change: &RowChange<'_>,
    side: Side,
    format: &ValueFormat<'_>,
) -> Rendered {
    let mut out = String::with_capacity(bound.template.source.len() + 16);
    match render_into(bound, change, side, format, &mut out) {
        Ok(true) => Rendered::Value(out),
        Ok(false) => Rendered::Absent,
        Err(cause) => Rendered::Unknown(cause),
    }
}

/// `render` onto the end of `out`, which the caller reuses: `Ok(false)` for a NULL in a key
/// template (no such key exists). On `Ok(false)` and errors `out` holds a partial rendering.
fn render_into(
    bound: &BoundTemplate,
    change: &RowChange<'_>,
    side: Side,
    format: &ValueFormat<'_>,
    out: &mut String,
) -> Result<bool, FallbackCause> {
    let ValueFormat {
        type_oids,
        types,
        zone,
        python,
    } = *format;
    let mut positions = bound.positions.iter();
    for segment in &bound.template.segments {
        match segment {
            Segment::Literal(l) => out.push_str(l),
            Segment::Column { repr, .. } => {
                let position = positions.next().copied().flatten();
                let oid = || {
                    position
                        .and_then(|p| type_oids.get(p))
                        .copied()
                        .unwrap_or(0)
                };
                match cell(change, side, position) {
                    Cell::Text(t) if *repr => out.push_str(&python_repr(oid(), &t, types)),
                    Cell::Text(t) if python => out.push_str(&python_str(oid(), &t, types, zone)),
                    Cell::Text(t) => out.push_str(&t),
                    Cell::Null if python => out.push_str(PYTHON_NONE),
                    Cell::Null => return Ok(false),
                    Cell::Unknown(cause) => return Err(cause),
                }
            }
        }
    }
    Ok(true)
}

/// matroska's condition string, `condition:Name:&a=1&b=True&`, onto the end of `out`; the
/// cause when a value is unknown.
fn scope_condition(
    scope: &BoundScope,
    change: &RowChange<'_>,
    side: Side,
    type_oids: &[u32],
    types: &TypeRegistry,
    zone: &TimeZone,
    out: &mut String,
) -> Result<(), FallbackCause> {
    out.push_str("condition:");
    out.push_str(&scope.rule.name);
    out.push_str(":&");
    for (column, position) in scope.rule.columns.iter().zip(&scope.positions) {
        out.push_str(column);
        out.push('=');
        match cell(change, side, *position) {
            Cell::Text(t) => {
                let oid = position
                    .and_then(|p| type_oids.get(p))
                    .copied()
                    .unwrap_or(0);
                out.push_str(&python_str(oid, &t, types, zone));
            }
            Cell::Null => out.push_str(PYTHON_NONE),
            Cell::Unknown(cause) => return Err(cause),
        }
        out.push('&');
    }
    Ok(())
}

/// The `Planner` built from rules.
pub struct RulesPlanner {
    rules: Vec<Arc<TableRule>>,
    bound: HashMap<u32, Vec<BoundTable>>,
    /// (table, template, cause) already logged, so a weak replica identity logs once, not per row.
    warned: HashSet<(usize, String, FallbackCause)>,
    /// Enums and domains the stream resolved: a scope value of a domain over `boolean` renders
    /// `True` as the app's driver hands it, not Postgres's `t`.
    types: TypeRegistry,
    timezone: TimeZone,
    /// Sizes each transaction's sets at its first change (`SizeHint`).
    pub(crate) size_hint: SizeHint,
    /// Where each key, dependency and condition is rendered before it is emitted: reused, so
    /// rendering allocates nothing once it is large enough.
    rendered: String,
}

impl RulesPlanner {
    pub fn new(rules: Rules) -> Self {
        RulesPlanner {
            rules: rules.tables.into_iter().map(Arc::new).collect(),
            bound: HashMap::new(),
            warned: HashSet::new(),
            types: TypeRegistry::new(),
            timezone: rules.timezone,
            size_hint: SizeHint::default(),
            rendered: String::new(),
        }
    }

    /// Whether a table rule is about this relation.
    pub(crate) fn names(&self, relation: &RelationInfo) -> bool {
        self.rules.iter().any(|r| r.name == relation.qualified_name)
    }

    fn bind(&mut self, relation: &RelationInfo) {
        let tables = self
            .rules
            .iter()
            .filter(|r| r.name == relation.qualified_name)
            .map(|r| BoundTable::bind(r.clone(), relation))
            .collect();
        self.bound.insert(relation.oid, tables);
    }

    fn fallback_logged(&mut self, table: &TableRule, what: &str, cause: FallbackCause) {
        if self.warned.insert((table.index, what.to_string(), cause)) {
            tracing::warn!(
                table = %table.name,
                rule = what,
                cause = cause.as_str(),
                "invalidating table-wide: a value the rule needs is not in the change; \
                 `walsweep check` shows the fix (usually REPLICA IDENTITY FULL)"
            );
        }
    }

    /// Every effect of one change with the rule that produced it.
    pub(crate) fn effects(
        &mut self,
        change: &RowChange<'_>,
        emit: &mut dyn FnMut(EffectRef<'_>, Origin),
    ) {
        if !self.bound.contains_key(&change.relation.oid) {
            self.bind(change.relation);
        }
        let Some(tables) = self.bound.get(&change.relation.oid) else {
            return;
        };
        let mut fallbacks = Vec::new();
        for table in tables {
            let rule = &table.rule;
            if !rule.ops.contains(&change.op) {
                continue;
            }
            let sides: &[Side] = match change.op {
                Op::Insert => &[Side::New],
                Op::Update => &[Side::Old, Side::New],
                Op::Delete => &[Side::Old],
                Op::Truncate => &[],
            };
            let watched_changed = change.op != Op::Update
                || table.watched.as_ref().is_none_or(|watched| {
                    watched
                        .iter()
                        .any(|p| p.is_none_or(|i| change.column_changed(i)))
                });
            if watched_changed {
                for (python, templates) in [(false, &table.keys), (true, &table.deps)] {
                    for bound in templates {
                        for &side in sides {
                            let origin = Origin {
                                table: rule.index,
                                rule: if python {
                                    RuleRef::Dep(bound.index)
                                } else {
                                    RuleRef::Key(bound.index)
                                },
                                side,
                            };
                            let format = ValueFormat {
                                type_oids: &table.type_oids,
                                types: &self.types,
                                zone: &self.timezone,
                                python,
                            };
                            let out = &mut self.rendered;
                            out.clear();
                            match render_into(bound, change, side, &format, out) {
                                Ok(true) if python => emit(EffectRef::InvalidateDep(out), origin),
                                Ok(true) => emit(EffectRef::UnlinkKey(out), origin),
                                Ok(false) => {}
                                Err(cause) => {
                                    let prefix = bound.template.literal_prefix();
                                    fallbacks.push((
                                        rule.clone(),
                                        bound.template.source.clone(),
                                        cause,
                                    ));
                                    let effect = if python {
                                        EffectRef::InvalidateDepsWithPrefix { prefix, cause }
                                    } else {
                                        EffectRef::UnlinkKeysWithPrefix { prefix, cause }
                                    };
                                    emit(
                                        effect,
                                        Origin {
                                            side: Side::Table,
                                            ..origin
                                        },
                                    );
                                }
                            }
                        }
                    }
                }
            }
            for scope in &table.scopes {
                let scope_changed = match change.op {
                    Op::Update => scope
                        .positions
                        .iter()
                        .any(|p| p.is_none_or(|i| change.column_changed(i))),
                    _ => true,
                };
                if !scope_changed {
                    continue;
                }
                for &side in sides {
                    let origin = Origin {
                        table: rule.index,
                        rule: RuleRef::Scope(scope.index),
                        side,
                    };
                    let out = &mut self.rendered;
                    out.clear();
                    match scope_condition(
                        scope,
                        change,
                        side,
                        &table.type_oids,
                        &self.types,
                        &self.timezone,
                        out,
                    ) {
                        Ok(()) => emit(EffectRef::InvalidateDep(out), origin),
                        Err(cause) => {
                            fallbacks.push((
                                rule.clone(),
                                format!("scope {}", scope.rule.name),
                                cause,
                            ));
                            emit(
                                EffectRef::InvalidateDep(&scope.rule.invalidate_all()),
                                Origin {
                                    side: Side::Table,
                                    ..origin
                                },
                            );
                        }
                    }
                }
            }
        }
        for (rule, what, cause) in fallbacks {
            crate::telemetry::metrics::fallback(cause.as_str());
            self.fallback_logged(&rule, &what, cause);
        }
    }

    /// Effects of a TRUNCATE of `relation`.
    pub(crate) fn truncate_effects(
        &mut self,
        relation: &RelationInfo,
        emit: &mut dyn FnMut(EffectRef<'_>, Origin),
    ) {
        if !self.bound.contains_key(&relation.oid) {
            self.bind(relation);
        }
        let Some(tables) = self.bound.get(&relation.oid) else {
            return;
        };
        let cause = FallbackCause::Truncate;
        for table in tables {
            let rule = &table.rule;
            if !rule.ops.contains(&Op::Truncate) {
                continue;
            }
            let origin = |r: RuleRef| Origin {
                table: rule.index,
                rule: r,
                side: Side::Table,
            };
            for bound in &table.keys {
                let prefix = bound.template.literal_prefix();
                emit(
                    EffectRef::UnlinkKeysWithPrefix { prefix, cause },
                    origin(RuleRef::Key(bound.index)),
                );
            }
            for bound in &table.deps {
                let prefix = bound.template.literal_prefix();
                emit(
                    EffectRef::InvalidateDepsWithPrefix { prefix, cause },
                    origin(RuleRef::Dep(bound.index)),
                );
            }
            for scope in &table.scopes {
                emit(
                    EffectRef::InvalidateDep(&scope.rule.invalidate_all()),
                    origin(RuleRef::Scope(scope.index)),
                );
            }
            crate::telemetry::metrics::fallback(cause.as_str());
        }
    }
}

impl Planner for RulesPlanner {
    type Plan = EffectPlan;

    fn plan_change(&mut self, change: &RowChange<'_>, plan: &mut EffectPlan) {
        self.size_hint.before_change(plan);
        self.effects(change, &mut |effect, _| plan.add_ref(effect));
        self.size_hint.after_change(plan);
    }

    fn plan_truncate(&mut self, relations: &[&RelationInfo], plan: &mut EffectPlan) {
        for relation in relations {
            self.truncate_effects(relation, &mut |effect, _| plan.add_ref(effect));
        }
    }

    fn plan_message(&mut self, prefix: &str, content: &[u8], plan: &mut EffectPlan) {
        if prefix != HINT_PREFIX {
            return;
        }
        match hint::parse_hint(content) {
            Ok(effects) => {
                for effect in effects {
                    plan.add(effect);
                }
            }
            Err(err) => {
                crate::telemetry::metrics::hint_malformed();
                tracing::warn!(error = %err, bytes = content.len(), "ignoring malformed walsweep hint");
            }
        }
    }

    fn register_types(&mut self, types: &TypeRegistry) {
        self.types = types.clone();
    }

    fn relation_changed(&mut self, relation: &RelationInfo) {
        self.bind(relation);
    }
}
