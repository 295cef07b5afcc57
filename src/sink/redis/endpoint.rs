//! Where the sink's Redis is: one node (`redis.url`) or a Redis Cluster
//! (`redis.cluster_nodes`), and the one connection type the sink's code talks through.
//!
//! On a cluster, a command with keys goes to the node serving their hash slot, and the client
//! follows MOVED and ASK redirections by itself; a multi-key UNLINK is split per slot and sent to
//! the nodes concurrently. What it cannot do (a pipeline or a script across slots) the sink
//! groups per slot itself (`cluster`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{
    Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, TlsCertificates, Value,
};

use super::errors::sink_error_at;
use crate::config::RedisConfig;
use crate::sink::SinkError;

/// Why `[redis]` does not give a usable client. Never echoes the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    #[error(
        "redis.url is not a valid Redis URL ({0:?}); expected redis://[user:password@]host:port/db, \
         or rediss:// for TLS"
    )]
    Url(ErrorKind),
    #[error("redis.{key} needs TLS: use a rediss:// URL in redis.url, or remove redis.{key}")]
    NotTls { key: &'static str },
    #[error("redis.cert_file and redis.key_file go together; set both or neither")]
    ClientCertPair,
    #[error(
        "cannot read redis.{key} {}; fix the path in [redis] or make the file readable by \
         walsweep", path.display()
    )]
    ReadFile {
        key: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("redis.{key} {} is not usable: {reason}", path.display())]
    BadFile {
        key: &'static str,
        path: std::path::PathBuf,
        reason: &'static str,
        /// None when the file is valid PEM without the item: the reason already says so.
        #[source]
        source: Option<rustls::pki_types::pem::Error>,
    },
    #[error("cannot set up TLS for Redis from redis.ca_file / cert_file / key_file")]
    Tls(#[source] RedisError),
}

/// The client for one Redis node at `redis.url`, plus `ca_file` / `cert_file` / `key_file` for a
/// `rediss://` URL (otherwise the system trust store verifies the server). Used by the sink, the
/// health probe and `check`, so all three connect the same way. A cluster: `cluster_client`.
pub fn redis_client(redis: &RedisConfig) -> Result<::redis::Client, RedisClientError> {
    let client =
        ::redis::Client::open(redis.url.as_str()).map_err(|e| RedisClientError::Url(e.kind()))?;
    match tls_certificates(redis, is_tls(client.get_connection_info()))? {
        None => Ok(client),
        Some(certificates) => ::redis::Client::build_with_tls(redis.url.as_str(), certificates)
            .map_err(RedisClientError::Tls),
    }
}

/// The client for the Redis Cluster at `redis.cluster_nodes`: TLS, user and password as for one
/// node (from the first URL), timeouts from `redis.timeout_ms`.
pub fn cluster_client(redis: &RedisConfig) -> Result<ClusterClient, RedisClientError> {
    cluster_client_with_retries(redis, CLUSTER_RETRIES)
}

fn cluster_client_with_retries(
    redis: &RedisConfig,
    retries: u32,
) -> Result<ClusterClient, RedisClientError> {
    let mut infos = Vec::with_capacity(redis.cluster_nodes.len());
    for url in &redis.cluster_nodes {
        infos.push(
            ::redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| RedisClientError::Url(e.kind()))?,
        );
    }
    let tls = infos.first().is_some_and(is_tls);
    let timeout = Duration::from_millis(redis.timeout_ms);
    let mut builder = ClusterClientBuilder::new(infos)
        .connection_timeout(timeout)
        .response_timeout(timeout)
        // Redirections (MOVED, ASK) and "not now" replies (TRYAGAIN, CLUSTERDOWN) are retried
        // by the client a few times; past that the sink's own retry takes over, forever.
        .retries(retries)
        // The client's defaults wait 1.28 s to 11 min between tries; a failover or a slot
        // hand-over takes seconds, and the whole request stays bounded by `timeout_ms`.
        .min_retry_wait(10)
        .max_retry_wait(250);
    if let Some(certificates) = tls_certificates(redis, tls)? {
        builder = builder.certs(certificates);
    }
    builder.build().map_err(RedisClientError::Tls)
}

/// Client-side retries of one cluster request before it fails to the sink.
const CLUSTER_RETRIES: u32 = 6;

