//! The torture through a mount when a worker process fails: the run ends at
//! its time with one error per worker, saying how the process ended, and
//! unmounts. The test mounts (as root, with `/dev/fuse`); if it cannot, it
//! fails with the reason.

use filemap_torture::mount::MountSettings;
use filemap_torture::{run, TortureConfig};

#[test]
fn a_worker_process_that_ends_is_an_error_of_the_run_not_a_hang() {
    let config = TortureConfig {
        seconds: 1.0,
        threads: 3,
        pages_per_file: 64,
        mount: Some(MountSettings {
            // Ends at once, whatever it is asked.
            worker: "false".into(),
            kernel_cache: false,
            readahead: filemap_fuse::MountOptions::default().readahead_mode,
        }),
        ..TortureConfig::default()
    };
    let report = run(&config, |_| {}).unwrap_or_else(|error| panic!("cannot run: {error}"));
    assert_eq!(report.errors, 3, "{report:?}");
    // Each worker stops at its first call that reaches its process (before
    // it, only the calls made through the library beside the mount).
    assert!(report.ops < 30, "the workers went on: {report:?}");
    assert!(
        report
            .examples
            .iter()
            .all(|example| example.contains("the worker process failed (exit status: 1)")),
        "{:?}",
        report.examples
    );
    assert_eq!(report.through, "mount");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let ours = format!(" filemap-torture:{} ", std::process::id());
    assert!(!mounts.contains(&ours), "left mounted: {mounts}");
}
