//! Committed tables as host sessions send them: built once per version, shared by every session.
//!
//! A session sends its host one full table, then for each later version a delta (hosts added or
//! changed, hosts removed) that applies to the version before. Each version's full order and
//! delta are built and protobuf-encoded here once, whatever the number of sessions; a session
//! sends the shared bytes as they are (see [`crate::wire`]). A session that fell further behind
//! than the deltas kept (it skipped versions while it was slow) gets the full table again.
//!
//! Tables are sorted by host name (they come from a `BTreeMap`), which makes the diff a merge and
//! lets hosts apply a delta with binary searches.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use prost::Message;
use proto::placement::placement_order::Order;
use proto::placement::{HostInfo, PlacementDelta, PlacementOrder, PlacementTable};

use crate::ring::{HostEntry, Table};

/// How many consecutive deltas a version keeps for sessions that are behind.
pub const KEPT_DELTAS: usize = 64;

/// One committed version, ready to send.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    pub table: Arc<Table>,
    /// The whole table as an encoded order.
    pub full: Bytes,
    /// Consecutive encoded delta orders ending at `version`, oldest first: `(from_version, order)`.
    deltas: VecDeque<(u64, Bytes)>,
}

impl Published {
    /// The first version a replica publishes (no deltas yet).
    pub fn first(table: Table) -> Published {
        Published {
            version: table.version,
            full: encode(&full_order(&table)),
            table: Arc::new(table),
            deltas: VecDeque::new(),
        }
    }

    /// The version after `self`: `table` must be newer.
    pub fn next(&self, table: Table) -> Published {
        let delta = diff(&self.table, &table);
        let mut deltas = self.deltas.clone();
        deltas.push_back((self.version, encode(&delta)));
        while deltas.len() > KEPT_DELTAS {
            deltas.pop_front();
        }
        Published {
            version: table.version,
            full: encode(&full_order(&table)),
            table: Arc::new(table),
            deltas,
        }
    }

    /// What to send a session that has sent its host `sent` (`None`: nothing yet) to bring it to
    /// this version: nothing, the chain of deltas from `sent`, or the full table.
    pub fn orders_since(&self, sent: Option<u64>) -> Vec<Bytes> {
        match sent {
            Some(s) if s >= self.version => Vec::new(),
            Some(s) => match self.deltas.iter().position(|(from, _)| *from == s) {
                Some(i) => self.deltas.iter().skip(i).map(|(_, d)| d.clone()).collect(),
                None => vec![self.full.clone()],
            },
            None => vec![self.full.clone()],
        }
    }
}

/// One order, protobuf-encoded (the message body of one gRPC frame).
pub fn encode(o: &PlacementOrder) -> Bytes {
    Bytes::from(o.encode_to_vec())
}

fn info(h: &HostEntry) -> HostInfo {
    HostInfo {
        name: h.name.clone(),
        app_id: h.app_id.clone(),
        actor_types: h.actor_types.clone(),
        namespace: h.namespace.clone(),
    }
}

fn full_order(t: &Table) -> PlacementOrder {
    PlacementOrder {
        order: Some(Order::Table(PlacementTable {
            version: t.version,
            hosts: t.hosts.iter().map(info).collect(),
        })),
    }
}

