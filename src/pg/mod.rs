//! Everything that speaks to Postgres: byte codecs (pure) and the connections that carry them.

pub mod catalog;
pub mod lsn;
pub mod pgoutput;
pub mod replication;
pub mod tls;
pub mod wire;

pub use lsn::Lsn;
