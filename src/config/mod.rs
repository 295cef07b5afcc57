//! The TOML configuration: documented serde structs (the reference for every option), defaults,
//! environment overrides for secrets, and validation that reports every problem at once with the
//! file, line and a fix.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;
use toml::Spanned;

use crate::pg::replication::ConnectParams;

pub(crate) mod hash_slot;
mod inspect;
mod libpq;
mod mirror;
pub(crate) mod score;
pub(crate) mod template;
pub use inspect::InspectConfig;
pub(crate) use mirror::{BroadcastConfig, MirrorConfig, MirrorFormat};

pub(crate) const DEFAULT_SLOT: &str = "walsweep";
pub(crate) const DEFAULT_PUBLICATION: &str = "walsweep";
pub(crate) const DEFAULT_APPLICATION_NAME: &str = "walsweep";
pub(crate) const DEFAULT_STATUS_INTERVAL_MS: u64 = 1_000;
pub(crate) const DEFAULT_QUEUE_CAPACITY: usize = 1_024;
pub(crate) const DEFAULT_BATCH_MAX_TXNS: usize = 512;
pub(crate) const DEFAULT_BATCH_MAX_CHANGES: u64 = 2_048;
pub(crate) const DEFAULT_RECONNECT_MIN_MS: u64 = 100;
pub(crate) const DEFAULT_RECONNECT_MAX_MS: u64 = 30_000;
pub(crate) const DEFAULT_RELEASE_SLOT_AFTER_SINK_OUTAGE_MS: u64 = 10_000;
pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub(crate) const DEFAULT_REDIS_TIMEOUT_MS: u64 = 5_000;
pub(crate) const DEFAULT_MATROSKA_PREFIX: &str = "cache";
/// Longest `matroska.reinvalidate_after_ms` accepted (10 minutes).
pub(crate) const MAX_REINVALIDATE_AFTER_MS: u64 = 600_000;
pub(crate) const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9187";
pub(crate) const DEFAULT_SPILL_AFTER_BYTES: u64 = 8 * 1024 * 1024;
/// Environment variable that replaces `redis.url`.
pub const REDIS_URL_ENV: &str = "WALSWEEP_REDIS_URL";
/// Environment variable that replaces `redis.cluster_nodes` (comma-separated URLs).
pub const REDIS_CLUSTER_NODES_ENV: &str = "WALSWEEP_REDIS_CLUSTER_NODES";
/// Environment variable that replaces `source.url`, so the password can stay out of the file.
pub const SOURCE_URL_ENV: &str = "WALSWEEP_SOURCE_URL";

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct Config {
    /// Where changes come from.
    pub source: SourceConfig,
    /// Where invalidations go.
    #[serde(default)]
    pub redis: RedisConfig,
    /// Prometheus metrics and health endpoints.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Layout of matroska-cache entries (dependency sets and scopes).
    #[serde(default)]
    pub matroska: MatroskaConfig,
    /// Tables whose changes walsweep follows, with their rules. Each must be in the publication.
    #[serde(default, rename = "table")]
    pub tables: Vec<TableConfig>,
    /// How every `[[table.mirror]]` holds a transaction's pending writes.
    #[serde(default)]
    pub mirror: MirrorSettings,
    /// One message per committed transaction on a Redis channel and/or stream, for in-process
    /// caches. Default: off.
    #[serde(default)]
    pub(crate) broadcast: Option<BroadcastConfig>,
    /// Sample mirrored rows continuously and compare them with Redis, see `InspectConfig`.
    /// Default: off.
    #[serde(default)]
    pub inspect: Option<InspectConfig>,
}

/// `[mirror]`: settings shared by every `[[table.mirror]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct MirrorSettings {
    /// Mirror writes land after their transaction commits, so until then walsweep holds one
    /// pending write per distinct row of it. Past about this many bytes of them in one
    /// transaction, the rest go to a file in `spill_dir` and are read back a chunk at a time
    /// when the transaction is applied: a million-row transaction does not hold a million rows
    /// in memory. 0 keeps everything in memory. Default 8388608 (8 MiB).
    #[serde(default = "default_spill_after_bytes")]
    pub spill_after_bytes: u64,
    /// Directory of those files, `walsweep-spill-<pid>-<run>-<n>`: each is removed once its
    /// transaction was applied or rolled back, and files of a walsweep process that no longer
    /// runs are removed at start. Must exist and be writable by walsweep's user (checked at
    /// start). Default: the OS temp dir (`TMPDIR`, else `/tmp`).
    #[serde(default)]
    pub spill_dir: Option<PathBuf>,
}

impl Default for MirrorSettings {
    fn default() -> Self {
        MirrorSettings {
            spill_after_bytes: DEFAULT_SPILL_AFTER_BYTES,
            spill_dir: None,
        }
    }
}

fn default_spill_after_bytes() -> u64 {
    DEFAULT_SPILL_AFTER_BYTES
}

