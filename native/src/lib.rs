//! Native core of iris-fast: wire codec (`frame`, `batch`), the dedup window
//! (`dedup`), the replication-link records (`repl`) and their Python bindings (`py`).

pub mod batch;
pub mod dedup;
pub mod frame;
mod py;
pub mod repl;
