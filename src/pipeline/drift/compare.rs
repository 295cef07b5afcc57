//! One stored entry or index score against what the row says it must be: the same, or which
//! kind of drift and what differs, in words an operator can act on. Pure, so every case is
//! tested here; which rows and entries to compare is `check`'s business.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::expect::{Entry, Want};
use super::DriftKind;
use crate::sink::redis::readback::Stored;

/// What a comparison found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    Same,
    Drift(DriftKind, String),
}

/// Longest value shown in a detail.
const SHOWN_CHARS: usize = 48;
/// Most fields named in one detail.
const SHOWN_FIELDS: usize = 3;

/// What may legitimately be absent: entries of an `only_if_present` mirror (the app fills them)
/// or with a TTL (they expire), index members of an `only_if_present` mirror or old enough for
/// retention to have trimmed them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tolerance {
    pub(crate) absent: bool,
}

/// The entry a row (or no row) wants against what the key holds.
pub(crate) fn entry(want: &Want, stored: &Stored, tolerance: Tolerance) -> Verdict {
    match (want, stored) {
        (Want::NoRow, Stored::Absent) | (Want::NoEntry, Stored::Absent) => Verdict::Same,
        (Want::NoRow, _) => unexplained_entry(),
        (Want::NoEntry, other) => Verdict::Drift(
            DriftKind::Different,
            format!(
                "holds {}, but every stored column of the row is NULL, so a hash mirror keeps no \
                 entry",
                describe(other)
            ),
        ),
        (Want::Entry(_), Stored::Absent) if tolerance.absent => Verdict::Same,
        (Want::Entry(_), Stored::Absent) => Verdict::Drift(
            DriftKind::Missing,
            "no entry, but the row exists".to_string(),
        ),
        (Want::Entry(Entry::Json(document)), Stored::String(bytes)) => json(document, bytes),
        (Want::Entry(Entry::Hash(fields)), Stored::Hash(stored)) => hash(fields, stored),
        (Want::Entry(want), other) => Verdict::Drift(
            DriftKind::Different,
            format!(
                "holds {}, but a {} mirror stores {}",
                describe(other),
                match want {
                    Entry::Json(_) => "json",
                    Entry::Hash(_) => "hash",
                },
                match want {
                    Entry::Json(_) => "a string",
                    Entry::Hash(_) => "a hash",
                }
            ),
        ),
    }
}

/// A stored entry no row renders the key of.
pub(crate) fn unexplained_entry() -> Verdict {
    Verdict::Drift(DriftKind::Extra, "no row has this key".to_string())
}

/// A stored index member no row renders.
pub(crate) fn unexplained_member() -> Verdict {
    Verdict::Drift(DriftKind::Extra, "no row has this member".to_string())
}

/// A member's expected score (`None`: no row has this member) against the stored one.
pub(crate) fn score(want: Option<f64>, stored: Option<f64>, tolerance: Tolerance) -> Verdict {
    match (want, stored) {
        (None, None) => Verdict::Same,
        (None, Some(_)) => unexplained_member(),
        (Some(_), None) if tolerance.absent => Verdict::Same,
        (Some(want), None) => Verdict::Drift(
            DriftKind::Missing,
            format!("not in the index, but the row exists (score {want})"),
        ),
        (Some(want), Some(got)) if want == got => Verdict::Same,
        (Some(want), Some(got)) => Verdict::Drift(
            DriftKind::Different,
            format!("score {got} in Redis, {want} from the row"),
        ),
    }
}

fn describe(stored: &Stored) -> String {
    match stored {
        Stored::Absent => "nothing".into(),
        Stored::String(_) => "a string".into(),
        Stored::Hash(_) => "a hash".into(),
        Stored::Other(kind) => format!("a {kind}"),
    }
}

fn shown(text: &str) -> String {
    let mut out: String = text.chars().take(SHOWN_CHARS).collect();
    if text.chars().nth(SHOWN_CHARS).is_some() {
        out.push('…');
    }
    out
}