/// `[redis]`: the cache to keep honest (a single node; cluster is not supported).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`. Overridden by `WALSWEEP_REDIS_URL`. Never logged.
    /// Default `redis://127.0.0.1:6379/0`.
    #[serde(default = "default_redis_url")]
    pub url: String,
    /// How long one Redis round trip may take before it counts as failed and is retried, in ms.
    /// Default 5000.
    #[serde(default = "default_redis_timeout_ms")]
    pub timeout_ms: u64,
    /// With a `rediss://` URL: PEM file of the CA certificate(s) that signed the Redis server's
    /// certificate, when it is not in the system trust store (the default). The server name in
    /// the URL must match the certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// With a `rediss://` URL: PEM client certificate, for servers that require one
    /// (`tls-auth-clients yes`). Needs `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// A Redis Cluster instead of one node: URLs of some of its nodes (any role, any number;
    /// walsweep learns the rest from them), e.g. `["redis://10.0.0.1:7000",
    /// "redis://10.0.0.2:7000"]`. User, password and `rediss://` work as in `url`, which is then
    /// left out; database numbers other than 0 do not exist in a cluster. Overridden by
    /// `WALSWEEP_REDIS_CLUSTER_NODES` (comma-separated). Default empty: one node at `url`.
    #[serde(default)]
    pub cluster_nodes: Vec<String>,
    /// How many replicas (of each primary touched, on a cluster) must acknowledge a batch's
    /// writes before walsweep confirms it to Postgres (`WAIT`). Redis replicates
    /// asynchronously: without it, a primary that dies right after applying a batch can take
    /// the batch's invalidations with it while its promoted replica still serves the stale
    /// entries. A batch not acknowledged within half of `timeout_ms` is applied again.
    /// Default 0 (do not wait).
    #[serde(default)]
    pub wait_for_replicas: u32,
}

impl RedisConfig {
    /// Whether walsweep talks to a Redis Cluster (`cluster_nodes`) rather than one node.
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: default_redis_url(),
            timeout_ms: DEFAULT_REDIS_TIMEOUT_MS,
            ca_file: None,
            cert_file: None,
            key_file: None,
            cluster_nodes: Vec::new(),
            wait_for_replicas: 0,
        }
    }
}

/// `[metrics]`: the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct MetricsConfig {
    /// `address:port` to listen on; an empty string disables the endpoint.
    /// Default `127.0.0.1:9187`.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

/// `[matroska]`: compatibility with the matroska-cache layout.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct MatroskaConfig {
    /// The `prefix` the app gave `RedisBackend`: data keys are `{prefix}::data::{key}` and
    /// dependency sets `{prefix}::rdep::{dep}`. Default `cache`.
    #[serde(default = "default_matroska_prefix")]
    pub(crate) prefix: String,
    /// Also delete a dependency set after unlinking its members, as the library does. Default
    /// false: keeping the set lets the next change find an entry written by a reader that raced
    /// the invalidation (measured: fewer stale entries). The app's TTL expires the set.
    #[serde(default)]
    pub(crate) remove_dependency_sets: bool,
    /// Apply each batch's invalidations a second time this many ms after Redis confirmed the
    /// whole batch. Default: off. It closes matroska-cache's refill race: a reader that read
    /// the old row before the commit and SETEXes it after walsweep's invalidation leaves a
    /// stale entry; the second invalidation removes it, because the kept dependency set still
    /// names the entry (so it needs `remove_dependency_sets = false`). Use a bit more than the
    /// app's longest read-to-fill time, e.g. 500. Pending second applications are kept in
    /// Redis (`walsweep:<database>/<slot>:reinvalidate`, one extra round trip per batch) before
    /// the slot is confirmed, so a crash does not lose them: the next start applies them. A
    /// clean stop applies them when due, so it takes up to this delay longer. Failures are
    /// retried a few times, then counted and logged. Memory: the effects of the last
    /// `reinvalidate_after_ms` wait, at most 100000 (beyond that the oldest are applied early,
    /// never dropped silently).
    #[serde(default)]
    pub(crate) reinvalidate_after_ms: Option<u64>,
    /// The `TimeZone` the app's database connections run with, as an IANA name, e.g.
    /// `America/New_York`. Default `UTC`. psycopg2 hands the app timestamptz values in that
    /// zone, so `str()` of one (in a dependency or scope string) carries the zone's offset at
    /// that instant, DST included; walsweep renders timestamptz the same way. Zone rules come
    /// from the tz database built into walsweep, not from the host.
    #[serde(default = "default_timezone")]
    pub(crate) timezone: String,
    /// Fenced fills (opt-in, exact): before each invalidation walsweep sets a fence
    /// (`walsweep:fence:<key>`, the commit's LSN) for every key it unlinks and every dependency
    /// set it invalidates (`walsweep:fence-all` for a table-wide one), and loads the Redis
    /// Functions `walsweep_fill_begin` / `walsweep_fill` with which an app's cache refuses a
    /// fill that began before a commit it may have missed (README, "Fenced fills";
    /// `clients/python` has a drop-in matroska-cache backend). Default false.
    #[serde(default)]
    pub(crate) fences: bool,
    /// How long a fence lives, in ms: well above the slowest fill (read the database, then
    /// store). Default 60000.
    #[serde(default = "default_fence_ttl_ms")]
    pub(crate) fence_ttl_ms: u64,
}

fn default_fence_ttl_ms() -> u64 {
    60_000
}

fn default_timezone() -> String {
    "UTC".into()
}

impl MatroskaConfig {
    /// The zone `timezone` names, or what to write instead.
    pub fn timezone(&self) -> Result<jiff::tz::TimeZone, String> {
        jiff::tz::TimeZone::get(&self.timezone).map_err(|_| {
            format!(
                "{:?} is not an IANA time zone name; use the TimeZone the app's connections \
                 run with, e.g. \"America/New_York\" or \"UTC\"",
                self.timezone
            )
        })
    }
}

impl Default for MatroskaConfig {
    fn default() -> Self {
        MatroskaConfig {
            prefix: default_matroska_prefix(),
            remove_dependency_sets: false,
            reinvalidate_after_ms: None,
            timezone: default_timezone(),
            fences: false,
            fence_ttl_ms: default_fence_ttl_ms(),
        }
    }
}

