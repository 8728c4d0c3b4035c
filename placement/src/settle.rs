//! The settled table version, as the leader computes it.
//!
//! A host reports the latest table version it has *applied* (stopped and drained every actor it
//! lost in that version). The settled version is the newest committed version `c`, taken at a
//! moment when every host listed in table `c` has reported an applied version `>= c`.
//!
//! Settling `c` also covers every earlier version `c' < c`: a host listed in `c'` is either still
//! listed in `c` (so it applied `c`, after every table before it) or was removed in between,
//! which the leader does only after its lease ran out, when it has stopped serving actors anyway.
//! An older version never settles once a newer one exists (see `Tracker::advance`).
//!
//! The tracker is leader state: a new leader starts from scratch (settled 0) with the current
//! table, and learns applied versions from the hosts' next reports.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::ring::Table;

/// Applied versions by host and the hosts each unsettled version still waits for.
#[derive(Debug, Default)]
pub struct Tracker {
    settled: u64,
    /// Latest applied version each host reported.
    applied: HashMap<String, u64>,
    /// Unsettled versions (> `settled`) -> listed hosts that have not yet applied them.
    pending: BTreeMap<u64, HashSet<String>>,
}

impl Tracker {
    /// The settled version (0 until one settles).
    pub fn settled(&self) -> u64 {
        self.settled
    }

    /// Forgets everything (leadership changed) and starts tracking `current`.
    pub fn reset(&mut self, current: &Table) {
        *self = Tracker::default();
        self.on_table(current);
    }

    /// A committed table. Returns the new settled version if it grew.
    pub fn on_table(&mut self, t: &Table) -> Option<u64> {
        if t.version <= self.settled || self.pending.contains_key(&t.version) {
            return None;
        }
        // Hosts that left can never hold anything back again.
        let listed: HashSet<&str> = t.hosts.iter().map(|h| h.name.as_str()).collect();
        self.applied
            .retain(|name, _| listed.contains(name.as_str()));
        let waiting: HashSet<String> = t
            .hosts
            .iter()
            .filter(|h| self.applied.get(&h.name).is_none_or(|a| *a < t.version))
            .map(|h| h.name.clone())
            .collect();
        self.pending.insert(t.version, waiting);
        self.advance()
    }

    /// A host reported `applied`. Returns the new settled version if it grew.
    pub fn on_report(&mut self, host: &str, applied: u64) -> Option<u64> {
        let before = match self.applied.get_mut(host) {
            Some(a) if *a == applied => return None,
            Some(a) => std::mem::replace(a, applied),
            None => {
                self.applied.insert(host.to_string(), applied);
                0
            }
        };
        // Only versions the host newly covers can stop waiting for it: a heartbeat costs
        // nothing, a new applied version one set removal per unsettled version it covers. (A host
        // that reports a lower version, say after a restart, is not waited for again: it lost
        // its actors when it stopped.)
        if applied <= before {
            return None;
        }
        let mut emptied = false;
        for waiting in self.pending.range_mut(before + 1..=applied).map(|(_, w)| w) {
            emptied |= waiting.remove(host) && waiting.is_empty();
        }
        if emptied {
            self.advance()
        } else {
            None
        }
    }

