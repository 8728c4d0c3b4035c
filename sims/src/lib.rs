//! Deterministic whole-cluster simulations on turmoil, with oracles for the invariants of
//! `../shared/reference/reliability.md`.
//!
//! [`placement::run`] simulates 3 placement replicas and 10 actor hosts through leader crashes,
//! partitions between replicas and lossy links, then heals everything and checks:
//! - at most one leader per term;
//! - table versions only grow on every host;
//! - after the faults heal, all hosts hold the same table, listing every host;
//! - no host is ever dropped from a table while it is alive and can reach the replicas (hosts are
//!   never faulted here, so once all are in, none may go missing).
//!
//! Everything random comes from the seed: turmoil's network, the fault schedule, openraft's
//! election timeouts and the clients' jitter (through `placement::runtime`). A failing seed
//! prints itself and replays exactly with `SIM_SEED=<seed>`.

pub mod net;
pub mod placement_sim;

pub use placement_sim as placement;
