//! Every metric walsweep exports, named in one place, with the helpers that record them.
//! Labels stay low-cardinality: never a key, a row value or an LSN. The README's metrics
//! reference lists the same names; a test checks that `/metrics` exports each of them.

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};

pub(crate) const TRANSACTIONS_COMMITTED_TOTAL: &str = "walsweep_transactions_committed_total";
pub(crate) const CHANGES_DECODED_TOTAL: &str = "walsweep_changes_decoded_total";
pub(crate) const TRANSACTIONS_APPLIED_TOTAL: &str = "walsweep_transactions_applied_total";
pub(crate) const EFFECTS_APPLIED_TOTAL: &str = "walsweep_effects_applied_total";
pub(crate) const KEYS_UNLINKED_TOTAL: &str = "walsweep_keys_unlinked_total";
pub(crate) const FALLBACKS_TOTAL: &str = "walsweep_fallbacks_total";
pub(crate) const HINTS_MALFORMED_TOTAL: &str = "walsweep_hints_malformed_total";
pub(crate) const BATCH_SIZE_TRANSACTIONS: &str = "walsweep_batch_size_transactions";
pub(crate) const BATCH_APPLY_SECONDS: &str = "walsweep_batch_apply_seconds";
pub(crate) const COMMIT_TO_APPLIED_SECONDS: &str = "walsweep_commit_to_applied_seconds";
pub(crate) const REDIS_ROUND_TRIP_SECONDS: &str = "walsweep_redis_round_trip_seconds";
pub(crate) const VISIBILITY_WAIT_SECONDS: &str = "walsweep_visibility_wait_seconds";
pub(crate) const FENCES_RAISED_TOTAL: &str = "walsweep_fences_raised_total";
pub(crate) const REDIS_CLUSTER_PRIMARIES: &str = "walsweep_redis_cluster_primaries";
pub(crate) const REDIS_CLUSTER_REDIRECTS_TOTAL: &str = "walsweep_redis_cluster_redirects_total";
pub(crate) const FILLS_TOTAL: &str = "walsweep_fills_total";
pub(crate) const VISIBILITY_RECHECKS_TOTAL: &str = "walsweep_visibility_rechecks_total";
pub(crate) const REDIS_UP: &str = "walsweep_redis_up";
pub(crate) const FLUSHED_LSN: &str = "walsweep_flushed_lsn";
pub(crate) const STREAMING: &str = "walsweep_streaming";
pub(crate) const RECONNECTS_TOTAL: &str = "walsweep_reconnects_total";
pub(crate) const ERRORS_TOTAL: &str = "walsweep_errors_total";
pub(crate) const STATUS_UPDATES_TOTAL: &str = "walsweep_status_updates_total";
pub(crate) const SLOT_LAG_BYTES: &str = "walsweep_slot_lag_bytes";
pub(crate) const LAG_SECONDS: &str = "walsweep_lag_seconds";
pub(crate) const SLOT_WAL_STATUS: &str = "walsweep_slot_wal_status";
pub(crate) const SLOT_SAFE_WAL_SIZE_BYTES: &str = "walsweep_slot_safe_wal_size_bytes";
pub(crate) const RECEIVED_LSN: &str = "walsweep_received_lsn";
pub(crate) const REINVALIDATIONS_TOTAL: &str = "walsweep_reinvalidations_total";
pub(crate) const REINVALIDATION_ERRORS_TOTAL: &str = "walsweep_reinvalidation_errors_total";
pub(crate) const SLOTS_RECREATED_TOTAL: &str = "walsweep_slots_recreated_total";
pub(crate) const MIRROR_ROWS_TOTAL: &str = "walsweep_mirror_rows_total";
pub(crate) const MIRROR_KEYS_CLEARED_TOTAL: &str = "walsweep_mirror_keys_cleared_total";
pub(crate) const BROADCASTS_TOTAL: &str = "walsweep_broadcasts_total";
pub(crate) const SNAPSHOT_ROWS_TOTAL: &str = "walsweep_snapshot_rows_total";
pub(crate) const SKIPPED_CHANGES_TOTAL: &str = "walsweep_skipped_changes_total";
pub(crate) const INSPECTED_ROWS_TOTAL: &str = "walsweep_inspected_rows_total";
pub(crate) const DRIFT_ROWS_TOTAL: &str = "walsweep_drift_rows_total";

