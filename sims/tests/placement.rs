//! The placement simulation over many seeds (`SIM_SEEDS=N`, default 100), or one seed
//! (`SIM_SEED=S`) to rerun a failure with the same fault schedule, network and random draws.
//! `SIM_LOG=openraft=info` prints the replicas' logs; `SIM_DEBUG=1` their state changes.

use std::time::Instant;

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    let n: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    (0..n).collect()
}

#[test]
fn placement_invariants_hold_over_seeds() {
    if let Ok(f) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .try_init();
    }
    let start = Instant::now();
    let seeds = seeds();
    // Two threads, each running its own seeds start to finish: a seed's run depends only on the
    // seed (the random source is per thread and reseeded per run).
    let chunks: Vec<Vec<u64>> = (0..2)
        .map(|t| seeds.iter().copied().filter(|s| s % 2 == t).collect())
        .collect();
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for seed in chunk {
                        match sims::placement::run(seed) {
                            Ok(r) => eprintln!(
                                "seed {seed}: ok ({} terms, final version {}, {} faults, trace {:016x})",
                                r.terms,
                                r.max_version,
                                r.faults.len(),
                                {
                                    use std::hash::{Hash, Hasher};
                                    let mut h = std::hash::DefaultHasher::new();
                                    r.trace.hash(&mut h);
                                    h.finish()
                                }
                            ),
                            Err(e) => {
                                eprintln!("FAILED {e}\n  replay with: SIM_SEED={seed} cargo test -p sims --test placement -- --nocapture");
                                failures.push(e);
                            }
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("sim thread"))
            .collect()
    });
    eprintln!("{} seeds in {:?}", seeds.len(), start.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
}
