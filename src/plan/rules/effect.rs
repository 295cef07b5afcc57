//! Effects: what one change asks of Redis, and the deduplicated plan a transaction keeps.

use std::collections::BTreeMap;

use crate::plan::Plan;

pub use super::effect_set::EffectSet;

/// Why a table-wide invalidation replaced precise ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FallbackCause {
    /// TRUNCATE removes every row.
    Truncate,
    /// An old value the template needs was not sent (replica identity too weak).
    UnknownOldValue,
    /// A new value is unchanged TOAST without a full old row to take it from.
    UnknownNewValue,
    /// The template names a column the table does not have (fix the config; `check` says so).
    UnknownColumn,
    /// The replication slot was lost and recreated: changes in between were never seen.
    SlotRecreated,
    /// A value is not valid UTF-8 (SQL_ASCII databases): its exact key bytes cannot be rendered
    /// into a key string, so every key the template could produce goes.
    NonUtf8Value,
}

impl FallbackCause {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FallbackCause::Truncate => "truncate",
            FallbackCause::UnknownOldValue => "unknown_old_value",
            FallbackCause::UnknownNewValue => "unknown_new_value",
            FallbackCause::UnknownColumn => "unknown_column",
            FallbackCause::SlotRecreated => "slot_recreated",
            FallbackCause::NonUtf8Value => "non_utf8_value",
        }
    }

    /// The cause `as_str` names (effects kept outside the process, e.g. in Redis).
    pub(crate) fn parse(name: &str) -> Option<FallbackCause> {
        Some(match name {
            "truncate" => FallbackCause::Truncate,
            "unknown_old_value" => FallbackCause::UnknownOldValue,
            "unknown_new_value" => FallbackCause::UnknownNewValue,
            "unknown_column" => FallbackCause::UnknownColumn,
            "slot_recreated" => FallbackCause::SlotRecreated,
            "non_utf8_value" => FallbackCause::NonUtf8Value,
            _ => return None,
        })
    }
}

/// One thing to do in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    /// UNLINK this key.
    UnlinkKey(String),
    /// Invalidate the dependency set of this matroska dependency string (e.g. `id:article:1`):
    /// unlink every member key.
    InvalidateDep(String),
    /// UNLINK every key starting with this literal prefix (SCAN in batches).
    UnlinkKeysWithPrefix {
        prefix: String,
        cause: FallbackCause,
    },
    /// Invalidate every dependency set whose dependency starts with this prefix.
    InvalidateDepsWithPrefix {
        prefix: String,
        cause: FallbackCause,
    },
}

impl Effect {
    pub fn as_ref(&self) -> EffectRef<'_> {
        match self {
            Effect::UnlinkKey(k) => EffectRef::UnlinkKey(k),
            Effect::InvalidateDep(d) => EffectRef::InvalidateDep(d),
            Effect::UnlinkKeysWithPrefix { prefix, cause } => EffectRef::UnlinkKeysWithPrefix {
                prefix,
                cause: *cause,
            },
            Effect::InvalidateDepsWithPrefix { prefix, cause } => {
                EffectRef::InvalidateDepsWithPrefix {
                    prefix,
                    cause: *cause,
                }
            }
        }
    }
}

/// An `Effect` whose text is borrowed: what the planner emits, rendered into a buffer it
/// reuses, so a key a transaction already has costs no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectRef<'a> {
    UnlinkKey(&'a str),
    InvalidateDep(&'a str),
    UnlinkKeysWithPrefix {
        prefix: &'a str,
        cause: FallbackCause,
    },
    InvalidateDepsWithPrefix {
        prefix: &'a str,
        cause: FallbackCause,
    },
}

impl EffectRef<'_> {
    pub fn to_owned(self) -> Effect {
        match self {
            EffectRef::UnlinkKey(k) => Effect::UnlinkKey(k.to_string()),
            EffectRef::InvalidateDep(d) => Effect::InvalidateDep(d.to_string()),
            EffectRef::UnlinkKeysWithPrefix { prefix, cause } => Effect::UnlinkKeysWithPrefix {
                prefix: prefix.to_string(),
                cause,
            },
            EffectRef::InvalidateDepsWithPrefix { prefix, cause } => {
                Effect::InvalidateDepsWithPrefix {
                    prefix: prefix.to_string(),
                    cause,
                }
            }
        }
    }
}

/// How large the sets of the last transaction planned grew: the next transaction's are sized
/// to match at its first change. A transaction's sets otherwise grow from empty, rehashing
/// every key a few times over, which was the largest single cost of planning a backlog of
/// 100-row transactions. Capped so one huge transaction does not make every later one
/// allocate for it.
#[derive(Debug, Default)]
pub(crate) struct SizeHint {
    keys: (usize, usize),
    deps: (usize, usize),
}

impl SizeHint {
    const MOST: usize = 4_096;

    /// Before a change is planned into `plan`: sizes a plan that has not allocated yet.
    pub(crate) fn before_change(&self, plan: &mut EffectPlan) {
        for (set, (members, bytes)) in [(&mut plan.keys, self.keys), (&mut plan.deps, self.deps)] {
            if set.capacity() == 0 && members > 0 {
                let most = members.min(Self::MOST);
                // Text for that many members of the last plan's average length.
                set.reserve(most, bytes / members * most);
            }
        }
    }

