//! The Redis sink: applies transaction plans to a single Redis node, in three steps per batch.
//!
//! 1. Invalidations: the plans of all its transactions are merged (deduplicated), then keys are
//!    UNLINKed and dependency sets invalidated in ONE pipelined round trip (the set fan-out is a
//!    Lua script, atomic per call). Table-wide fallbacks SCAN their prefix in further round
//!    trips. These are deletions: their order within a batch does not matter and applying a
//!    batch twice is harmless.
//! 2. Mirrors (`mirror`): row writes and index moves in commit order, last write wins, so
//!    applying a batch again leaves the same state.
//! 3. Broadcasts (`broadcast`): one message per transaction, skipped when its LSN was already
//!    published.
//!
//! So the sink contract's at-least-once delivery is safe here.

pub(crate) mod broadcast;
pub mod certificate;
pub(crate) mod cluster;
mod cluster_mirror;
pub(crate) mod endpoint;
pub(crate) mod errors;
pub mod fences;
pub(crate) mod mirror;
mod position;
pub mod probe;
pub(crate) mod readback;
mod recovery;
pub(crate) mod reinvalidate;

use crate::pg::Lsn;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ::redis::Value;

pub use self::endpoint::{cluster_client, pubsub_connection, redis_client, RedisClientError};
pub(crate) use self::endpoint::{Endpoint, RedisConn};
pub(crate) use self::errors::sink_error;
use self::errors::{script_sink_error, ScriptCalls};
pub use self::position::APPLIED as APPLIED_POSITION;
use crate::config::template::glob_escape;
use crate::config::{BroadcastConfig, MatroskaConfig, RedisConfig};
use crate::plan::rules::{union, EffectPlan, FallbackCause};
use crate::plan::txn::TxnPlan;
use crate::plan::Plan;
use crate::sink::{Applied, Recovery, Sink, SinkError};
use crate::stream::assembler::CommittedTxn;
use crate::stream::history::RecordedSource;
use crate::telemetry::metrics as m;

const INVALIDATE_DEPS_LUA: &str = include_str!("scripts/invalidate_deps.lua");
/// How errors name the script.
const INVALIDATE_DEPS_SCRIPT: &str = "invalidate_deps.lua";
/// Keys per UNLINK and sets per script call: large enough to amortise, small enough that one
/// command never blocks Redis for long.
const KEYS_PER_COMMAND: usize = 1_000;
const SETS_PER_SCRIPT_CALL: usize = 256;
const SCAN_COUNT: usize = 1_000;

/// Where matroska-cache keeps dependency sets.
pub(crate) fn dep_set_key(prefix: &str, dep: &str) -> String {
    // Built by hand: `format!` here was a tenth of the CPU draining a backlog.
    const RDEP: &str = "::rdep::";
    let mut key = String::with_capacity(prefix.len() + RDEP.len() + dep.len());
    key.push_str(prefix);
    key.push_str(RDEP);
    key.push_str(dep);
    key
}

/// A dependency set's key (`dep_set_key`) as one Redis argument, written straight into the
/// command: a batch names thousands of sets, and building each key as a `String` first was a
/// tenth of walsweep's CPU draining a backlog.
struct DepSetKey<'a> {
    prefix: &'a str,
    dep: &'a str,
}

impl ::redis::ToRedisArgs for DepSetKey<'_> {
    fn write_redis_args<W: ?Sized + ::redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing to the command's own buffer cannot fail.
        let _ = arg.write_all(self.prefix.as_bytes());
        let _ = arg.write_all(b"::rdep::");
        let _ = arg.write_all(self.dep.as_bytes());
    }
}