/// Every exported name, for the endpoint test and the docs. The inspector's two exist only
/// while it runs (`[inspect]`): zeros from a walsweep that checks nothing would read as
/// "checked, no drift".
pub const ALL: [&str; 38] = [
    TRANSACTIONS_COMMITTED_TOTAL,
    CHANGES_DECODED_TOTAL,
    TRANSACTIONS_APPLIED_TOTAL,
    EFFECTS_APPLIED_TOTAL,
    KEYS_UNLINKED_TOTAL,
    FALLBACKS_TOTAL,
    HINTS_MALFORMED_TOTAL,
    BATCH_SIZE_TRANSACTIONS,
    BATCH_APPLY_SECONDS,
    COMMIT_TO_APPLIED_SECONDS,
    REDIS_ROUND_TRIP_SECONDS,
    REDIS_UP,
    FLUSHED_LSN,
    STREAMING,
    RECONNECTS_TOTAL,
    ERRORS_TOTAL,
    STATUS_UPDATES_TOTAL,
    SLOT_LAG_BYTES,
    LAG_SECONDS,
    SLOT_WAL_STATUS,
    SLOT_SAFE_WAL_SIZE_BYTES,
    RECEIVED_LSN,
    SLOTS_RECREATED_TOTAL,
    REINVALIDATIONS_TOTAL,
    REINVALIDATION_ERRORS_TOTAL,
    MIRROR_ROWS_TOTAL,
    MIRROR_KEYS_CLEARED_TOTAL,
    BROADCASTS_TOTAL,
    SNAPSHOT_ROWS_TOTAL,
    SKIPPED_CHANGES_TOTAL,
    INSPECTED_ROWS_TOTAL,
    DRIFT_ROWS_TOTAL,
    VISIBILITY_WAIT_SECONDS,
    VISIBILITY_RECHECKS_TOTAL,
    FENCES_RAISED_TOTAL,
    FILLS_TOTAL,
    REDIS_CLUSTER_PRIMARIES,
    REDIS_CLUSTER_REDIRECTS_TOTAL,
];

/// `reason` labels of `walsweep_redis_cluster_redirects_total`.
pub(crate) const CLUSTER_REDIRECT_REASONS: [&str; 5] =
    ["moved", "ask", "migrating", "tryagain", "clusterdown"];

/// `result` labels of `walsweep_mirror_rows_total`.
/// `kind` label values of `EFFECTS_APPLIED_TOTAL`.
pub(crate) const EFFECT_KINDS: [&str; 4] = ["key", "dep", "key_prefix", "dep_prefix"];
/// `cause` label values of `FALLBACKS_TOTAL` (`plan::rules::FallbackCause::as_str`).
pub(crate) const FALLBACK_CAUSES: [&str; 6] = [
    "truncate",
    "unknown_old_value",
    "unknown_new_value",
    "unknown_column",
    "slot_recreated",
    "non_utf8_value",
];
/// `reason` label values of `SKIPPED_CHANGES_TOTAL`.
pub(crate) const SKIP_REASONS: [&str; 1] = [SKIP_UNDECODABLE_RELATION];
/// A change to a relation whose name is not valid UTF-8 and that nothing in the config names.
pub(crate) const SKIP_UNDECODABLE_RELATION: &str = "undecodable_relation";
/// `reason` label values of `STATUS_UPDATES_TOTAL` (`stream::progress::StatusReason::as_str`).
pub(crate) const STATUS_REASONS: [&str; 4] =
    ["keepalive_reply", "interval", "shutdown", "caught_up"];
pub(crate) const MIRROR_RESULTS: [&str; 4] = ["written", "deleted", "skipped_absent", "incomplete"];
/// `result` labels of `walsweep_broadcasts_total`.
pub(crate) const BROADCAST_RESULTS: [&str; 2] = ["published", "duplicate"];
pub(crate) const LABEL_RESULT: &str = "result";

