//! A private Redis Cluster per test: six cluster-mode redis-servers (three primaries with one
//! replica each) joined by `redis-cli --cluster create`.
//!
//! Each node is a [`Redis`]: a direct child with its own instance dir, free ports, and pid
//! file for the stale sweep, killed on drop. Roles and slot owners are always read back from
//! the nodes (`CLUSTER NODES`, `CLUSTER INFO`, `INFO replication`), never remembered: they
//! change on failover and migration.
//!
//! The control calls block (one plain connection per call) so they need no runtime and work
//! from a std thread. In an async test whose other tasks must keep running meanwhile (a
//! writer during [`RedisCluster::migrate_slots_paced`]), wrap them in
//! `tokio::task::block_in_place` on a multi-threaded runtime, or `spawn_blocking`.

use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

use super::binaries::redis_server;
use super::redis::Redis;
use super::scratch;

/// Hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

const HOST: &str = "127.0.0.1";
const PRIMARIES: usize = 3;
const NODES: usize = 2 * PRIMARIES;

/// Milliseconds a node may be unreachable before it is flagged failing. With 1 s, a killed
/// primary's replica takes over ~2-3 s later (failure agreement, then a 0.5-1 s election
/// delay); much lower and a loaded CI machine sees spurious failovers.
const NODE_TIMEOUT_MS: u32 = 1000;

/// Boot, failover, migration hand-over and rejoin normally settle in well under 5 s. (Boot
/// cannot go below ~2 s: a primary reports `cluster_state:fail` for the first 2 s after it
/// starts, a fixed delay in Redis so that a restarted primary learns the current config before
/// it takes writes.)
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// A node's per-call connect and read limits: long enough for a loaded machine, short enough
/// that a stuck node fails the test instead of hanging it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// MIGRATE's own timeout (ms) for talking to the target node.
const MIGRATE_TIMEOUT_MS: u32 = 5000;

/// Six cluster nodes on free ports, killed on drop.
pub struct RedisCluster {
    nodes: Vec<Node>,
}

struct Node {
    redis: Redis,
    /// Fixed for the node's life: it is kept in its nodes.conf across restarts.
    id: String,
    /// Set by `kill_primary`, for `wait_for_failover`.
    killed: Option<KilledPrimary>,
}

struct KilledPrimary {
    slots: Vec<RangeInclusive<u16>>,
    replica_ids: Vec<String>,
}

/// One node as the cluster describes it (a line of `CLUSTER NODES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    pub port: u16,
    pub id: String,
    /// The primary it replicates; `None` for a primary.
    pub primary_id: Option<String>,
    /// Slot ranges it serves, ascending (empty for a replica).
    pub slots: Vec<RangeInclusive<u16>>,
    /// Flagged `fail` (agreed) or `fail?` (suspected) by the node that was asked.
    pub failing: bool,
}

impl ClusterNode {
    pub fn is_primary(&self) -> bool {
        self.primary_id.is_none()
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|r| r.contains(&slot))
    }

    /// Every slot it serves.
    pub fn slot_list(&self) -> Vec<u16> {
        self.slots.iter().flat_map(|r| r.clone()).collect()
    }
}

/// How fast [`RedisCluster::migrate_slots_paced`] moves keys. Pausing while some keys are
/// already on the target but the slot is still MIGRATING makes a concurrent client get ASK
/// redirections; once the slot is handed over, its stale slot map gets MOVED.
#[derive(Debug, Clone, Copy)]
pub struct MigrationPace {
    /// Keys per `MIGRATE` (and per `CLUSTER GETKEYSINSLOT`).
    pub keys_per_migrate: usize,
    /// Sleep after each `MIGRATE`.
    pub pause_between_migrates: Duration,
    /// Sleep once all keys are on the target, before `CLUSTER SETSLOT ... NODE`.
    pub pause_before_handover: Duration,
}

impl MigrationPace {
    /// As fast as it goes (what `redis-cli --cluster reshard` does).
    pub const FAST: MigrationPace = MigrationPace {
        keys_per_migrate: 100,
        pause_between_migrates: Duration::ZERO,
        pause_before_handover: Duration::ZERO,
    };

    /// One key per `MIGRATE`, 20 ms apart, then 200 ms before the hand-over.
    pub const SLOW: MigrationPace = MigrationPace {
        keys_per_migrate: 1,
        pause_between_migrates: Duration::from_millis(20),
        pause_before_handover: Duration::from_millis(200),
    };
}

