//! Tessera's components: the building-block contracts (state today; pub/sub, secrets and bindings
//! as they arrive) and their backends, plus the loader for Dapr component YAML.
//!
//! # Layout
//! - [`state`]: the [`state::StateStore`] trait with its semantics, and the `state.sled`
//!   (embedded, group-committed), `state.redis` and `state.postgresql` backends.
//! - [`resources`]: `kind: Component` YAML from `--resources-path`, validated with the file and
//!   field named in every error, and the factory that opens a component.

pub mod resources;
pub mod state;
