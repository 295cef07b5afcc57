//! Rules end to end: SQL changes in a real Postgres remove exactly the right entries from a
//! real Redis.

mod compat;
mod invalidation;
mod undecodable;

use redis::AsyncCommands;

pub use crate::support::daemon::{config, exists, start, wait_gone, Daemon};

pub async fn set_keys<C: AsyncCommands>(conn: &mut C, keys: &[&str]) {
    for k in keys {
        let _: () = conn.set(*k, "cached").await.expect("SET");
    }
}

/// matroska-cache's `put`: SADD the data key to each dependency set, then SETEX the data.
pub async fn matroska_put<C: AsyncCommands>(conn: &mut C, key: &str, deps: &[&str]) {
    let data_key = format!("cache::data::{key}");
    for d in deps {
        let _: () = conn
            .sadd(format!("cache::rdep::{d}"), &data_key)
            .await
            .expect("SADD");
    }
    let _: () = conn.set_ex(&data_key, "s1", 600).await.expect("SETEX");
}
