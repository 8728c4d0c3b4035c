use super::*;
use crate::store::PARTITIONS;

fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
    ids.iter().copied().collect()
}

fn apply(a: &mut Assignment, changes: &[(u32, Option<NodeId>)], epoch: u64) {
    for (p, owner) in changes {
        a.assign(*p, *owner, epoch);
    }
}

fn counts(a: &Assignment) -> BTreeMap<Option<NodeId>, usize> {
    let mut c = BTreeMap::new();
    for s in &a.slots {
        *c.entry(s.owner).or_default() += 1;
    }
    c
}

#[test]
fn fresh_partitions_are_spread_over_live_replicas() {
    let a = Assignment::default();
    let members = set(&[1, 2, 3]);
    let live = set(&[1, 2, 3]);
    let mut input = PlanInput {
        assignment: &a,
        members: &members,
        live: &live,
        gone: &BTreeSet::new(),
        applied: &HashMap::new(),
        draining: &HashMap::new(),
        assign_fresh: false,
    };
    assert!(
        plan(&input).is_empty(),
        "waits before handing out fresh partitions"
    );
    input.assign_fresh = true;
    let changes = plan(&input);
    let mut a2 = a.clone();
    apply(&mut a2, &changes, 5);
    let c = counts(&a2);
    assert_eq!(c.get(&None), None);
    assert!(c.values().all(|n| *n == 10 || *n == 11), "{c:?}");
}

#[test]
fn a_silent_replica_keeps_its_partitions_until_gone() {
    let mut a = Assignment::default();
    let all: Vec<(u32, Option<NodeId>)> = (0..PARTITIONS)
        .map(|p| (p, Some(p as u64 % 3 + 1)))
        .collect();
    apply(&mut a, &all, 2);
    let members = set(&[1, 2, 3]);
    let live = set(&[1, 2]);
    let input = PlanInput {
        assignment: &a,
        members: &members,
        live: &live,
        gone: &BTreeSet::new(),
        applied: &HashMap::new(),
        draining: &HashMap::new(),
        assign_fresh: true,
    };
    // 3 is not live, but not known to be gone: its lease may still run, so nothing moves.
    assert!(plan(&input).is_empty());
    let gone = set(&[3]);
    let input = PlanInput {
        gone: &gone,
        ..input
    };
    let changes = plan(&input);
    assert_eq!(changes.len(), 10);
    assert!(changes
        .iter()
        .all(|(p, o)| a.slots[*p as usize].owner == Some(3) && o.is_some_and(|o| o != 3)));
    apply(&mut a, &changes, 9);
    let c = counts(&a);
    assert_eq!(c.get(&Some(3)), None);
    assert_eq!(c[&Some(1)] + c[&Some(2)], 32);
}

#[test]
fn a_returning_replica_gets_work_after_the_owner_lets_go() {
    let mut a = Assignment::default();
    let all: Vec<(u32, Option<NodeId>)> = (0..PARTITIONS)
        .map(|p| (p, Some(p as u64 % 2 + 1)))
        .collect();
    apply(&mut a, &all, 2);
    let members = set(&[1, 2, 3]);
    let live = set(&[1, 2, 3]);
    let applied: HashMap<NodeId, u64> = [(1, 2), (2, 2), (3, 2)].into();
    let changes = plan(&PlanInput {
        assignment: &a,
        members: &members,
        live: &live,
        gone: &BTreeSet::new(),
        applied: &applied,
        draining: &HashMap::new(),
        assign_fresh: true,
    });
    // Revocations first.
    assert!(
        !changes.is_empty() && changes.iter().all(|(_, o)| o.is_none()),
        "{changes:?}"
    );
    apply(&mut a, &changes, 10);
    // Not reassigned before the former owners have applied the revocation...
    let input = PlanInput {
        assignment: &a,
        members: &members,
        live: &live,
        gone: &BTreeSet::new(),
        applied: &applied,
        draining: &HashMap::new(),
        assign_fresh: true,
    };
    assert!(plan(&input).is_empty());
    // ...then given out.
    let mut released = applied.clone();
    released.insert(1, 10);
    released.insert(2, 10);
    // ...nor while one of them still has deliveries of a revoked partition in flight...
    let busy_partition = a
        .slots
        .iter()
        .position(|s| s.released_by == Some(1))
        .unwrap() as u32;
    let draining: HashMap<NodeId, HashSet<u32>> = [(1, [busy_partition].into())].into();
    let changes = plan(&PlanInput {
        applied: &released,
        draining: &draining,
        ..input.clone()
    });
    assert!(
        !changes.is_empty() && changes.iter().all(|(p, _)| *p != busy_partition),
        "{changes:?}"
    );
    let changes = plan(&PlanInput {
        applied: &released,
        ..input
    });
    assert!(changes.iter().all(|(_, o)| *o == Some(3)), "{changes:?}");
    apply(&mut a, &changes, 11);
    let c = counts(&a);
    assert!(c.values().all(|n| *n == 10 || *n == 11), "{c:?}");
}
