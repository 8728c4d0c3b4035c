//! Tessera's scheduler: durable jobs and actor reminders.
//!
//! It owns everything between "a client asked for something to happen later" and "a tick is
//! handed to whoever delivers it":
//! - [`schedule`]: parsing of the time formats Dapr accepts (Go durations, ISO 8601 durations with
//!   repetitions, RFC 3339 times, cron with seconds and `@every`/`@daily`-style macros) and the
//!   next-tick computation of a schedule.
//! - [`job`]: the job model (app jobs and actor reminders), the parsing and validation of create
//!   requests with Dapr's error codes, and when a job fires next.
//! - [`store`]: the durable job store on sled with its due-time index; acknowledged creates and
//!   deletes survive `kill -9` (group-committed flushes).
//! - [`engine`]: the single trigger loop that hands due ticks to a delivery sink, with an
//!   injectable clock: never early, one tick in flight per job, retries per failure policy,
//!   coalescing of missed ticks, and deletes that stop every later tick.
//! - [`backend`]: the create/get/delete interface a host stores jobs through, implemented by the
//!   embedded engine and by the remote [`client`].
//! - [`server`]: the scheduler service (`tessera scheduler`): the store and trigger loop behind a
//!   gRPC API; [`hub`] hands ticks to the hosts' watch streams and completes them on their acks.
//! - [`raft`]: the replicated job data of a scheduler cluster: Raft commands, the partition
//!   assignment with its epochs (the fence on tick completions), the state machine on sled.
//! - [`replica`]: a replica in a cluster: writes through the leader, partition leases, the
//!   leader's assignment of partitions to live replicas, tick completions committed in batches.
//! - [`client`]: the host side of the service: unary calls and watch streams to every replica,
//!   reconnecting forever.

pub mod backend;
pub mod client;
pub mod engine;
pub mod hub;
pub mod job;
pub mod raft;
pub mod replica;
pub mod schedule;
pub mod server;
pub mod store;
