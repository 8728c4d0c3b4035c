//! Consistent-hash rings that decide which host owns an actor.
//!
//! Placement disseminates a versioned [`Table`] of actor hosts. Every node (the
//! placement leader and each actor host) builds [`Rings`] from that table —
//! one ring per actor type, holding exactly the hosts that registered that
//! type — and asks [`Rings::owner`] who owns `(actor_type, actor_id)`. All
//! nodes must agree on the answer for a given table version, so this module
//! owns the rules that make the answer deterministic:
//!
//! * host entries are normalised (their `actor_types` sorted and
//!   deduplicated) and deduplicated by host name before any ring is built,
//!   so neither the order of `hosts` nor of `actor_types` matters;
//! * hashing is SipHash-1-3 with fixed zero keys (the `consistent_hash`
//!   crate's [`DefaultHash`]) fed only byte strings, so it does not depend on
//!   the process, the platform's word size or endianness, or std's
//!   unspecified `DefaultHasher`/`Hash`-for-`str` details;
//! * virtual node `i` of host `name` is hashed from the bytes of `name`,
//!   `0xff`, then `i` as a little-endian `u64`; the lookup key is the bytes
//!   of `"{actor_type}||{actor_id}"` followed by `0xff`.
//!
//! Each host gets [`DEFAULT_VNODES`] virtual nodes per ring unless
//! [`Rings::with_vnodes`] says otherwise. Building is `O(h·t·v·log)` for `h`
//! hosts, `t` types and `v` virtual nodes; a lookup is one hash plus a binary
//! search.

use std::collections::BTreeMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use consistent_hash::{DefaultHash, Node, RingHash, StaticHashRing};
use serde::{Deserialize, Serialize};

/// Number of virtual nodes each host gets in each ring by default.
pub const DEFAULT_VNODES: usize = 100;

/// One actor host as disseminated by placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostEntry {
    /// Host address `"ip:port"`; unique within a table and the identity the
    /// ring hashes.
    pub name: String,
    /// Dapr app id of the host.
    pub app_id: String,
    /// Actor types the host can activate.
    pub actor_types: Vec<String>,
    /// Namespace of the host. Not used by lookups: a table is already
    /// per-namespace.
    pub namespace: String,
}

/// A placement table: the hosts known at one version.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Table {
    /// Monotonic table version assigned by the placement leader.
    pub version: u64,
    /// Hosts in any order.
    pub hosts: Vec<HostEntry>,
}

/// The consistent-hash rings of one [`Table`], one per actor type.
///
/// Built once per table version and then read-only (share it with `Arc`).
/// If the table names a host twice, the entry that sorts first by
/// `(name, app_id, namespace, sorted actor_types)` wins, so the outcome does
/// not depend on table order either.
pub struct Rings {
    version: u64,
    vnodes: usize,
    /// Normalised, deduplicated hosts sorted by name; rings refer to them by
    /// index.
    hosts: Vec<HostEntry>,
    /// Actor type -> ring of the hosts that registered it.
    rings: BTreeMap<String, TypeRing>,
}

/// Ring of one actor type; node values are indices into `Rings::hosts`.
///
/// `'static` is the crate's unconstrained internal lifetime: its virtual nodes
/// point into the ring's own node `Vec`, which is fine because rings are never
/// mutated after construction (`take`/`take_if` are never called).
type TypeRing = StaticHashRing<'static, HostKey, usize, StableHash>;

impl Rings {
    /// Builds the rings of `table` with [`DEFAULT_VNODES`] virtual nodes per
    /// host.
    pub fn build(table: &Table) -> Rings {
        Rings::with_vnodes(table, DEFAULT_VNODES)
    }

