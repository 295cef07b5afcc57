//! The visibility gate, made deterministic: a synchronous standby (`pg_receivewal
//! --synchronous`, named in `synchronous_standby_names`) is paused with SIGSTOP while a writer
//! commits. Postgres has flushed the commit and walsweep receives it, but the transaction is
//! not visible to other sessions until the standby answers. A reader that misses the cache in
//! that window reads the old row and fills the cache with it.
//!
//! Without the gate walsweep invalidates inside the window and the reader's fill is stale
//! (the first test shows it). With the gate the entry stays until the commit is visible, and
//! the fill after the invalidation always reads the new row, however often it is repeated.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use support::binaries::{pg_tool, server_major};
use support::daemon::{self, wait_streaming};
use support::scratch;
use support::{Postgres, PostgresOptions, Redis};

const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
INSERT INTO items VALUES (1, 'v0');
CREATE PUBLICATION pub FOR TABLE items;
";

const RULES: &str = r#"
[[table]]
name = "public.items"
keys = ["item:{id}"]
"#;

const STANDBY_NAME: &str = "syncstandby";

/// `pg_receivewal --synchronous` as the synchronous standby; killed on drop.
struct SyncStandby {
    child: Child,
    _dir: tempfile::TempDir,
}

impl SyncStandby {
    fn start(pg: &Postgres) -> SyncStandby {
        let dir = scratch::instance_dir("receivewal-", false);
        let child = Command::new(pg_tool("pg_receivewal"))
            .arg("-D")
            .arg(dir.path())
            .arg("-d")
            .arg(format!(
                "host={} port={} user=postgres application_name={STANDBY_NAME}",
                pg.host(),
                pg.port()
            ))
            .args(["--synchronous", "--no-loop", "--status-interval=1"])
            .env_remove("LD_LIBRARY_PATH")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pg_receivewal");
        SyncStandby { child, _dir: dir }
    }

    fn signal(&self, signal: &str) {
        scratch::signal(self.child.id(), signal).expect("signal pg_receivewal");
    }
}

impl Drop for SyncStandby {
    fn drop(&mut self) {
        let _ = scratch::signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The machine's pg_receivewal only talks to servers of its own major or older; says when the
/// test is skipped for that.
fn receivewal_fits() -> bool {
    let out = Command::new(pg_tool("pg_receivewal"))
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("pg_receivewal --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let major: u32 = text
        .split_whitespace()
        .last()
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < server_major() {
        eprintln!(
            "skipped: the machine's pg_receivewal ({major}) cannot stream from Postgres {}",
            server_major()
        );
    }
    major >= server_major()
}

struct Setup {
    pg: Postgres,
    redis: Redis,
    standby: SyncStandby,
    client: tokio_postgres::Client,
}

async fn setup() -> Setup {
    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![("synchronous_standby_names".into(), STANDBY_NAME.into())],
        ..Default::default()
    });
    let standby = SyncStandby::start(&pg);
    let client = pg.client("postgres").await;
    daemon::wait_for(30, || async {
        client
            .query_opt(
                "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 \
                 AND sync_state = 'sync'",
                &[&STANDBY_NAME],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    pg.create_database("app");
    pg.psql("app", SCHEMA);
    let client = pg.client("app").await;
    Setup {
        pg,
        redis: Redis::start(),
        standby,
        client,
    }
}

/// One round: the reader has `item:1` cached; the standby stalls while the writer commits
/// `value`; the reader refills as soon as the entry is gone. Returns (whether the entry was
/// gone while the commit was still invisible, what the reader's fill stored).
async fn round(
    s: &Setup,
    conn: &mut redis::aio::MultiplexedConnection,
    value: &str,
) -> (bool, String) {
    let _: () = conn.set("item:1", "cached").await.unwrap();
    s.standby.signal("STOP");
    let writer = {
        let url = s.pg.url("app");
        let value = value.to_string();
        tokio::spawn(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("writer connects");
            tokio::spawn(connection);
            client
                .execute("UPDATE items SET v = $1 WHERE id = 1", &[&value])
                .await
                .expect("the writer's commit")
        })
    };
    // The commit is flushed (and decodable) once the writer waits for the standby.
    daemon::wait_for(10, || async {
        s.client
            .query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
                &[],
            )
            .await
            .unwrap()
            .is_some()
    })
    .await;
    // Long enough for walsweep to receive and apply it, had it no gate (a few ms).
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut gone_while_invisible = false;
    while Instant::now() < deadline {
        if !daemon::exists(conn, "item:1").await {
            gone_while_invisible = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if gone_while_invisible {
        // The reader misses and refills from the database, which still shows the old row.
        let old: String = s
            .client
            .query_one("SELECT v FROM items WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        let _: () = conn.set("item:1", &old).await.unwrap();
    }
    s.standby.signal("CONT");
    writer.await.unwrap();
    if !gone_while_invisible {
        // Now visible: walsweep invalidates, and the reader's refill reads the new row.
        daemon::wait_gone(conn, "item:1", 10).await;
        let now: String = s
            .client
            .query_one("SELECT v FROM items WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        let _: () = conn.set("item:1", &now).await.unwrap();
    }
    // Whatever walsweep still had to apply for this commit is applied by now.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cached: Option<String> = conn.get("item:1").await.unwrap();
    (gone_while_invisible, cached.unwrap_or_default())
}

/// walsweep on `slot`, with the gate on or off.
fn start_walsweep(s: &Setup, slot: &str, gate: bool) -> daemon::Daemon {
    let text = daemon::config_text(&s.pg, &s.redis.url(), "app", slot, RULES).replacen(
        "[source]\n",
        &format!("[source]\nvisibility_gate = {gate}\n"),
        1,
    );
    daemon::start(walsweep::config::Config::parse(&text).expect("config"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_gate_an_invalidation_before_visibility_is_refilled_with_the_old_row() {
    support::init_tracing();
    if !receivewal_fits() {
        return;
    }
    let s = setup().await;
    let mut conn = s.redis.connection().await;
    let walsweep = start_walsweep(&s, "nogate", false);
    wait_streaming(&s.client, "nogate").await;

    let (gone_early, cached) = round(&s, &mut conn, "v1").await;
    assert!(
        gone_early,
        "without the gate walsweep invalidates while the commit is still invisible"
    );
    assert_eq!(
        cached, "v0",
        "and the reader's fill stores the old row: stale"
    );
    walsweep.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_gate_the_fill_after_an_invalidation_never_reads_the_old_row() {
    support::init_tracing();
    if !receivewal_fits() {
        return;
    }
    let s = setup().await;
    let mut conn = s.redis.connection().await;
    let walsweep = start_walsweep(&s, "gate", true);
    wait_streaming(&s.client, "gate").await;

    let rounds: u32 = std::env::var("WALSWEEP_GATE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    for i in 1..=rounds {
        let value = format!("v{i}");
        let (gone_early, cached) = round(&s, &mut conn, &value).await;
        assert!(
            !gone_early,
            "round {i}: the entry was invalidated while the commit was invisible"
        );
        assert_eq!(
            cached, value,
            "round {i}: the fill after the invalidation is stale"
        );
    }
    walsweep.stop().await;
}