pub struct RedisSink {
    endpoint: Endpoint,
    connection: Option<RedisConn>,
    /// On a cluster: the mirror scripts are loaded on every node (`cluster_mirror`).
    cluster_scripts_loaded: bool,
    /// `redis.wait_for_replicas`, and how long one WAIT may take.
    wait_for_replicas: (u32, u64),
    prefix: String,
    remove_sets: bool,
    /// `matroska.fences`: fences raised before each invalidation (`fences`).
    fences: Option<fences::Fences>,
    /// `matroska.reinvalidate_after_ms`: keeps applied batches for a second application.
    reinvalidate: Option<reinvalidate::Scheduler>,
    /// Whether outcomes set `walsweep_redis_up` (not for the reinvalidation worker's sink).
    reports_health: bool,
    /// What `reset` clears: every prefix the rules can touch (`Rules::reset_plan`).
    reset_plan: EffectPlan,
    /// `[broadcast]`, when on.
    broadcast: Option<BroadcastConfig>,
    /// Where walsweep keeps its own state for this source and slot (`state_key`).
    state_prefix: String,
}

/// The state item holding the pending second applications (`reinvalidate`).
const REINVALIDATE_STATE: &str = "reinvalidate";

/// The start of every key walsweep keeps its own state under, for one database and slot:
/// `walsweep:<database>/<slot>:`. Two daemons on different databases or slots never share one.
pub fn state_prefix(database: &str, slot: &str) -> String {
    format!("walsweep:{database}/{slot}:")
}

/// What the invalidations of a batch removed (tests, logs and metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Unlinked {
    pub keys_unlinked: u64,
    pub wrong_type_sets: u64,
}

impl RedisSink {
    /// Validates the URL; connects lazily, so Redis being down at start is retried like any
    /// other outage instead of failing the daemon.
    pub fn new(redis: &RedisConfig, matroska: &MatroskaConfig) -> Result<Self, SinkError> {
        let endpoint = Endpoint::new(redis)?;
        let state_prefix = state_prefix("postgres", "walsweep");
        let mut sink = RedisSink {
            endpoint,
            connection: None,
            cluster_scripts_loaded: false,
            wait_for_replicas: (redis.wait_for_replicas, (redis.timeout_ms / 2).max(1)),
            prefix: matroska.prefix.clone(),
            remove_sets: matroska.remove_dependency_sets,
            reset_plan: EffectPlan::default(),
            reinvalidate: None,
            fences: matroska.fences.then_some(fences::Fences {
                ttl_ms: matroska.fence_ttl_ms,
                library_loaded: false,
            }),
            reports_health: true,
            broadcast: None,
            state_prefix,
        };
        if let Some(ms) = matroska.reinvalidate_after_ms {
            // Its own sink: own connection, same layout, no second-level reinvalidation.
            let mut worker = RedisSink::new(
                redis,
                &MatroskaConfig {
                    reinvalidate_after_ms: None,
                    // The first application raised them; a fence stays newer than any token
                    // taken before it, so the second pass needs none of its own.
                    fences: false,
                    ..matroska.clone()
                },
            )?;
            worker.reports_health = false;
            sink.reinvalidate = Some(reinvalidate::Scheduler::new(
                Duration::from_millis(ms),
                worker,
                sink.state_key(REINVALIDATE_STATE),
            ));
        }
        Ok(sink)
    }

    /// Sets what `reset` clears; without it a reset has nothing to clear and says so.
    pub fn with_reset_plan(mut self, plan: EffectPlan) -> Self {
        self.reset_plan = plan;
        self
    }

    /// Keeps walsweep's own state under `prefix` (see `state_prefix`).
    pub fn with_state_prefix(mut self, prefix: String) -> Self {
        self.state_prefix = prefix;
        let key = self.state_key(REINVALIDATE_STATE);
        if let Some(reinvalidate) = &mut self.reinvalidate {
            reinvalidate.set_key(key);
        }
        self
    }

    /// The key of walsweep's own state item `name` (e.g. `recovery`).
    pub(crate) fn state_key(&self, name: &str) -> String {
        format!("{}{name}", self.state_prefix)
    }

    /// Publishes a message per transaction as `[broadcast]` says.
    pub(crate) fn with_broadcast(mut self, broadcast: Option<BroadcastConfig>) -> Self {
        self.broadcast = broadcast;
        self
    }

