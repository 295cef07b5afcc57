//! Everything one transaction asks of Redis: invalidations (`rules`), mirror writes (`mirror`)
//! and its broadcast message (`broadcast`), planned together from each row change so that a
//! broadcast lists exactly the keys and dependencies the rules invalidated.

use crate::config::Config;
use crate::plan::broadcast::{BroadcastPlan, BroadcastPlanner};
use crate::plan::mirror::{MirrorPlan, MirrorPlanner};
use crate::plan::rules::{EffectPlan, Rules, RulesPlanner};
use crate::plan::{Plan, Planner, RelationInfo, RowChange};
use crate::value::TypeRegistry;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct TxnPlan {
    pub(crate) invalidate: EffectPlan,
    pub(crate) mirror: MirrorPlan,
    pub(crate) broadcast: BroadcastPlan,
}

impl Plan for TxnPlan {
    fn merge(&mut self, later: Self) {
        self.invalidate.merge(later.invalidate);
        self.mirror.merge(later.mirror);
        self.broadcast.merge(later.broadcast);
    }

    fn effect_count(&self) -> usize {
        self.invalidate.effect_count() + self.mirror.len() + self.broadcast.len()
    }

    fn absorbs(&self, later: &Self) -> bool {
        // Mirror writes are ordered (last write wins) and a broadcast lists every change: only
        // a segment without either can add nothing.
        later.mirror.len() == 0
            && later.broadcast.is_empty()
            && self.invalidate.absorbs(&later.invalidate)
    }

    fn absorbing_part(&self) -> Self {
        TxnPlan {
            invalidate: self.invalidate.absorbing_part(),
            ..TxnPlan::default()
        }
    }
}

pub struct TxnPlanner {
    pub(crate) rules: RulesPlanner,
    pub(crate) mirrors: MirrorPlanner,
    pub(crate) broadcast: Option<BroadcastPlanner>,
}

impl TxnPlanner {
    /// Mirror plans spill to `spill` (`None`: never), see `plan::mirror::spill`.
    pub(crate) fn with_spill(
        mut self,
        spill: Option<std::sync::Arc<crate::plan::mirror::spill::Spill>>,
    ) -> Self {
        self.mirrors = self.mirrors.with_spill(spill);
        self
    }

    pub fn from_config(
        config: &Config,
        rules: Rules,
    ) -> Result<TxnPlanner, crate::plan::mirror::MirrorRuleError> {
        Ok(TxnPlanner {
            rules: RulesPlanner::new(rules),
            mirrors: MirrorPlanner::new(crate::plan::mirror::compile_all(&config.tables)?),
            broadcast: config
                .broadcast
                .as_ref()
                .map(|b| BroadcastPlanner::new(b).defaulting_to(&config.qualified_tables())),
        })
    }
}

impl Planner for TxnPlanner {
    type Plan = TxnPlan;

    fn plan_change(&mut self, change: &RowChange<'_>, plan: &mut TxnPlan) {
        self.rules.size_hint.before_change(&mut plan.invalidate);
        match self
            .broadcast
            .as_ref()
            .filter(|b| b.follows(change.relation))
        {
            None => self
                .rules
                .effects(change, &mut |effect, _| plan.invalidate.add_ref(effect)),
            Some(broadcast) => {
                let (mut keys, mut deps) = (Vec::new(), Vec::new());
                self.rules.effects(change, &mut |effect, _| {
                    crate::plan::broadcast::list_effect(effect, &mut keys, &mut deps);
                    plan.invalidate.add_ref(effect);
                });
                broadcast.add_change(change, &keys, &deps, &mut plan.broadcast);
            }
        }
        self.rules.size_hint.after_change(&plan.invalidate);
        if !self.mirrors.is_empty() {
            self.mirrors.plan_change(change, &mut plan.mirror);
        }
    }

    fn plan_truncate(&mut self, relations: &[&RelationInfo], plan: &mut TxnPlan) {
        self.rules.plan_truncate(relations, &mut plan.invalidate);
        for relation in relations {
            self.mirrors.plan_truncate(relation, &mut plan.mirror);
            if let Some(b) = self.broadcast.as_ref().filter(|b| b.follows(relation)) {
                b.add_truncate(relation, &mut plan.broadcast);
            }
        }
    }

    fn plan_message(&mut self, prefix: &str, content: &[u8], plan: &mut TxnPlan) {
        self.rules
            .plan_message(prefix, content, &mut plan.invalidate);
    }

    fn relation_changed(&mut self, relation: &RelationInfo) {
        self.rules.relation_changed(relation);
        self.mirrors.relation_changed(relation);
    }

    fn needs(&self, relation: &RelationInfo) -> bool {
        self.rules.names(relation)
            || self.mirrors.names(relation)
            || self.broadcast.as_ref().is_some_and(|b| b.follows(relation))
    }

    fn register_types(&mut self, types: &TypeRegistry) {
        self.rules.register_types(types);
        self.mirrors.register_types(types);
        if let Some(broadcast) = &mut self.broadcast {
            broadcast.register_types(types);
        }
    }
}