/// `[source]`: the Postgres primary and its logical replication slot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct SourceConfig {
    /// `postgres://user[:password]@host[:port]/database[?sslmode=verify-full&sslrootcert=...]`
    /// or a key=value string. Overridden by the `WALSWEEP_SOURCE_URL` environment variable.
    /// Settings it leaves out come from the libpq variables (`PGHOST`, `PGPORT`, `PGUSER`,
    /// `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`, ...) and the password file, as for psql (see
    /// `libpq`); without a URL, those alone say where to connect. Several hosts with
    /// `target_session_attrs=read-write` find the primary after a failover.
    /// Never logged (only host, port and database). TLS for both Postgres connections, as in
    /// libpq: `sslmode` = `disable`, `prefer` (default), `require`, `verify-ca` or
    /// `verify-full`; `sslrootcert` = CA PEM file (default `~/.postgresql/root.crt`, else the
    /// system trust store; `system` for the system store); `sslcert` + `sslkey` for a client
    /// certificate. See `pg::tls`.
    #[serde(default)]
    pub url: Option<String>,
    /// Logical replication slot (pgoutput). Default `walsweep`.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication naming the followed tables. Default `walsweep`.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Create the slot when it does not exist. Default true. With false, a missing slot stops
    /// walsweep with the command to create it.
    #[serde(default = "default_true")]
    pub create_slot: bool,
    /// Create the publication (`FOR TABLE` the `[[table]]` names) when it does not exist.
    /// Default true. Needs a role allowed to create publications on those tables.
    #[serde(default = "default_true")]
    pub create_publication: bool,
    /// Seconds between status updates sent to Postgres even when nothing happens, in ms.
    /// Default 1000. Keep it well below the server's `wal_sender_timeout` (default 60 s).
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
    /// `application_name` of walsweep's connections (shown in `pg_stat_replication`). Default:
    /// the URL's `application_name`, else `PGAPPNAME`, else `walsweep`.
    #[serde(default)]
    pub application_name: Option<String>,
    /// Committed transactions that may wait for the sink. When full, walsweep stops reading the
    /// replication socket (Postgres keeps the WAL) until the sink catches up. Default 1024.
    #[serde(default = "default_queue_capacity")]
    pub(crate) queue_capacity: usize,
    /// Most committed transactions applied in one sink batch. Default 512.
    #[serde(default = "default_batch_max_txns")]
    pub(crate) batch_max_txns: usize,
    /// Row changes after which a sink batch is applied even if it holds fewer than
    /// `batch_max_txns` transactions (the transaction that reaches it ends the batch;
    /// transactions are never split). Past a few thousand changes a batch's sets of keys
    /// outgrow the CPU caches, and walsweep spends more time allocating than it saves in round
    /// trips. Default 2048.
    #[serde(default = "default_batch_max_changes")]
    pub(crate) batch_max_changes: u64,
    /// First reconnect delay after a lost connection, in ms (doubles up to
    /// `reconnect_max_ms`, jittered). Default 100.
    #[serde(default = "default_reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in ms. Default 30000.
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// What to do when the slot is lost (Postgres removed WAL it needed, past
    /// `max_slot_wal_keep_size`), dropped (while walsweep runs, or while it is stopped: its
    /// record of the source in Redis tells that from a first start), or belongs to another WAL
    /// history (the database was replaced behind the URL): `fail` (default) stops with
    /// instructions; `recreate` creates a new slot and then clears every key and dependency set
    /// the rules maintain, the only honest recovery for a cache that missed changes.
    #[serde(default)]
    pub on_slot_lost: SlotLostPolicy,
    /// When the sink (Redis) has been failing this long, in ms, walsweep closes the replication
    /// connection until it recovers: Postgres keeps the WAL either way, but a connected
    /// walsender waiting for confirmations would also hold up a Postgres shutdown. Default 10000.
    #[serde(default = "default_release_slot_after_sink_outage_ms")]
    pub release_slot_after_sink_outage_ms: u64,
    /// When walsweep creates the slot (first start, or `on_slot_lost = "recreate"`), first load
    /// every `[[table.mirror]]` from the snapshot Postgres exports with it, so the mirrors start
    /// complete and consistent with the stream that follows (`walsweep snapshot` does the same
    /// on demand). Default false.
    #[serde(default)]
    pub warm_up: bool,
    /// Create the slot as a failover slot (Postgres 17+), and make an existing one one, so that
    /// standbys that sync slots (`sync_replication_slots = on`) keep a copy and walsweep
    /// resumes on the promoted standby without missing a change. `walsweep setup` prints what
    /// the primary and the standbys need. Default false.
    #[serde(default)]
    pub failover: bool,
    /// pgoutput protocol version: 1 (no streaming: Postgres spills large transactions to disk
    /// until they commit), 2 (streams them as they are written, Postgres 14+), 3 (15+), 4
    /// (16+). Default: the newest the server speaks. Prepared transactions are decoded when
    /// they commit (walsweep never asks for two-phase decoding: it acts on commits only).
    #[serde(default)]
    pub protocol_version: Option<u32>,
    /// Before applying a batch, wait until its transactions are visible to other sessions
    /// (one query per batch on an SQL connection). Postgres can send a commit before it is
    /// visible (after the flush, during a synchronous standby's wait); an invalidation in that
    /// window is refilled with the old row by the next reader. Default true.
    #[serde(default = "default_true")]
    pub visibility_gate: bool,
}

/// `source.on_slot_lost`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotLostPolicy {
    #[default]
    Fail,
    Recreate,
}