    async fn connection(&mut self) -> Result<RedisConn, SinkError> {
        if let Some(c) = &mut self.connection {
            if let Err(e) = c.refresh_slot_map_if_stale().await {
                let err = sink_error("read the Redis Cluster's slot map (CLUSTER SLOTS)", e);
                self.connection = None;
                return Err(err);
            }
            return Ok(c.clone());
        }
        let c = self.endpoint.connect().await?;
        self.connection = Some(c.clone());
        Ok(c)
    }

    /// Applies the union of `plans`.
    pub async fn apply_plans<'a>(
        &mut self,
        plans: impl Iterator<Item = &'a EffectPlan> + Clone,
    ) -> Result<Unlinked, SinkError> {
        self.apply_plans_at(plans, None).await
    }

    /// Applies the union of `plans`, the effects of commits up to `fence_lsn`: with
    /// `matroska.fences`, their fences are raised at it first.
    async fn apply_plans_at<'a>(
        &mut self,
        plans: impl Iterator<Item = &'a EffectPlan> + Clone,
        fence_lsn: Option<Lsn>,
    ) -> Result<Unlinked, SinkError> {
        let keys = union(plans.clone().map(|p| &p.keys));
        let deps = union(plans.clone().map(|p| &p.deps));
        let mut key_prefixes: BTreeMap<&str, FallbackCause> = BTreeMap::new();
        let mut dep_prefixes: BTreeMap<&str, FallbackCause> = BTreeMap::new();
        for plan in plans {
            for (p, c) in &plan.key_prefixes {
                key_prefixes.entry(p).or_insert(*c);
            }
            for (p, c) in &plan.dep_prefixes {
                dep_prefixes.entry(p).or_insert(*c);
            }
        }
        if tracing::enabled!(target: EFFECTS_LOG_TARGET, tracing::Level::DEBUG) {
            log_effects(&keys, &deps, &key_prefixes, &dep_prefixes, &self.prefix);
        }
        let result = self
            .apply_sets(keys, deps, key_prefixes, dep_prefixes, fence_lsn)
            .await;
        self.observe(&result);
        result
    }

    async fn apply_sets(
        &mut self,
        keys: Vec<&str>,
        deps: Vec<&str>,
        key_prefixes: BTreeMap<&str, FallbackCause>,
        dep_prefixes: BTreeMap<&str, FallbackCause>,
        fence_lsn: Option<Lsn>,
    ) -> Result<Unlinked, SinkError> {
        // One clone per batch, so the sets' keys can be written while `self` is borrowed.
        let prefix = self.prefix.clone();
        let set_keys = || -> Vec<String> { deps.iter().map(|d| dep_set_key(&prefix, d)).collect() };
        if let Some(lsn) = fence_lsn.filter(|_| self.fences.is_some()) {
            let all = !key_prefixes.is_empty() || !dep_prefixes.is_empty();
            let sets = set_keys();
            self.raise_fences(&keys, &sets, all, lsn).await?;
        }
        let mut conn = self.connection().await?;
        let mut applied = Unlinked::default();
        if self.endpoint.is_cluster() {
            const OPERATION: &str = "unlink keys and invalidate dependency sets";
            applied =
                cluster::invalidate(&conn, &keys, &set_keys(), self.remove_sets, OPERATION).await?;
        } else if !keys.is_empty() || !deps.is_empty() {
            applied = self.invalidate_on_node(&mut conn, &keys, &deps).await?;
        }
        for prefix in key_prefixes.into_keys() {
            applied.keys_unlinked += self
                .unlink_prefix(
                    &mut conn,
                    prefix,
                    "unlink keys of a table-wide invalidation",
                )
                .await?;
        }
        for prefix in dep_prefixes.into_keys() {
            const OPERATION: &str = "invalidate dependency sets table-wide";
            let pattern = format!("{}*", glob_escape(&dep_set_key(&self.prefix, prefix)));
            let mut scan = Scan::new(pattern, "scan for a table-wide dependency invalidation");
            while let Some(page) = scan.next_page(&mut conn).await? {
                if self.endpoint.is_cluster() {
                    let sets =
                        cluster::invalidate(&conn, &[], &page, self.remove_sets, OPERATION).await?;
                    applied.keys_unlinked += sets.keys_unlinked;
                    applied.wrong_type_sets += sets.wrong_type_sets;
                    continue;
                }
                for chunk in page.chunks(SETS_PER_SCRIPT_CALL) {
                    let mut pipe = ::redis::pipe();
                    self.push_invalidate_sets(&mut pipe, chunk.iter().map(String::as_str));
                    let replies: Vec<Value> = script_round_trip(
                        OPERATION,
                        ScriptCalls {
                            script: INVALIDATE_DEPS_SCRIPT,
                            at: 0..usize::MAX,
                        },
                        pipe.query_async(&mut conn),
                    )
                    .await?;
                    count_replies(&replies, &mut applied);
                }
            }
        }
        if applied.wrong_type_sets > 0 {
            m::error(m::ERROR_WRONG_TYPE);
            tracing::warn!(
                sets = applied.wrong_type_sets,
                prefix = %self.prefix,
                "some dependency keys are not sets; left alone (another app may share the prefix)"
            );
        }
        m::keys_unlinked(applied.keys_unlinked);
        Ok(applied)
    }

    /// One node: UNLINKs `keys` and invalidates the dependency sets of `deps`. The first round
    /// trip sends the UNLINKs and one EXISTS per chunk of sets; only the chunks where a set
    /// exists go to `invalidate_deps.lua`, in a second one. Most sets a change names do not
    /// exist (nothing cached depends on them), and a script call costs Redis three times an
    /// EXISTS of the same sets (it copies every argument into Lua): those calls were most of
    /// Redis's CPU draining a backlog. Checking first changes nothing a reader can see: a set
    /// filled after the EXISTS is one filled after the invalidation, as it would be after the
    /// script.
    async fn invalidate_on_node(
        &self,
        conn: &mut RedisConn,
        keys: &[&str],
        deps: &[&str],
    ) -> Result<Unlinked, SinkError> {
        const OPERATION: &str = "unlink keys and invalidate dependency sets";
        let prefix = self.prefix.as_str();
        fn set_keys<'a>(prefix: &'a str, chunk: &[&'a str]) -> Vec<DepSetKey<'a>> {
            chunk.iter().map(|dep| DepSetKey { prefix, dep }).collect()
        }
        let mut pipe = ::redis::pipe();
        // Error replies in their places, so each is classified (`cluster::reply`) like one
        // from a cluster node.
        pipe.ignore_errors();
        for chunk in keys.chunks(KEYS_PER_COMMAND) {
            pipe.cmd("UNLINK").arg(chunk);
        }
        let unlinks = keys.len().div_ceil(KEYS_PER_COMMAND);
        let chunks: Vec<&[&str]> = deps.chunks(SETS_PER_SCRIPT_CALL).collect();
        for chunk in &chunks {
            pipe.cmd("EXISTS").arg(set_keys(prefix, chunk));
        }
        let replies: Vec<Value> = round_trip(OPERATION, pipe.query_async(conn)).await?;
        let mut applied = Unlinked::default();
        let mut pipe = ::redis::pipe();
        for (at, reply) in replies.into_iter().enumerate() {
            let count = cluster::count(&cluster::reply(reply, OPERATION)?);
            if at < unlinks {
                applied.keys_unlinked += count;
            } else if count > 0 {
                if let Some(chunk) = chunks.get(at - unlinks) {
                    self.push_invalidate_sets(&mut pipe, set_keys(prefix, chunk).into_iter());
                }
            }
        }
        if !pipe.is_empty() {
            let replies: Vec<Value> = script_round_trip(
                OPERATION,
                ScriptCalls {
                    script: INVALIDATE_DEPS_SCRIPT,
                    at: 0..usize::MAX,
                },
                pipe.query_async(conn),
            )
            .await?;
            count_replies(&replies, &mut applied);
        }
        Ok(applied)
    }

    fn push_invalidate_sets<S: ::redis::ToRedisArgs>(
        &self,
        pipe: &mut ::redis::Pipeline,
        sets: impl ExactSizeIterator<Item = S>,
    ) {
        // EVAL with the source rather than EVALSHA: no NOSCRIPT dance after a Redis restart,
        // and Redis caches the compiled script by its hash anyway.
        let cmd = pipe.cmd("EVAL").arg(INVALIDATE_DEPS_LUA).arg(sets.len());
        for s in sets {
            cmd.arg(s);
        }
        cmd.arg(if self.remove_sets { "1" } else { "0" });
    }

    /// UNLINKs every key starting with the literal `prefix`, one SCAN page at a time, so
    /// memory stays at one page however many keys match; returns how many Redis removed.
    /// Table-wide invalidations and mirror clears both use it.
    async fn unlink_prefix(
        &self,
        conn: &mut RedisConn,
        prefix: &str,
        operation: &'static str,
    ) -> Result<u64, SinkError> {
        let mut scan = Scan::new(format!("{}*", glob_escape(prefix)), operation);
        let mut unlinked = 0;
        while let Some(page) = scan.next_page(conn).await? {
            unlinked += cluster::unlink_keys(conn, &page, operation).await?;
        }
        Ok(unlinked)
    }
}

