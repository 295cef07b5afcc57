//! The check against the live Redis: it answers PING within `redis.timeout_ms`, and a TLS
//! certificate it cannot verify is reported as the daemon would stop on it. On a cluster it
//! also names the primaries, says whether they run walsweep's per-node invalidation script,
//! and for each key template whether its keys share a hash slot.

use crate::config::hash_slot::hash_tag;
use crate::config::template::{Segment, Template};
use crate::config::Config;
use crate::sink::redis::certificate::CertificateRejected;
use crate::sink::redis::cluster::{node_script_refusal, NODE_SCRIPT_REFUSED};
use crate::sink::redis::Endpoint;
use crate::telemetry::log::display_chain;

use super::Report;

pub(super) async fn check_redis(config: &Config, report: &mut Report) {
    let endpoint = match Endpoint::new(&config.redis) {
        Ok(e) => e,
        Err(e) => {
            report.errors.push(display_chain(&e));
            return;
        }
    };
    let setting = if config.redis.is_cluster() {
        "redis.cluster_nodes (or WALSWEEP_REDIS_CLUSTER_NODES)"
    } else {
        "redis.url (or WALSWEEP_REDIS_URL)"
    };
    let timeout = std::time::Duration::from_millis(config.redis.timeout_ms);
    let ping = async {
        let mut conn = endpoint.connect_plain().await?;
        // On a cluster PING goes to every primary.
        ::redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await?;
        let primaries = conn.primaries().await?;
        Ok::<_, ::redis::RedisError>((conn, primaries))
    };
    match tokio::time::timeout(timeout, ping).await {
        Ok(Ok((mut conn, primaries))) if config.redis.is_cluster() => {
            let names: Vec<String> = primaries
                .iter()
                .map(|p| format!("{}:{}", p.host, p.port))
                .collect();
            report.notes.push(format!(
                "Redis Cluster with {} primaries: {}",
                names.len(),
                names.join(", ")
            ));
            for line in slot_notes(config) {
                report.notes.push(line);
            }
            let tried = tokio::time::timeout(timeout, node_script_refusal(&mut conn, &primaries));
            match tried.await {
                Ok(Ok(None)) => report.notes.push(
                    "every primary runs invalidate_node.lua: a batch's invalidations take one \
                     call per primary"
                        .to_string(),
                ),
                Ok(Ok(Some(refusal))) => report
                    .warnings
                    .push(format!("{NODE_SCRIPT_REFUSED} ({refusal})")),
                Ok(Err(e)) => report.warnings.push(format!(
                    "could not try invalidate_node.lua on the primaries: {e}"
                )),
                Err(_) => report.warnings.push(format!(
                    "invalidate_node.lua did not answer within {} ms on the primaries",
                    config.redis.timeout_ms
                )),
            }
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => report.errors.push(
            match CertificateRejected::find(&e, Some(endpoint.target())) {
                Some(rejected) => rejected.to_string(),
                None => format!("Redis does not answer PING: {e}; check {setting}"),
            },
        ),
        Err(_) => report.errors.push(format!(
            "Redis did not answer PING within {} ms; check {setting}",
            config.redis.timeout_ms
        )),
    }
}

/// For each key template: whether a literal `{tag}` pins its keys to one hash slot (their
/// invalidations then go to one node), or each key lands in a slot of its own.
fn slot_notes(config: &Config) -> Vec<String> {
    let mut notes = Vec::new();
    for table in &config.tables {
        for source in &table.keys {
            let Ok(template) = Template::parse(source) else {
                continue;
            };
            notes.push(format!(
                "key template {source:?} of {}: {}",
                table.name,
                slot_pinning(&template)
            ));
        }
    }
    notes
}

fn slot_pinning(template: &Template) -> String {
    // A column renders as one character no brace can come from, so the tag shows what of it
    // is literal.
    const COLUMN: char = '\u{1}';
    let rendered: String = template
        .segments
        .iter()
        .map(|s| match s {
            Segment::Literal(l) => l.clone(),
            Segment::Column { .. } => COLUMN.to_string(),
        })
        .collect();
    let tag = hash_tag(rendered.as_bytes());
    if tag.len() == rendered.len() {
        "no hash tag: each key hashes to a slot of its own, so a batch's invalidations spread \
         over all primaries"
            .into()
    } else if !tag.contains(&(COLUMN as u8)) {
        format!(
            "hash tag {{{}}}: every key is in one slot, on one primary",
            String::from_utf8_lossy(tag)
        )
    } else {
        "hash tag with a column: keys of one value share a slot".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_say_whether_a_hash_tag_pins_their_slot() {
        let pinning = |t: &str| slot_pinning(&Template::parse(t).unwrap());
        assert!(pinning("article:{id}").starts_with("no hash tag"));
        assert!(pinning("{{articles}}:{id}").starts_with("hash tag {articles}"));
        assert!(pinning("user:{{{id}}}:profile").starts_with("hash tag with a column"));
    }
}