/// `[[table]]`: one followed table and what its changes invalidate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TableConfig {
    /// `schema.table`; a bare name means `public.name`.
    pub(crate) name: String,
    /// Key templates such as `article:{id}`: rendered from the old and the new row, and those
    /// keys are UNLINKed. `{column}` takes the column's text as Postgres prints it; `{{` and
    /// `}}` are literal braces.
    #[serde(default)]
    pub(crate) keys: Vec<String>,
    /// matroska-cache dependency templates such as `id:article:{id}` or `pk:Article:{id}`:
    /// each rendered dependency's set `{prefix}::rdep::{dep}` is invalidated (every member key
    /// unlinked). Values render as Python `str()` would (`True`, `None`, ...).
    #[serde(default)]
    pub(crate) deps: Vec<String>,
    /// When set, an UPDATE that changes none of these columns invalidates no key and no
    /// dependency (unchanged TOAST counts as unchanged). Scopes use their own columns.
    #[serde(default)]
    pub(crate) columns: Option<Vec<String>>,
    /// Operations this table's rules react to: any of `insert`, `update`, `delete`,
    /// `truncate`. Default: all four.
    #[serde(default)]
    pub(crate) ops: Option<Vec<OpName>>,
    /// matroska-cache `Scopes`, see `ScopeConfig`.
    #[serde(default)]
    pub(crate) scope: Vec<ScopeConfig>,
    /// Rows kept current in Redis instead of invalidated, see `MirrorConfig`.
    #[serde(default)]
    pub(crate) mirror: Vec<MirrorConfig>,
}

/// `[[table.scope]]`: a matroska-cache `Scopes(name)` described by `columns`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub(crate) struct ScopeConfig {
    /// The name given to `Scopes(...)` in the app, e.g. `Article`.
    pub(crate) name: String,
    /// The described columns (the keys of the app's `condition(...)` call).
    pub(crate) columns: Vec<String>,
}

/// An operation name in `ops`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OpName {
    Insert,
    Update,
    Delete,
    Truncate,
}

fn default_release_slot_after_sink_outage_ms() -> u64 {
    DEFAULT_RELEASE_SLOT_AFTER_SINK_OUTAGE_MS
}
/// What `[redis]`'s URLs get wrong: one node's `url`, or a cluster's `cluster_nodes`.
fn redis_endpoint_problems(
    redis: &RedisConfig,
    matroska: &MatroskaConfig,
) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    let parse = |url: &str| -> Option<::redis::ConnectionInfo> {
        ::redis::IntoConnectionInfo::into_connection_info(url).ok()
    };
    let is_tls = |info: &::redis::ConnectionInfo| {
        matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. })
    };
    let (key, tls) = if redis.is_cluster() {
        if redis.url != default_redis_url() {
            problems.push((
                "redis.cluster_nodes",
                "set either redis.url (one Redis node) or redis.cluster_nodes (a Redis \
                 Cluster), not both"
                    .into(),
            ));
        }
        let mut schemes_tls = Vec::new();
        for (i, node) in redis.cluster_nodes.iter().enumerate() {
            match parse(node) {
                None => problems.push((
                    "redis.cluster_nodes",
                    format!(
                        "entry {} is not a valid Redis URL; expected \
                         redis://[user:password@]host:port (rediss:// for TLS)",
                        i + 1
                    ),
                )),
                Some(info) => {
                    if info.redis_settings().db() != 0 {
                        problems.push((
                            "redis.cluster_nodes",
                            format!(
                                "entry {} names database {}: a Redis Cluster has only database \
                                 0, so leave the /db part out",
                                i + 1,
                                info.redis_settings().db()
                            ),
                        ));
                    }
                    schemes_tls.push(is_tls(&info));
                }
            }
        }
        if schemes_tls.iter().any(|t| *t) && schemes_tls.iter().any(|t| !*t) {
            problems.push((
                "redis.cluster_nodes",
                "mixes redis:// and rediss:// URLs; the nodes of one cluster all use TLS or none \
                 does"
                    .into(),
            ));
        }
        if matroska.fences {
            problems.push((
                "matroska.fences",
                "fenced fills are not supported on a Redis Cluster yet (a fill's key, its \
                 dependency sets and their fences live in different hash slots); remove \
                 matroska.fences or use one Redis node"
                    .into(),
            ));
        }
        (
            "redis.cluster_nodes",
            schemes_tls.first().copied().unwrap_or(false),
        )
    } else {
        match parse(&redis.url) {
            None => {
                problems.push((
                    "redis.url",
                    "not a valid Redis URL; expected redis://[user:password@]host:port/db \
                     (rediss:// for TLS)"
                        .into(),
                ));
                return problems;
            }
            Some(info) => ("redis.url", is_tls(&info)),
        }
    };
    for (file_key, set) in [
        ("redis.ca_file", redis.ca_file.is_some()),
        ("redis.cert_file", redis.cert_file.is_some()),
    ] {
        if set && !tls {
            problems.push((
                file_key,
                if key == "redis.url" {
                    "only applies to TLS; use a rediss:// URL in redis.url".into()
                } else {
                    format!("only applies to TLS; use rediss:// URLs in {key}")
                },
            ));
        }
    }
    problems
}

fn default_redis_url() -> String {
    DEFAULT_REDIS_URL.into()
}
fn default_redis_timeout_ms() -> u64 {
    DEFAULT_REDIS_TIMEOUT_MS
}
fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.into()
}
fn default_matroska_prefix() -> String {
    DEFAULT_MATROSKA_PREFIX.into()
}
fn default_slot() -> String {
    DEFAULT_SLOT.into()
}
fn default_publication() -> String {
    DEFAULT_PUBLICATION.into()
}
fn default_true() -> bool {
    true
}
fn default_status_interval_ms() -> u64 {
    DEFAULT_STATUS_INTERVAL_MS
}
fn default_queue_capacity() -> usize {
    DEFAULT_QUEUE_CAPACITY
}
fn default_batch_max_txns() -> usize {
    DEFAULT_BATCH_MAX_TXNS
}
fn default_batch_max_changes() -> u64 {
    DEFAULT_BATCH_MAX_CHANGES
}
fn default_reconnect_min_ms() -> u64 {
    DEFAULT_RECONNECT_MIN_MS
}
fn default_reconnect_max_ms() -> u64 {
    DEFAULT_RECONNECT_MAX_MS
}