impl RedisCluster {
    /// Boots six nodes, joins them into three primaries with one replica each, and waits until
    /// every node reports `cluster_state:ok`, all agree on the slot map and roles, and every
    /// replica's link is up. Panics (with the nodes' log tails) if that takes over 30 s.
    pub fn start() -> RedisCluster {
        let nodes: Vec<Node> = (0..NODES)
            .map(|i| {
                let redis =
                    Redis::start_with_args(&format!("redis-cluster{i}-"), &cluster_node_args);
                let id: String = query(redis.port(), redis::cmd("CLUSTER").arg("MYID"))
                    .unwrap_or_else(|e| panic!("asking a new cluster node for its id: {e}"));
                Node {
                    redis,
                    id,
                    killed: None,
                }
            })
            .collect();
        let cluster = RedisCluster { nodes };
        cluster.create();
        cluster.wait_settled("the new cluster");
        cluster.check_boot_shape();
        cluster
    }

    fn create(&self) {
        let cli = redis_server().with_file_name("redis-cli");
        assert!(
            cli.is_file(),
            "{} not found next to {}: install the redis-tools package (or point \
             WALSWEEP_REDIS_SERVER at a redis-server that has redis-cli beside it)",
            cli.display(),
            redis_server().display()
        );
        let mut cmd = Command::new(&cli);
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("{HOST}:{}", node.redis.port()));
        }
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"]);
        if let Err(e) = scratch::run(&mut cmd) {
            panic!("creating the Redis Cluster: {e}");
        }
    }

    /// Three primaries serving disjoint ranges that cover every slot, each with one replica.
    fn check_boot_shape(&self) {
        let nodes = self.topology();
        let primaries: Vec<&ClusterNode> = nodes.iter().filter(|n| n.is_primary()).collect();
        let mut replicated: Vec<&str> = nodes
            .iter()
            .filter_map(|n| n.primary_id.as_deref())
            .collect();
        replicated.sort_unstable();
        let mut primary_ids: Vec<&str> = primaries.iter().map(|n| n.id.as_str()).collect();
        primary_ids.sort_unstable();
        assert!(
            primaries.len() == PRIMARIES && replicated == primary_ids,
            "redis-cli --cluster create should have made {PRIMARIES} primaries with one replica \
             each, the cluster says: {nodes:#?}"
        );
    }

    /// Ports of all six nodes, running or not.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.redis.port()).collect()
    }

    /// `redis://127.0.0.1:PORT` of every node: the seed list a cluster client takes.
    pub fn seed_urls(&self) -> Vec<String> {
        self.ports()
            .into_iter()
            .map(|p| format!("redis://{HOST}:{p}"))
            .collect()
    }

    /// Pids of the running nodes.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.redis.pid()).collect()
    }

    /// Every node's log file (its dir is the file's parent).
    pub fn log_paths(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.redis.log_path()).collect()
    }

    /// The node id of the node on `port` (fixed for its life, also across `restart_node`).
    pub fn node_id(&self, port: u16) -> String {
        self.node(port).id.clone()
    }

    /// A client over [`Self::seed_urls`] with redis-rs's defaults.
    pub fn client(&self) -> ClusterClient {
        let urls = self.seed_urls();
        ClusterClient::new(urls.clone())
            .unwrap_or_else(|e| panic!("building a cluster client for {urls:?}: {e}"))
    }

    /// A cluster connection with redis-rs's defaults. It follows ASK and MOVED by itself: in
    /// tests/cluster_support.rs (redis 1.8.1, Redis 7.0) it went through a paced migration
    /// and a primary's failover without returning an error. During the ~2.5 s failover it
    /// does not fail commands but holds them (its retries wait at least 1.28 s each by
    /// default): one GET took up to ~4 s there.
    pub async fn connection(&self) -> ClusterConnection {
        self.client()
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connecting to the Redis Cluster {:?}: {e}", self.ports()))
    }

    /// A plain blocking connection to one node, which answers MOVED/ASK for keys it does not
    /// serve: what tests use to see where a key really is.
    pub fn node_connection(&self, port: u16) -> redis::Connection {
        self.node(port);
        connect(port).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A plain async connection to one node (no redirections followed).
    pub async fn node_async_connection(&self, port: u16) -> redis::aio::MultiplexedConnection {
        self.node(port);
        let url = format!("redis://{HOST}:{port}");
        redis::Client::open(url.as_str())
            .unwrap_or_else(|e| panic!("parsing {url}: {e}"))
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connecting to cluster node {url}: {e}"))
    }

    /// Every node as the first running node describes the cluster (after a change, nodes can
    /// disagree until [`Self::wait_settled`] returns).
    pub fn topology(&self) -> Vec<ClusterNode> {
        let port = self.running_ports()[0];
        view(port)
            .map(|v| v.nodes)
            .unwrap_or_else(|e| panic!("reading the cluster topology: {e}"))
    }

    /// Running primaries (as the cluster sees them now), ascending by port.
    pub fn primaries(&self) -> Vec<ClusterNode> {
        self.running_nodes_where(ClusterNode::is_primary)
    }

    /// Running replicas (as the cluster sees them now), ascending by port.
    pub fn replicas(&self) -> Vec<ClusterNode> {
        self.running_nodes_where(|n| !n.is_primary())
    }

    fn running_nodes_where(&self, keep: impl Fn(&ClusterNode) -> bool) -> Vec<ClusterNode> {
        let running = self.running_ports();
        let mut nodes: Vec<ClusterNode> = self
            .topology()
            .into_iter()
            .filter(|n| running.contains(&n.port) && keep(n))
            .collect();
        nodes.sort_by_key(|n| n.port);
        nodes
    }

    /// The hash slot of `key` (computed here; the self-test checks it against the server).
    pub fn slot_of(&self, key: impl AsRef<[u8]>) -> u16 {
        key_slot(key.as_ref())
    }

    /// `CLUSTER KEYSLOT key`, as a running node computes it.
    pub fn keyslot_on_server(&self, key: impl AsRef<[u8]>) -> u16 {
        let port = self.running_ports()[0];
        query(port, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key.as_ref()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The node serving `slot`, per [`Self::topology`]. Panics if no node serves it (a slot is
    /// never unassigned in these clusters).
    pub fn owner_of_slot(&self, slot: u16) -> ClusterNode {
        assert!(
            slot < SLOTS,
            "slot {slot} out of range: slots are 0..{SLOTS}"
        );
        let nodes = self.topology();
        nodes
            .iter()
            .find(|n| n.serves(slot))
            .cloned()
            .unwrap_or_else(|| panic!("no node serves slot {slot}: {nodes:#?}"))
    }

    /// `GET key` straight from the node serving its slot (no client-side routing involved).
    pub fn get(&self, key: &str) -> Option<String> {
        let port = self.owner_of_slot(self.slot_of(key)).port;
        self.get_on(port, key)
            .unwrap_or_else(|e| panic!("GET {key:?} from its owner: {e}"))
    }

    /// `GET key` on one node; an `Err` is what the node answered instead (e.g. `MOVED ...`).
    pub fn get_on(&self, port: u16, key: &str) -> Result<Option<String>, String> {
        self.node(port);
        query(port, redis::cmd("GET").arg(key))
    }

    /// `FLUSHALL` on every running primary (replicas follow).
    pub fn flushall(&self) {
        for primary in self.primaries() {
            let _: () =
                query(primary.port, &redis::cmd("FLUSHALL")).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Keys matching `pattern` on every running primary (SCAN), sorted.
    pub fn keys_everywhere(&self, pattern: &str) -> Vec<String> {
        let mut keys = Vec::new();
        for primary in self.primaries() {
            let mut con = self.node_connection(primary.port);
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut con)
                    .unwrap_or_else(|e| panic!("SCAN on cluster node {}: {e}", primary.port));
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort();
        keys
    }

    /// Error replies sent so far by the running nodes, summed, by prefix (`INFO errorstats`:
    /// `MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, ...). Counts restart with a node. `ERR`
    /// includes two per connection redis-rs opens (Redis 7.0 does not know its `CLIENT
    /// SETINFO`) and redis-cli's early `CLUSTER REPLICATE` attempts at boot.
    pub fn error_stats(&self) -> BTreeMap<String, u64> {
        let mut totals = BTreeMap::new();
        for port in self.running_ports() {
            let info: String =
                query(port, redis::cmd("INFO").arg("errorstats")).unwrap_or_else(|e| panic!("{e}"));
            // "errorstat_MOVED:count=12"
            for line in info.lines() {
                let Some((name, count)) = line
                    .strip_prefix("errorstat_")
                    .and_then(|l| l.split_once(":count="))
                else {
                    continue;
                };
                let count: u64 = count.trim().parse().unwrap_or_else(|e| {
                    panic!("bad count in INFO errorstats line {line:?} of node {port}: {e}")
                });
                *totals.entry(name.to_owned()).or_insert(0) += count;
            }
        }
        totals
    }

    /// Calls of `command` (lower case, e.g. `eval`) the running nodes ran so far, summed
    /// (`INFO commandstats`: calls made from scripts count too; refused calls do not).
    pub fn command_calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        let mut total = 0;
        for port in self.running_ports() {
            let info: String = query(port, redis::cmd("INFO").arg("commandstats"))
                .unwrap_or_else(|e| panic!("{e}"));
            // "cmdstat_eval:calls=3,usec=120,usec_per_call=40.00,rejected_calls=0,failed_calls=0"
            for line in info.lines() {
                let Some(rest) = line.strip_prefix(&prefix) else {
                    continue;
                };
                let calls = rest.split(',').next().unwrap_or_default();
                total += calls.trim().parse::<u64>().unwrap_or_else(|e| {
                    panic!("bad calls in INFO commandstats line {line:?} of node {port}: {e}")
                });
            }
        }
        total
    }

    /// Runs `cmd` on every running node (e.g. `ACL SETUSER`, which each node keeps for itself).
    pub fn on_every_node(&self, cmd: &redis::Cmd) {
        for port in self.running_ports() {
            let _: redis::Value = query(port, cmd).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    /// Waits until every replica has acknowledged all writes its primary had when this was
    /// called. Replicas acknowledge once a second, so this takes up to ~1 s. Call it before
    /// killing a primary when the test needs its writes to survive the failover: replication
    /// is asynchronous, and an unacknowledged write is legitimately lost.
    pub fn wait_replicas_caught_up(&self) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let replicas = self.replicas();
        for primary in self.primaries() {
            let expected = replicas
                .iter()
                .filter(|r| r.primary_id.as_deref() == Some(primary.id.as_str()))
                .count();
            let target = replication_info(primary.port)
                .unwrap_or_else(|e| panic!("{e}"))
                .master_offset;
            loop {
                let info = replication_info(primary.port).unwrap_or_else(|e| panic!("{e}"));
                let caught_up = info
                    .replica_offsets
                    .iter()
                    .filter(|&&offset| offset >= target)
                    .count();
                if caught_up >= expected {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "replicas of primary {} did not acknowledge offset {target} within \
                     {SETTLE_TIMEOUT:?} ({expected} expected, offsets: {:?})",
                    primary.port,
                    info.replica_offsets
                );
                thread::sleep(POLL);
            }
        }
    }

    /// Moves `slots` with their keys to the primary on `to_port`, as fast as possible.
    /// Returns how many keys moved.
    pub fn migrate_slots(&self, slots: &[u16], to_port: u16) -> usize {
        self.migrate_slots_paced(slots, to_port, MigrationPace::FAST)
    }

    /// Puts `slots` in flight towards the primary on `to_port` without moving a key:
    /// `CLUSTER SETSLOT IMPORTING` on the target and `MIGRATING` on each source, so clients
    /// meet ASK for keys not yet on the source. Returns the target and each moving slot with
    /// its source (slots the target already serves are left out).
    pub fn start_migration(
        &self,
        slots: &[u16],
        to_port: u16,
    ) -> (ClusterNode, Vec<(u16, ClusterNode)>) {
        let nodes = self.topology();
        let running = self.running_ports();
        let target = nodes
            .iter()
            .find(|n| n.port == to_port && n.is_primary() && running.contains(&n.port))
            .unwrap_or_else(|| {
                panic!("migrate_slots: {to_port} is not a running primary: {nodes:#?}")
            })
            .clone();
        let mut moves: Vec<(u16, ClusterNode)> = Vec::new();
        for &slot in slots {
            assert!(
                slot < SLOTS,
                "migrate_slots: slot {slot} out of range: slots are 0..{SLOTS}"
            );
            let source = nodes
                .iter()
                .find(|n| n.serves(slot))
                .unwrap_or_else(|| panic!("migrate_slots: no node serves slot {slot}"));
            assert!(
                running.contains(&source.port) && !source.failing,
                "migrate_slots: slot {slot} is served by node {}, which is down",
                source.port
            );
            if source.port != to_port && !moves.iter().any(|(s, _)| *s == slot) {
                moves.push((slot, source.clone()));
            }
        }

        // Importing first: a source that is already MIGRATING sends ASK to the target, which
        // must then accept it.
        for (slot, source) in &moves {
            setslot(target.port, *slot, "IMPORTING", &source.id, to_port);
            setslot(source.port, *slot, "MIGRATING", &target.id, to_port);
        }
        (target, moves)
    }

    /// Moves `slots` with their keys from whichever primaries serve them to the primary on
    /// `to_port`, the way resharding does: `CLUSTER SETSLOT IMPORTING` on the target and
    /// `MIGRATING` on the source (all slots first, so they are in flight together), then
    /// `GETKEYSINSLOT` + `MIGRATE` until each slot is empty on its source, then `SETSLOT NODE`
    /// on the target, the source and the other primaries. Waits until every node agrees on the
    /// new owners. Returns how many keys moved (keys a concurrent client creates meanwhile land
    /// on the target directly, through ASK, and are not counted).
    pub fn migrate_slots_paced(&self, slots: &[u16], to_port: u16, pace: MigrationPace) -> usize {
        assert!(
            pace.keys_per_migrate > 0,
            "MigrationPace::keys_per_migrate must be at least 1"
        );
        let (target, moves) = self.start_migration(slots, to_port);

        let mut moved = 0;
        for (slot, source) in &moves {
            loop {
                let keys: Vec<Vec<u8>> = query(
                    source.port,
                    redis::cmd("CLUSTER")
                        .arg("GETKEYSINSLOT")
                        .arg(*slot)
                        .arg(pace.keys_per_migrate),
                )
                .unwrap_or_else(|e| panic!("migrating slot {slot}: {e}"));
                if keys.is_empty() {
                    break;
                }
                let mut migrate = redis::cmd("MIGRATE");
                migrate
                    .arg(HOST)
                    .arg(target.port)
                    .arg("")
                    .arg(0)
                    .arg(MIGRATE_TIMEOUT_MS)
                    .arg("KEYS")
                    .arg(&keys);
                // "NOKEY" when a concurrent client deleted them first.
                let _: String = query(source.port, &migrate).unwrap_or_else(|e| {
                    panic!(
                        "migrating {} keys of slot {slot} from {} to {to_port}: {e}",
                        keys.len(),
                        source.port
                    )
                });
                moved += keys.len();
                thread::sleep(pace.pause_between_migrates);
            }
        }
        thread::sleep(pace.pause_before_handover);

        // Target first: once the source stops answering ASK and answers MOVED instead, the
        // target must already claim the slot, or clients bounce between the two.
        let primaries = self.primaries();
        for (slot, source) in &moves {
            setslot(target.port, *slot, "NODE", &target.id, to_port);
            setslot(source.port, *slot, "NODE", &target.id, to_port);
            for other in &primaries {
                if other.port != target.port && other.port != source.port {
                    setslot(other.port, *slot, "NODE", &target.id, to_port);
                }
            }
        }
        self.wait_settled("the slot migration");
        for (slot, source) in &moves {
            let left: u64 = query(
                source.port,
                redis::cmd("CLUSTER").arg("COUNTKEYSINSLOT").arg(*slot),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                left, 0,
                "slot {slot} was handed over to {to_port} but {left} keys stayed on {}",
                source.port
            );
        }
        moved
    }

    /// SIGKILLs the primary on `port` (no chance to hand anything over). Panics if it is not a
    /// running primary serving slots.
    pub fn kill_primary(&mut self, port: u16) {
        let nodes = self.topology();
        let victim = nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("kill_primary: no cluster node on port {port}"));
        assert!(
            victim.is_primary() && !victim.slots.is_empty() && self.node(port).redis.is_running(),
            "kill_primary: {port} is not a running primary serving slots: {victim:?}"
        );
        let killed = KilledPrimary {
            slots: victim.slots.clone(),
            replica_ids: nodes
                .iter()
                .filter(|n| n.primary_id.as_deref() == Some(victim.id.as_str()))
                .map(|n| n.id.clone())
                .collect(),
        };
        let node = self.node_mut(port);
        node.redis.stop();
        node.killed = Some(killed);
    }

    /// After [`Self::kill_primary`]: waits until one of the killed primary's replicas serves
    /// all its slots and the running nodes have settled (`cluster_state:ok` everywhere, one
    /// slot map, the dead node flagged failing by all). Returns the new primary's port.
    pub fn wait_for_failover(&self, killed_port: u16) -> u16 {
        let node = self.node(killed_port);
        let killed = node.killed.as_ref().unwrap_or_else(|| {
            panic!("wait_for_failover({killed_port}): that node was not killed with kill_primary")
        });
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            let outcome = self.settled().and_then(|()| {
                for port in self.running_ports() {
                    let dead = view(port)?
                        .nodes
                        .into_iter()
                        .find(|n| n.id == node.id)
                        .ok_or_else(|| format!("node {port} forgot the killed node"))?;
                    if !dead.failing || !dead.slots.is_empty() {
                        return Err(format!(
                            "node {port} still sees the killed node as {dead:?}"
                        ));
                    }
                }
                let nodes = self.topology();
                nodes
                    .iter()
                    .find(|n| n.slots == killed.slots && killed.replica_ids.contains(&n.id))
                    .map(|heir| heir.port)
                    .ok_or_else(|| {
                        format!(
                            "none of the killed primary's replicas {:?} serves its slots \
                             {:?}: {nodes:#?}",
                            killed.replica_ids, killed.slots
                        )
                    })
            });
            match outcome {
                Ok(port) => return port,
                Err(e) if Instant::now() > deadline => panic!(
                    "no failover of the primary on port {killed_port} within \
                     {SETTLE_TIMEOUT:?}: {e}"
                ),
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// Starts a killed node again on its ports and dir. It keeps its node id (nodes.conf) but
    /// no data, learns that it lost its slots, and rejoins as a replica of whoever took them
    /// over. Waits until the cluster has settled with it.
    pub fn restart_node(&mut self, port: u16) {
        let node = self.node_mut(port);
        node.redis.restart();
        node.killed = None;
        self.wait_settled("the restarted node rejoining");
    }

    /// Waits until every running node reports `cluster_state:ok` with all slots served, all
    /// running nodes agree on the slot map and on every running node's role, no running node
    /// is flagged failing, no slot is mid-migration, and every running replica's link to its
    /// primary is up. Panics naming `what` and the last thing that was not yet so after 30 s.
    pub fn wait_settled(&self, what: &str) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            match self.settled() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("{what} did not settle within {SETTLE_TIMEOUT:?}: {e}")
                }
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// `Err` says what is not settled yet (see `wait_settled`).
    fn settled(&self) -> Result<(), String> {
        let running: Vec<(u16, &str)> = self
            .nodes
            .iter()
            .filter(|n| n.redis.is_running())
            .map(|n| (n.redis.port(), n.id.as_str()))
            .collect();
        let mut reference: Option<(u16, Agreement)> = None;
        for &(port, _) in &running {
            let info = cluster_info(port)?;
            for (field, want) in [
                ("cluster_state", "ok"),
                ("cluster_slots_assigned", "16384"),
                ("cluster_slots_ok", "16384"),
            ] {
                let got = info.get(field).map_or("(missing)", String::as_str);
                if got != want {
                    return Err(format!("node {port}: {field} is {got}, not {want}"));
                }
            }
            let view = view(port)?;
            if !view.open_slots.is_empty() {
                return Err(format!(
                    "node {port} has slots mid-migration: {:?}",
                    view.open_slots
                ));
            }
            for &(other_port, other_id) in &running {
                match view.nodes.iter().find(|n| n.id == other_id) {
                    None => return Err(format!("node {port} does not know node {other_port}")),
                    Some(n) if n.failing => {
                        return Err(format!(
                            "node {port} flags running node {other_port} failing"
                        ))
                    }
                    Some(_) => {}
                }
            }
            let agreement = Agreement::of(&view, &running)?;
            match &reference {
                None => reference = Some((port, agreement)),
                Some((first, seen)) if *seen != agreement => {
                    return Err(format!(
                        "nodes {first} and {port} disagree: {seen:?} vs {agreement:?}"
                    ))
                }
                Some(_) => {}
            }
            if !view.myself.is_primary() {
                let link = replication_info(port)?.link_status;
                if link != "up" {
                    return Err(format!("replica {port}: master_link_status is {link}"));
                }
            }
        }
        Ok(())
    }

    fn running_ports(&self) -> Vec<u16> {
        let ports: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.redis.is_running())
            .map(|n| n.redis.port())
            .collect();
        assert!(!ports.is_empty(), "every node of the cluster is stopped");
        ports
    }

    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.redis.port() == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}: {:?}", self.ports()))
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        let ports = self.ports();
        self.nodes
            .iter_mut()
            .find(|n| n.redis.port() == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port}: {ports:?}"))
    }
}

/// What all running nodes must see alike: who serves which slots, and who replicates whom.
#[derive(Debug, PartialEq, Eq)]
struct Agreement {
    /// First slot of each range -> (last slot, serving node id).
    slot_map: BTreeMap<u16, (u16, String)>,
    /// Running node id -> the id of its primary (`None` for a primary).
    roles: BTreeMap<String, Option<String>>,
}

impl Agreement {
    fn of(view: &View, running: &[(u16, &str)]) -> Result<Agreement, String> {
        let mut slot_map = BTreeMap::new();
        for node in &view.nodes {
            for range in &node.slots {
                if !running.iter().any(|(_, id)| *id == node.id) {
                    return Err(format!(
                        "node {} says slots {range:?} are served by the stopped node {}",
                        view.myself.port, node.port
                    ));
                }
                slot_map.insert(*range.start(), (*range.end(), node.id.clone()));
            }
        }
        let roles = view
            .nodes
            .iter()
            .filter(|n| running.iter().any(|(_, id)| *id == n.id))
            .map(|n| (n.id.clone(), n.primary_id.clone()))
            .collect();
        Ok(Agreement { slot_map, roles })
    }
}

/// `CLUSTER NODES` of one node.
#[derive(Debug)]
pub struct View {
    pub myself: ClusterNode,
    pub nodes: Vec<ClusterNode>,
    /// The node's own `[slot->-id]` / `[slot-<-id]` entries: migrations in progress.
    pub open_slots: Vec<String>,
}

fn view(port: u16) -> Result<View, String> {
    let text: String = query(port, redis::cmd("CLUSTER").arg("NODES"))?;
    parse_cluster_nodes(&text).map_err(|e| format!("CLUSTER NODES of node {port}: {e}"))
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@busport[,hostname]> <flags> <primary id or ->
/// <ping-sent> <pong-recv> <config-epoch> <link-state> <slot>...`.
pub fn parse_cluster_nodes(text: &str) -> Result<View, String> {
    let mut myself = None;
    let mut nodes = Vec::new();
    let mut open_slots = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [id, addr, flags, primary, _ping, _pong, _epoch, _link, slot_fields @ ..] =
            fields.as_slice()
        else {
            return Err(format!("line with too few fields: {line:?}"));
        };
        let port = addr
            .split_once('@')
            .and_then(|(host_port, _)| host_port.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .ok_or_else(|| format!("no port in address {addr:?} of line {line:?}"))?;
        let flags: Vec<&str> = flags.split(',').collect();
        let mut slots = Vec::new();
        for field in slot_fields {
            if field.starts_with('[') {
                if flags.contains(&"myself") {
                    open_slots.push((*field).to_owned());
                }
                continue;
            }
            let bound = |s: &str| {
                s.parse::<u16>()
                    .map_err(|e| format!("bad slot {s:?} in line {line:?}: {e}"))
            };
            let range = match field.split_once('-') {
                Some((start, end)) => bound(start)?..=bound(end)?,
                None => bound(field)?..=bound(field)?,
            };
            slots.push(range);
        }
        slots.sort_by_key(|r| *r.start());
        let node = ClusterNode {
            port,
            id: (*id).to_owned(),
            primary_id: (*primary != "-").then(|| (*primary).to_owned()),
            slots,
            failing: flags.iter().any(|f| *f == "fail" || *f == "fail?"),
        };
        if flags.contains(&"myself") {
            myself = Some(node.clone());
        }
        nodes.push(node);
    }
    let myself = myself.ok_or_else(|| format!("no `myself` line in {text:?}"))?;
    Ok(View {
        myself,
        nodes,
        open_slots,
    })
}

fn cluster_info(port: u16) -> Result<HashMap<String, String>, String> {
    let text: String = query(port, redis::cmd("CLUSTER").arg("INFO"))?;
    Ok(info_fields(&text))
}

/// `field:value` lines of an INFO-style reply.
fn info_fields(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

struct ReplicationInfo {
    /// `master_repl_offset`: how far this node's replication stream has gone.
    master_offset: u64,
    /// A primary's replicas' acknowledged offsets (`slaveN:...,offset=N,...`).
    replica_offsets: Vec<u64>,
    /// A replica's `master_link_status` (empty on a primary).
    link_status: String,
}

fn replication_info(port: u16) -> Result<ReplicationInfo, String> {
    let text: String = query(port, redis::cmd("INFO").arg("replication"))?;
    let fields = info_fields(&text);
    let master_offset = fields
        .get("master_repl_offset")
        .and_then(|o| o.parse().ok())
        .ok_or_else(|| format!("no master_repl_offset in INFO replication of node {port}"))?;
    // "slave0:ip=127.0.0.1,port=40001,state=online,offset=1234,lag=0"
    let replica_offsets = fields
        .iter()
        .filter(|(k, _)| k.starts_with("slave") && k[5..].parse::<u32>().is_ok())
        .filter(|(_, v)| v.contains("state=online"))
        .filter_map(|(_, v)| {
            v.split(',')
                .find_map(|kv| kv.strip_prefix("offset="))
                .and_then(|o| o.parse().ok())
        })
        .collect();
    Ok(ReplicationInfo {
        master_offset,
        replica_offsets,
        link_status: fields
            .get("master_link_status")
            .cloned()
            .unwrap_or_default(),
    })
}

/// The hash slot of a key: CRC16-XMODEM of the key, or of its hash tag (the bytes between the
/// first `{` and the first `}` after it, when there are any), modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let len = rest.iter().position(|&b| b == b'}')?;
            (len > 0).then(|| &rest[..len])
        })
        .unwrap_or(key);
    crc16_xmodem(hashed) % SLOTS
}

/// CRC-16 with polynomial 0x1021, initial value 0, no reflection (the variant Redis Cluster
/// uses).
fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A node's settings, after `Redis`'s defaults (bind, port, dir, no persistence). Called again
/// when a start is retried, so a taken bus port is replaced too.
fn cluster_node_args() -> Vec<String> {
    [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        // Default is port + 10000, which is over 65535 for half the ephemeral range.
        "--cluster-port",
        &scratch::free_port().to_string(),
        "--cluster-node-timeout",
        &NODE_TIMEOUT_MS.to_string(),
        // A replica may always take over, however long its link was down: tests kill nodes at
        // arbitrary times and want the failover, not a cluster that stays down.
        "--cluster-replica-validity-factor",
        "0",
        // The replicas redis-cli assigned stay where they are (a rejoined node must not move
        // another primary's replica).
        "--cluster-allow-replica-migration",
        "no",
        // The 5 s default wait before a diskless full sync would delay every boot and rejoin.
        "--repl-diskless-sync-delay",
        "0",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn connect(port: u16) -> Result<redis::Connection, String> {
    use redis::IntoConnectionInfo;
    let url = format!("redis://{HOST}:{port}");
    let info = url
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("parsing {url}: {e}"))?;
    // Redis 7.0 answers redis-rs's CLIENT SETINFO with an error, which would swamp the real
    // ones in `error_stats` (the polling here connects often).
    let settings = info.redis_settings().clone().set_skip_set_lib_name();
    let client = redis::Client::open(info.set_redis_settings(settings))
        .map_err(|e| format!("opening {url}: {e}"))?;
    let con = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(|e| format!("connecting to cluster node {url}: {e}"))?;
    con.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| format!("setting a read timeout on {url}: {e}"))?;
    Ok(con)
}

/// Runs one command on one node over a fresh connection; errors name the node and the command.
/// One step of a slot migration towards `to_port` (named in the panic).
fn setslot(port: u16, slot: u16, state: &str, node_id: &str, to_port: u16) {
    let _: () = query(
        port,
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(state)
            .arg(node_id),
    )
    .unwrap_or_else(|e| panic!("migrating slot {slot} to {to_port}: {e}"));
}

fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> Result<T, String> {
    let mut con = connect(port)?;
    cmd.query(&mut con).map_err(|e| {
        let shown: Vec<String> = cmd
            .args_iter()
            .take(4)
            .map(|a| match a {
                redis::Arg::Simple(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                _ => "<cursor>".to_owned(),
            })
            .collect();
        format!("{} on cluster node {port}: {e}", shown.join(" "))
    })
}
