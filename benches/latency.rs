//! Live invalidation latency: single-row UPDATEs at a fixed rate against a private Postgres,
//! walsweep (release build, in-process) applying a realistic rule set to a private Redis, and
//! for each update the time from COMMIT returning to the client until Redis reports the key
//! deleted (keyspace notification). Prints p50/p90/p99/max.
//!
//! Read-your-writes too: after each COMMIT the writer takes `pg_current_wal_insert_lsn()` and
//! waits until walsweep's published applied position (`walsweep:<db>/<slot>:applied`, followed
//! through its Pub/Sub channel by one subscription, as an app would keep) reaches it; the time
//! from the COMMIT acknowledgement until the wait returns is the "wait" line.
//!
//!   cargo bench --bench latency
//!   WALSWEEP_BENCH_RATE=1000 WALSWEEP_BENCH_SECS=10 cargo bench --bench latency
//!   WALSWEEP_BENCH_GATE=0 cargo bench --bench latency    # without the visibility gate

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use walsweep::config::Config;
use walsweep::pipeline;
use walsweep::pipeline::visibility::{GatedSink, VisibilityGate};
use walsweep::plan::rules::{Rules, RulesPlanner};
use walsweep::sink::redis::{state_prefix, RedisSink, APPLIED_POSITION};

