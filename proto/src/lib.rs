//! Tessera's gRPC protocols, generated from `proto/*.proto` with a vendored protoc.
//!
//! - [`placement`]: hosts' sessions with the placement service and Raft between its replicas.
//! - [`internal`]: host-to-host actor calls.
//! - [`scheduler`]: hosts' job calls and watch streams to the scheduler, and Raft between its
//!   replicas.
//! - [`dapr`]: the part of Dapr's own gRPC API the sidecar serves (`dapr.proto.runtime.v1.Dapr`).

/// `tessera.placement.v1`.
pub mod placement {
    tonic::include_proto!("tessera.placement.v1");
}

/// `tessera.internal.v1`.
pub mod internal {
    tonic::include_proto!("tessera.internal.v1");
}

/// `tessera.scheduler.v1`.
pub mod scheduler {
    tonic::include_proto!("tessera.scheduler.v1");
}

/// `dapr.proto.runtime.v1`: Dapr's gRPC API as far as the sidecar serves it.
pub mod dapr {
    tonic::include_proto!("dapr.proto.runtime.v1");
}