/// `kind` label values of `DRIFT_ROWS_TOTAL` (`pipeline::drift::DriftKind::as_str`).
pub(crate) const DRIFT_KINDS: [&str; 3] = ["missing", "extra", "different"];

/// Values of `pg_replication_slots.wal_status`, one `walsweep_slot_wal_status` series each.
pub(crate) const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

pub(crate) const LABEL_KIND: &str = "kind";
pub(crate) const LABEL_TABLE: &str = "table";
pub(crate) const LABEL_OP: &str = "op";
pub(crate) const LABEL_REASON: &str = "reason";
pub(crate) const LABEL_CAUSE: &str = "cause";
pub(crate) const LABEL_STATUS: &str = "status";

pub(crate) const ERROR_SINK: &str = "sink";
/// Every `kind` label `walsweep_errors_total` can carry (`ReplicationError::kind`,
/// `PipelineError::kind` and the sink's own).
pub(crate) const ERROR_KINDS: [&str; 22] = [
    "connect",
    "io",
    "server",
    "auth",
    "protocol",
    "closed",
    "unsupported",
    "wire",
    "tls",
    "config",
    "catalog",
    "decode",
    "setup",
    "warm_up",
    "internal",
    "slot_lost",
    ERROR_SINK,
    ERROR_WRONG_TYPE,
    ERROR_MIRROR_SCORE,
    ERROR_MIRROR_VALUE,
    ERROR_REDIS_SCRIPT,
    ERROR_MIRROR_SPILL,
];
pub(crate) const ERROR_WRONG_TYPE: &str = "redis_wrong_type";
/// A row's index score could not be computed (NULL, out of the declared range): left out.
pub(crate) const ERROR_MIRROR_SCORE: &str = "mirror_score";
/// A column's text did not parse as its type: mirrored as a string.
pub(crate) const ERROR_MIRROR_VALUE: &str = "mirror_value";
/// One of walsweep's Redis scripts raised an error: walsweep stops (`sink::redis::errors`).
pub(crate) const ERROR_REDIS_SCRIPT: &str = "redis_script";
/// A large transaction's pending mirror writes could not be spilled to disk: kept in memory.
pub(crate) const ERROR_MIRROR_SPILL: &str = "mirror_spill";

/// Histogram buckets for latencies: 100 µs to 30 s.
pub(crate) const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