/// Field by field, in column order: `name: stored vs expected`.
fn fields_differ<'a>(
    names: impl Iterator<Item = &'a String>,
    stored: &BTreeMap<String, String>,
    want: &BTreeMap<String, String>,
) -> Verdict {
    let mut differences = Vec::new();
    for name in names {
        let (got, expected) = (stored.get(name), want.get(name));
        if got == expected {
            continue;
        }
        let side = |v: Option<&String>| v.map_or("absent".to_string(), |v| shown(v));
        differences.push(format!(
            "{name}: {} in Redis, {} in the row",
            side(got),
            side(expected)
        ));
    }
    if differences.is_empty() {
        return Verdict::Same;
    }
    let more = differences.len().saturating_sub(SHOWN_FIELDS);
    differences.truncate(SHOWN_FIELDS);
    let mut detail = differences.join("; ");
    if more > 0 {
        detail.push_str(&format!("; and {more} more field(s)"));
    }
    Verdict::Drift(DriftKind::Different, detail)
}

/// Both JSON objects: equal as JSON values (key order and spacing do not matter).
fn json(document: &str, bytes: &[u8]) -> Verdict {
    if document.as_bytes() == bytes {
        return Verdict::Same;
    }
    let Ok(Json::Object(stored)) = serde_json::from_slice::<Json>(bytes) else {
        return Verdict::Drift(
            DriftKind::Different,
            format!(
                "holds {:?}, which is not a JSON object",
                shown(&String::from_utf8_lossy(bytes))
            ),
        );
    };
    let Ok(Json::Object(want)) = serde_json::from_str::<Json>(document) else {
        // walsweep built it: only a bug gets here, and it is drift all the same.
        return Verdict::Drift(
            DriftKind::Different,
            "the row's expected document is not JSON".into(),
        );
    };
    let as_text = |object: &serde_json::Map<String, Json>| -> BTreeMap<String, String> {
        object
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    };
    let (stored, want_text) = (as_text(&stored), as_text(&want));
    let names: Vec<String> = want
        .keys()
        .cloned()
        .chain(stored.keys().filter(|k| !want.contains_key(*k)).cloned())
        .collect();
    fields_differ(names.iter(), &stored, &want_text)
}

