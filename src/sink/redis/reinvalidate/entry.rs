//! A pending second application as kept in Redis: one member of the sorted set
//! `walsweep:<database>/<slot>:reinvalidate`, scored by its due time (unix ms).
//!
//! The member is `<batch end LSN>|<compact JSON of the batch's merged effects>`. The LSN makes
//! it unique per batch (two batches with the same effects stay two entries); a batch applied
//! again after a crash writes the same member, so it is not kept twice. Effects are sorted,
//! so the same effects always serialize the same way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::pg::Lsn;
use crate::plan::rules::{EffectPlan, FallbackCause};

#[derive(Serialize, Deserialize)]
struct Stored {
    /// Keys to unlink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    k: Vec<String>,
    /// Dependencies whose sets to invalidate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    d: Vec<String>,
    /// Key prefixes (table-wide), with their cause's name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    kp: BTreeMap<String, String>,
    /// Dependency prefixes (table-wide), with their cause's name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    dp: BTreeMap<String, String>,
}

/// Why a member of the set cannot be applied (written by another version, or by hand).
#[derive(Debug, thiserror::Error)]
pub(crate) enum EntryError {
    #[error("expected <lsn>|<json>, found no '|'")]
    NoSeparator,
    #[error("the effects are not walsweep's JSON")]
    Json(#[source] serde_json::Error),
    #[error("unknown table-wide invalidation cause {0:?}")]
    Cause(String),
}

pub(crate) fn encode(end_lsn: Lsn, plan: &EffectPlan) -> String {
    let sorted = |set: &crate::plan::rules::EffectSet| {
        let mut v: Vec<String> = set.iter().map(str::to_string).collect();
        v.sort_unstable();
        v
    };
    let causes = |prefixes: &BTreeMap<String, FallbackCause>| {
        prefixes
            .iter()
            .map(|(p, c)| (p.clone(), c.as_str().to_string()))
            .collect()
    };
    let stored = Stored {
        k: sorted(&plan.keys),
        d: sorted(&plan.deps),
        kp: causes(&plan.key_prefixes),
        dp: causes(&plan.dep_prefixes),
    };
    let json = serde_json::to_string(&stored).expect("strings and maps always serialize");
    format!("{end_lsn}|{json}")
}

pub(crate) fn decode(member: &str) -> Result<EffectPlan, EntryError> {
    let (_lsn, json) = member.split_once('|').ok_or(EntryError::NoSeparator)?;
    let stored: Stored = serde_json::from_str(json).map_err(EntryError::Json)?;
    let causes = |prefixes: BTreeMap<String, String>| {
        prefixes
            .into_iter()
            .map(|(p, c)| match FallbackCause::parse(&c) {
                Some(cause) => Ok((p, cause)),
                None => Err(EntryError::Cause(c)),
            })
            .collect::<Result<BTreeMap<_, _>, _>>()
    };
    Ok(EffectPlan {
        keys: stored.k.into_iter().collect(),
        deps: stored.d.into_iter().collect(),
        key_prefixes: causes(stored.kp)?,
        dep_prefixes: causes(stored.dp)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::rules::Effect;

    #[test]
    fn a_plan_survives_the_round_trip_and_encodes_the_same_every_time() {
        let mut plan = EffectPlan::default();
        for k in ["b", "a|x", "c\"q"] {
            plan.add(Effect::UnlinkKey(k.into()));
        }
        plan.add(Effect::InvalidateDep("id:item:1".into()));
        plan.add(Effect::UnlinkKeysWithPrefix {
            prefix: "item:".into(),
            cause: FallbackCause::Truncate,
        });
        plan.add(Effect::InvalidateDepsWithPrefix {
            prefix: "id:item:".into(),
            cause: FallbackCause::UnknownOldValue,
        });
        let member = encode(Lsn(0x1_0000_00AB), &plan);
        assert!(member.starts_with("1/AB|{"), "{member}");
        assert_eq!(encode(Lsn(0x1_0000_00AB), &plan.clone()), member);
        assert_eq!(decode(&member).expect("decodes"), plan);
        assert_eq!(
            encode(Lsn(1), &EffectPlan::default()),
            "0/1|{}",
            "empty parts are left out"
        );
    }

    #[test]
    fn a_foreign_member_is_an_error_naming_what_is_wrong() {
        assert!(matches!(decode("nothing"), Err(EntryError::NoSeparator)));
        assert!(matches!(decode("0/1|[1]"), Err(EntryError::Json(_))));
        assert!(matches!(
            decode(r#"0/1|{"kp":{"x":"meteor"}}"#),
            Err(EntryError::Cause(c)) if c == "meteor"
        ));
    }
}
