//! Running a simulation over many seeds, as the seed tests under `tests/` do.
//!
//! The environment picks the seeds: `SIM_SEED=S` runs only `S` (to rerun a failure), else
//! `SIM_SEEDS=N` seeds (default 100) from `SIM_FIRST_SEED` (default 0). `SIM_THREADS` (default 2)
//! threads each run their own seeds start to finish: a seed's run depends only on the seed (the
//! random source is per thread and reseeded per run). `SIM_LOG` (an `EnvFilter`) prints logs.

/// The seeds the environment asks for.
pub fn from_env() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    let n = env_u64("SIM_SEEDS").unwrap_or(100);
    let first = env_u64("SIM_FIRST_SEED").unwrap_or(0);
    (first..first + n).collect()
}

/// Whether one seed was asked for (`SIM_SEED`).
pub fn single() -> bool {
    std::env::var_os("SIM_SEED").is_some()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// Prints logs as `SIM_LOG` filters them, if set.
pub fn init_log() {
    if let Ok(f) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(f))
            .try_init();
    }
}

/// Runs `check` on every seed over `SIM_THREADS` threads. `check` prints what it wants and
/// returns counts to sum over the seeds, or the one-line reason the seed failed. Returns the
/// failures and the sums.
pub fn run<const N: usize>(
    seeds: &[u64],
    check: impl Fn(u64) -> Result<[u64; N], String> + Sync,
) -> (Vec<String>, [u64; N]) {
    let threads = env_u64("SIM_THREADS").unwrap_or(2).max(1);
    let check = &check;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let chunk: Vec<u64> = seeds.iter().copied().filter(|s| s % threads == t).collect();
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    let mut totals = [0u64; N];
                    for seed in chunk {
                        match check(seed) {
                            Ok(counts) => {
                                for (total, c) in totals.iter_mut().zip(counts) {
                                    *total += c;
                                }
                            }
                            Err(e) => failures.push(e),
                        }
                    }
                    (failures, totals)
                })
            })
            .collect();
        let mut failures = Vec::new();
        let mut totals = [0u64; N];
        for h in handles {
            let (f, t) = h.join().expect("simulation thread");
            failures.extend(f);
            for (total, c) in totals.iter_mut().zip(t) {
                *total += c;
            }
        }
        (failures, totals)
    })
}
