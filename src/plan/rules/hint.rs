//! Transactional hints: `pg_logical_emit_message(true, 'walsweep', '{"keys":[...],"deps":[...]}')`
//! inside an app's transaction adds those effects to that transaction.

use serde::Deserialize;

use super::Effect;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Hint {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    deps: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum HintError {
    #[error("hint is not valid JSON of the form {{\"keys\": [...], \"deps\": [...]}}")]
    Json(#[from] serde_json::Error),
    #[error("hint has an empty key or dependency")]
    Empty,
}

pub(crate) fn parse_hint(content: &[u8]) -> Result<Vec<Effect>, HintError> {
    let hint: Hint = serde_json::from_slice(content)?;
    if hint.keys.iter().chain(&hint.deps).any(String::is_empty) {
        return Err(HintError::Empty);
    }
    Ok(hint
        .keys
        .into_iter()
        .map(Effect::UnlinkKey)
        .chain(hint.deps.into_iter().map(Effect::InvalidateDep))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_keys_and_deps() {
        let effects = parse_hint(br#"{"keys":["a","b"],"deps":["id:article:1"]}"#).unwrap();
        assert_eq!(
            effects,
            vec![
                Effect::UnlinkKey("a".into()),
                Effect::UnlinkKey("b".into()),
                Effect::InvalidateDep("id:article:1".into())
            ]
        );
    }

    #[test]
    fn rejects_malformed_hints() {
        for bad in [
            &b"not json"[..],
            br#"{"keyz":[]}"#,
            br#"{"keys":"a"}"#,
            br#"{"keys":[""]}"#,
            b"\xff",
        ] {
            assert!(
                parse_hint(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