/// Histogram buckets for transactions per batch.
pub(crate) const BATCH_SIZE_BUCKETS: [f64; 10] =
    [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Registers descriptions and units; call once after installing a recorder. Also sets every
/// metric to zero so dashboards and alerts see it from the first scrape.
pub(crate) fn describe() {
    describe_counter!(
        TRANSACTIONS_COMMITTED_TOTAL,
        "Committed transactions decoded from the slot."
    );
    describe_counter!(
        CHANGES_DECODED_TOTAL,
        "Row changes in committed transactions."
    );
    describe_counter!(
        TRANSACTIONS_APPLIED_TOTAL,
        "Transactions whose effects the sink confirmed."
    );
    describe_counter!(
        EFFECTS_APPLIED_TOTAL,
        "Distinct effects confirmed by Redis, by kind (key, dep, key_prefix, dep_prefix)."
    );
    describe_counter!(
        KEYS_UNLINKED_TOTAL,
        "Redis keys actually removed (UNLINK replies)."
    );
    describe_counter!(FALLBACKS_TOTAL, "Table-wide invalidations, by cause.");
    describe_counter!(
        HINTS_MALFORMED_TOTAL,
        "walsweep hints (pg_logical_emit_message) that could not be parsed."
    );
    describe_histogram!(
        BATCH_SIZE_TRANSACTIONS,
        Unit::Count,
        "Transactions per sink batch."
    );
    describe_histogram!(
        BATCH_APPLY_SECONDS,
        Unit::Seconds,
        "Time to apply one sink batch, retries included."
    );
    describe_histogram!(
        COMMIT_TO_APPLIED_SECONDS,
        Unit::Seconds,
        "From the commit timestamp in Postgres to Redis confirming the effects."
    );
    describe_histogram!(
        REDIS_ROUND_TRIP_SECONDS,
        Unit::Seconds,
        "One Redis round trip (pipeline, script or scan)."
    );
    describe_histogram!(
        VISIBILITY_WAIT_SECONDS,
        Unit::Seconds,
        "Time a batch spent in the visibility gate (its check queries included) before it was \
         applied."
    );
    describe_counter!(
        FENCES_RAISED_TOTAL,
        "Fences raised before invalidations (matroska.fences): one per key, dependency set or \
         table-wide invalidation."
    );
    describe_counter!(
        FILLS_TOTAL,
        "Fills through the walsweep_fill function, by result (stored, refused: a fence was \
         newer than the fill's token); read from Redis with each fenced batch."
    );
    describe_counter!(
        VISIBILITY_RECHECKS_TOTAL,
        "Visibility checks that found a committed transaction not yet visible to other \
         sessions, so the batch waited and checked again."
    );
    describe_gauge!(
        REDIS_UP,
        "1 when the last Redis round trip or probe succeeded."
    );
    describe_gauge!(
        FLUSHED_LSN,
        "Flush position reported to Postgres, as a number."
    );
    describe_gauge!(STREAMING, "1 while the replication stream is open.");
    describe_counter!(RECONNECTS_TOTAL, "Reconnects of the replication stream.");
    describe_counter!(ERRORS_TOTAL, "Errors, by kind.");
    describe_counter!(
        REINVALIDATIONS_TOTAL,
        "Effects applied a second time by matroska.reinvalidate_after_ms (distinct per batch)."
    );
    describe_counter!(
        REINVALIDATION_ERRORS_TOTAL,
        "Failed attempts of a delayed second invalidation (retried, then given up) and batches \
         of it dropped from a full queue."
    );
    describe_counter!(
        STATUS_UPDATES_TOTAL,
        "Standby status updates sent to Postgres, by reason."
    );
    for name in [
        TRANSACTIONS_COMMITTED_TOTAL,
        CHANGES_DECODED_TOTAL,
        TRANSACTIONS_APPLIED_TOTAL,
        KEYS_UNLINKED_TOTAL,
        HINTS_MALFORMED_TOTAL,
        RECONNECTS_TOTAL,
        REINVALIDATIONS_TOTAL,
        REINVALIDATION_ERRORS_TOTAL,
    ] {
        counter!(name).absolute(0);
    }
    for kind in EFFECT_KINDS {
        counter!(EFFECTS_APPLIED_TOTAL, LABEL_KIND => kind).absolute(0);
    }
    for cause in FALLBACK_CAUSES {
        counter!(FALLBACKS_TOTAL, LABEL_CAUSE => cause).absolute(0);
    }
    // Every error kind exists from the start, so `increase()` sees the first error of each.
    for kind in ERROR_KINDS {
        counter!(ERRORS_TOTAL, LABEL_KIND => kind).absolute(0);
    }
    describe_counter!(
        SKIPPED_CHANGES_TOTAL,
        "Row changes (and truncated tables) left unplanned, by reason: undecodable_relation (a \
         table whose name is not valid UTF-8 and that no rule, mirror or broadcast names)."
    );
    for reason in SKIP_REASONS {
        counter!(SKIPPED_CHANGES_TOTAL, LABEL_REASON => reason).absolute(0);
    }
    for reason in STATUS_REASONS {
        counter!(STATUS_UPDATES_TOTAL, LABEL_REASON => reason).absolute(0);
    }
    describe_gauge!(
        SLOT_LAG_BYTES,
        Unit::Bytes,
        "WAL the slot still holds: pg_current_wal_lsn() - confirmed_flush_lsn (polled)."
    );
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Commit timestamp to Redis confirmation of the newest applied transaction."
    );
    describe_gauge!(
        SLOT_WAL_STATUS,
        "1 for the slot's current wal_status (reserved, extended, unreserved, lost)."
    );
    describe_gauge!(
        SLOT_SAFE_WAL_SIZE_BYTES,
        Unit::Bytes,
        "WAL that can still be written before the slot risks being lost (-1: unlimited)."
    );
    describe_gauge!(
        RECEIVED_LSN,
        "Furthest WAL position received from Postgres, as a number."
    );
    for status in WAL_STATUSES {
        gauge!(SLOT_WAL_STATUS, LABEL_STATUS => status).set(0.0);
    }
    gauge!(SLOT_LAG_BYTES).set(0.0);
    gauge!(LAG_SECONDS).set(0.0);
    gauge!(SLOT_SAFE_WAL_SIZE_BYTES).set(-1.0);
    gauge!(RECEIVED_LSN).set(0.0);
    describe_counter!(
        SLOTS_RECREATED_TOTAL,
        "Lost or dropped slots recreated (on_slot_lost = recreate); each cleared the caches."
    );
    counter!(SLOTS_RECREATED_TOTAL).absolute(0);
    describe_counter!(
        MIRROR_ROWS_TOTAL,
        "Mirrored rows, by result: written, deleted, skipped_absent (only_if_present and not \
         cached), incomplete (unchanged TOAST and no stored entry, or one without that field: \
         removed instead)."
    );
    describe_counter!(
        MIRROR_KEYS_CLEARED_TOTAL,
        "Mirror and index keys removed table-wide (TRUNCATE, fallbacks, resets)."
    );
    describe_counter!(
        BROADCASTS_TOTAL,
        "Broadcast messages, by result: published, or duplicate (a redelivered transaction)."
    );
    describe_counter!(
        SNAPSHOT_ROWS_TOTAL,
        "Rows loaded into mirrors by a warm-up snapshot."
    );
    for result in MIRROR_RESULTS {
        counter!(MIRROR_ROWS_TOTAL, LABEL_RESULT => result).absolute(0);
    }
    for result in BROADCAST_RESULTS {
        counter!(BROADCASTS_TOTAL, LABEL_RESULT => result).absolute(0);
    }
    counter!(MIRROR_KEYS_CLEARED_TOTAL).absolute(0);
    counter!(SNAPSHOT_ROWS_TOTAL).absolute(0);
    counter!(VISIBILITY_RECHECKS_TOTAL).absolute(0);
    counter!(FENCES_RAISED_TOTAL).absolute(0);
    set_fills(0, 0);
    describe_gauge!(
        REDIS_CLUSTER_PRIMARIES,
        "Primaries of the Redis Cluster (redis.cluster_nodes) when walsweep last read its \
         topology; 0 for one Redis node."
    );
    describe_counter!(
        REDIS_CLUSTER_REDIRECTS_TOTAL,
        "Requests to a Redis Cluster that failed because their hash slot had moved (moved), \
         was moving (ask, migrating) or was not served for now (tryagain, clusterdown); the \
         batch was applied again."
    );
    gauge!(REDIS_CLUSTER_PRIMARIES).set(0.0);
    for reason in CLUSTER_REDIRECT_REASONS {
        counter!(REDIS_CLUSTER_REDIRECTS_TOTAL, LABEL_REASON => reason).absolute(0);
    }
    describe_counter!(
        INSPECTED_ROWS_TOTAL,
        "Mirrored rows and stored entries the inspector compared, by table ([inspect] \
         rows_per_minute)."
    );
    describe_counter!(
        DRIFT_ROWS_TOTAL,
        "Entries and index members the inspector found to differ from the database after \
         rechecks, by table and kind: missing, extra, different."
    );
    gauge!(REDIS_UP).set(0.0);
    gauge!(STREAMING).set(0.0);
    gauge!(FLUSHED_LSN).set(0.0);
    for name in [
        BATCH_SIZE_TRANSACTIONS,
        BATCH_APPLY_SECONDS,
        COMMIT_TO_APPLIED_SECONDS,
        REDIS_ROUND_TRIP_SECONDS,
        VISIBILITY_WAIT_SECONDS,
    ] {
        // Registering without recording keeps the histogram empty but exported.
        let _ = histogram!(name);
    }
}