/// A SCAN over `pattern`, read a page at a time so the caller acts on each page before the
/// next: on every primary of a cluster in turn, or on the one node. Deleting keys mid-scan is
/// fine: SCAN still returns every key present for the whole scan, and a key it returns twice is
/// UNLINKed twice, which is harmless. (A key migrating between two primaries while both are
/// scanned can be missed on a cluster: resharding and a table-wide invalidation at the same
/// moment.)
struct Scan {
    pattern: String,
    /// The nodes still to scan, the current one first; `None` until asked (the first page).
    nodes: Option<Vec<Option<endpoint::Primary>>>,
    /// The current node's cursor; `None` once the server said its scan is complete.
    cursor: Option<u64>,
    operation: &'static str,
}

impl Scan {
    fn new(pattern: String, operation: &'static str) -> Self {
        Scan {
            pattern,
            nodes: None,
            cursor: Some(0),
            operation,
        }
    }

    /// The next page of matching keys (possibly empty: SCAN filters after it samples), or
    /// `None` when the scan is done.
    async fn next_page(&mut self, conn: &mut RedisConn) -> Result<Option<Vec<String>>, SinkError> {
        if self.nodes.is_none() {
            let mut nodes = round_trip(self.operation, conn.scan_nodes()).await?;
            nodes.reverse();
            self.nodes = Some(nodes);
        }
        let nodes = self.nodes.as_mut().expect("set above");
        let cursor = match self.cursor {
            Some(cursor) => cursor,
            None => {
                nodes.pop();
                if nodes.is_empty() {
                    return Ok(None);
                }
                0
            }
        };
        let Some(node) = nodes.last() else {
            return Ok(None);
        };
        let mut scan = ::redis::cmd("SCAN");
        scan.arg(cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let (next, page): (u64, Vec<String>) =
            round_trip(self.operation, conn.query_on(node.as_ref(), &scan)).await?;
        self.cursor = (next != 0).then_some(next);
        Ok(Some(page))
    }
}

/// One round trip (a command or a pipeline), timed for `walsweep_redis_round_trip_seconds`;
/// a failure says what the sink was doing.
pub(crate) async fn round_trip<T>(
    operation: &'static str,
    request: impl std::future::Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, SinkError> {
    let started = Instant::now();
    let reply = request.await.map_err(|e| sink_error(operation, e))?;
    m::redis_round_trip(started.elapsed());
    Ok(reply)
}

/// `round_trip` for requests that run scripts: an error one of them raises is fatal and names
/// the script (`errors`).
pub(crate) async fn script_round_trip<T>(
    operation: &'static str,
    calls: ScriptCalls,
    request: impl std::future::Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, SinkError> {
    let started = Instant::now();
    let reply = request
        .await
        .map_err(|e| script_sink_error(operation, &calls, e))?;
    m::redis_round_trip(started.elapsed());
    Ok(reply)
}

/// The commit LSNs of `batch`, for a script error (fatal: it must say where walsweep stopped).
fn at_commits<P>(err: SinkError, batch: &[CommittedTxn<P>]) -> SinkError {
    match (batch.first(), batch.last()) {
        (Some(first), Some(last)) => errors::at_commits(err, first.commit_lsn, last.commit_lsn),
        _ => err,
    }
}

/// Log target for one line per effect (`RUST_LOG=walsweep::effects=debug`): handy to watch,
/// far too chatty for production.
pub(crate) const EFFECTS_LOG_TARGET: &str = "walsweep::effects";

fn log_effects(
    keys: &[&str],
    deps: &[&str],
    key_prefixes: &BTreeMap<&str, FallbackCause>,
    dep_prefixes: &BTreeMap<&str, FallbackCause>,
    prefix: &str,
) {
    for key in keys {
        tracing::debug!(target: EFFECTS_LOG_TARGET, "unlink {key}");
    }
    for dep in deps {
        tracing::debug!(target: EFFECTS_LOG_TARGET, "invalidate {}", dep_set_key(prefix, dep));
    }
    for (p, cause) in key_prefixes {
        tracing::debug!(target: EFFECTS_LOG_TARGET, cause = cause.as_str(), "unlink every {p}*");
    }
    for (p, cause) in dep_prefixes {
        tracing::debug!(target: EFFECTS_LOG_TARGET, cause = cause.as_str(), "invalidate every {}*", dep_set_key(prefix, p));
    }
}

/// The effects of `plans` by kind, summed: counted once per batch (a metrics lookup per
/// transaction cost more than the counting).
fn sum_counts<'a>(plans: impl Iterator<Item = &'a EffectPlan>) -> [usize; 4] {
    plans.fold([0; 4], |mut sum, plan| {
        for (s, n) in sum.iter_mut().zip(plan.counts_by_kind()) {
            *s += n;
        }
        sum
    })
}

fn count_replies(replies: &[Value], applied: &mut Unlinked) {
    for reply in replies {
        match reply {
            Value::Int(n) => applied.keys_unlinked += *n as u64,
            Value::Array(items) => {
                if let Some(Value::Int(n)) = items.first() {
                    applied.keys_unlinked += *n as u64;
                }
                if let Some(Value::Int(n)) = items.get(2) {
                    applied.wrong_type_sets += *n as u64;
                }
            }
            _ => {}
        }
    }
}

/// The `Sink` methods that keep walsweep's own state (`recovery`), the same for every plan type.
macro_rules! state_hooks {
    () => {
        async fn pending_recovery(&mut self) -> Result<Recovery, SinkError> {
            // The first thing a run asks of the sink: apps can fill through the functions
            // before the first change arrives.
            let result = match self.ensure_function_library().await {
                Ok(()) => self.read_recovery().await,
                Err(e) => Err(e),
            };
            self.observe(&result);
            result
        }

        async fn begin_recovery(&mut self, steps: Recovery) -> Result<(), SinkError> {
            let result = self.write_recovery(steps).await;
            self.observe(&result);
            result
        }

        async fn end_recovery(&mut self) -> Result<(), SinkError> {
            let result = self.delete_recovery().await;
            self.observe(&result);
            result
        }

        async fn recorded_source(&mut self) -> Result<Option<RecordedSource>, SinkError> {
            let result = self.read_source().await;
            self.observe(&result);
            result
        }

        async fn record_source(&mut self, source: RecordedSource) -> Result<(), SinkError> {
            let result = self.write_source(&source).await;
            self.observe(&result);
            result
        }

        async fn publish_position(&mut self, lsn: Lsn) -> Result<(), SinkError> {
            let result = self.write_position(lsn).await;
            self.observe(&result);
            result
        }
    };
}

impl Sink<TxnPlan> for RedisSink {
    async fn reset(&mut self) -> Result<(), SinkError> {
        // Deletes the old history's position too.
        <Self as Sink<EffectPlan>>::reset(self).await?;
        self.publish_reset("the replication slot was recreated; changes may have been missed")
            .await
    }

    async fn slot_created(&mut self) -> Result<(), SinkError> {
        <Self as Sink<EffectPlan>>::slot_created(self).await?;
        // A restored or moved database starts a new LSN sequence: the chain must restart, or
        // its transactions would look like already published ones.
        self.publish_reset("walsweep created the replication slot; earlier changes were not seen")
            .await
    }

    state_hooks!();

    async fn apply(&mut self, batch: &[CommittedTxn<TxnPlan>]) -> Result<Applied, SinkError> {
        let result = self
            .apply_txn_plans(batch)
            .await
            .map_err(|e| at_commits(e, batch));
        self.observe(&result);
        result.map(|()| Applied::whole(batch))
    }

    fn start(&mut self) {
        self.start_background();
    }

    async fn finish(&mut self) {
        self.finish_background().await;
    }
}

impl RedisSink {
    /// Once the whole batch applied, and before `apply` returns (the slot is confirmed right
    /// after, so a crash must not lose it): keeps the batch's invalidations for their delayed
    /// second application, in Redis and in the worker's queue. An error keeps nothing and
    /// fails the batch.
    async fn keep_second_application<P>(
        &mut self,
        batch: &[CommittedTxn<P>],
        invalidations: impl Fn(&P) -> &EffectPlan,
    ) -> Result<(), SinkError> {
        let (Some(_), Some(last)) = (&self.reinvalidate, batch.last()) else {
            return Ok(());
        };
        let end_lsn = last.end_lsn;
        let mut merged = EffectPlan::default();
        for txn in batch {
            merged.merge(invalidations(&txn.plan).clone());
        }
        if merged.is_empty() {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        match &mut self.reinvalidate {
            Some(reinvalidate) => reinvalidate.schedule(&mut conn, end_lsn, merged).await,
            None => Ok(()),
        }
    }

    /// `Sink::start`: the reinvalidation worker starts with the sink, so what an earlier run
    /// left pending is applied even if no change follows.
    fn start_background(&mut self) {
        if let Some(reinvalidate) = &mut self.reinvalidate {
            reinvalidate.start();
        }
    }

    /// `Sink::finish`: pending second applications are applied when due, bounded by the delay.
    async fn finish_background(&mut self) {
        if let Some(reinvalidate) = &mut self.reinvalidate {
            reinvalidate.finish().await;
        }
    }

    /// What a round trip's outcome says about Redis: readiness follows it, and a failed
    /// attempt starts the next one on a fresh connection rather than a wedged one.
    fn observe<T>(&mut self, result: &Result<T, SinkError>) {
        if self.reports_health {
            crate::telemetry::health::set_redis_up(result.is_ok());
        }
        if result.is_err() {
            self.connection = None;
            self.cluster_scripts_loaded = false;
            // Redis may have restarted without the function library.
            if let Some(f) = &mut self.fences {
                f.library_loaded = false;
            }
        }
    }

    /// Invalidations, then mirror writes, then broadcasts: a subscriber that hears of a
    /// transaction finds its effects already in Redis. Then, with `reinvalidate_after_ms`, the
    /// second application is kept: only for a batch that applied, once however often retried.
    async fn apply_txn_plans(&mut self, batch: &[CommittedTxn<TxnPlan>]) -> Result<(), SinkError> {
        let applied = self
            .apply_plans_at(
                batch.iter().map(|t| &t.plan.invalidate),
                batch.last().map(|t| t.commit_lsn),
            )
            .await?;
        // Each transaction's ops are already folded per key; across transactions they are
        // applied as they come, which keeps commit order without copying them. Ops a large
        // transaction spilled to disk come back a bounded chunk at a time, in order.
        let newest_commit_secs = batch
            .iter()
            .map(|t| t.commit_time_unix_micros.div_euclid(1_000_000))
            .max()
            .unwrap_or(0);
        let mut ops: Vec<&crate::plan::mirror::MirrorOp> = Vec::new();
        for txn in batch {
            for chunk in txn.plan.mirror.chunks(crate::plan::mirror::SPILL_READ_OPS) {
                match chunk? {
                    std::borrow::Cow::Borrowed(in_memory) => ops.extend(in_memory),
                    std::borrow::Cow::Owned(from_disk) => {
                        if !ops.is_empty() {
                            let before = std::mem::take(&mut ops);
                            self.apply_mirror_ops(before, newest_commit_secs).await?;
                        }
                        self.apply_mirror_ops(&from_disk, newest_commit_secs)
                            .await?;
                    }
                }
            }
        }
        if !ops.is_empty() {
            self.apply_mirror_ops(ops, newest_commit_secs).await?;
        }
        self.publish(batch).await?;
        self.wait_for_replicas().await?;
        self.keep_second_application(batch, |plan| &plan.invalidate)
            .await?;
        m::effects_applied(sum_counts(batch.iter().map(|t| &t.plan.invalidate)));
        tracing::debug!(
            transactions = batch.len(),
            keys_unlinked = applied.keys_unlinked,
            "batch applied"
        );
        Ok(())
    }
}

impl RedisSink {
    /// With `redis.wait_for_replicas`: WAITs until that many replicas (of every primary, on a
    /// cluster) have the writes sent so far, so a failover right after cannot lose them. Too
    /// few in time fails the batch as retryable: applying it again is harmless.
    async fn wait_for_replicas(&mut self) -> Result<(), SinkError> {
        let (wanted, timeout_ms) = self.wait_for_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let mut conn = self.connection().await?;
        // On a cluster the client sends WAIT to every primary on the connection the writes
        // took, and answers the smallest count.
        let acknowledged: i64 = round_trip(
            "wait for replicas to acknowledge the batch (WAIT)",
            ::redis::cmd("WAIT")
                .arg(wanted)
                .arg(timeout_ms)
                .query_async(&mut conn),
        )
        .await?;
        if acknowledged < i64::from(wanted) {
            return Err(SinkError {
                operation: "wait for replicas to acknowledge the batch (WAIT)",
                retryable: true,
                source: format!(
                    "only {acknowledged} of the {wanted} replicas redis.wait_for_replicas asks \
                     for acknowledged within {timeout_ms} ms; the batch is applied again"
                )
                .into(),
            });
        }
        Ok(())
    }

    /// The applied position and the fences belong to the old history's LSNs.
    async fn forget_history(&mut self) -> Result<(), SinkError> {
        self.delete_position().await?;
        self.drop_fences().await
    }
}

impl Sink<EffectPlan> for RedisSink {
    state_hooks!();

    async fn slot_created(&mut self) -> Result<(), SinkError> {
        // The new slot's LSNs may be lower than the old history's: waiters must not take an
        // old position for theirs, nor fills be refused by old fences.
        let result = self.forget_history().await;
        self.observe(&result);
        result
    }

    async fn reset(&mut self) -> Result<(), SinkError> {
        let result = self.forget_history().await;
        self.observe(&result);
        result?;
        if self.reset_plan.is_empty() {
            tracing::warn!("sink reset requested, but no rule prefixes are known to clear");
            return Ok(());
        }
        let plan = self.reset_plan.clone();
        let applied = self.apply_plans(std::iter::once(&plan)).await?;
        tracing::warn!(
            keys_unlinked = applied.keys_unlinked,
            prefixes = crate::plan::Plan::effect_count(&plan),
            "cleared every key and dependency set the rules maintain"
        );
        Ok(())
    }

    async fn apply(&mut self, batch: &[CommittedTxn<EffectPlan>]) -> Result<Applied, SinkError> {
        let applied = self
            .apply_plans_at(
                batch.iter().map(|t| &t.plan),
                batch.last().map(|t| t.commit_lsn),
            )
            .await
            .map_err(|e| at_commits(e, batch))?;
        let replicated = self.wait_for_replicas().await;
        self.observe(&replicated);
        replicated?;
        let kept = self.keep_second_application(batch, |plan| plan).await;
        self.observe(&kept);
        kept?;
        m::effects_applied(sum_counts(batch.iter().map(|t| &t.plan)));
        tracing::debug!(
            transactions = batch.len(),
            keys_unlinked = applied.keys_unlinked,
            "batch applied"
        );
        Ok(Applied::whole(batch))
    }

    fn start(&mut self) {
        self.start_background();
    }

    async fn finish(&mut self) {
        self.finish_background().await;
    }
}
