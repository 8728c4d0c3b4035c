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
//! - no host ever learns a settled version `s` while a host listed in table `s` has not applied
//!   `s` yet (hosts apply each table as it arrives);
//! - after healing, every host knows the final table version as settled.
//!
//! A run is a pure function of its seed (see "Simulation" in `docs/ARCHITECTURE.md`): the seed
//! drives turmoil's network (latency, loss), the fault schedule, openraft's election timeouts and
//! the clients' jitter (through `placement::runtime`) and tokio's schedulers (`--cfg
//! tokio_unstable`, see `.cargo/config.toml`); nothing waits on a real-time thread, and a crashed
//! replica is cut off before its runtime is dropped. A failing seed prints itself and
//! `SIM_SEED=<seed>` replays it event for event; `tests/determinism.rs` checks that.
//!
//! [`actor_sim::run`] simulates 3 placement replicas and 4 actor hosts, each a real
//! `ActorRuntime` with its internal port, an in-process app (a `Counter` actor whose turn
//! reads and writes its count through the runtime's fenced state API) and one shared in-memory
//! state store standing for Redis ([`mem_store`]). Workers in every host call 12 actors, skewed
//! towards a few hot ones. Faults, from the seed: host crashes (restarted with a new address, as
//! a real restart gets a new port), host pauses, partitions between a host and placement,
//! partitions between two hosts, placement replica crashes. Then everything heals and:
//! - no two turns of one actor whose state writes were accepted overlap (turns are judged in
//!   the order the simulation executed them, which is exact on one thread); overlaps of any
//!   turns (a turn frozen by a pause and then refused by the fence, say) are counted and
//!   reported, not failed: the design allows them;
//! - each actor's accepted writes count 1, 2, 3, ... (no lost or doubled update), the store
//!   holds their number, and every increment a client saw acknowledged is one of them;
//! - every host reaches every actor after healing;
//! - the cluster did real work (at least 100 accepted writes).
//!
//! A pause freezes the host's app (its turns in flight) and its store client, and holds every
//! link of the host (messages queue and arrive on release, as a stopped process's TCP peers
//! see it). Frozen work resumes 0-40 ms after the pause ends, in no particular order, as threads
//! do after SIGCONT; half the pauses end near the placement lease, where the host's lease has
//! lapsed but placement may not yet have removed it. turmoil cannot stop one host's clock, so the runtime's own tasks (the lease watch,
//! heartbeats, which queue on the held links) keep running: weaker than SIGSTOP for the runtime
//! itself, the same for everything around it. A turmoil partition drops TCP segments for good
//! (no retransmission), which black-holes a connection open across it.
//!
//! The seed drives turmoil's network (latency, loss), the fault schedule, openraft's election
//! timeouts and the clients' jitter (through `placement::runtime`), the hosts' and app's draws;
//! tokio's scheduler is seeded too (`--cfg tokio_unstable`, see `.cargo/config.toml`). A failing
//! seed prints itself and `SIM_SEED=<seed>` reruns it (its test checks two seeds, twice each,
//! after the parallel runs; `SIM_CHECK_REPLAY=1` checks every seed). Found and removed on the way:
//! the runtime deactivating actors in its `HashMap`'s random order.
//!
//! [`sched_sim::run`] simulates the scheduler service (the real store, trigger loop, hub and
//! gRPC server, on simulated time), three hosts on the real client's watch streams and clients
//! creating, replacing and deleting jobs and reminders, under scheduler crashes, host crashes,
//! partitions, message loss and latency. It checks that no tick is dispatched or received
//! before it is due, nothing is dispatched after its delete (or replacement) was acknowledged,
//! no tick is lost (the trigger loop never moves past a tick no host received, unless the
//! default policy gave it up; quiet-time ticks arrive on time; retried-forever jobs get every
//! tick), every delivery coalesces the ticks due at its dispatch, and each scheduler restart
//! brings at most one catch-up per job. `SIM_SEED=<seed>` reruns a seed exactly.

pub mod actor_sim;
pub mod mem_store;
pub mod net;
pub mod placement_sim;
pub mod sched_sim;
pub mod seeds;

pub use placement_sim as placement;
