//! Property tests of `placement::ring`: every node computes the same owner,
//! adding or removing a host moves only the keys it must, and a host never
//! owns an actor type it did not register.

use std::collections::BTreeSet;

use placement::ring::{HostEntry, Rings, Table};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

const TYPES: [&str; 5] = ["A", "B", "C", "D", "E"];

/// A host address `"10.x.y.z:port"`.
fn host_name() -> impl Strategy<Value = String> {
    (any::<[u8; 3]>(), 1024u16..).prop_map(|([a, b, c], port)| format!("10.{a}.{b}.{c}:{port}"))
}

/// Actor types in random order, possibly repeated, possibly empty.
fn actor_types() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop::sample::select(&TYPES[..]).prop_map(str::to_owned),
        0..7,
    )
}

fn entry(name: String, actor_types: Vec<String>) -> HostEntry {
    HostEntry {
        app_id: format!("app-{}", name.len() % 3),
        name,
        actor_types,
        namespace: "default".to_owned(),
    }
}

/// Hosts with distinct names and random actor types.
fn hosts(size: std::ops::Range<usize>) -> impl Strategy<Value = Vec<HostEntry>> {
    prop::collection::btree_set(host_name(), size).prop_flat_map(|names| {
        let n = names.len();
        (Just(names), prop::collection::vec(actor_types(), n)).prop_map(|(names, types)| {
            names
                .into_iter()
                .zip(types)
                .map(|(name, types)| entry(name, types))
                .collect()
        })
    })
}

/// `n` hosts with distinct names that all host type `"T"`.
fn uniform_hosts(n: usize) -> impl Strategy<Value = Vec<HostEntry>> {
    prop::collection::btree_set(host_name(), n).prop_map(|names| {
        names
            .into_iter()
            .map(|name| entry(name, vec!["T".to_owned()]))
            .collect()
    })
}

fn table(version: u64, hosts: Vec<HostEntry>) -> Table {
    Table { version, hosts }
}

fn name_of<'a>(rings: &'a Rings, actor_type: &str, id: &str) -> &'a str {
    rings
        .owner(actor_type, id)
        .expect("type has hosts")
        .name
        .as_str()
}

/// Actor ids used by the movement tests.
fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("actor-{i}")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Every node computes the same owner for `(version, hosts, type, id)`:
    /// the table as sent, a permutation of it (hosts and each host's types
    /// reordered) and a copy decoded from JSON on "another node" all give the
    /// same answers, also when the table names a host twice.
    #[test]
    fn owner_is_independent_of_order_and_node(
        (hosts, permuted) in hosts(1..16)
            .prop_flat_map(|hosts| {
                (Just(hosts), any::<Option<prop::sample::Index>>(), actor_types())
            })
            .prop_map(|(mut hosts, dup, types)| {
                // Sometimes a second entry for an existing host name.
                if let Some(i) = dup {
                    let name = hosts[i.index(hosts.len())].name.clone();
                    hosts.push(entry(name, types));
                }
                hosts
            })
            .prop_flat_map(|hosts| (Just(hosts.clone()), Just(hosts).prop_shuffle()))
            .prop_map(|(hosts, mut permuted)| {
                for h in &mut permuted {
                    h.actor_types.reverse();
                }
                (hosts, permuted)
            }),
        version in any::<u64>(),
        actor_ids in prop::collection::vec("\\PC{0,12}", 1..40),
    ) {
        let sent = table(version, hosts);
        let wire = serde_json::to_vec(&sent).unwrap();
        let received: Table = serde_json::from_slice(&wire).unwrap();

        let here = Rings::build(&sent);
        let there = Rings::build(&received);
        let reordered = Rings::build(&table(version, permuted));

        for rings in [&there, &reordered] {
            prop_assert_eq!(rings.version(), here.version());
            prop_assert!(rings.actor_types().eq(here.actor_types()));
        }
        for ty in TYPES.iter().copied().chain(["missing"]) {
            for id in &actor_ids {
                let owner = here.owner(ty, id);
                prop_assert_eq!(owner, there.owner(ty, id), "type {} id {:?}", ty, id);
                prop_assert_eq!(owner, reordered.owner(ty, id), "type {} id {:?}", ty, id);
            }
        }
    }

    /// Removing one host moves exactly the keys it owned; every other key
    /// keeps its owner.
    #[test]
    fn removing_a_host_moves_only_its_keys(
        (hosts, removed) in (3usize..30).prop_flat_map(|n| (uniform_hosts(n), 0..n)),
    ) {
        let keys = ids(20_000);
        let gone = hosts[removed].name.clone();
        let before = Rings::build(&table(1, hosts.clone()));
        let mut rest = hosts;
        rest.remove(removed);
        let after = Rings::build(&table(2, rest));

        let (mut owned, mut moved) = (0, 0);
        for id in &keys {
            let old = name_of(&before, "T", id);
            let new = name_of(&after, "T", id);
            prop_assert_ne!(new, gone.as_str());
            if old == gone {
                owned += 1;
            }
            if old != new {
                prop_assert_eq!(old, gone.as_str(), "key {} moved off a host that stayed", id);
                moved += 1;
            }
        }
        prop_assert!(owned > 0, "removed host owned no keys; test is vacuous");
        prop_assert_eq!(moved, owned);
    }

    /// A host only owns actors of types it registered; a type nobody
    /// registered has no owner.
    #[test]
    fn only_hosts_of_a_type_own_it(
        hosts in hosts(0..12),
        actor_ids in prop::collection::vec("\\PC{0,12}", 1..40),
    ) {
        let rings = Rings::build(&table(3, hosts.clone()));
        let registered: BTreeSet<&str> = hosts
            .iter()
            .flat_map(|h| h.actor_types.iter().map(String::as_str))
            .collect();
        prop_assert!(rings.actor_types().eq(registered.iter().copied()));

        for ty in TYPES.iter().copied().chain(["missing", ""]) {
            let holders: BTreeSet<&str> = hosts
                .iter()
                .filter(|h| h.actor_types.iter().any(|t| t == ty))
                .map(|h| h.name.as_str())
                .collect();
            for id in &actor_ids {
                match rings.owner(ty, id) {
                    None => prop_assert!(holders.is_empty(), "type {} has hosts but no owner", ty),
                    Some(owner) => {
                        prop_assert!(holders.contains(owner.name.as_str()), "{} owns {}", owner.name, ty);
                        prop_assert!(owner.actor_types.iter().any(|t| t == ty));
                    }
                }
            }
        }
    }
}