    /// Builds the rings of `table` with `vnodes` virtual nodes per host
    /// (`0` is treated as `1`). All nodes must use the same value to agree.
    pub fn with_vnodes(table: &Table, vnodes: usize) -> Rings {
        let vnodes = vnodes.max(1);

        let mut hosts: Vec<HostEntry> = table
            .hosts
            .iter()
            .map(|h| {
                let mut h = h.clone();
                h.actor_types.sort_unstable();
                h.actor_types.dedup();
                h
            })
            .collect();
        hosts.sort_unstable_by(|a, b| {
            (&a.name, &a.app_id, &a.namespace, &a.actor_types).cmp(&(
                &b.name,
                &b.app_id,
                &b.namespace,
                &b.actor_types,
            ))
        });
        hosts.dedup_by(|later, first| later.name == first.name);

        let mut members: BTreeMap<&str, Vec<Node<HostKey, usize>>> = BTreeMap::new();
        for (idx, host) in hosts.iter().enumerate() {
            let key = HostKey(Arc::from(host.name.as_str()));
            for ty in &host.actor_types {
                members
                    .entry(ty.as_str())
                    .or_default()
                    .push(Node::new(key.clone()).value(idx).quantity(vnodes));
            }
        }
        let rings = members
            .into_iter()
            .map(|(ty, nodes)| {
                (
                    ty.to_owned(),
                    StaticHashRing::new(StableHash, nodes.into_iter()),
                )
            })
            .collect();

        Rings {
            version: table.version,
            vnodes,
            hosts,
            rings,
        }
    }

    /// Version of the table these rings were built from.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Host that owns actor `actor_id` of type `actor_type`, or `None` when
    /// no host registered that type.
    pub fn owner(&self, actor_type: &str, actor_id: &str) -> Option<&HostEntry> {
        let ring = self.rings.get(actor_type)?;
        let key = LookupKey {
            actor_type,
            actor_id,
        };
        let node = ring.calc_candidates(&key).next()?;
        self.hosts.get(node.value)
    }

    /// Actor types that have at least one host, in ascending order.
    pub fn actor_types(&self) -> impl Iterator<Item = &str> {
        self.rings.keys().map(String::as_str)
    }
}

impl fmt::Debug for Rings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The rings themselves hold `hosts × vnodes` entries; show sizes only.
        let hosts_per_type: BTreeMap<&str, usize> = self
            .rings
            .iter()
            .map(|(ty, ring)| (ty.as_str(), ring.nodes().len()))
            .collect();
        f.debug_struct("Rings")
            .field("version", &self.version)
            .field("vnodes", &self.vnodes)
            .field("hosts", &self.hosts.len())
            .field("hosts_per_type", &hosts_per_type)
            .finish()
    }
}

/// Ring node key: the host name, hashed as its bytes followed by `0xff`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct HostKey(Arc<str>);

impl Hash for HostKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
        state.write(&[0xff]);
    }
}

/// Lookup key, hashed as the bytes of `"{actor_type}||{actor_id}"` followed
/// by `0xff` (without allocating the string).
struct LookupKey<'a> {
    actor_type: &'a str,
    actor_id: &'a str,
}

impl Hash for LookupKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.actor_type.as_bytes());
        state.write(b"||");
        state.write(self.actor_id.as_bytes());
        state.write(&[0xff]);
    }
}

/// Virtual node `seq` of a host, hashed as the host key then `seq` as a
/// little-endian `u64` (the crate's default would hash a native `usize`).
struct VnodeKey<'a, K> {
    host: &'a K,
    seq: u64,
}

impl<K: Hash> Hash for VnodeKey<'_, K> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.host.hash(state);
        state.write(&self.seq.to_le_bytes());
    }
}

/// SipHash-1-3 with fixed zero keys, platform-independent vnode hashing.
#[derive(Debug, Clone, Copy)]
struct StableHash;

impl RingHash for StableHash {
    fn hash_item<T: Hash>(&self, item: &T) -> u64 {
        DefaultHash.hash_item(item)
    }

