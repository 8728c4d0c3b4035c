//! A seed replays exactly: two runs of one seed in one process produce the same trace, event for
//! event: every table and settled version each host receives, every change of each replica's Raft
//! state (term, role, vote, last log index, last applied index) and every change of leader, each
//! with its simulated time.
//!
//! Seeds 2 and 5 diverged before crashed replicas were cut off from the network (see `Links` in
//! `placement_sim.rs`); seed 7 diverged in its first second while sled flushes were awaited in the
//! simulation. `SIM_SEED=S` checks one seed, `SIM_DETERMINISM_SEEDS=N` seeds 0..N.

fn first_difference(a: &[String], b: &[String]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    if let Ok(n) = std::env::var("SIM_DETERMINISM_SEEDS") {
        return (0..n.parse().expect("SIM_DETERMINISM_SEEDS is a number")).collect();
    }
    vec![2, 5, 7]
}

#[test]
fn one_seed_twice_gives_the_same_trace() {
    let mut diverged = Vec::new();
    for seed in seeds() {
        let a = sims::placement::run(seed).expect("first run");
        let b = sims::placement::run(seed).expect("second run");
        assert!(
            a.trace.len() > 100,
            "seed {seed}: a trace of {} events is too short to mean much",
            a.trace.len()
        );
        match first_difference(&a.trace, &b.trace) {
            None => eprintln!("seed {seed}: {} events, identical", a.trace.len()),
            Some(i) => {
                let from = i.saturating_sub(3);
                let msg = format!(
                    "seed {seed}: runs diverge at event {i} of {}/{}:\n  first:  {:?}\n  second: {:?}",
                    a.trace.len(),
                    b.trace.len(),
                    &a.trace[from..(i + 3).min(a.trace.len())],
                    &b.trace[from..(i + 3).min(b.trace.len())],
                );
                eprintln!("{msg}");
                diverged.push(msg);
            }
        }
    }
    assert!(diverged.is_empty(), "{}", diverged.join("\n"));
}
