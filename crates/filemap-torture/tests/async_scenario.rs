//! The async scenario: the mixed workload through `filemap::AsyncMapping`,
//! with futures dropped at random points. Every locking strategy passes it,
//! and it still catches `none`.

use filemap::Strategy;
use filemap_torture::{run, DeviceSpec, OpKind, Scenario, TortureConfig};

#[test]
fn every_locking_strategy_passes_with_futures_dropped() {
    for strategy in Strategy::ALL.into_iter().filter(|s| s.is_coherent()) {
        let config = TortureConfig {
            strategy,
            scenario: Scenario::Async,
            device: DeviceSpec::Mem,
            seconds: 1.5,
            ..TortureConfig::default()
        };
        let report = run(&config, |_| {}).unwrap();
        assert_eq!(report.scenario, "async");
        assert!(report.is_clean(), "{report:#?}");
        assert!(report.reads_checked > 1000, "{report:#?}");
        for kind in OpKind::ALL {
            assert!(
                report.by_kind[kind.name()] >= 50,
                "{kind} ran too rarely: {report:#?}"
            );
        }
    }
}

#[test]
fn the_async_scenario_catches_the_none_strategy() {
    let config = TortureConfig {
        strategy: Strategy::None,
        scenario: Scenario::Async,
        device: DeviceSpec::Mem,
        seconds: 60.0,
        stop_on_violation: true,
        ..TortureConfig::default()
    };
    let report = run(&config, |_| {}).unwrap();
    assert!(
        report.violations() > 0,
        "no violation under `none` in {:.1} s: {report:?}",
        report.seconds
    );
}
