//! Everything that speaks to Postgres: byte codecs (pure) and the connections that carry them.

pub mod lsn;
pub mod pgoutput;

pub use lsn::Lsn;
