//! The HTTP endpoint against a running pipeline: every documented metric is exported, and
//! `/readyz` follows Redis going away and coming back. Its own test binary, because the
//! metrics recorder is process-wide.

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::{Postgres, Redis};
use walsweep::config::Config;
use walsweep::pipeline;
use walsweep::plan::rules::{Rules, RulesPlanner};
use walsweep::sink::redis::RedisSink;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, response)
}

async fn wait_status(addr: std::net::SocketAddr, path: &str, want: u16, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, body) = get(addr, path).await;
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} stayed {status}, want {want}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exported_and_readiness_follows_redis() {
    support::init_tracing();
    let pg = Postgres::start();
    pg.psql(
        "postgres",
        "CREATE TABLE items (id int PRIMARY KEY, name text); CREATE PUBLICATION pub FOR TABLE items;
         CREATE TABLE gauges (id int PRIMARY KEY);",
    );
    let mut redis = Redis::start();
    // The inspector's metrics exist while it runs: an (empty) mirrored table to inspect.
    let config = Config::parse(&format!(
        "[source]\nurl = \"{}\"\npublication = \"pub\"\nstatus_interval_ms = 200\nreconnect_max_ms = 300\n\
         [redis]\nurl = \"{}\"\ntimeout_ms = 500\n[[table]]\nname = \"items\"\nkeys = [\"item:{{id}}\"]\n\
         [[table]]\nname = \"gauges\"\n[[table.mirror]]\nkey = \"gauge:{{id}}\"\n[inspect]\nrows_per_minute = 60\n",
        pg.url("postgres"),
        redis.url()
    ))
    .unwrap();
    let handle = walsweep::telemetry::http::install_recorder();
    let addr = walsweep::telemetry::http::serve("127.0.0.1:0", handle)
        .await
        .unwrap();
    tokio::spawn(walsweep::sink::redis::probe::probe_redis(
        config.redis.clone(),
        Duration::from_millis(100),
    ));
    let (status, _) = get(addr, "/healthz").await;
    assert_eq!(status, 200);

    let rules = Rules::from_config(&config).unwrap();
    let sink = RedisSink::new(&config.redis, &config.matroska).unwrap();
    let (shutdown, signal) = pipeline::shutdown_channel();
    // As `walsweep::pipeline::daemon::run` does.
    tokio::spawn(pipeline::inspect::run(config.clone(), signal.clone()));
    let source = config.source.clone();
    let task = tokio::spawn(async move {
        pipeline::run(&source, &[], RulesPlanner::new(rules), sink, signal).await
    });
    wait_status(addr, "/readyz", 200, 30).await;

    let mut conn = redis.connection().await;
    let _: () = redis::cmd("SET")
        .arg("item:1")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    pg.psql(
        "postgres",
        "INSERT INTO items VALUES (1, 'a'); TRUNCATE items;",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg("item:1")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (_, body) = get(addr, "/metrics").await;
        // Both transactions applied (the TRUNCATE's table-wide effect included) before checking.
        if !exists
            && body.contains("walsweep_transactions_applied_total 2")
            && body.contains("walsweep_fallbacks_total{cause=\"truncate\"} 1")
        {
            for name in walsweep::telemetry::metrics::ALL {
                assert!(
                    body.contains(&format!("# TYPE {name}")),
                    "{name} missing from /metrics:\n{body}"
                );
            }
            assert!(body.contains("walsweep_keys_unlinked_total 1"), "{body}");
            assert!(
                body.contains("walsweep_effects_applied_total{kind=\"key\"} 1"),
                "{body}"
            );
            assert!(
                body.contains("walsweep_effects_applied_total{kind=\"key_prefix\"} 1"),
                "{body}"
            );
            assert!(
                body.contains("walsweep_transactions_applied_total 2"),
                "{body}"
            );
            for op in ["insert", "truncate"] {
                let series = format!(
                    "walsweep_changes_decoded_total{{table=\"public.items\",op=\"{op}\"}} 1"
                );
                assert!(body.contains(&series), "{series} missing:\n{body}");
            }
            assert!(
                body.contains("walsweep_commit_to_applied_seconds_count 2"),
                "{body}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed the workload:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    redis.stop();
    wait_status(addr, "/readyz", 503, 10).await;
    redis.restart();
    wait_status(addr, "/readyz", 200, 10).await;

    shutdown.request();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