impl SourceConfig {
    /// A source with every default, for tests and embedded use.
    pub fn new(url: impl Into<String>) -> Self {
        SourceConfig {
            url: Some(url.into()),
            slot: default_slot(),
            publication: default_publication(),
            create_slot: true,
            create_publication: true,
            status_interval_ms: DEFAULT_STATUS_INTERVAL_MS,
            application_name: None,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            batch_max_txns: DEFAULT_BATCH_MAX_TXNS,
            batch_max_changes: DEFAULT_BATCH_MAX_CHANGES,
            reconnect_min_ms: DEFAULT_RECONNECT_MIN_MS,
            reconnect_max_ms: DEFAULT_RECONNECT_MAX_MS,
            on_slot_lost: SlotLostPolicy::Fail,
            release_slot_after_sink_outage_ms: DEFAULT_RELEASE_SLOT_AFTER_SINK_OUTAGE_MS,
            warm_up: false,
            failover: false,
            protocol_version: None,
            visibility_gate: true,
        }
    }

    pub(crate) fn status_interval(&self) -> Duration {
        Duration::from_millis(self.status_interval_ms)
    }

    pub(crate) fn reconnect_min(&self) -> Duration {
        Duration::from_millis(self.reconnect_min_ms)
    }

    pub(crate) fn reconnect_max(&self) -> Duration {
        Duration::from_millis(self.reconnect_max_ms)
    }

    /// The connection settings, from the URL and the process's libpq environment.
    pub fn connect_params(&self) -> Result<ConnectParams, ConfigError> {
        Ok(self
            .resolve_connection(&|name| std::env::var(name).ok())?
            .params)
    }

    /// The connection settings, from the URL and `env` (see `libpq`), and where each came
    /// from. Reads the certificate files now, so a wrong path stops walsweep at start-up (and
    /// in `check`) rather than at the first connection; they are read again per connection.
    pub(crate) fn resolve_connection(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<libpq::Resolved, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: None,
            problems: vec![Problem {
                key: "source.url".into(),
                line: None,
                message,
            }],
        };
        // Without a URL, walsweep connects as psql would only when the libpq variables say
        // where to: the defaults alone (localhost as the OS user) are more likely a forgotten
        // URL than an intent.
        if self.url.is_none()
            && LIBPQ_TARGET_ENV
                .iter()
                .all(|v| env(v).is_none_or(|v| v.is_empty()))
        {
            return Err(invalid(format!(
                "no source: set source.url, the {SOURCE_URL_ENV} environment variable, or the \
                 libpq variables ({})",
                LIBPQ_TARGET_ENV.join(", ")
            )));
        }
        let resolved = libpq::resolve(self.url.as_deref(), self.application_name.as_deref(), env)
            .map_err(|e| match e {
            libpq::ResolveError::Invalid(message) => invalid(message),
            libpq::ResolveError::Tls(source) => ConfigError::SourceTls { source },
        })?;
        resolved
            .params
            .tls
            .connector()
            .map_err(|source| ConfigError::SourceTls { source })?;
        Ok(resolved)
    }
}

/// libpq variables that say which server to connect to: one of them (or a URL) is needed.
const LIBPQ_TARGET_ENV: &[&str] = &["PGHOST", "PGPORT", "PGUSER", "PGDATABASE"];

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted TOML path, e.g. `source.status_interval_ms` or `table[2].name`.
    pub(crate) key: String,
    pub(crate) line: Option<usize>,
    pub(crate) message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(path.as_deref(), problems))]
    Invalid {
        path: Option<PathBuf>,
        problems: Vec<Problem>,
    },
    /// The TLS files `source.url` names cannot be used. Worded like an `Invalid` problem
    /// without a file (`config: key: ...`), the problem being the source.
    #[error("config: source.url")]
    SourceTls {
        #[source]
        source: crate::pg::tls::TlsError,
    },
}

