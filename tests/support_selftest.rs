//! Tests of the test support itself: if these fail, every integration test's failure is
//! suspect. Run with `cargo test --test support_selftest`.

mod support;

use std::time::Instant;

use redis::AsyncCommands;
use support::scratch::process_alive;
use support::{Postgres, PostgresOptions, Redis, ShutdownMode};

#[tokio::test]
async fn postgres_boots_with_logical_decoding_settings() {
    support::init_tracing();
    let started = Instant::now();
    let pg = Postgres::start();
    eprintln!("Postgres boot took {:?}", started.elapsed());

    assert_eq!(pg.host(), "127.0.0.1");
    assert_eq!(pg.psql("postgres", "SHOW wal_level"), "logical");
    assert_eq!(
        pg.psql("postgres", "SHOW logical_decoding_work_mem"),
        "64kB"
    );
    assert_eq!(pg.psql("postgres", "SHOW TimeZone"), "UTC");

    // The async client sees the same server, and create_database copes with odd names.
    pg.create_database("odd db-name");
    let client = pg.client("odd db-name").await;
    let row = client
        .query_one(
            "SELECT current_database(), current_setting('port')::int",
            &[],
        )
        .await
        .expect("query through the test client");
    assert_eq!(row.get::<_, &str>(0), "odd db-name");
    assert_eq!(row.get::<_, i32>(1), i32::from(pg.port()));

    // A logical slot can be created: the point of this whole set-up.
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT slot_name FROM pg_create_logical_replication_slot('selftest', 'pgoutput')"
        ),
        "selftest"
    );
}

#[test]
fn parallel_postgres_instances_get_different_ports() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(Postgres::start);
        let b = s.spawn(Postgres::start);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.port(), b.port());
    assert_ne!(a.pid(), b.pid());
    assert_eq!(a.psql("postgres", "SHOW port"), a.port().to_string());
    assert_eq!(b.psql("postgres", "SHOW port"), b.port().to_string());
}

#[test]
fn fast_stop_and_restart_keep_data_and_port() {
    let mut pg = Postgres::start();
    let port = pg.port();
    pg.psql(
        "postgres",
        "CREATE TABLE kept (id int PRIMARY KEY, note text); \
         INSERT INTO kept VALUES (1, 'one'), (2, 'two');",
    );

    pg.stop(ShutdownMode::Fast);
    assert!(!pg.is_running());
    pg.restart();
    assert_eq!(pg.port(), port);
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT string_agg(note, ',' ORDER BY id) FROM kept"
        ),
        "one,two"
    );

    // A crash-like stop keeps committed data too: the commit reached the OS (fsync=off only
    // matters if the machine crashes) and synchronous_commit is on.
    pg.psql("postgres", "INSERT INTO kept VALUES (3, 'three')");
    pg.stop(ShutdownMode::Immediate);
    pg.restart();
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM kept"), "3");
}

#[test]
fn restart_after_the_postmaster_was_killed() {
    let mut pg = Postgres::start();
    pg.psql("postgres", "CREATE TABLE survived (id int)");
    let old = pg.pid();
    support::scratch::signal(old, "KILL").unwrap();
    assert!(support::scratch::wait_gone(
        old,
        std::time::Duration::from_secs(10)
    ));
    assert!(!pg.is_running());
    pg.restart();
    assert_ne!(pg.pid(), old);
    assert_eq!(pg.psql("postgres", "SELECT count(*) FROM survived"), "0");
}

#[tokio::test]
async fn hba_extra_password_users() {
    let pg = Postgres::start_with(PostgresOptions {
        hba_extra: vec![
            "host all scram_user 127.0.0.1/32 scram-sha-256".into(),
            "host all md5_user 127.0.0.1/32 md5".into(),
        ],
        password_encryption: Some("scram-sha-256".into()),
        ..Default::default()
    });
    assert_eq!(
        pg.psql("postgres", "SHOW password_encryption"),
        "scram-sha-256"
    );
    pg.psql(
        "postgres",
        "CREATE ROLE scram_user LOGIN PASSWORD 'right p@ss:/word'; \
         SET password_encryption = 'md5'; \
         CREATE ROLE md5_user LOGIN PASSWORD 'md5 secret';",
    );

    let connect = |user: &'static str, password: &'static str| {
        let url = pg.url_as(user, password, "postgres");
        async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            client.query_one("SELECT current_user::text", &[]).await
        }
    };

    let row = connect("scram_user", "right p@ss:/word")
        .await
        .expect("scram login");
    assert_eq!(row.get::<_, &str>(0), "scram_user");
    let err = connect("scram_user", "wrong")
        .await
        .expect_err("wrong scram password");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "unexpected error: {err:?}"
    );

    let row = connect("md5_user", "md5 secret").await.expect("md5 login");
    assert_eq!(row.get::<_, &str>(0), "md5_user");
    connect("md5_user", "wrong")
        .await
        .expect_err("wrong md5 password");

    // Everyone else still gets the default trust lines.
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM pg_hba_file_rules WHERE auth_method = 'trust'"
        ),
        "4"
    );
}

