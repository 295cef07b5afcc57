//! Where data enters: committed transactions assembled from the decoded pgoutput stream, and
//! the LSN bookkeeping of what was received and what may be confirmed.

pub mod assembler;
pub(crate) mod history;
pub(crate) mod progress;
pub(crate) mod streamed;
pub mod types;