    /// After a change was planned into `plan`.
    pub(crate) fn after_change(&mut self, plan: &EffectPlan) {
        self.keys = (plan.keys.len(), plan.keys.text_len());
        self.deps = (plan.deps.len(), plan.deps.text_len());
    }
}

/// Distinct effects of a transaction (or of a batch of them).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EffectPlan {
    pub keys: EffectSet,
    pub(crate) deps: EffectSet,
    pub key_prefixes: BTreeMap<String, FallbackCause>,
    pub(crate) dep_prefixes: BTreeMap<String, FallbackCause>,
}

impl EffectPlan {
    /// Keys, dependency sets, key prefixes and dependency prefixes: the order of
    /// `telemetry::metrics::EFFECT_KINDS`.
    pub(crate) fn counts_by_kind(&self) -> [usize; 4] {
        [
            self.keys.len(),
            self.deps.len(),
            self.key_prefixes.len(),
            self.dep_prefixes.len(),
        ]
    }

    pub fn add(&mut self, effect: Effect) {
        self.add_ref(effect.as_ref());
    }

    /// `add` without an owned effect: its text is copied only if the plan lacks it.
    pub fn add_ref(&mut self, effect: EffectRef<'_>) {
        match effect {
            EffectRef::UnlinkKey(k) => {
                self.keys.insert(k);
            }
            EffectRef::InvalidateDep(d) => {
                self.deps.insert(d);
            }
            EffectRef::UnlinkKeysWithPrefix { prefix, cause } => {
                if !self.key_prefixes.contains_key(prefix) {
                    self.key_prefixes.insert(prefix.to_string(), cause);
                }
            }
            EffectRef::InvalidateDepsWithPrefix { prefix, cause } => {
                if !self.dep_prefixes.contains_key(prefix) {
                    self.dep_prefixes.insert(prefix.to_string(), cause);
                }
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.effect_count() == 0
    }
}

impl Plan for EffectPlan {
    fn merge(&mut self, later: Self) {
        self.keys.merge(later.keys);
        self.deps.merge(later.deps);
        for (p, c) in later.key_prefixes {
            self.key_prefixes.entry(p).or_insert(c);
        }
        for (p, c) in later.dep_prefixes {
            self.dep_prefixes.entry(p).or_insert(c);
        }
    }

    fn effect_count(&self) -> usize {
        self.keys.len() + self.deps.len() + self.key_prefixes.len() + self.dep_prefixes.len()
    }

    fn absorbs(&self, later: &Self) -> bool {
        // A prefix already here keeps its cause, so only the prefix itself matters.
        later.keys.is_subset(&self.keys)
            && later.deps.is_subset(&self.deps)
            && later
                .key_prefixes
                .keys()
                .all(|p| self.key_prefixes.contains_key(p))
            && later
                .dep_prefixes
                .keys()
                .all(|p| self.dep_prefixes.contains_key(p))
    }

    fn absorbing_part(&self) -> Self {
        self.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_plan_is_sized_like_the_last_one_up_to_a_cap() {
        let mut hint = SizeHint::default();
        let mut fresh = EffectPlan::default();
        hint.before_change(&mut fresh);
        assert_eq!(fresh.keys.capacity(), 0, "nothing planned yet: no guess");

        let mut last = EffectPlan::default();
        for i in 0..300 {
            last.add_ref(EffectRef::UnlinkKey(&format!("k{i}")));
            last.add_ref(EffectRef::InvalidateDep(&format!("d{i}")));
            hint.after_change(&last);
        }
        let mut next = EffectPlan::default();
        hint.before_change(&mut next);
        assert!(next.keys.capacity() >= 300 && next.deps.capacity() >= 300);
        assert!(next.keys.text_len() == 0, "sized, not filled");

        let mut huge = EffectPlan::default();
        for i in 0..10_000 {
            huge.add_ref(EffectRef::UnlinkKey(&format!("k{i}")));
        }
        hint.after_change(&huge);
        let mut after_huge = EffectPlan::default();
        hint.before_change(&mut after_huge);
        assert!(after_huge.keys.capacity() < 10_000, "capped");
        assert!(after_huge.keys.capacity() >= SizeHint::MOST);
    }

    #[test]
    fn fallback_causes_are_the_exported_labels() {
        let causes = [
            FallbackCause::Truncate,
            FallbackCause::UnknownOldValue,
            FallbackCause::UnknownNewValue,
            FallbackCause::UnknownColumn,
            FallbackCause::SlotRecreated,
            FallbackCause::NonUtf8Value,
        ];
        assert_eq!(
            causes.map(FallbackCause::as_str),
            crate::telemetry::metrics::FALLBACK_CAUSES
        );
        for cause in causes {
            assert_eq!(FallbackCause::parse(cause.as_str()), Some(cause));
        }
        assert_eq!(FallbackCause::parse("Truncate"), None);
    }
}