/// The counter of committed transactions handed to the sink, kept by the stream task: a
/// registry lookup per commit was a measurable part of draining a backlog.
pub(crate) fn txns_committed() -> metrics::Counter {
    counter!(TRANSACTIONS_COMMITTED_TOTAL)
}

/// The counter of decoded row changes for one table and operation (kept by the caller).
pub(crate) fn changes_decoded(table: &str, op: &'static str) -> metrics::Counter {
    counter!(CHANGES_DECODED_TOTAL, LABEL_TABLE => table.to_string(), LABEL_OP => op)
}

/// A batch the sink confirmed: the commit time of each of its transactions, in commit order.
pub(crate) fn batch_applied(commit_times_unix_micros: &[i64], elapsed: Duration) {
    let now_micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    let transactions = commit_times_unix_micros.len();
    counter!(TRANSACTIONS_APPLIED_TOTAL).increment(transactions as u64);
    histogram!(BATCH_SIZE_TRANSACTIONS).record(transactions as f64);
    histogram!(BATCH_APPLY_SECONDS).record(elapsed.as_secs_f64());
    let latency = histogram!(COMMIT_TO_APPLIED_SECONDS);
    for commit_time in commit_times_unix_micros {
        let micros = (now_micros - commit_time).max(0);
        latency.record(micros as f64 / 1e6);
    }
    if let Some(newest) = commit_times_unix_micros.last() {
        let micros = (now_micros - newest).max(0);
        gauge!(LAG_SECONDS).set(micros as f64 / 1e6);
    }
}