proptest! {
    // 100,000 keys per case: few cases. The seed is pinned because the bound
    // is statistical, not exact: with 100 virtual nodes the new host's share
    // has a relative standard deviation of about 1/sqrt(100) = 10%, so about
    // 2-4.5% of random host sets fall outside ±20% (measured over 2,000 random
    // sets for each of N = 3, 5, 10, 20, 29), and with a random seed 8 cases
    // would fail roughly one run in four. A pinned seed keeps the run
    // reproducible while any real regression (unbalanced hashing, vnodes
    // ignored, keys moving between old hosts) still fails it.
    #![proptest_config(ProptestConfig {
        rng_seed: RngSeed::Fixed(0x7e55_e4a0),
        ..ProptestConfig::with_cases(8)
    })]

    /// Adding one host to N moves about 1/(N+1) of the keys (within 20%,
    /// relative), and every moved key moves to the new host.
    #[test]
    fn adding_a_host_moves_a_fair_share_to_it(
        (hosts, new) in (3usize..30).prop_flat_map(|n| (uniform_hosts(n + 1), 0..=n)),
    ) {
        let keys = ids(100_000);
        let mut old_hosts = hosts.clone();
        let added = old_hosts.remove(new).name;
        let before = Rings::build(&table(1, old_hosts));
        let after = Rings::build(&table(2, hosts.clone()));

        let mut moved = 0usize;
        for id in &keys {
            let old = name_of(&before, "T", id);
            let new = name_of(&after, "T", id);
            if old != new {
                prop_assert_eq!(new, added.as_str(), "key {} moved between old hosts", id);
                moved += 1;
            }
        }
        let n = hosts.len() - 1;
        let fraction = moved as f64 / keys.len() as f64;
        let expected = 1.0 / (n as f64 + 1.0);
        let deviation = (fraction - expected) / expected;
        println!("N={n} moved={fraction:.4} expected={expected:.4} deviation={deviation:+.3}");
        prop_assert!(
            deviation.abs() <= 0.2,
            "N={} moved {:.4} of keys, expected {:.4} (deviation {:+.3})",
            n, fraction, expected, deviation
        );
    }
}

/// Building the rings of 1,000 hosts x 5 types stays well under 100 ms in
/// release (about 20 ms measured); debug builds are too slow to time.
#[test]
#[cfg_attr(debug_assertions, ignore = "timing; run with --release")]
fn building_1000_hosts_by_5_types_is_fast() {
    let types: Vec<String> = TYPES.iter().map(|t| (*t).to_owned()).collect();
    let hosts = (0..1000)
        .map(|i| entry(format!("10.0.{}.{}:50002", i / 256, i % 256), types.clone()))
        .collect();
    let table = table(1, hosts);
    let mut fastest = std::time::Duration::MAX;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let rings = Rings::build(&table);
        fastest = fastest.min(started.elapsed());
        assert_eq!(rings.actor_types().count(), 5);
        assert!(rings.owner("E", "x").is_some());
    }
    assert!(fastest.as_millis() < 100, "took {fastest:?}");
}
