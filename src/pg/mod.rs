//! Everything that speaks to Postgres: byte codecs (pure) and the connections that carry them.

pub mod catalog;
pub(crate) mod channel_binding;
pub(crate) mod connect;
pub(crate) mod lsn;
pub mod pgoutput;
pub mod pgoutput_options;
pub(crate) mod pgpass;
pub mod replication;
pub(crate) mod slot_invalidation;
pub(crate) mod tls;
pub(crate) mod wal_layout;
pub(crate) mod wire;

pub use lsn::Lsn;