const ROWS: i32 = 1000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn main() {
    let rate = env_u64("WALSWEEP_BENCH_RATE", 1000);
    let secs = env_u64("WALSWEEP_BENCH_SECS", 10);
    let pg = support::Postgres::start();
    pg.psql(
        "postgres",
        &format!(
            "CREATE TABLE articles (id int PRIMARY KEY, slug text, title text, category text, published bool);
             ALTER TABLE articles REPLICA IDENTITY FULL;
             INSERT INTO articles SELECT g, 'slug-' || g, 't', 'c' || (g % 10), true FROM generate_series(1, {ROWS}) g;
             CREATE PUBLICATION pub FOR TABLE articles;"
        ),
    );
    let redis = support::Redis::start();
    let config = Config::parse(&format!(
        r#"
[source]
url = "{}"
publication = "pub"
[redis]
url = "{}"
[[table]]
name = "public.articles"
keys = ["article:{{id}}", "article:slug:{{slug}}"]
deps = ["id:article:{{id}}"]
[[table.scope]]
name = "Article"
columns = ["category", "published"]
"#,
        pg.url("postgres"),
        redis.url()
    ))
    .expect("bench config");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let rules = Rules::from_config(&config).unwrap();
        let sink = RedisSink::new(&config.redis, &config.matroska)
            .unwrap()
            .with_state_prefix(state_prefix("postgres", &config.source.slot));
        let position_key = format!(
            "{}{APPLIED_POSITION}",
            state_prefix("postgres", &config.source.slot)
        );
        let gate = (env_u64("WALSWEEP_BENCH_GATE", 1) != 0)
            .then(|| VisibilityGate::new(config.source.connect_params().unwrap()));
        println!("visibility gate: {}", if gate.is_some() { "on" } else { "off" });
        let sink = GatedSink::new(sink, gate);
        let (shutdown, signal) = pipeline::shutdown_channel();
        let source = config.source.clone();
        let daemon = tokio::spawn(async move {
            pipeline::run(&source, &[], RulesPlanner::new(rules), sink, signal).await
        });
        let client = pg.client("postgres").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .query_opt("SELECT 1 FROM pg_replication_slots WHERE active", &[])
            .await
            .unwrap()
            .is_none()
        {
            assert!(Instant::now() < deadline, "walsweep did not start streaming");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Deletions are observed through keyspace notifications, timestamped on arrival.
        let mut conn = redis.connection().await;
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("notify-keyspace-events")
            .arg("Eg")
            .query_async(&mut conn)
            .await
            .unwrap();
        let redis_client = redis::Client::open(redis.url()).unwrap();
        let mut pubsub = redis_client.get_async_pubsub().await.unwrap();
        pubsub.subscribe("__keyevent@0__:del").await.unwrap();
        let deleted: Arc<Mutex<HashMap<String, VecDeque<Instant>>>> = Default::default();
        let sink_deleted = deleted.clone();
        let listener = tokio::spawn(async move {
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let key: String = msg.get_payload().unwrap_or_default();
                let now = Instant::now();
                sink_deleted.lock().unwrap().entry(key).or_default().push_back(now);
            }
        });

        // The applied position, as one long-lived subscription sees it.
        let mut position_sub = redis_client.get_async_pubsub().await.unwrap();
        position_sub.subscribe(&position_key).await.unwrap();
        let initial: Option<String> = redis::cmd("GET")
            .arg(&position_key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let (position_tx, position) =
            tokio::sync::watch::channel(initial.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0));
        let position_listener = tokio::spawn(async move {
            let mut messages = position_sub.on_message();
            while let Some(msg) = messages.next().await {
                if let Ok(value) = msg.get_payload::<String>().unwrap_or_default().parse::<u64>() {
                    position_tx.send_if_modified(|p| {
                        let moved = value > *p;
                        *p = (*p).max(value);
                        moved
                    });
                }
            }
        });
        let insert_lsn = client
            .prepare("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::text")
            .await
            .unwrap();
        let mut waits: Vec<Duration> = Vec::with_capacity((rate * secs) as usize);
        let mut waiters = Vec::with_capacity((rate * secs) as usize);
        let mut wait_timeouts = 0usize;

        let total = rate * secs;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        // (key, UPDATE sent, COMMIT acknowledged): the true commit lies between the two, so
        // the latency is reported from both ends.
        let mut committed: Vec<(String, Instant, Instant)> = Vec::with_capacity(total as usize);
        let update = client
            .prepare("UPDATE articles SET title = $2 WHERE id = $1")
            .await
            .unwrap();
        let started = Instant::now();
        for i in 0..total {
            let due = started + interval * i as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(wait).await;
            }
            let id = (i % ROWS as u64) as i32 + 1;
            let key = format!("article:{id}");
            let _: () = redis::cmd("SET").arg(&key).arg("cached").query_async(&mut conn).await.unwrap();
            let sent = Instant::now();
            client.execute(&update, &[&id, &format!("t{i}")]).await.unwrap();
            let acked = Instant::now();
            committed.push((key, sent, acked));
            let lsn: u64 = client
                .query_one(&insert_lsn, &[])
                .await
                .unwrap()
                .get::<_, String>(0)
                .parse()
                .unwrap();
            // Waited for beside the writer, so the waits do not slow the write rate.
            let mut position = position.clone();
            waiters.push(tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(5), position.wait_for(|p| *p >= lsn))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|_| acked.elapsed())
            }));
        }
        for waiter in waiters {
            match waiter.await.unwrap() {
                Some(waited) => waits.push(waited),
                None => wait_timeouts += 1,
            }
        }
        position_listener.abort();
        let elapsed = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        listener.abort();

        let mut deleted = std::mem::take(&mut *deleted.lock().unwrap());
        let mut from_ack = Vec::with_capacity(committed.len());
        let mut from_sent = Vec::with_capacity(committed.len());
        let mut missing = 0usize;
        for (key, sent, acked) in &committed {
            // The deletion often lands before the client has read its own COMMIT
            // acknowledgement; that counts as zero from the acknowledgement.
            match deleted.get_mut(key).and_then(|q| q.pop_front()) {
                Some(gone) => {
                    from_ack.push(gone.saturating_duration_since(*acked));
                    from_sent.push(gone.saturating_duration_since(*sent));
                }
                None => missing += 1,
            }
        }
        from_ack.sort();
        from_sent.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "latency: {} single-row updates at {:.0}/s ({} requested) over {:.1}s, missing={missing}",
            committed.len(),
            committed.len() as f64 / elapsed.as_secs_f64(),
            rate,
            elapsed.as_secs_f64(),
        );
        for (label, sorted) in [
            ("from COMMIT acknowledged (lower bound)", &from_ack),
            ("from UPDATE sent (upper bound)", &from_sent),
        ] {
            println!(
                "  key gone {label}: p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms",
                ms(percentile(sorted, 50.0)),
                ms(percentile(sorted, 90.0)),
                ms(percentile(sorted, 99.0)),
                ms(sorted.last().copied().unwrap_or_default()),
            );
        }
        waits.sort();
        println!(
            "  wait (COMMIT acknowledged -> applied position reached it): p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms timeouts={wait_timeouts}",
            ms(percentile(&waits, 50.0)),
            ms(percentile(&waits, 90.0)),
            ms(percentile(&waits, 99.0)),
            ms(waits.last().copied().unwrap_or_default()),
        );
        shutdown.request();
        let _ = daemon.await;
    });
}
