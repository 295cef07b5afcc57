//! The subcommands behind the `walsweep` binary, one file each.

pub mod check;
pub mod explain;
pub mod setup;
pub mod tail;
