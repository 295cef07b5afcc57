//! A fenced fill from Rust (README, "Fenced fills"): read item `id` through the cache so that
//! a fill racing a commit walsweep invalidates is refused instead of stored stale.
//!
//! ```text
//! cargo run --example fenced_fill -- redis://127.0.0.1:6379 postgres://app@localhost/app 1
//! ```
//!
//! Expects walsweep with `[matroska] fences = true` (it loads the Redis Functions) on database
//! `app`, slot `walsweep`, with a rule `deps = ["id:item:{id}"]` on `items (id int, v int)`.
//! Values are stored as matroska-cache serializes them (`j` + JSON), so a Python app using
//! the same keys reads them.

use redis::AsyncCommands;

const POSITION_KEY: &str = "walsweep:app/walsweep:applied";
const TTL_SECS: u64 = 600;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [redis_url, pg_url, id] = &args[..] else {
        return Err("usage: fenced_fill <redis-url> <postgres-url> <item id>".into());
    };
    let id: i32 = id.parse()?;
    let mut redis = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let (pg, connection) = tokio_postgres::connect(pg_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);

    let data_key = format!("cache::data::item:{id}");
    if let Some(cached) = redis.get::<_, Option<String>>(&data_key).await? {
        println!("hit {cached}");
        return Ok(());
    }
    // 1. A miss: take the token BEFORE reading the database.
    let token: String = redis::cmd("FCALL")
        .arg("walsweep_fill_begin")
        .arg(1)
        .arg(POSITION_KEY)
        .query_async(&mut redis)
        .await?;
    // 2. Read the row.
    let v: i32 = pg
        .query_one("SELECT v FROM items WHERE id = $1", &[&id])
        .await?
        .get(0);
    // 3. Store it, unless walsweep invalidated the entry (or its dependency set) since the
    //    token: then the row read may be older than the commit, and nothing is written.
    let set = format!("cache::rdep::id:item:{id}");
    let stored: i64 = redis::cmd("FCALL")
        .arg("walsweep_fill")
        .arg(6)
        .arg(&data_key)
        .arg(format!("walsweep:fence:{data_key}"))
        .arg("walsweep:fence-all")
        .arg("walsweep:fills")
        .arg(&set)
        .arg(format!("walsweep:fence:{set}"))
        .arg(&token)
        .arg(format!("j{v}"))
        .arg(TTL_SECS)
        .query_async(&mut redis)
        .await?;
    println!(
        "miss: read {v}, {}",
        if stored == 1 {
            "stored"
        } else {
            "refused (a newer commit was invalidated meanwhile; read again next time)"
        }
    );
    Ok(())
}
