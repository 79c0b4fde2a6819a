//! The torture's two promises, on both backends: it catches the `none`
//! strategy, and every locking strategy passes it with every operation kind
//! exercised.

use filemap::Strategy;
use filemap_torture::{run, BackendKind, DeviceSpec, OpKind, TortureConfig};

const BACKENDS: [BackendKind; 2] = [BackendKind::Volume, BackendKind::HostFile];

#[test]
fn the_checker_catches_the_none_strategy_on_both_backends() {
    for backend in BACKENDS {
        let config = TortureConfig {
            strategy: Strategy::None,
            backend,
            device: DeviceSpec::TempFile,
            seconds: 60.0,
            stop_on_violation: true,
            ..TortureConfig::default()
        };
        let report = run(&config, |_| {}).unwrap();
        assert!(
            report.stale + report.foreign > 0,
            "no stale or foreign page found under `none` on {} in {:.1} s: {report:?}",
            backend.name(),
            report.seconds
        );
    }
}

#[test]
fn every_locking_strategy_passes_on_both_backends() {
    for backend in BACKENDS {
        for strategy in Strategy::ALL.into_iter().filter(|s| s.is_coherent()) {
            let config = TortureConfig {
                strategy,
                backend,
                device: DeviceSpec::TempFile,
                seconds: 2.0,
                ..TortureConfig::default()
            };
            let report = run(&config, |_| {}).unwrap();
            assert!(report.is_clean(), "{report:#?}");
            assert!(report.reads_checked > 1000, "{report:#?}");
            for kind in OpKind::ALL {
                assert!(
                    report.by_kind[kind.name()] >= 100,
                    "{kind} ran too rarely: {report:#?}"
                );
            }
            assert!(report.injected > 0, "the default run injects delays");
        }
    }
}

#[test]
fn host_files_do_not_live_in_memory() {
    let config = TortureConfig {
        backend: BackendKind::HostFile,
        device: DeviceSpec::Mem,
        ..TortureConfig::default()
    };
    let error = run(&config, |_| {}).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
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

#[test]
fn direct_io_through_maps_of_each_others_files_is_clean_under_punches() {
    let strategies = [Strategy::InvalidateLock, Strategy::Range];
    for (backend, strategy) in BACKENDS
        .into_iter()
        .flat_map(|backend| strategies.map(|strategy| (backend, strategy)))
    {
        let config = TortureConfig {
            strategy,
            scenario: filemap_torture::Scenario::SelfMapDio,
            backend,
            device: DeviceSpec::TempFile,
            seconds: 2.0,
            ..TortureConfig::default()
        };
        let report = run(&config, |_| {}).unwrap();
        assert!(report.is_clean(), "{report:#?}");
        for kind in [OpKind::ReadDirect, OpKind::WriteDirect, OpKind::Punch] {
            assert!(
                report.by_kind[kind.name()] >= 100,
                "{kind} ran too rarely: {report:#?}"
            );
        }
        assert!(report.reads_checked > 1000, "{report:#?}");
    }
}

#[test]
fn each_peer_cache_runs_the_mix_but_maps_and_pins_under_the_oracle_on_both_backends() {
    use filemap_torture::Peer;
    for backend in BACKENDS {
        for peer in Peer::ALL {
            let config = TortureConfig {
                peer: Some(peer),
                backend,
                device: DeviceSpec::TempFile,
                seconds: 1.0,
                pages_per_file: 64,
                ..TortureConfig::default()
            };
            let report = run(&config, |_| {}).unwrap();
            assert_eq!(report.strategy, peer.name(), "{report:#?}");
            assert_eq!(report.errors, 0, "{report:#?}");
            assert!(report.reads_checked > 1000, "{report:#?}");
            for kind in OpKind::ALL {
                let left_out = matches!(kind, OpKind::MapRead | OpKind::MapWrite | OpKind::Pin);
                let ran = report.by_kind[kind.name()];
                assert_eq!(ran == 0, left_out, "{peer}: {kind} ran {ran} times");
            }
        }
    }
}

#[test]
fn a_peer_cache_is_refused_through_a_mount_or_in_another_scenario() {
    let peer = Some(filemap_torture::Peer::Moka);
    for config in [
        TortureConfig {
            peer,
            scenario: filemap_torture::Scenario::Async,
            ..TortureConfig::default()
        },
        TortureConfig {
            peer,
            scenario: filemap_torture::Scenario::SelfMapDio,
            ..TortureConfig::default()
        },
    ] {
        let error = config.check().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
        assert!(error.to_string().contains("peer cache"), "{error}");
    }
}
