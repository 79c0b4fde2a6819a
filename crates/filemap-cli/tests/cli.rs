//! The command-line contract that scripts depend on: JSON lines with the agreed
//! keys, and exit codes 0 (clean), 1 (violations) and 2 (bad usage).

use std::process::Command;

fn filemap(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_filemap"))
        .args(args)
        .output()
        .expect("the filemap binary runs")
}

#[test]
fn torture_json_has_the_contract_keys_and_exits_zero_when_clean() {
    let out = filemap(&[
        "torture",
        "--strategy",
        "invalidate-lock",
        "--seconds",
        "1",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON object per strategy: {stdout}");
    let report: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    for key in [
        "strategy",
        "ops",
        "reads_checked",
        "stale",
        "foreign",
        "torn",
        "errors",
        "ops_per_s",
        "by_kind",
    ] {
        assert!(report.get(key).is_some(), "missing {key}: {report}");
    }
    assert_eq!(report["strategy"], "invalidate-lock");
    for kind in [
        "read",
        "write",
        "readahead",
        "punch",
        "zero",
        "truncate",
        "read_direct",
        "write_direct",
    ] {
        assert!(
            report["by_kind"][kind].as_u64().unwrap() > 0,
            "{kind}: {report}"
        );
    }
}

#[test]
fn torture_without_a_strategy_runs_every_strategy_and_prints_a_table() {
    let out = filemap(&["torture", "--seconds", "0.5", "--device", "mem"]);
    let stdout = String::from_utf8(out.stdout).unwrap();
    for strategy in [
        "none",
        "file-exclusive",
        "invalidate-lock",
        "two-state",
        "range",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(strategy)),
            "{strategy} row missing: {stdout}"
        );
    }
    assert!(stdout.contains("ops by kind"), "{stdout}");
    // `none` may or may not be caught in half a second; it never fails the run.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_usage_exits_two_and_says_why() {
    for args in [
        &["torture", "--strategy", "bogus"][..],
        &["torture", "--threads", "0", "--seconds", "0"][..],
        &["torture", "--seconds", "soon"][..],
        &["nonsense"][..],
    ] {
        let out = filemap(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no reason");
    }
}