fn render_problems(path: Option<&Path>, problems: &[Problem]) -> String {
    let file = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "config".into());
    problems
        .iter()
        .map(|p| match p.line {
            Some(line) => format!("{file}:{line}: {}: {}", p.key, p.message),
            None => format!("{file}: {}: {}", p.key, p.message),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Reads, parses and validates a file, then applies environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Invalid { problems, .. } => ConfigError::Invalid {
                path: Some(path.to_path_buf()),
                problems,
            },
            other => other,
        })?;
        config.apply_env(|name| std::env::var(name).ok());
        Ok(config)
    }

    /// Parses and validates TOML text (no environment).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: None,
            problems: vec![Problem {
                key: "toml".into(),
                line: e.span().map(|s| line_of(text, s.start)),
                message: e.message().to_string(),
            }],
        })?;
        let problems = config.validate(text);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: None,
                problems,
            })
        }
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(url) = get(SOURCE_URL_ENV).filter(|u| !u.is_empty()) {
            self.source.url = Some(url);
        }
        if let Some(url) = get(REDIS_URL_ENV).filter(|u| !u.is_empty()) {
            self.redis.url = url;
        }
        if let Some(nodes) = get(REDIS_CLUSTER_NODES_ENV).filter(|u| !u.trim().is_empty()) {
            self.redis.cluster_nodes = nodes
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
        }
    }

    /// Every problem the file has, each with its line when it can be found.
    fn validate(&self, text: &str) -> Vec<Problem> {
        let mut problems = self.problems();
        // Lines come from a second parse, paid only by a file that has problems.
        if !problems.is_empty() {
            let locator = Locator::new(text);
            for p in &mut problems {
                p.line = locator.locate(&p.key);
            }
        }
        problems
    }

    /// Every problem the file has, without lines.
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_string(),
                line: None,
                message,
            })
        };
        let s = &self.source;
        if s.slot.is_empty()
            || !s
                .slot
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            problem(
                "source.slot",
                format!(
                    "slot name {:?} is invalid: Postgres allows only lowercase letters, digits \
                     and underscores",
                    s.slot
                ),
            );
        }
        if s.publication.is_empty() {
            problem("source.publication", "publication name is empty".into());
        }
        if s.status_interval_ms == 0 {
            problem(
                "source.status_interval_ms",
                "must be at least 1 (ms); 1000 is a good value".into(),
            );
        }
        if let Some(version) = s.protocol_version {
            if !(1..=crate::pg::pgoutput_options::NEWEST_PROTOCOL_VERSION).contains(&version) {
                problem(
                    "source.protocol_version",
                    format!(
                        "{version} is not a pgoutput protocol version walsweep speaks; use 1 to \
                         {}, or leave it out for the newest the server speaks",
                        crate::pg::pgoutput_options::NEWEST_PROTOCOL_VERSION
                    ),
                );
            }
        }
        if s.queue_capacity == 0 {
            problem("source.queue_capacity", "must be at least 1".into());
        }
        if s.batch_max_txns == 0 {
            problem("source.batch_max_txns", "must be at least 1".into());
        }
        if s.batch_max_changes == 0 {
            problem("source.batch_max_changes", "must be at least 1".into());
        }
        if s.release_slot_after_sink_outage_ms == 0 {
            problem(
                "source.release_slot_after_sink_outage_ms",
                "must be at least 1 (ms); 10000 is a good value".into(),
            );
        }
        if s.reconnect_min_ms == 0 || s.reconnect_min_ms > s.reconnect_max_ms {
            problem(
                "source.reconnect_min_ms",
                "must be at least 1 and at most source.reconnect_max_ms".into(),
            );
        }
        if let Some(url) = &s.url {
            // The file alone, without the environment: what the URL itself gets wrong.
            match libpq::resolve(Some(url), None, &|_| None) {
                Err(libpq::ResolveError::Invalid(message)) => problem("source.url", message),
                Err(libpq::ResolveError::Tls(e)) => problem("source.url", e.to_string()),
                Ok(_) => {}
            }
        }
        for problem_found in redis_endpoint_problems(&self.redis, &self.matroska) {
            problem(problem_found.0, problem_found.1);
        }
        if let Some(stream) = self.broadcast.as_ref().and_then(|b| b.stream.as_deref()) {
            if self.redis.is_cluster() && hash_slot::same_slot_key(stream, "").is_none() {
                problem(
                    "broadcast.stream",
                    format!(
                        "{stream:?} cannot be used on a Redis Cluster: walsweep keeps the \
                         stream's chain state in a key of the same hash slot, and a name with \
                         '}}' but no hash tag has none; give it a hash tag (e.g. \
                         \"{{walsweep}}:changes\") or leave '}}' out"
                    ),
                );
            }
        }
        if self.redis.cert_file.is_some() != self.redis.key_file.is_some() {
            problem(
                if self.redis.cert_file.is_some() {
                    "redis.cert_file"
                } else {
                    "redis.key_file"
                },
                "redis.cert_file and redis.key_file go together; set both or neither".into(),
            );
        }
        if self.redis.timeout_ms == 0 {
            problem(
                "redis.timeout_ms",
                "must be at least 1 (ms); 5000 is a good value".into(),
            );
        }
        if !self.metrics.listen.is_empty()
            && self.metrics.listen.parse::<std::net::SocketAddr>().is_err()
        {
            problem(
                "metrics.listen",
                format!(
                    "{:?} is not address:port, e.g. 127.0.0.1:9187 (empty disables the endpoint)",
                    self.metrics.listen
                ),
            );
        }
        if self.matroska.prefix.is_empty() {
            problem(
                "matroska.prefix",
                "must not be empty (matroska-cache's default is \"cache\")".into(),
            );
        }
        if let Some(ms) = self.matroska.reinvalidate_after_ms {
            if ms == 0 || ms > MAX_REINVALIDATE_AFTER_MS {
                problem(
                    "matroska.reinvalidate_after_ms",
                    format!(
                        "must be between 1 and {MAX_REINVALIDATE_AFTER_MS} (ms); a bit more than \
                         the app's read-to-fill time, e.g. 500, or remove it to turn it off"
                    ),
                );
            }
        }
        if self.matroska.fence_ttl_ms == 0 {
            problem(
                "matroska.fence_ttl_ms",
                "must be at least 1 (ms); well above the app's slowest fill, e.g. 60000".into(),
            );
        }
        if let Err(message) = self.matroska.timezone() {
            problem("matroska.timezone", message);
        }
        for (i, table) in self.tables.iter().enumerate() {
            let parts: Vec<&str> = table.name.split('.').collect();
            if table.name.is_empty() || parts.len() > 2 || parts.iter().any(|p| p.is_empty()) {
                problem(
                    &format!("table[{i}].name"),
                    format!(
                        "table name {:?} is invalid; write schema.table, e.g. public.articles",
                        table.name
                    ),
                );
            }
            for (field, templates) in [("keys", &table.keys), ("deps", &table.deps)] {
                for (j, source) in templates.iter().enumerate() {
                    let key = format!("table[{i}].{field}[{j}]");
                    match template::Template::parse(source) {
                        Err(e) => problem(&key, format!("template {source:?}: {e}")),
                        Ok(t) if t.literal_prefix().is_empty() => problem(
                            &key,
                            format!(
                                "template {source:?} must start with literal text (e.g. \
                                 \"article:{{id}}\"): a table-wide invalidation removes \
                                 everything starting with that text"
                            ),
                        ),
                        Ok(t) if t.columns().next().is_none() => problem(
                            &key,
                            format!("template {source:?} names no column; write e.g. \"article:{{id}}\""),
                        ),
                        Ok(_) => {}
                    }
                }
            }
            if let Some(ops) = &table.ops {
                if ops.is_empty() {
                    problem(
                        &format!("table[{i}].ops"),
                        "is empty; remove it to react to every operation".into(),
                    );
                }
            }
            if let Some(columns) = &table.columns {
                if columns.is_empty() {
                    problem(
                        &format!("table[{i}].columns"),
                        "is empty, so no UPDATE would ever invalidate; remove it to react to \
                         every column"
                            .into(),
                    );
                }
            }
            for (j, m) in table.mirror.iter().enumerate() {
                mirror::validate_mirror(&format!("table[{i}].mirror[{j}]"), m, &mut problem);
            }
            for (j, scope) in table.scope.iter().enumerate() {
                if scope.name.is_empty() {
                    problem(
                        &format!("table[{i}].scope[{j}].name"),
                        "is empty; use the name given to Scopes(...)".into(),
                    );
                }
                if scope.columns.is_empty() {
                    problem(
                        &format!("table[{i}].scope[{j}].columns"),
                        "is empty; list the columns the app's condition(...) uses".into(),
                    );
                }
            }
        }
        if let Some(b) = &self.broadcast {
            mirror::validate_broadcast(b, &self.qualified_tables(), &mut problem);
        }
        if let Some(i) = &self.inspect {
            inspect::validate_inspect(i, &mut problem);
        }
        problems
    }

    /// Things that work but are probably not what was meant: `run` logs them, `check` prints
    /// them (and `check --deny-warnings` fails).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.tables.is_empty() {
            out.push("no [[table]] is configured: walsweep will follow nothing".to_string());
        }
        if self.matroska.reinvalidate_after_ms.is_some() && self.matroska.remove_dependency_sets {
            out.push(
                "matroska.reinvalidate_after_ms with remove_dependency_sets = true: the first \
                 invalidation deletes the sets, so the second cannot find racing entries"
                    .to_string(),
            );
        }
        for (i, t) in self.tables.iter().enumerate() {
            if t.keys.is_empty() && t.deps.is_empty() && t.scope.is_empty() && t.mirror.is_empty() {
                out.push(format!(
                    "table[{i}] ({}) has no keys, deps, scope or mirror: its changes do nothing",
                    t.name
                ));
            }
        }
        if self.source.warm_up
            && !self
                .tables
                .iter()
                .any(|t| t.mirror.iter().any(|m| !m.only_if_present))
        {
            out.push(
                "source.warm_up = true, but every [[table.mirror]] is only_if_present (or there \
                 is none), and warm-up skips those, so it loads nothing; remove warm_up or add a \
                 mirror without only_if_present"
                    .to_string(),
            );
        }
        mirror::prefix_warnings(self, &mut out);
        inspect::inspect_warnings(self, &mut out);
        out
    }

    /// Table names as `schema.table`.
    pub fn qualified_tables(&self) -> Vec<String> {
        self.tables
            .iter()
            .map(|t| {
                if t.name.contains('.') {
                    t.name.clone()
                } else {
                    format!("public.{}", t.name)
                }
            })
            .collect()
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Finds the line of a dotted config path such as `source.slot`, `table[2].keys[0]` or
/// `table[0].mirror[1].index[0].score` in the spans toml records while parsing, so table headers
/// with comments, dotted keys and inline tables resolve like plain `[section]` + `key = ...`.
/// A path that ends early (a field left at its default) falls back to its deepest part found,
/// usually the section's header. Lookups are by key and index, so reporting many problems stays
/// linear in the file's size.
struct Locator<'t> {
    /// `None` only if toml rejects text it has just accepted; problems then go without lines.
    root: Option<DeTable<'t>>,
    /// Byte offset where each line starts.
    line_starts: Vec<usize>,
}

