//! The Tessera placement service: which actor host owns which actor.
//!
//! Replicas keep the membership of actor hosts in Raft (openraft, storage on sled); every committed
//! change bumps the table version. Hosts keep a bidirectional stream to the leader: heartbeats up,
//! lease acknowledgements and `(version, hosts)` tables down. A host that misses its lease is
//! removed through Raft; a new leader waits one lease before removing anyone. Hosts compute owners
//! locally from the table with [`ring::Rings`].
//!
//! # Layout
//! - [`store`]: the membership state machine on sled.
//! - [`raft_group`]: what both Raft groups do alike (initial cluster, leadership, tie-breaks).
//! - [`raft_log`]: the Raft log on sled, shared with the scheduler's replicas.
//! - [`network`]: Raft RPCs between replicas over gRPC (generic: the scheduler's replicas use it
//!   too).
//! - [`publish`]: each committed table built once as a full order and a delta, shared by every
//!   host session.
//! - [`server`]: the replica ([`server::Node`]): host sessions, change batching, lease expiry,
//!   health, metrics and `/placement/state`; `run(listeners, shutdown)`.
//! - [`client`]: what hosts use: keeps the latest table, follows the leader, never gives up;
//!   reports the version the host has applied and learns the settled version.
//! - [`settle`]: the leader's settled version (every listed host applied it), the version barrier
//!   actor hosts wait on before activating actors they gained.
//! - [`ring`]: consistent-hash rings per actor type.
//! - [`runtime`]: tokio with a seedable random source, so simulations replay exactly.

pub mod client;
pub mod network;
pub mod publish;
pub mod raft_group;
pub mod raft_log;
pub mod ring;
pub mod runtime;
pub mod server;
pub mod settle;
pub mod store;
pub mod wire;

use std::io::Cursor;

openraft::declare_raft_types!(
    /// Raft types of the placement service.
    pub TypeConfig:
        D = store::Request,
        R = store::Response,
        AsyncRuntime = runtime::Runtime,
);

/// A placement replica's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
