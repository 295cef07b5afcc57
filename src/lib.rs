//! walsweep: keeps Redis caches honest by following a Postgres logical replication slot.

pub mod pg;
