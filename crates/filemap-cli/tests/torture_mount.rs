//! `filemap torture --mount`: worker processes race every operation through
//! a FUSE mount of the volume, and the oracle checks what they read. These
//! tests mount (as root, with `/dev/fuse`); one that cannot fails with the
//! reason the command gives.

use std::process::{Command, Stdio};

use filemap_torture::OpKind;

/// Runs `filemap torture --mount ARGS --json` and returns its one report.
/// Fails if the run left its mount behind.
fn torture_through_the_mount(args: &[&str]) -> serde_json::Value {
    let child = Command::new(env!("CARGO_BIN_EXE_filemap"))
        .args(["torture", "--mount", "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the filemap binary runs");
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(mounts_of(pid), Vec::<String>::new(), "mounts left behind");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|error| panic!("{error}: stdout {stdout:?}, stderr {stderr}"));
    // Exit 0 unless a strategy other than `none` found something.
    let clean = report["stale"] == 0 && report["foreign"] == 0 && report["torn"] == 0;
    let expected = if report["strategy"] == "none" || clean && report["errors"] == 0 {
        0
    } else {
        1
    };
    assert_eq!(out.status.code(), Some(expected), "{report}\n{stderr}");
    report
}

/// The mounts of the torture run of process `pid` (its source names it).
fn mounts_of(pid: u32) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.contains(&format!(" filemap-torture:{pid} ")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn range_through_the_mount_reads_nothing_stale_foreign_or_torn_with_the_kernel_cache_off_and_on_and_readahead_backend_bound(
) {
    for (flags, through) in [
        (&[][..], "mount"),
        (&["--kernel-cache"][..], "mount+kernel-cache"),
        (
            &["--readahead", "backend-bound"][..],
            "mount+readahead-backend-bound",
        ),
    ] {
        let mut args = vec!["--strategy", "range", "--seconds", "8"];
        args.extend(flags);
        let report = torture_through_the_mount(&args);
        assert_eq!(report["through"], through, "{report}");
        for key in ["stale", "foreign", "torn", "errors"] {
            assert_eq!(report[key], 0, "{key} through the {through}: {report}");
        }
        // Pins are the library's: the mount has none.
        for kind in OpKind::ALL.into_iter().filter(|&kind| kind != OpKind::Pin) {
            assert!(
                report["by_kind"][kind.name()].as_u64().unwrap() > 0,
                "no {kind} through the {through}: {report}"
            );
        }
        assert!(report["reads_checked"].as_u64().unwrap() > 1000, "{report}");
    }
}

#[test]
fn none_through_the_mount_is_caught_reading_stale_pages() {
    let report = torture_through_the_mount(&["--strategy", "none", "--seconds", "10"]);
    let violations = ["stale", "foreign", "torn"]
        .map(|key| report[key].as_u64().unwrap())
        .iter()
        .sum::<u64>();
    assert!(
        violations > 0,
        "none went uncaught through the mount: {report}"
    );
    assert_eq!(report["errors"], 0, "{report}");
}

#[test]
fn settings_the_mount_cannot_run_are_bad_usage_naming_the_setting() {
    for (args, says) in [
        (&["--kernel-cache"][..], "--mount"),
        (&["--readahead", "always"][..], "--mount"),
        (
            &["--mount", "--backend", "hostfile"][..],
            "--backend volume",
        ),
        (
            &["--mount", "--scenario", "self-map-dio"][..],
            "mixed scenario",
        ),
        (
            &["--mount", "--scenario", "differential"][..],
            "mixed scenario",
        ),
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_filemap"))
            .arg("torture")
            .args(args)
            .args(["--seconds", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        assert_eq!(mounts_of(pid), Vec::<String>::new(), "{args:?} mounted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