pub(crate) fn slot_recreated() {
    counter!(SLOTS_RECREATED_TOTAL).increment(1);
}

pub(crate) fn set_received_lsn(lsn: u64) {
    gauge!(RECEIVED_LSN).set(lsn as f64);
}

/// One poll of the slot's state.
pub(crate) fn slot_polled(lag_bytes: u64, wal_status: Option<&str>, safe_wal_size: Option<i64>) {
    gauge!(SLOT_LAG_BYTES).set(lag_bytes as f64);
    for status in WAL_STATUSES {
        let current = wal_status == Some(status);
        gauge!(SLOT_WAL_STATUS, LABEL_STATUS => status).set(if current { 1.0 } else { 0.0 });
    }
    gauge!(SLOT_SAFE_WAL_SIZE_BYTES).set(safe_wal_size.map_or(-1.0, |b| b as f64));
}

/// Effects Redis confirmed: how many of each of `EFFECT_KINDS`, in that order.
pub(crate) fn effects_applied(counts: [usize; 4]) {
    for (kind, n) in EFFECT_KINDS.into_iter().zip(counts) {
        if n > 0 {
            counter!(EFFECTS_APPLIED_TOTAL, LABEL_KIND => kind).increment(n as u64);
        }
    }
}

/// Effects a delayed second invalidation applied.
pub(crate) fn reinvalidated(effects: u64) {
    counter!(REINVALIDATIONS_TOTAL).increment(effects);
}

/// A delayed second invalidation failed (one attempt, or a dropped batch).
pub(crate) fn reinvalidation_error() {
    counter!(REINVALIDATION_ERRORS_TOTAL).increment(1);
}

/// One of `SKIP_REASONS`.
pub(crate) fn change_skipped(reason: &'static str) {
    counter!(SKIPPED_CHANGES_TOTAL, LABEL_REASON => reason).increment(1);
}

pub(crate) fn keys_unlinked(n: u64) {
    counter!(KEYS_UNLINKED_TOTAL).increment(n);
}

/// One of `FALLBACK_CAUSES`.
pub(crate) fn fallback(cause: &'static str) {
    counter!(FALLBACKS_TOTAL, LABEL_CAUSE => cause).increment(1);
}

/// Mirror rows Redis confirmed, by each of `MIRROR_RESULTS` in order, and keys a clear removed.
pub(crate) fn mirror_applied(rows: [u64; 4], cleared_keys: u64) {
    for (result, n) in MIRROR_RESULTS.iter().zip(rows) {
        if n > 0 {
            counter!(MIRROR_ROWS_TOTAL, LABEL_RESULT => *result).increment(n);
        }
    }
    if cleared_keys > 0 {
        counter!(MIRROR_KEYS_CLEARED_TOTAL).increment(cleared_keys);
    }
}

