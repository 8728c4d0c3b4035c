//! The actor simulation over many seeds (`SIM_SEEDS=N`, default 100), or one seed
//! (`SIM_SEED=S`) to rerun a failure with the same fault schedule. `SIM_LOG=actor_host=debug`
//! prints the hosts' logs; `SIM_VERBOSE=1` the errors clients saw and a few overlapping turns
//! (strict form) per seed; `SIM_CHECK_REPLAY=1` runs every seed twice and fails a seed whose two
//! runs observed different histories.

use std::time::Instant;

#[test]
fn single_activation_holds_over_seeds() {
    sims::seeds::init_log();
    let start = Instant::now();
    let seeds = sims::seeds::from_env();
    let replay = std::env::var_os("SIM_CHECK_REPLAY").is_some();
    let (failures, totals) = sims::seeds::run::<6>(&seeds, |seed| {
        let t = Instant::now();
        match sims::actor_sim::run(seed) {
            Ok(r)
                if replay
                    && sims::actor_sim::run(seed).map(|again| again.fingerprint)
                        != Ok(r.fingerprint) =>
            {
                eprintln!("FAILED seed {seed}: a second run observed something else\n  replay with: SIM_SEED={seed} SIM_CHECK_REPLAY=1 cargo test -p sims --test actors -- --nocapture");
                Err(format!("seed {seed}: does not replay exactly"))
            }
            Ok(r) => {
                eprintln!(
                        "seed {seed}: ok in {:.1?} ({} faults, {} turns, {} writes accepted, {} refused, calls {} ok / {} failed, overlapping turns: {} ({} with a refused write or a crash), fingerprint {:016x})",
                        t.elapsed(),
                        r.faults.len(),
                        r.turns,
                        r.accepted,
                        r.refused,
                        r.calls_ok,
                        r.calls_failed,
                        r.strict_overlaps,
                        r.strict_overlaps_refused,
                        r.fingerprint,
                    );
                if std::env::var_os("SIM_VERBOSE").is_some() {
                    for (k, v) in &r.errors {
                        eprintln!("    {v:5} {k}");
                    }
                    if std::env::var_os("SIM_TRACE").is_some() {
                        for l in &r.trace {
                            eprintln!("    {l}");
                        }
                    }
                    for (k, v) in &r.refusals {
                        eprintln!("    {v:5} refused: {k}");
                    }
                    for o in &r.overlap_samples {
                        eprintln!("    overlap: {o}");
                    }
                }
                Ok([
                    r.turns as u64,
                    r.accepted as u64,
                    r.refused,
                    r.strict_overlaps as u64,
                    r.strict_overlaps_refused as u64,
                    r.calls_failed,
                ])
            }
            Err(e) => {
                eprintln!("FAILED {e}\n  replay with: SIM_SEED={seed} cargo test -p sims --test actors -- --nocapture");
                Err(e.lines().next().unwrap_or_default().to_string())
            }
        }
    });
    // Two runs of one seed observe exactly the same (O9 of the reliability plan), which is what
    // makes a printed failing seed worth rerunning. Checked here, once the threads above are done:
    // runs replay exactly one at a time, but not always while another simulation runs in the
    // same process (see `sims/src/lib.rs`).
    let mut failures = failures;
    if !sims::seeds::single() {
        for seed in [1000, 1001] {
            let a = sims::actor_sim::run(seed).map(|r| r.fingerprint);
            let b = sims::actor_sim::run(seed).map(|r| r.fingerprint);
            if a.is_err() || a != b {
                failures.push(format!(
                    "seed {seed} does not replay exactly: {a:x?} then {b:x?}"
                ));
            }
        }
    }
    let sum = |i: usize| totals[i];
    eprintln!(
        "{} seeds in {:?}: {} turns, {} writes accepted, {} refused, {} failed calls; overlapping turns (strict form): {}, of which {} had a refused write or a crash",
        seeds.len(),
        start.elapsed(),
        sum(0),
        sum(1),
        sum(2),
        sum(5),
        sum(3),
        sum(4)
    );
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
}