#[tokio::test]
async fn extra_settings_override_defaults() {
    let pg = Postgres::start_with(PostgresOptions {
        extra_settings: vec![
            ("max_slot_wal_keep_size".into(), "1MB".into()),
            ("wal_sender_timeout".into(), "3s".into()),
        ],
        ..Default::default()
    });
    assert_eq!(pg.psql("postgres", "SHOW max_slot_wal_keep_size"), "1MB");
    assert_eq!(pg.psql("postgres", "SHOW wal_sender_timeout"), "3s");
}

#[test]
fn dropping_postgres_stops_it_and_removes_its_dir() {
    let pg = Postgres::start();
    let pid = pg.pid();
    let data = pg.data_dir();
    assert!(process_alive(pid));
    drop(pg);
    assert!(!process_alive(pid), "postmaster {pid} survived drop");
    assert!(!data.exists(), "{} survived drop", data.display());
}

#[tokio::test]
async fn redis_stop_and_restart_on_the_same_port() {
    let mut redis = Redis::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}/0"));

    let mut con = redis.connection().await;
    let _: () = con.set("k", "v").await.expect("SET");
    let v: String = con.get("k").await.expect("GET");
    assert_eq!(v, "v");

    redis.stop();
    assert!(!redis.is_running());
    let res: redis::RedisResult<String> = con.get("k").await;
    assert!(
        res.is_err(),
        "a command on a stopped Redis succeeded: {res:?}"
    );
    let client = redis::Client::open(redis.url()).unwrap();
    assert!(
        client.get_multiplexed_async_connection().await.is_err(),
        "connected to a stopped Redis"
    );

    redis.restart();
    assert_eq!(redis.port(), port);
    let mut con = redis.connection().await;
    // No persistence: the restarted server is empty.
    let v: Option<String> = con.get("k").await.expect("GET after restart");
    assert_eq!(v, None);
    let _: () = con.set("k", "again").await.expect("SET after restart");
}

#[test]
fn dropping_redis_kills_it() {
    let redis = Redis::start();
    let pid = redis.pid().expect("running");
    drop(redis);
    assert!(!process_alive(pid), "redis-server {pid} survived drop");
}

/// Not a check: prints how long booting takes, to keep an eye on test-suite speed.
/// `cargo test --test support_selftest measure_boot_time -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_boot_time() {
    let t = Instant::now();
    drop(Postgres::start());
    eprintln!(
        "first Postgres boot + drop (includes the once-per-process initdb): {:?}",
        t.elapsed()
    );
    const N: u32 = 5;
    let (mut boot, mut stop) = (Default::default(), std::time::Duration::default());
    for _ in 0..N {
        let t = Instant::now();
        let pg = Postgres::start();
        boot += t.elapsed();
        let t = Instant::now();
        drop(pg);
        stop += t.elapsed();
    }
    let boot: std::time::Duration = boot;
    eprintln!(
        "Postgres boot: {:?} avg, drop: {:?} avg (over {N})",
        boot / N,
        stop / N
    );
    let t = Instant::now();
    for _ in 0..N {
        drop(Redis::start());
    }
    eprintln!("Redis boot + drop: {:?} avg", t.elapsed() / N);
}

#[test]
#[should_panic(expected = "no_such_setting")]
fn bad_setting_fails_fast_with_the_server_log() {
    Postgres::start_with(PostgresOptions {
        extra_settings: vec![("no_such_setting".into(), "1".into())],
        ..Default::default()
    });
}