impl<'t> Locator<'t> {
    fn new(text: &'t str) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Locator {
            root: DeTable::parse(text).ok().map(Spanned::into_inner),
            line_starts,
        }
    }

    fn locate(&self, path: &str) -> Option<usize> {
        let mut table = self.root.as_ref()?;
        let mut found = None;
        for segment in path.split('.') {
            let (name, nth) = match segment.split_once('[') {
                Some((name, rest)) => (name, rest.strip_suffix(']')?.parse::<usize>().ok()),
                None => (segment, None),
            };
            let Some((key, mut value)) = table.get_key_value(name) else {
                break;
            };
            found = Some(key.span().start);
            if let Some(nth) = nth {
                // `[[header]]` or `{ ... }` of an array's table, or an array's string.
                let Some(item) = value.get_ref().as_array().and_then(|a| a.get(nth)) else {
                    break;
                };
                found = Some(item.span().start);
                value = item;
            }
            let Some(inner) = value.get_ref().as_table() else {
                break;
            };
            table = inner;
        }
        found.map(|offset| self.line_starts.partition_point(|&start| start <= offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_file_gets_defaults() {
        let c = Config::parse("[source]\nurl = \"postgres://u@h/db\"\n").unwrap();
        assert_eq!(c.source.slot, "walsweep");
        assert_eq!(c.source.publication, "walsweep");
        assert!(c.source.create_slot);
        assert_eq!(c.source.status_interval(), Duration::from_secs(1));
    }

    #[test]
    fn malformed_files_report_line_and_fix() {
        let cases = [
            (
                "[source]\nurl = \"postgres://u@h/db\"\nslott = \"x\"\n",
                "config:3: toml: unknown field `slott`",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\nslot = \"Bad-Slot\"\n",
                "config:3: source.slot: slot name \"Bad-Slot\" is invalid",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\nstatus_interval_ms = 0\n",
                "config:3: source.status_interval_ms: must be at least 1",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\nstatus_interval_ms = \"fast\"\n",
                "config:3: toml: invalid type: string \"fast\", expected u64",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[[table]]\nname = \"a.b.c\"\n",
                "config:4: table[0].name: table name \"a.b.c\" is invalid",
            ),
            ("[sorce]\n", "config:1: toml: unknown field `sorce`"),
            ("", "config:1: toml: missing field `source`"),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[[table]]\nname = \"a\"\n[[table]]\nname = \"b\"\nkeys = [\"b:{id\"]\n",
                "config:7: table[1].keys[0]: template \"b:{id\": unclosed `{` at byte 2",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[[table]]\nname = \"a\"\ndeps = [\"{id}\"]\n",
                "config:5: table[0].deps[0]: template \"{id}\" must start with literal text",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[[table]]\nname = \"a\"\n[[table.scope]]\nname = \"A\"\ncolumns = []\n",
                "config:7: table[0].scope[0].columns: is empty",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[[table]]\nname = \"a\"\nops = [\"upsert\"]\n",
                "config:5: toml: unknown variant `upsert`",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[metrics]\nlisten = \"nine\"\n",
                "config:4: metrics.listen: \"nine\" is not address:port",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[matroska]\nreinvalidate_after_ms = 0\n",
                "config:4: matroska.reinvalidate_after_ms: must be between 1 and 600000",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[matroska]\ntimezone = \"EST5EDT-ish\"\n",
                "config:4: matroska.timezone: \"EST5EDT-ish\" is not an IANA time zone name; use \
                 the TimeZone the app's connections run with, e.g. \"America/New_York\"",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[redis]\nurl = \"http://x\"\n",
                "config:4: redis.url: not a valid Redis URL",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[[table]]\nname = \"a\"\n[[table.scope]]\nname = \"A\"\ncolumns = [\"x\"]\nextra = 1\n",
                "config:8: toml: unknown field `extra`",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[[table]] # articles\nname = \"a.b.c\"\n",
                "config:4: table[0].name: table name \"a.b.c\" is invalid",
            ),
            (
                "[source] # primary\nurl = \"postgres://u@h/db\"\nslot = \"Bad-Slot\"\n",
                "config:3: source.slot: slot name \"Bad-Slot\" is invalid",
            ),
            (
                "redis.url = \"http://x\"\n[source]\nurl = \"postgres://u@h/db\"\n",
                "config:1: redis.url: not a valid Redis URL",
            ),
            (
                "source.url = \"postgres://u@h/db\"\nsource.slot = \"Bad-Slot\"\n",
                "config:2: source.slot: slot name \"Bad-Slot\" is invalid",
            ),
            (
                "[source]\nurl = \"postgres://u@h/db\"\n[[table]]\nname = \"a\"\n\
                 mirror = [\n  { key = \"a:{id}\" },\n  { key = \"row\" },\n]\n",
                "config:7: table[0].mirror[1].key: template \"row\" names no column",
            ),
            (
                "table = [{ name = \"a\" }, { name = \"b\", keys = [\n  \"b:{id}\",\n  \"b:{id\",\n] }]\n\
                 [source]\nurl = \"postgres://u@h/db\"\n",
                "config:3: table[1].keys[1]: template \"b:{id\": unclosed `{`",
            ),
        ];
        for (text, expected) in cases {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(
                err.starts_with(expected),
                "for {text:?}:\n got {err}\nwant {expected}"
            );
        }
    }

    #[test]
    fn several_problems_are_reported_together() {
        let err = Config::parse(
            "[source]\nurl = \"postgres://u@h/db\"\nslot = \"\"\nqueue_capacity = 0\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("source.slot"), "{err}");
        assert!(err.contains("source.queue_capacity"), "{err}");
    }

    #[test]
    fn environment_overrides_url_and_bad_url_is_not_echoed() {
        let mut c = Config::parse("[source]\nurl = \"postgres://u@h/db\"\n").unwrap();
        c.apply_env(|k| (k == SOURCE_URL_ENV).then(|| "postgres://u:secret@other/db".into()));
        assert_eq!(
            c.source.url.as_deref(),
            Some("postgres://u:secret@other/db")
        );
        let err = Config::parse("[source]\nurl = \"postgres://u:hunter2@h:notaport/db\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("source.url"), "{err}");
        assert!(!err.contains("hunter2"), "password leaked: {err}");
    }

    #[test]
    fn without_a_url_the_libpq_variables_say_where_to_connect() {
        let c = Config::parse("[source]\n").unwrap();
        let err = c
            .source
            .resolve_connection(&|k| (k == "HOME").then(|| "/home/op".into()))
            .err()
            .expect("no URL and no PG* variables must fail")
            .to_string();
        assert!(
            err.contains(SOURCE_URL_ENV) && err.contains("PGHOST"),
            "{err}"
        );
        let env = |k: &str| match k {
            "PGHOST" => Some("db.internal".to_string()),
            "PGUSER" => Some("walsweep".to_string()),
            _ => None,
        };
        let resolved = c.source.resolve_connection(&env).unwrap();
        assert_eq!(resolved.params.target(), "db.internal:5432/walsweep");
        assert!(
            resolved.describe().contains("host db.internal (PGHOST)"),
            "{}",
            resolved.describe()
        );
    }
}