fn hash(want: &[(String, String)], stored: &[(String, String)]) -> Verdict {
    let want_map: BTreeMap<String, String> = want.iter().cloned().collect();
    let stored_map: BTreeMap<String, String> = stored.iter().cloned().collect();
    let names: Vec<String> = want
        .iter()
        .map(|(n, _)| n.clone())
        .chain(
            stored
                .iter()
                .filter(|(n, _)| !want_map.contains_key(n))
                .map(|(n, _)| n.clone()),
        )
        .collect();
    fields_differ(names.iter(), &stored_map, &want_map)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: Tolerance = Tolerance { absent: false };

    fn json_want(s: &str) -> Want {
        Want::Entry(Entry::Json(s.into()))
    }

    fn kind(v: &Verdict) -> Option<DriftKind> {
        match v {
            Verdict::Same => None,
            Verdict::Drift(k, _) => Some(*k),
        }
    }

    #[test]
    fn json_entries_compare_as_json_and_name_the_fields_that_differ() {
        let want = json_want(r#"{"id":1,"name":"a","price":"1.50"}"#);
        let same = Stored::String(br#"{"id":1,"name":"a","price":"1.50"}"#.to_vec());
        assert_eq!(entry(&want, &same, STRICT), Verdict::Same);
        let reordered = Stored::String(br#"{ "price": "1.50", "name": "a", "id": 1 }"#.to_vec());
        assert_eq!(entry(&want, &reordered, STRICT), Verdict::Same);
        let changed = Stored::String(br#"{"id":1,"name":"b","price":"1.50","x":true}"#.to_vec());
        assert_eq!(
            entry(&want, &changed, STRICT),
            Verdict::Drift(
                DriftKind::Different,
                r#"name: "b" in Redis, "a" in the row; x: true in Redis, absent in the row"#.into()
            )
        );
        let garbage = Stored::String(b"not json".to_vec());
        assert_eq!(
            kind(&entry(&want, &garbage, STRICT)),
            Some(DriftKind::Different)
        );
        let hash = Stored::Hash(vec![("id".into(), "1".into())]);
        assert_eq!(
            entry(&want, &hash, STRICT),
            Verdict::Drift(
                DriftKind::Different,
                "holds a hash, but a json mirror stores a string".into()
            )
        );
    }

    #[test]
    fn hash_entries_compare_field_by_field() {
        let want = Want::Entry(Entry::Hash(vec![
            ("id".into(), "1".into()),
            ("name".into(), "a".into()),
        ]));
        let reordered = Stored::Hash(vec![("name".into(), "a".into()), ("id".into(), "1".into())]);
        assert_eq!(entry(&want, &reordered, STRICT), Verdict::Same);
        let missing_field = Stored::Hash(vec![("id".into(), "1".into())]);
        assert_eq!(
            entry(&want, &missing_field, STRICT),
            Verdict::Drift(
                DriftKind::Different,
                "name: absent in Redis, a in the row".into()
            )
        );
        let many: Vec<(String, String)> =
            (0..6).map(|i| (format!("f{i}"), "v".to_string())).collect();
        let Verdict::Drift(_, detail) = entry(&want, &Stored::Hash(many), STRICT) else {
            panic!("drift expected");
        };
        assert!(detail.ends_with("; and 5 more field(s)"), "{detail}");
    }

    #[test]
    fn absent_and_extra_entries() {
        let want = json_want("{}");
        assert_eq!(
            kind(&entry(&want, &Stored::Absent, STRICT)),
            Some(DriftKind::Missing)
        );
        assert_eq!(
            entry(&want, &Stored::Absent, Tolerance { absent: true }),
            Verdict::Same
        );
        assert_eq!(
            kind(&entry(
                &Want::NoRow,
                &Stored::String(b"{}".to_vec()),
                STRICT
            )),
            Some(DriftKind::Extra)
        );
        assert_eq!(entry(&Want::NoRow, &Stored::Absent, STRICT), Verdict::Same);
        assert_eq!(
            entry(&Want::NoEntry, &Stored::Absent, STRICT),
            Verdict::Same
        );
        assert_eq!(
            kind(&entry(&Want::NoEntry, &Stored::Hash(vec![]), STRICT)),
            Some(DriftKind::Different)
        );
    }

    #[test]
    fn scores() {
        assert_eq!(score(Some(2.0), Some(2.0), STRICT), Verdict::Same);
        assert_eq!(
            score(Some(2.0), Some(3.0), STRICT),
            Verdict::Drift(
                DriftKind::Different,
                "score 3 in Redis, 2 from the row".into()
            )
        );
        assert_eq!(
            kind(&score(Some(2.0), None, STRICT)),
            Some(DriftKind::Missing)
        );
        assert_eq!(
            score(Some(2.0), None, Tolerance { absent: true }),
            Verdict::Same
        );
        assert_eq!(
            kind(&score(None, Some(1.0), STRICT)),
            Some(DriftKind::Extra)
        );
        assert_eq!(score(None, None, STRICT), Verdict::Same);
    }

    #[test]
    fn long_values_are_cut() {
        let long = "x".repeat(100);
        let want = Want::Entry(Entry::Hash(vec![("a".into(), long)]));
        let Verdict::Drift(_, detail) = entry(&want, &Stored::Hash(vec![]), STRICT) else {
            panic!("drift expected");
        };
        assert!(detail.contains('…') && detail.len() < 100, "{detail}");
    }
}
