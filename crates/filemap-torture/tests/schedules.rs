//! The randomized-schedule test of the whole cache: under many seeds of
//! schedule noise (seeded yields, spins and sleeps at the cache's interleaving
//! points, see `filemap::schedule`), the torture's oracle finds no violation
//! under the default strategy, and still catches `none`. Its own test binary:
//! the noise is process-wide.

use std::sync::Mutex;

use filemap::{schedule, PageCache, Strategy};
use filemap_torture::{run, BackendKind, DeviceSpec, TortureConfig};

/// The noise is process-wide: the tests of this file take turns.
static NOISE: Mutex<()> = Mutex::new(());

/// A short torture run under schedule noise `seed`, with no device delays:
/// the noise is what varies the interleavings.
fn noisy_run(
    strategy: Strategy,
    backend: BackendKind,
    seed: u64,
) -> filemap_torture::TortureReport {
    let _turn = NOISE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    schedule::set_noise(Some(seed));
    let config = TortureConfig {
        strategy,
        backend,
        device: DeviceSpec::TempFile,
        seconds: 0.25,
        threads: 4,
        files: 2,
        pages_per_file: 16,
        seed,
        delay_percent: 0,
        ..TortureConfig::default()
    };
    let report = run(&config, |_| {});
    schedule::set_noise(None);
    report.unwrap()
}

#[test]
fn the_default_strategy_is_clean_under_every_schedule_seed() {
    let strategy = PageCache::builder().build().unwrap().strategy();
    let mut ops = 0;
    for seed in 1..=24 {
        let backend = if seed % 2 == 0 {
            BackendKind::Volume
        } else {
            BackendKind::HostFile
        };
        let report = noisy_run(strategy, backend, seed);
        assert!(report.is_clean(), "seed {seed}: {report:#?}");
        ops += report.ops;
    }
    println!("{strategy}: 24 schedule seeds, {ops} operations, no violation");
}

#[test]
fn schedule_noise_still_lets_the_oracle_catch_none() {
    let caught = (1..=24)
        .find(|&seed| noisy_run(Strategy::None, BackendKind::Volume, seed).violations() > 0);
    assert!(caught.is_some(), "no violation under `none` in 24 seeds");
}