pub(crate) fn broadcasts(published: u64, duplicates: u64) {
    counter!(BROADCASTS_TOTAL, LABEL_RESULT => BROADCAST_RESULTS[0]).increment(published);
    counter!(BROADCASTS_TOTAL, LABEL_RESULT => BROADCAST_RESULTS[1]).increment(duplicates);
}

/// The inspector starts on `tables`: its series exist from then on, so `increase()` sees the
/// first drift of each.
pub(crate) fn inspector_started(tables: &[String]) {
    for table in tables {
        counter!(INSPECTED_ROWS_TOTAL, LABEL_TABLE => table.clone()).increment(0);
        for kind in DRIFT_KINDS {
            counter!(DRIFT_ROWS_TOTAL, LABEL_TABLE => table.clone(), LABEL_KIND => kind)
                .increment(0);
        }
    }
}

/// One inspector check of `table`: items compared, and confirmed drift per `DRIFT_KINDS`.
pub(crate) fn inspected(table: &str, compared: u64, drift: [u64; 3]) {
    counter!(INSPECTED_ROWS_TOTAL, LABEL_TABLE => table.to_string()).increment(compared);
    for (kind, n) in DRIFT_KINDS.into_iter().zip(drift) {
        if n > 0 {
            counter!(DRIFT_ROWS_TOTAL, LABEL_TABLE => table.to_string(), LABEL_KIND => kind)
                .increment(n);
        }
    }
}

pub(crate) fn snapshot_rows(n: u64) {
    counter!(SNAPSHOT_ROWS_TOTAL).increment(n);
}

pub(crate) fn hint_malformed() {
    counter!(HINTS_MALFORMED_TOTAL).increment(1);
}

/// A request failed on a moving or moved hash slot (`CLUSTER_REDIRECT_REASONS`).
pub(crate) fn cluster_redirect(reason: &'static str) {
    counter!(REDIS_CLUSTER_REDIRECTS_TOTAL, LABEL_REASON => reason).increment(1);
}

pub(crate) fn cluster_primaries(n: usize) {
    gauge!(REDIS_CLUSTER_PRIMARIES).set(n as f64);
}

pub(crate) fn fences_raised(n: u64) {
    counter!(FENCES_RAISED_TOTAL).increment(n);
}

/// The counts the fill function keeps in Redis (`walsweep:fills`).
pub(crate) fn set_fills(stored: u64, refused: u64) {
    counter!(FILLS_TOTAL, LABEL_RESULT => "stored").absolute(stored);
    counter!(FILLS_TOTAL, LABEL_RESULT => "refused").absolute(refused);
}

/// A batch passed the visibility gate after `checks` queries.
pub(crate) fn visibility_waited(elapsed: Duration, checks: u64) {
    histogram!(VISIBILITY_WAIT_SECONDS).record(elapsed.as_secs_f64());
    counter!(VISIBILITY_RECHECKS_TOTAL).increment(checks.saturating_sub(1));
}

pub(crate) fn redis_round_trip(elapsed: Duration) {
    histogram!(REDIS_ROUND_TRIP_SECONDS).record(elapsed.as_secs_f64());
}

pub(crate) fn set_redis_up(up: bool) {
    gauge!(REDIS_UP).set(if up { 1.0 } else { 0.0 });
}

pub(crate) fn set_flushed_lsn(lsn: u64) {
    gauge!(FLUSHED_LSN).set(lsn as f64);
}

pub(crate) fn set_streaming(on: bool) {
    gauge!(STREAMING).set(if on { 1.0 } else { 0.0 });
}

pub(crate) fn reconnected() {
    counter!(RECONNECTS_TOTAL).increment(1);
}

pub(crate) fn error(kind: &'static str) {
    counter!(ERRORS_TOTAL, LABEL_KIND => kind).increment(1);
}

/// One of `STATUS_REASONS`.
pub(crate) fn status_sent(reason: &'static str) {
    counter!(STATUS_UPDATES_TOTAL, LABEL_REASON => reason).increment(1);
}
