//! The placement simulation over many seeds (`SIM_SEEDS=N`, default 100), or one seed
//! (`SIM_SEED=S`) to rerun a failure with the same fault schedule, network and random draws.
//! `SIM_LOG=openraft=info` prints the replicas' logs; `SIM_DEBUG=1` their state changes.

use std::time::Instant;

#[test]
fn placement_invariants_hold_over_seeds() {
    sims::seeds::init_log();
    let start = Instant::now();
    let seeds = sims::seeds::from_env();
    let (failures, _) = sims::seeds::run::<0>(&seeds, |seed| match sims::placement::run(seed) {
        Ok(r) => {
            eprintln!(
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
            );
            Ok([])
        }
        Err(e) => {
            eprintln!("FAILED {e}\n  replay with: SIM_SEED={seed} cargo test -p sims --test placement -- --nocapture");
            Err(e)
        }
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