    /// Settles the newest committed version once nobody waits for it. Only the newest: an older
    /// version must not settle after a newer one exists, because a host may have skipped it
    /// (tables are a watch) and never released what it lost there, while a host still on the
    /// older table would take that as leave to activate. Settling only the newest version means
    /// every listed host applied exactly that table, which it cannot do without seeing it.
    fn advance(&mut self) -> Option<u64> {
        let (&top, waiting) = self.pending.iter().next_back()?;
        if !waiting.is_empty() {
            return None;
        }
        self.pending.clear();
        if top > self.settled {
            self.settled = top;
            Some(top)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::HostEntry;

    fn table(version: u64, hosts: &[&str]) -> Table {
        Table {
            version,
            hosts: hosts
                .iter()
                .map(|n| HostEntry {
                    name: n.to_string(),
                    app_id: "app".into(),
                    actor_types: vec!["T".into()],
                    namespace: "default".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn settles_only_when_every_listed_host_applied() {
        let mut t = Tracker::default();
        assert_eq!(t.on_table(&table(1, &["a", "b"])), None);
        assert_eq!(t.on_report("a", 1), None);
        assert_eq!(t.on_report("x", 1), None, "an unlisted host does not count");
        assert_eq!(t.on_report("b", 0), None);
        assert_eq!(t.on_report("b", 1), Some(1));
        assert_eq!(t.settled(), 1);
        assert_eq!(t.on_report("b", 1), None);
    }

    #[test]
    fn a_host_that_does_not_apply_holds_back_until_removed() {
        let mut t = Tracker::default();
        t.on_table(&table(1, &["a", "b", "stuck"]));
        t.on_table(&table(2, &["a", "b", "stuck", "c"]));
        for h in ["a", "b", "c"] {
            assert_eq!(t.on_report(h, 2), None);
        }
        assert_eq!(t.on_report("stuck", 0), None);
        assert_eq!(t.settled(), 0);
        // "stuck" is removed in version 3; the others apply it.
        t.on_table(&table(3, &["a", "b", "c"]));
        assert_eq!(t.on_report("a", 3), None);
        assert_eq!(t.on_report("b", 3), None);
        assert_eq!(t.on_report("c", 3), Some(3));
        assert_eq!(t.settled(), 3);
    }

    #[test]
    fn an_older_version_never_settles_once_a_newer_one_exists() {
        // "b" may have skipped 5's predecessor and still hold an actor it lost there; a host
        // still on 4 must not be told 4 is settled.
        let mut t = Tracker::default();
        t.on_table(&table(4, &["a", "b"]));
        t.on_table(&table(5, &["a", "b", "new"]));
        assert_eq!(t.on_report("a", 5), None);
        assert_eq!(t.on_report("b", 4), None);
        assert_eq!(t.settled(), 0);
        assert_eq!(t.on_report("new", 5), None);
        assert_eq!(t.on_report("b", 5), Some(5));
    }

    #[test]
    fn reports_before_the_table_count() {
        let mut t = Tracker::default();
        t.on_report("a", 7);
        assert_eq!(t.on_table(&table(7, &["a"])), Some(7));
        // Older tables arriving late change nothing; the value never goes down.
        assert_eq!(t.on_table(&table(6, &["a", "zz"])), None);
        assert_eq!(t.settled(), 7);
    }

    #[test]
    fn reset_starts_from_zero_with_the_current_table() {
        let mut t = Tracker::default();
        t.on_report("a", 2);
        t.on_table(&table(2, &["a"]));
        assert_eq!(t.settled(), 2);
        t.reset(&table(3, &["a"]));
        assert_eq!(t.settled(), 0);
        assert_eq!(t.on_report("a", 3), Some(3));
    }

    #[test]
    fn a_restarted_host_that_reports_less_is_waited_for_only_in_later_versions() {
        let mut t = Tracker::default();
        t.on_table(&table(3, &["a", "b"]));
        t.on_table(&table(4, &["a", "b"]));
        assert_eq!(t.on_report("a", 4), None);
        // "a" restarts and reports nothing applied yet; version 5 then waits for it.
        assert_eq!(t.on_report("a", 0), None);
        t.on_table(&table(5, &["a", "b"]));
        // 4 never settles once 5 exists (newest only); 5 waits for the restarted "a".
        assert_eq!(t.on_report("b", 5), None);
        assert_eq!(t.on_report("a", 5), Some(5));
    }

    #[test]
    fn an_empty_table_settles_at_once() {
        let mut t = Tracker::default();
        assert_eq!(t.on_table(&table(1, &[])), Some(1));
    }
}
