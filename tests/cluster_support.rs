//! Tests of the Redis Cluster test support (`support::RedisCluster`) against a real cluster:
//! if these fail, every cluster test's failure is suspect. They also pin down how redis-rs's
//! async cluster connection copes with slot migrations and failovers, which the sink relies
//! on. `cargo test --test cluster_support -- --nocapture` shows boot and failover times.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use redis::cluster_async::ClusterConnection;
use redis::AsyncCommands;
use support::redis_cluster::{key_slot, parse_cluster_nodes, MigrationPace, SLOTS};
use support::scratch::process_alive;
use support::RedisCluster;

/// Sets `keys[i]` to `values[i]`, all at once, through the cluster connection.
async fn set_all(con: &ClusterConnection, keys: &[String], values: &[String]) {
    try_join_all(keys.iter().zip(values).map(|(k, v)| {
        let mut con = con.clone();
        async move { con.set::<_, _, ()>(k, v).await }
    }))
    .await
    .expect("SET through the cluster connection");
}

fn numbered(prefix: &str, n: usize) -> (Vec<String>, Vec<String>) {
    (0..n)
        .map(|i| (format!("{prefix}:{i}"), format!("value {i}")))
        .unzip()
}

/// `new - old` per error prefix, leaving out the ones that did not change.
fn stats_delta(old: &BTreeMap<String, u64>, new: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    new.iter()
        .map(|(k, v)| (k.clone(), v - old.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect()
}

#[tokio::test]
async fn boots_routes_keys_and_cleans_up() {
    support::init_tracing();
    let started = Instant::now();
    let cluster = RedisCluster::start();
    eprintln!(
        "Redis Cluster boot (6 nodes, redis-cli --cluster create, settled): {:?}",
        started.elapsed()
    );

    // Shape: three primaries whose ranges cover every slot exactly once, one replica each.
    let primaries = cluster.primaries();
    let replicas = cluster.replicas();
    assert_eq!(primaries.len(), 3, "{primaries:#?}");
    assert_eq!(replicas.len(), 3, "{replicas:#?}");
    let mut covered = vec![0u8; usize::from(SLOTS)];
    for slot in primaries.iter().flat_map(|p| p.slot_list()) {
        covered[usize::from(slot)] += 1;
    }
    assert!(covered.iter().all(|&c| c == 1), "slots not covered once");
    for replica in &replicas {
        assert!(
            primaries
                .iter()
                .any(|p| Some(&p.id) == replica.primary_id.as_ref()),
            "replica {replica:?} does not replicate a running primary"
        );
    }
    let mut ports = cluster.ports();
    ports.sort_unstable();
    let mut seen: Vec<u16> = primaries.iter().chain(&replicas).map(|n| n.port).collect();
    seen.sort_unstable();
    assert_eq!(ports, seen);
    assert_eq!(
        cluster.seed_urls(),
        cluster
            .ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
    );

    // The computed slot is the server's, hash tags included.
    let (keys, values) = numbered("boot", 1000);
    let tagged = [
        "",
        "{}",
        "{}x",
        "{user1000}.following",
        "x{user1000}.followers",
        "foo{}{bar}",
        "foo{{bar}}zap",
        "foo{bar}{zap}",
        "{a",
        "a}b{c}",
        "ünïcödé",
    ];
    for key in keys.iter().map(String::as_str).chain(tagged) {
        assert_eq!(
            cluster.slot_of(key),
            cluster.keyslot_on_server(key),
            "slot of {key:?}"
        );
    }
    assert_eq!(
        key_slot(b"\xff\x00{\x80}"),
        cluster.keyslot_on_server(b"\xff\x00{\x80}")
    );

    // Keys written through the cluster connection are on the node owner_of_slot names, and
    // only there: the other primaries redirect.
    let con = cluster.connection().await;
    set_all(&con, &keys, &values).await;
    for (key, value) in keys.iter().zip(&values) {
        let owner = cluster.owner_of_slot(cluster.slot_of(key));
        assert!(owner.is_primary());
        assert_eq!(
            cluster.get_on(owner.port, key).as_ref(),
            Ok(&Some(value.clone())),
            "{key} on its owner {}",
            owner.port
        );
        let other = primaries.iter().find(|p| p.port != owner.port).unwrap();
        let redirect = cluster.get_on(other.port, key).unwrap_err();
        assert!(
            redirect.contains("MOVED") || redirect.contains("Moved"),
            "{key} on non-owner {}: {redirect}",
            other.port
        );
    }
    assert_eq!(cluster.keys_everywhere("boot:*"), {
        let mut sorted = keys.clone();
        sorted.sort();
        sorted
    });

    cluster.flushall();
    assert!(cluster.keys_everywhere("*").is_empty());
    let mut con = con;
    let gone: Option<String> = con.get(&keys[0]).await.expect("GET after FLUSHALL");
    assert_eq!(gone, None);

    let pids = cluster.pids();
    let dirs: Vec<_> = cluster
        .log_paths()
        .iter()
        .map(|p| p.parent().unwrap().to_path_buf())
        .collect();
    assert_eq!(pids.len(), 6);
    assert!(dirs.iter().all(|d| d.is_dir()));
    drop(cluster);
    for pid in pids {
        assert!(!process_alive(pid), "cluster node {pid} survived drop");
    }
    for dir in dirs {
        assert!(!dir.exists(), "{} survived drop", dir.display());
    }
}

/// What the traffic task saw.
#[derive(Debug, Default)]
struct Traffic {
    rounds: u64,
    errors: Vec<String>,
}

/// Until `stop`: for each key, SET it to `key@round`, GET it back, and INCR its counter
/// `{key}:n` (same slot), which must then equal the round: a lost or repeated INCR shows.
async fn keep_writing(
    mut con: ClusterConnection,
    keys: Vec<String>,
    stop: Arc<AtomicBool>,
) -> Traffic {
    let mut traffic = Traffic::default();
    while !stop.load(Ordering::Relaxed) {
        traffic.rounds += 1;
        let round = traffic.rounds;
        for key in &keys {
            let value = format!("{key}@{round}");
            let step: redis::RedisResult<(String, u64)> = async {
                con.set::<_, _, ()>(key, &value).await?;
                let read: String = con.get(key).await?;
                let count: u64 = con.incr(format!("{{{key}}}:n"), 1).await?;
                Ok((read, count))
            }
            .await;
            match step {
                Ok((read, count)) if read == value && count == round => {}
                Ok(other) => traffic
                    .errors
                    .push(format!("round {round}, {key}: read back {other:?}")),
                Err(e) => traffic.errors.push(format!("round {round}, {key}: {e}")),
            }
        }
    }
    traffic
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_migration_under_traffic_loses_nothing() {
    support::init_tracing();
    let cluster = RedisCluster::start();
    let con = cluster.connection().await;
    let (keys, values) = numbered("mig", 1000);
    set_all(&con, &keys, &values).await;

    let primaries = cluster.primaries();
    let (source, target) = (&primaries[0], &primaries[1]);
    let moving: Vec<String> = keys
        .iter()
        .filter(|k| source.serves(cluster.slot_of(k)))
        .take(20)
        .cloned()
        .collect();
    assert_eq!(moving.len(), 20);
    let mut slots: Vec<u16> = moving.iter().map(|k| cluster.slot_of(k)).collect();
    slots.sort_unstable();
    slots.dedup();

    let stats_before = cluster.error_stats();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = tokio::spawn(keep_writing(con.clone(), moving.clone(), stop.clone()));
    // Some rounds against the old layout first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let moved = tokio::task::block_in_place(|| {
        cluster.migrate_slots_paced(&slots, target.port, MigrationPace::SLOW)
    });
    let took = started.elapsed();
    // And some against the new one (the client learns it from MOVED).
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let traffic = traffic.await.expect("traffic task");
    let redirects = stats_delta(&stats_before, &cluster.error_stats());
    eprintln!(
        "migrated {} slots ({moved} keys) in {took:?} under {} rounds of traffic; error \
         replies meanwhile: {redirects:?}",
        slots.len(),
        traffic.rounds
    );

    assert!(
        traffic.errors.is_empty(),
        "the cluster connection failed during the migration: {:#?}",
        traffic.errors
    );
    assert!(traffic.rounds >= 10, "too little traffic: {traffic:?}");
    // The migration really moved keys under the client's feet, both ways a client notices.
    assert!(moved >= 2 * moving.len(), "only {moved} keys migrated");
    assert!(
        redirects.get("ASK").is_some_and(|&n| n > 0),
        "{redirects:?}"
    );
    assert!(
        redirects.get("MOVED").is_some_and(|&n| n > 0),
        "{redirects:?}"
    );

    for &slot in &slots {
        assert_eq!(cluster.owner_of_slot(slot).port, target.port, "slot {slot}");
    }
    let mut con = con;
    for (key, value) in keys.iter().zip(&values) {
        let (want, counter) = if moving.contains(key) {
            (
                format!("{key}@{}", traffic.rounds),
                Some(traffic.rounds.to_string()),
            )
        } else {
            (value.clone(), None)
        };
        assert_eq!(cluster.get(key).as_ref(), Some(&want), "{key} on its owner");
        let through: Option<String> = con.get(key).await.expect("GET after the migration");
        assert_eq!(
            through.as_ref(),
            Some(&want),
            "{key} through the connection"
        );
        if let Some(counter) = counter {
            assert_eq!(cluster.get(&format!("{{{key}}}:n")), Some(counter));
            assert_eq!(cluster.get_on(target.port, key), Ok(Some(want)));
            let left = cluster.get_on(source.port, key).unwrap_err();
            assert!(left.contains("MOVED") || left.contains("Moved"), "{left}");
        }
    }

    // And back at full speed: the same keys, and a connection that follows again.
    let back = cluster.migrate_slots(&slots, source.port);
    assert_eq!(back, moved, "keys moved back");
    for &slot in &slots {
        assert_eq!(cluster.owner_of_slot(slot).port, source.port, "slot {slot}");
    }
    for key in &moving {
        let want = format!("{key}@{}", traffic.rounds);
        assert_eq!(cluster.get_on(source.port, key), Ok(Some(want.clone())));
        let through: Option<String> = con.get(key).await.expect("GET after moving back");
        assert_eq!(through, Some(want));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_keeps_replicated_writes() {
    support::init_tracing();
    let mut cluster = RedisCluster::start();
    let con = cluster.connection().await;
    let (keys, values) = numbered("fo", 1000);
    set_all(&con, &keys, &values).await;
    // Replication is asynchronous: only acknowledged writes are promised to survive.
    cluster.wait_replicas_caught_up();

    let victim = cluster.primaries()[0].clone();
    let doomed: Vec<usize> = (0..keys.len())
        .filter(|&i| victim.serves(cluster.slot_of(&keys[i])))
        .collect();
    assert!(doomed.len() > 100, "{} keys on the victim", doomed.len());

    // A reader on the victim's slots throughout, to see what the outage looks like to it.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = tokio::spawn({
        let (mut con, key, stop) = (con.clone(), keys[doomed[0]].clone(), stop.clone());
        async move {
            let (mut ok, mut errors, mut slowest) = (0u32, Vec::new(), Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match con.get::<_, Option<String>>(&key).await {
                    Ok(_) => ok += 1,
                    Err(e) => errors.push(e.to_string()),
                }
                slowest = slowest.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (ok, errors, slowest)
        }
    });

    let started = Instant::now();
    tokio::task::block_in_place(|| cluster.kill_primary(victim.port));
    let promoted = tokio::task::block_in_place(|| cluster.wait_for_failover(victim.port));
    eprintln!(
        "failover of primary {} to {promoted}: {:?} after SIGKILL",
        victim.port,
        started.elapsed()
    );
    assert_ne!(promoted, victim.port);
    assert!(cluster.primaries().iter().any(|p| p.port == promoted));

    // The connection made before the kill reads everything, the moved slots included.
    let mut con = con;
    let t = Instant::now();
    for (key, value) in keys.iter().zip(&values) {
        let got: Option<String> = con.get(key).await.expect("GET after the failover");
        assert_eq!(got.as_ref(), Some(value), "{key} through the connection");
    }
    eprintln!(
        "first 1000 GETs through the old connection after the failover: {:?}",
        t.elapsed()
    );
    for &i in &doomed {
        assert_eq!(
            cluster.get_on(promoted, &keys[i]),
            Ok(Some(values[i].clone())),
            "{} on the promoted replica",
            keys[i]
        );
    }
    let _: () = con
        .set(&keys[doomed[0]], "after failover")
        .await
        .expect("SET after the failover");
    assert_eq!(
        cluster.get(&keys[doomed[0]]).as_deref(),
        Some("after failover")
    );

    stop.store(true, Ordering::Relaxed);
    let (ok, errors, slowest) = reader.await.expect("reader task");
    eprintln!(
        "reader during the outage: {ok} GETs ok, {} failed, slowest {slowest:?}: {errors:?}",
        errors.len()
    );
    assert!(ok > 0);

    // The old primary comes back empty and follows the one that replaced it.
    tokio::task::block_in_place(|| cluster.restart_node(victim.port));
    let back = cluster
        .replicas()
        .into_iter()
        .find(|n| n.port == victim.port)
        .expect("the restarted node is a replica");
    assert_eq!(back.primary_id, Some(cluster.node_id(promoted)));
    assert_eq!(cluster.primaries().len(), 3);
}

#[test]
fn parses_cluster_nodes_with_migrations_and_failures() {
    let text = "\
a 127.0.0.1:40001@50001 myself,master - 0 0 1 connected 0-5460 [5461->-b] [17-<-c]
b 127.0.0.1:40002@50002 master - 0 1 2 connected 5461-10921 10922
c 127.0.0.1:40003@50003,host master,fail - 1 1 3 disconnected
d 127.0.0.1:40004@50004 slave,fail? a 0 1 1 connected
";
    let view = parse_cluster_nodes(text).unwrap();
    assert_eq!(view.myself.port, 40001);
    assert_eq!(view.open_slots, ["[5461->-b]", "[17-<-c]"]);
    assert_eq!(view.nodes[0].slots, [0..=5460]);
    assert_eq!(view.nodes[1].slots, [5461..=10921, 10922..=10922]);
    assert!(view.nodes[1].serves(10922) && !view.nodes[1].serves(5460));
    assert!(view.nodes[2].failing && view.nodes[2].slots.is_empty());
    assert_eq!(view.nodes[3].primary_id.as_deref(), Some("a"));
    assert!(view.nodes[3].failing);
    assert!(parse_cluster_nodes("a 127.0.0.1:1@2 master").is_err());
    assert!(parse_cluster_nodes("a nowhere master - 0 0 1 connected").is_err());
}

/// Set in the child processes of `stale_sweep_stops_nodes_of_a_killed_test_process`.
const SWEEP_CHILD_ENV: &str = "WALSWEEP_CLUSTER_SWEEP_CHILD";
const SWEEP_CHILD_TEST: &str = "sweep_child";

/// Not a test on its own: the child-process half of the next test. With the env var at
/// `boot`, boots a cluster, prints its node pids and waits to be killed; at `sweep`, only
/// creates its scratch dir, which sweeps what dead test processes left behind.
#[test]
#[ignore = "run by stale_sweep_stops_nodes_of_a_killed_test_process in a child process"]
fn sweep_child() {
    match std::env::var(SWEEP_CHILD_ENV).as_deref() {
        Ok("boot") => {
            let cluster = RedisCluster::start();
            let pids: Vec<String> = cluster.pids().iter().map(u32::to_string).collect();
            println!("PIDS {}", pids.join(","));
            std::io::stdout().flush().unwrap();
            std::thread::sleep(Duration::from_secs(120));
            panic!("sweep_child was not killed within 120 s");
        }
        Ok("sweep") => {
            support::scratch::scratch_root();
        }
        _ => {}
    }
}

#[test]
fn stale_sweep_stops_nodes_of_a_killed_test_process() {
    let exe = std::env::current_exe().expect("path of this test binary");
    let child = |mode: &str| {
        let mut cmd = Command::new(&exe);
        cmd.args(["--exact", SWEEP_CHILD_TEST, "--ignored", "--nocapture"])
            .env(SWEEP_CHILD_ENV, mode)
            .stdin(Stdio::null());
        cmd
    };

    let mut booter = child("boot")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning the child test process");
    let pids: Vec<u32> = BufReader::new(booter.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            line.strip_prefix("PIDS ")
                .map(|p| p.split(',').map(|p| p.parse().unwrap()).collect())
        })
        .expect("the child booted a cluster and printed its pids");
    // Like a test process killed mid-run: no unwinding, no Drop.
    booter.kill().unwrap();
    booter.wait().unwrap();
    assert_eq!(pids.len(), 6);
    assert!(
        pids.iter().all(|&p| process_alive(p)),
        "the nodes should outlive the killed child (that is what the sweep is for)"
    );

    let status = child("sweep")
        .stdout(Stdio::null())
        .status()
        .expect("running the sweeping child");
    assert!(status.success());
    for pid in pids {
        assert!(
            !process_alive(pid),
            "cluster node {pid} of the killed process survived the sweep"
        );
    }
}
