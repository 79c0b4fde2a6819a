//! The torture's two promises: it catches the `none` strategy, and the locking
//! strategies pass it with every operation kind exercised.

use filemap::Strategy;
use filemap_torture::{run, DeviceSpec, TortureConfig, OP_KINDS};

#[test]
fn the_checker_catches_the_none_strategy() {
    let config = TortureConfig {
        strategy: Strategy::None,
        seconds: 60.0,
        stop_on_violation: true,
        ..TortureConfig::default()
    };
    let report = run(&config, |_| {}).unwrap();
    assert!(
        report.stale + report.foreign > 0,
        "no stale or foreign page found under `none` in {:.1} s: {report:?}",
        report.seconds
    );
}

#[test]
fn invalidate_lock_passes_with_every_operation_exercised() {
    let config = TortureConfig {
        strategy: Strategy::InvalidateLock,
        device: DeviceSpec::TempFile,
        seconds: 4.0,
        ..TortureConfig::default()
    };
    let report = run(&config, |_| {}).unwrap();
    assert!(report.is_clean(), "{report:#?}");
    assert!(report.reads_checked > 1000, "{report:#?}");
    for kind in OP_KINDS {
        assert!(
            report.by_kind[kind] >= 100,
            "{kind} ran too rarely: {report:#?}"
        );
    }
    assert!(report.injected > 0, "the default run injects device delays");
}

#[test]
fn bad_settings_are_refused() {
    for config in [
        TortureConfig {
            threads: 0,
            ..TortureConfig::default()
        },
        TortureConfig {
            files: 0,
            ..TortureConfig::default()
        },
        TortureConfig {
            pages_per_file: 1,
            ..TortureConfig::default()
        },
        TortureConfig {
            delay_percent: 101,
            ..TortureConfig::default()
        },
        TortureConfig {
            seconds: f64::NAN,
            ..TortureConfig::default()
        },
    ] {
        let error = run(&config, |_| {}).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{config:?}");
    }
}