/// A client for one node for Pub/Sub: `redis.url`, or on a cluster the first seed node that
/// answers (a cluster forwards every PUBLISH to all its nodes, so any node hears it).
pub async fn pubsub_connection(redis: &RedisConfig) -> Result<::redis::aio::PubSub, String> {
    let urls: Vec<&String> = if redis.is_cluster() {
        redis.cluster_nodes.iter().collect()
    } else {
        vec![&redis.url]
    };
    let mut last = String::from("no Redis node configured");
    for url in urls {
        let node = RedisConfig {
            url: url.clone(),
            cluster_nodes: Vec::new(),
            ..redis.clone()
        };
        let client = redis_client(&node).map_err(|e| e.to_string())?;
        match client.get_async_pubsub().await {
            Ok(pubsub) => return Ok(pubsub),
            Err(e) => {
                last = format!(
                    "connecting to {} for SUBSCRIBE: {e}",
                    client.get_connection_info().addr()
                )
            }
        }
    }
    Err(last)
}

fn is_tls(info: &::redis::ConnectionInfo) -> bool {
    matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. })
}

/// The certificates `ca_file` / `cert_file` / `key_file` name, checked; `None` when none is set.
fn tls_certificates(
    redis: &RedisConfig,
    is_tls: bool,
) -> Result<Option<TlsCertificates>, RedisClientError> {
    use ::redis::ClientTlsConfig;
    use rustls::pki_types::pem::{self, PemObject};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    if is_tls {
        // The redis crate builds its rustls configuration with the process default provider.
        crate::pg::tls::crypto_provider();
    }
    if redis.ca_file.is_none() && redis.cert_file.is_none() && redis.key_file.is_none() {
        return Ok(None);
    }
    for (key, set) in [
        ("ca_file", redis.ca_file.is_some()),
        ("cert_file", redis.cert_file.is_some()),
        ("key_file", redis.key_file.is_some()),
    ] {
        if set && !is_tls {
            return Err(RedisClientError::NotTls { key });
        }
    }
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| RedisClientError::ReadFile {
            key,
            path: path.to_path_buf(),
            source,
        })
    };
    let bad = |key: &'static str,
               path: &std::path::Path,
               reason: &'static str,
               source: Option<pem::Error>| RedisClientError::BadFile {
        key,
        path: path.to_path_buf(),
        reason,
        source,
    };
    // The redis crate would accept a file without certificates and then fail every handshake;
    // check the PEM here so the message names the file.
    let certs = |key: &'static str, path: &std::path::Path| {
        let pem = read(key, path)?;
        match CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>() {
            Ok(certs) if certs.is_empty() => Err(bad(
                key,
                path,
                "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
                None,
            )),
            Ok(_) => Ok(pem),
            Err(e) => Err(bad(key, path, "invalid PEM", Some(e))),
        }
    };
    let root_cert = match &redis.ca_file {
        Some(path) => Some(certs("ca_file", path)?),
        None => None,
    };
    let client_tls = match (&redis.cert_file, &redis.key_file) {
        (Some(cert), Some(key)) => {
            let client_cert = certs("cert_file", cert)?;
            let client_key = read("key_file", key)?;
            PrivateKeyDer::from_pem_slice(&client_key).map_err(|e| {
                bad(
                    "key_file",
                    key,
                    "no usable PEM private key in it",
                    match e {
                        pem::Error::NoItemsFound => None,
                        other => Some(other),
                    },
                )
            })?;
            Some(ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
        (None, None) => None,
        _ => return Err(RedisClientError::ClientCertPair),
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// The `[redis]` deployment the sink, the drift checks' readback and the CLI talk to.
#[derive(Clone)]
pub(crate) enum Endpoint {
    Node {
        client: ::redis::Client,
        config: ConnectionManagerConfig,
    },
    Cluster {
        client: ClusterClient,
        /// For pipelines: the same nodes with no client-side retries (see `RedisConn::Cluster`).
        pipeline_client: Box<ClusterClient>,
        /// `host:port` of the seed nodes, for messages.
        seeds: String,
        /// Set once the cluster refused `invalidate_node.lua` (an ACL without EVAL, a Redis
        /// before 7.0): invalidations then go one command per hash slot (`cluster`), for the
        /// life of the process.
        node_scripts_refused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    },
}

impl Endpoint {
    /// The client for `[redis]` and how its connections time out and retry: the sink and the
    /// drift checks' readback connect the same way.
    pub(crate) fn new(redis: &RedisConfig) -> Result<Endpoint, SinkError> {
        let invalid = |e: RedisClientError| SinkError {
            operation: "set up the Redis client from [redis]",
            retryable: false,
            source: Box::new(e),
        };
        if redis.is_cluster() {
            return Ok(Endpoint::Cluster {
                client: cluster_client(redis).map_err(invalid)?,
                pipeline_client: Box::new(cluster_client_with_retries(redis, 0).map_err(invalid)?),
                seeds: redis
                    .cluster_nodes
                    .iter()
                    .filter_map(|url| {
                        ::redis::IntoConnectionInfo::into_connection_info(url.as_str()).ok()
                    })
                    .map(|info| info.addr().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                node_scripts_refused: Default::default(),
            });
        }
        let client = redis_client(redis).map_err(invalid)?;
        let timeout = Duration::from_millis(redis.timeout_ms);
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        Ok(Endpoint::Node { client, config })
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Endpoint::Cluster { .. })
    }

    /// Where Redis is, for messages (never the password).
    pub(crate) fn target(&self) -> String {
        match self {
            Endpoint::Node { client, .. } => client.get_connection_info().addr().to_string(),
            Endpoint::Cluster { seeds, .. } => format!("the Redis Cluster at {seeds}"),
        }
    }

    pub(crate) async fn connect(&self) -> Result<RedisConn, SinkError> {
        self.connect_plain()
            .await
            .map_err(|e| sink_error_at("connect to Redis", Some(self.target()), e))
    }

    /// `connect` with the client's own error, for callers that report it themselves.
    pub(crate) async fn connect_plain(&self) -> RedisResult<RedisConn> {
        match self {
            Endpoint::Node { client, config } => {
                ConnectionManager::new_with_config(client.clone(), config.clone())
                    .await
                    .map(RedisConn::Node)
            }
            Endpoint::Cluster {
                client,
                pipeline_client,
                node_scripts_refused,
                ..
            } => {
                let mut conn = client.get_async_connection().await?;
                let pipelines = pipeline_client.get_async_connection().await?;
                // Read once per connection: a moved slot fails a request, which drops the
                // connection, so the next one reads the map again.
                let slots = slot_map(&mut conn).await?;
                crate::telemetry::metrics::cluster_primaries(slots.primaries.len());
                Ok(RedisConn::Cluster(
                    ClusterConns {
                        conn,
                        pipelines,
                        node_scripts_refused: node_scripts_refused.clone(),
                        slot_map_stale: Default::default(),
                    },
                    std::sync::Arc::new(slots),
                ))
            }
        }
    }
}

/// A connection to one node or to a cluster; either runs commands and pipelines (a pipeline on
/// a cluster must stay within one hash slot).
#[derive(Clone)]
pub(crate) enum RedisConn {
    Node(ConnectionManager),
    Cluster(ClusterConns, std::sync::Arc<SlotMap>),
}

/// Two connections to the same cluster. `conn` follows MOVED and ASK for single commands.
/// `pipelines` never retries: on a MOVED or ASK reply anywhere in a pipeline, redis-rs re-sends
/// the WHOLE pipeline to the other node with one ASKING in front, so commands that had already
/// run on the right node ran again on the importing one. That created keys on both nodes of a
/// migration (the next MIGRATE failed with BUSYKEY); the sink's own retry re-plans instead.
#[derive(Clone)]
pub(crate) struct ClusterConns {
    conn: ClusterConnection,
    pipelines: ClusterConnection,
    node_scripts_refused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set when a node refused a key of a slot the map says it serves: read the map again
    /// before the next batch (`refresh_slot_map_if_stale`).
    slot_map_stale: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Which primary serves each hash slot, as `CLUSTER SLOTS` said when the connection was made.
#[derive(Debug)]
pub(crate) struct SlotMap {
    pub(crate) primaries: Vec<Primary>,
    /// Per slot, the index of its primary in `primaries`.
    owners: Vec<u16>,
}

impl SlotMap {
    /// The primary serving `slot` (the first one if the map has a hole: the request then
    /// gets a MOVED reply and the batch is applied again on a fresh map).
    pub(crate) fn owner(&self, slot: u16) -> usize {
        self.owners
            .get(usize::from(slot))
            .copied()
            .unwrap_or(0)
            .into()
    }
}

async fn slot_map(conn: &mut ClusterConnection) -> RedisResult<SlotMap> {
    let ranges: Vec<Value> = ::redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await?;
    let mut primaries: Vec<Primary> = Vec::new();
    let mut owners = vec![0u16; usize::from(super::cluster::SLOTS)];
    for range in ranges {
        let Value::Array(items) = range else { continue };
        // [start, end, [host, port, id, ...], replicas...]
        let int =
            |v: Option<&Value>| v.and_then(|v| ::redis::from_redis_value::<u16>(v.clone()).ok());
        let (Some(start), Some(end), Some(Value::Array(node))) =
            (int(items.first()), int(items.get(1)), items.get(2))
        else {
            continue;
        };
        let host: Option<String> = node
            .first()
            .and_then(|v| ::redis::from_redis_value(v.clone()).ok());
        let (Some(host), Some(port)) = (host, int(node.get(1))) else {
            continue;
        };
        let primary = Primary { host, port };
        let at = match primaries.iter().position(|p| *p == primary) {
            Some(at) => at,
            None => {
                primaries.push(primary);
                primaries.len() - 1
            }
        };
        for slot in start..=end.min(super::cluster::SLOTS - 1) {
            owners[usize::from(slot)] = at as u16;
        }
    }
    if primaries.is_empty() {
        return Err(RedisError::from((
            ErrorKind::Server(::redis::ServerErrorKind::ClusterDown),
            "CLUSTER SLOTS named no primary",
        )));
    }
    Ok(SlotMap { primaries, owners })
}

/// A primary of a cluster (`host`, `port`), as `CLUSTER SLOTS` names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Primary {
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl RedisConn {
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(..))
    }

    /// A cluster's slot map, when its primaries take `invalidate_node.lua` (none for one node,
    /// or once the cluster refused the script: see `refuse_node_scripts`).
    pub(crate) fn node_script_slots(&self) -> Option<&SlotMap> {
        match self {
            RedisConn::Cluster(conns, slots)
                if !conns.node_scripts_refused.load(Ordering::Relaxed) =>
            {
                Some(slots)
            }
            _ => None,
        }
    }

    /// Says the slot map may be out of date (a node refused a key the map gives it).
    pub(crate) fn mark_slot_map_stale(&self) {
        if let RedisConn::Cluster(conns, _) = self {
            conns.slot_map_stale.store(true, Ordering::Relaxed);
        }
    }

    /// Reads the slot map again if `mark_slot_map_stale` said so since it was read: one
    /// `CLUSTER SLOTS`, on the connections already open.
    pub(crate) async fn refresh_slot_map_if_stale(&mut self) -> RedisResult<()> {
        if let RedisConn::Cluster(conns, slots) = self {
            if conns.slot_map_stale.swap(false, Ordering::Relaxed) {
                match slot_map(&mut conns.conn).await {
                    Ok(fresh) => *slots = std::sync::Arc::new(fresh),
                    Err(e) => {
                        conns.slot_map_stale.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Invalidates with one command per hash slot from now on (`node_script_slots`); true the
    /// first time, so the caller says why once.
    pub(crate) fn refuse_node_scripts(&self) -> bool {
        match self {
            RedisConn::Cluster(conns, _) => {
                !conns.node_scripts_refused.swap(true, Ordering::Relaxed)
            }
            RedisConn::Node(_) => false,
        }
    }

    /// Runs `cmd` on `node` (a cluster's primary), or on the one node.
    pub(crate) async fn query_on<T: ::redis::FromRedisValue>(
        &mut self,
        node: Option<&Primary>,
        cmd: &Cmd,
    ) -> RedisResult<T> {
        match (self, node) {
            (RedisConn::Cluster(conns, _), Some(node)) => {
                let value = conns
                    .conn
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: node.host.clone(),
                            port: node.port,
                        }),
                    )
                    .await?;
                ::redis::from_redis_value(value).map_err(RedisError::from)
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }

    /// The nodes to run a keyspace-wide command (SCAN) on: every primary of a cluster, or the
    /// one node (`None`).
    pub(crate) async fn scan_nodes(&mut self) -> RedisResult<Vec<Option<Primary>>> {
        match self {
            RedisConn::Node(_) => Ok(vec![None]),
            RedisConn::Cluster(..) => Ok(self.primaries().await?.into_iter().map(Some).collect()),
        }
    }

    /// A cluster's primaries, from `CLUSTER SLOTS` (empty for one node).
    pub(crate) async fn primaries(&mut self) -> RedisResult<Vec<Primary>> {
        match self {
            RedisConn::Node(_) => Ok(Vec::new()),
            RedisConn::Cluster(conns, _) => {
                let mut primaries = slot_map(&mut conns.conn).await?.primaries;
                primaries.sort();
                crate::telemetry::metrics::cluster_primaries(primaries.len());
                Ok(primaries)
            }
        }
    }

    /// Sends `commands`, each within one hash slot (`(slot, command)`), as ONE pipeline per
    /// primary (the one node: one pipeline), the primaries concurrently. Replies come back in
    /// order, an error reply as `Value::ServerError` in its place: a moved slot's MOVED or ASK
    /// reply is the caller's to turn into a retry.
    pub(crate) async fn per_node(&self, commands: Vec<(u16, Cmd)>) -> RedisResult<Vec<Value>> {
        if commands.is_empty() {
            return Ok(Vec::new());
        }
        let total = commands.len();
        let mut groups: Vec<(Option<Primary>, Vec<usize>, Pipeline)> = Vec::new();
        match self {
            RedisConn::Node(_) => {
                let mut pipe = ::redis::pipe();
                pipe.ignore_errors();
                for (_, cmd) in commands {
                    pipe.add_command(cmd);
                }
                groups.push((None, (0..total).collect(), pipe));
            }
            RedisConn::Cluster(_, slots) => {
                let mut at_node: Vec<Option<usize>> = vec![None; slots.primaries.len()];
                for (i, (slot, cmd)) in commands.into_iter().enumerate() {
                    let node = slots.owner(slot);
                    let group = *at_node[node].get_or_insert_with(|| {
                        let mut pipe = ::redis::pipe();
                        pipe.ignore_errors();
                        groups.push((Some(slots.primaries[node].clone()), Vec::new(), pipe));
                        groups.len() - 1
                    });
                    groups[group].1.push(i);
                    groups[group].2.add_command(cmd);
                }
            }
        }
        let mut requests = Vec::with_capacity(groups.len());
        let mut indices_per_group = Vec::with_capacity(groups.len());
        // Each pipeline moves into its request: cloning it copied every command of the batch.
        for (node, indices, pipe) in groups {
            indices_per_group.push(indices);
            let mut conn = self.clone();
            let count = pipe.len();
            requests.push(async move {
                let started = std::time::Instant::now();
                let replies = match (&mut conn, node) {
                    (RedisConn::Cluster(c, _), Some(node)) => {
                        c.pipelines
                            .route_pipeline(
                                pipe,
                                0,
                                count,
                                SingleNodeRoutingInfo::ByAddress {
                                    host: node.host.clone(),
                                    port: node.port,
                                },
                            )
                            .await
                    }
                    (conn, _) => pipe.query_async::<Vec<Value>>(conn).await,
                };
                crate::telemetry::metrics::redis_round_trip(started.elapsed());
                replies
            });
        }
        let mut out = vec![Value::Nil; total];
        for (indices, replies) in indices_per_group
            .iter()
            .zip(futures_util::future::join_all(requests).await)
        {
            let replies = replies?;
            if replies.len() != indices.len() {
                return Err(RedisError::from((
                    ErrorKind::Parse,
                    "a pipeline returned another number of replies than it had commands",
                )));
            }
            for (i, reply) in indices.iter().zip(replies) {
                out[*i] = reply;
            }
        }
        Ok(out)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Node(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c, _) => c.conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Node(c) => c.req_packed_commands(cmd, offset, count),
            RedisConn::Cluster(c, _) => c.pipelines.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Node(c) => c.get_db(),
            RedisConn::Cluster(c, _) => c.conn.get_db(),
        }
    }
}
