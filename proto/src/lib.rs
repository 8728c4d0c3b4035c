//! Tessera's gRPC protocols, generated from `proto/*.proto` with a vendored protoc.
//!
//! - [`placement`]: hosts' sessions with the placement service and Raft between its replicas.

/// `tessera.placement.v1`.
pub mod placement {
    tonic::include_proto!("tessera.placement.v1");
}