/// The delta from `old` to `new`, both sorted by name.
fn diff(old: &Table, new: &Table) -> PlacementOrder {
    let mut upsert = Vec::new();
    let mut remove = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < old.hosts.len() || j < new.hosts.len() {
        let ord = match (old.hosts.get(i), new.hosts.get(j)) {
            (Some(o), Some(n)) => o.name.cmp(&n.name),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match ord {
            Ordering::Less => {
                remove.push(old.hosts[i].name.clone());
                i += 1;
            }
            Ordering::Greater => {
                upsert.push(info(&new.hosts[j]));
                j += 1;
            }
            Ordering::Equal => {
                if old.hosts[i] != new.hosts[j] {
                    upsert.push(info(&new.hosts[j]));
                }
                i += 1;
                j += 1;
            }
        }
    }
    PlacementOrder {
        order: Some(Order::Delta(PlacementDelta {
            from_version: old.version,
            version: new.version,
            upsert,
            remove,
        })),
    }
}

/// Converts a received table; sorts it by name if the sender did not.
pub fn table_from(t: PlacementTable) -> Table {
    let mut hosts: Vec<HostEntry> = t.hosts.into_iter().map(entry).collect();
    if !hosts.is_sorted_by(|a, b| a.name <= b.name) {
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Table {
        version: t.version,
        hosts,
    }
}

fn entry(h: HostInfo) -> HostEntry {
    HostEntry {
        name: h.name,
        app_id: h.app_id,
        actor_types: h.actor_types,
        namespace: h.namespace,
    }
}

/// Applies `d` to `t` (sorted by name), which must hold `d.from_version`.
pub fn apply_delta(t: &mut Table, d: PlacementDelta) {
    for name in &d.remove {
        if let Ok(i) = t.hosts.binary_search_by(|h| h.name.as_str().cmp(name)) {
            t.hosts.remove(i);
        }
    }
    for h in d.upsert {
        let e = entry(h);
        match t.hosts.binary_search_by(|x| x.name.cmp(&e.name)) {
            Ok(i) => t.hosts[i] = e,
            Err(i) => t.hosts.insert(i, e),
        }
    }
    t.version = d.version;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(name: &str, ty: &str) -> HostEntry {
        HostEntry {
            name: name.into(),
            app_id: "app".into(),
            actor_types: vec![ty.into()],
            namespace: "default".into(),
        }
    }

    fn table(version: u64, hosts: &[(&str, &str)]) -> Table {
        let mut hosts: Vec<HostEntry> = hosts.iter().map(|(n, t)| host(n, t)).collect();
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Table { version, hosts }
    }

    fn decode(b: &Bytes) -> PlacementOrder {
        PlacementOrder::decode(b.clone()).expect("an encoded order")
    }

    fn delta(b: &Bytes) -> PlacementDelta {
        match &decode(b).order {
            Some(Order::Delta(d)) => d.clone(),
            other => panic!("not a delta: {other:?}"),
        }
    }

    #[test]
    fn a_delta_names_only_what_changed() {
        let a = table(1, &[("a", "T"), ("b", "T"), ("c", "T")]);
        let b = table(2, &[("a", "T"), ("b", "U"), ("d", "T")]);
        let d = delta(&encode(&diff(&a, &b)));
        assert_eq!((d.from_version, d.version), (1, 2));
        let names: Vec<&str> = d.upsert.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!(d.remove, ["c"]);
    }

    #[test]
    fn sessions_get_deltas_from_what_they_hold_or_the_full_table() {
        let mut p = Published::first(table(1, &[("a", "T")]));
        assert!(matches!(
            decode(&p.orders_since(None)[0]).order,
            Some(Order::Table(_))
        ));
        for v in 2..=(KEPT_DELTAS as u64 + 3) {
            p = p.next(table(v, &[("a", "T"), (&format!("h{v}"), "T")]));
        }
        let last = p.version;
        assert!(p.orders_since(Some(last)).is_empty());
        let chain = p.orders_since(Some(last - 3));
        assert_eq!(chain.len(), 3);
        assert_eq!(delta(&chain[0]).from_version, last - 3);
        assert_eq!(delta(&chain[2]).version, last);
        // Further behind than the kept deltas: the whole table.
        let far = p.orders_since(Some(1));
        assert_eq!(far.len(), 1);
        assert!(matches!(decode(&far[0]).order, Some(Order::Table(_))));
    }

    fn arb_table(version: u64) -> impl Strategy<Value = Table> {
        proptest::collection::btree_map("[a-f]{1,2}", "[TU]", 0..12).prop_map(move |m| Table {
            version,
            hosts: m.iter().map(|(n, t)| host(n, t)).collect(),
        })
    }

    proptest! {
        #[test]
        fn applying_the_deltas_of_a_chain_gives_the_last_table(
            tables in proptest::collection::vec(arb_table(0), 1..8),
            skip in 0usize..8,
        ) {
            let tables: Vec<Table> = tables
                .into_iter()
                .enumerate()
                .map(|(i, mut t)| { t.version = i as u64 + 1; t })
                .collect();
            let mut p = Published::first(tables[0].clone());
            for t in &tables[1..] {
                p = p.next(t.clone());
            }
            // A host that holds table `start` and receives what its session would send.
            let start = skip.min(tables.len() - 1);
            let mut held = tables[start].clone();
            for o in p.orders_since(Some(held.version)) {
                match decode(&o).order {
                    Some(Order::Delta(d)) => {
                        prop_assert_eq!(d.from_version, held.version);
                        apply_delta(&mut held, d);
                    }
                    Some(Order::Table(t)) => held = table_from(t),
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(&held, tables.last().unwrap());
        }
    }
}
