//! The command line behaves like a Unix tool: errors name what they concern,
//! settings that cannot work are bad usage before anything runs, a closed pipe
//! ends it quietly, a piped stderr gets status lines, and the default torture
//! evicts.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn filemap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_filemap"))
        .args(args)
        .output()
        .expect("the filemap binary runs")
}

/// A run that is refused as bad usage: exit 2, nothing on stdout, at once
/// (before any strategy's seconds go by); its stderr.
fn refused(args: &[&str]) -> String {
    let started = Instant::now();
    let out = filemap(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?} ran anyway");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{args:?} was refused only after {:?}",
        started.elapsed()
    );
    stderr
}

/// A torture of the `range` strategy on a volume in memory.
const RANGE_ON_MEMORY: [&str; 5] = ["torture", "--strategy", "range", "--device", "mem"];

/// A `RANGE_ON_MEMORY` run with `settings`, which must be clean.
fn clean_run(settings: &[&str]) -> Output {
    let out = filemap(&[&RANGE_ON_MEMORY[..], settings].concat());
    assert!(
        out.status.success(),
        "{settings:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn an_error_names_the_path_it_concerns() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("missing/img");
    let image = image.to_str().unwrap();
    let stderr = refused(&["torture", "--device", image, "--seconds", "1"]);
    assert_eq!(
        stderr.trim_end(),
        format!("filemap torture: {image}: No such file or directory (os error 2)")
    );
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    let stderr = refused(&[
        "torture",
        "--backend",
        "hostfile",
        "--device",
        missing,
        "--seconds",
        "1",
    ]);
    assert!(
        stderr.contains(&format!("{missing}/file0: No such file or directory")),
        "{stderr}"
    );
}

#[test]
fn negative_numbers_are_bad_usage_with_a_message() {
    for (args, says) in [
        (
            &["torture", "--seconds", "-1"][..],
            "positive number of seconds",
        ),
        (
            &["torture", "--seconds", "0"][..],
            "positive number of seconds",
        ),
        (
            &["bench", "--seconds", "-0.5"][..],
            "positive number of seconds",
        ),
        (&["torture", "--threads", "-1"][..], "whole number"),
        (&["torture", "--cache-bytes", "-4096"][..], "whole number"),
    ] {
        let stderr = refused(args);
        assert!(stderr.contains(args[1]), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
fn a_budget_too_small_for_the_threads_is_bad_usage_naming_the_minimum() {
    // Four pages of 4 KiB per thread: 6 threads by default, 2 here.
    let stderr = refused(&["torture", "--cache-bytes", "4096"]);
    assert!(
        stderr.contains("--cache-bytes must be at least 98304"),
        "{stderr}"
    );
    let stderr = refused(&["torture", "--threads", "2", "--cache-bytes", "32767"]);
    assert!(
        stderr.contains("--cache-bytes must be at least 32768"),
        "{stderr}"
    );
    // The minimum itself runs.
    clean_run(&[
        "--threads",
        "2",
        "--cache-bytes",
        "32768",
        "--seconds",
        "0.3",
    ]);
}

#[test]
fn other_settings_that_cannot_work_are_bad_usage_naming_the_setting() {
    for (args, names) in [
        (&["torture", "--threads", "0"][..], "--threads"),
        (&["torture", "--files", "0"][..], "--files"),
        (&["torture", "--pages", "1"][..], "--pages"),
        (
            &["torture", "--delay-percent", "101"][..],
            "--delay-percent",
        ),
        (
            &["torture", "--backend", "all", "--device", "mem"][..],
            "--device mem",
        ),
    ] {
        let stderr = refused(args);
        assert!(stderr.contains(names), "{args:?}: {stderr}");
    }
}

/// Runs filemap with stdout a pipe whose reading end is already closed, as
/// under `| head -1` once `head` has gone; returns how it ended and its stderr.
fn with_stdout_closed(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors `pipe` writes.
    let made = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(made, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: `pipe2` just opened both descriptors, and nothing else owns them.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_filemap"))
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("the filemap binary runs");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A short bench run that prints a table, or JSON lines with `--json`.
const BENCH: &[&str] = &[
    "bench",
    "hit",
    "--runs",
    "1",
    "--seconds",
    "0.02",
    "--file-mib",
    "1",
    "--threads",
    "1",
    "--strategy",
    "range",
];

#[test]
fn a_closed_stdout_ends_every_printing_path_quietly_by_sigpipe() {
    let differential = [
        "torture",
        "--scenario",
        "differential",
        "--backend",
        "volume-mem",
        "--strategy",
        "range",
        "--seconds",
        "0.2",
        "--shrink-seconds",
        "0",
    ];
    for args in [
        &["--help"][..],
        &["--version"],
        &["torture", "--help"],
        &[&RANGE_ON_MEMORY[..], &["--seconds", "0.2"]].concat(),
        &[&RANGE_ON_MEMORY[..], &["--seconds", "0.2", "--json"]].concat(),
        &differential,
        BENCH,
        &[BENCH, &["--json"]].concat(),
    ] {
        let (status, stderr) = with_stdout_closed(args);
        assert_eq!(
            status.signal(),
            Some(libc::SIGPIPE),
            "{args:?} ended with {status}: {stderr}"
        );
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_piped_stderr_gets_a_status_line_every_few_seconds_and_one_at_the_end() {
    let out = clean_run(&["--seconds", "3.5"]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one status line at 3 s, one at the end: {stderr}"
    );
    assert!(
        lines[0].starts_with("filemap torture: volume/range: ")
            && lines[0].contains(" of 3.5 s, ")
            && lines[0].ends_with(" violations"),
        "{stderr}"
    );
    assert!(
        lines[1].starts_with("filemap torture: volume/range: done in ")
            && lines[1].ends_with(", 0 violations, 0 errors"),
        "{stderr}"
    );
    // No terminal: no bar, nothing that redraws.
    assert!(!stderr.contains(['\r', '\x1b']), "{stderr:?}");
    // stdout is the table, as ever.
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("strategy "), "{stdout}");
}

#[test]
fn the_default_torture_evicts() {
    let out = clean_run(&["--seconds", "2", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cache = &report["cache"];
    // The default files, 4 of 2048 pages, are four times the budget.
    assert_eq!(cache["budget_bytes"], 8 << 20, "{report}");
    assert!(cache["evictions"].as_u64().unwrap() > 0, "{report}");
    assert!(report["ops"].as_u64().unwrap() > 0, "{report}");
}