    fn hash_vnode<K: Hash>(&self, node_key: &K, vnode_seq: usize) -> u64 {
        DefaultHash.hash_item(&VnodeKey {
            host: node_key,
            seq: vnode_seq as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, types: &[&str]) -> HostEntry {
        HostEntry {
            name: name.to_owned(),
            app_id: format!("app-{name}"),
            actor_types: types.iter().map(|t| (*t).to_owned()).collect(),
            namespace: "default".to_owned(),
        }
    }

    fn table() -> Table {
        Table {
            version: 7,
            hosts: vec![
                host("10.0.0.1:50001", &["Counter", "Timer"]),
                host("10.0.0.2:50001", &["Counter"]),
                host("10.0.0.3:50001", &["Counter", "Timer"]),
            ],
        }
    }

    /// Pins the hash function: these owners must never change, across
    /// processes, platforms, toolchains or dependency upgrades, or nodes
    /// running different builds would disagree. If this fails, placement
    /// compatibility broke.
    #[test]
    fn owners_are_pinned() {
        let rings = Rings::build(&table());
        assert_eq!(rings.version(), 7);
        assert_eq!(
            DefaultHash.hash_item(&LookupKey {
                actor_type: "Counter",
                actor_id: "42"
            }),
            GOLDEN_LOOKUP_HASH
        );
        let owners: Vec<&str> = (0..12)
            .map(|i| {
                rings
                    .owner("Counter", &i.to_string())
                    .unwrap()
                    .name
                    .as_str()
            })
            .collect();
        assert_eq!(owners, GOLDEN_COUNTER_OWNERS);
        let owners: Vec<&str> = (0..6)
            .map(|i| rings.owner("Timer", &i.to_string()).unwrap().name.as_str())
            .collect();
        assert_eq!(owners, GOLDEN_TIMER_OWNERS);
    }

    /// Standard SipHash-1-3, keys (0, 0), of `b"Counter||42\xff"` (checked
    /// against an independent implementation of the reference algorithm).
    const GOLDEN_LOOKUP_HASH: u64 = 1_101_297_969_716_085_355;
    const A: &str = "10.0.0.1:50001";
    const B: &str = "10.0.0.2:50001";
    const C: &str = "10.0.0.3:50001";
    /// Owners of `Counter` ids `0..12`.
    const GOLDEN_COUNTER_OWNERS: [&str; 12] = [B, A, C, A, B, B, B, C, A, C, A, A];
    /// Owners of `Timer` ids `0..6`.
    const GOLDEN_TIMER_OWNERS: [&str; 6] = [A, C, C, A, A, C];

    #[test]
    fn types_hosts_and_duplicates() {
        let mut t = table();
        // Duplicate name: the entry sorting first wins whatever the order.
        t.hosts
            .push(host("10.0.0.2:50001", &["Timer", "Counter", "Timer"]));
        let rings = Rings::build(&t);
        assert_eq!(
            rings.actor_types().collect::<Vec<_>>(),
            ["Counter", "Timer"]
        );
        assert_eq!(rings.hosts.len(), 3);
        assert_eq!(rings.rings["Counter"].nodes().len(), 3);
        // app ids are equal, so the sorted actor_types decide: ["Counter"] < ["Counter", "Timer"].
        assert_eq!(rings.rings["Timer"].nodes().len(), 2);
        assert!(rings.owner("Nope", "1").is_none());
        for i in 0..200 {
            let h = rings.owner("Timer", &i.to_string()).unwrap();
            assert_ne!(h.name, "10.0.0.2:50001");
        }

        let empty = Rings::build(&Table::default());
        assert_eq!(empty.actor_types().count(), 0);
        assert!(empty.owner("Counter", "1").is_none());

        // Zero vnodes is clamped to one rather than yielding an empty ring.
        let one = Rings::with_vnodes(&table(), 0);
        assert!(one.owner("Counter", "1").is_some());
        assert_eq!(one.rings["Counter"].len(), 3);
    }

    #[test]
    fn rings_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Rings>();
        let dbg = format!("{:?}", Rings::build(&table()));
        assert!(dbg.contains("version: 7"), "{dbg}");
    }
}
