//! The command-line contract that scripts depend on: JSON lines with the agreed
//! keys, and exit codes 0 (clean), 1 (violations) and 2 (bad usage).

use std::process::Command;

use filemap_torture::OpKind;

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
    for kind in OpKind::ALL {
        assert!(
            report["by_kind"][kind.name()].as_u64().unwrap() > 0,
            "{kind}: {report}"
        );
    }
    for name in report["by_kind"].as_object().unwrap().keys() {
        if let Err(unknown) = name.parse::<OpKind>() {
            panic!("{unknown}: {report}");
        }
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

/// A tiny `filemap bench --json` run of some workloads (no timing asserted:
/// machines are noisy), parsed into rows, ratios and notes.
fn bench_json(args: &[&str]) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let mut all = vec!["bench", "--runs", "1", "--json"];
    if !args.contains(&"--seconds-per-run") {
        all.extend(["--seconds", "0.05"]);
    }
    all.extend_from_slice(args);
    let out = filemap(&all);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is a JSON object"))
        .collect();
    // Rows have an `op`, ratios a `name`, notes only a `note`.
    let (rows, rest): (Vec<_>, Vec<_>) = lines.into_iter().partition(|l| l.get("op").is_some());
    let ratios = rest
        .into_iter()
        .filter(|l| l.get("name").is_some())
        .collect();
    (rows, ratios)
}

#[test]
fn bench_json_rows_have_the_contract_keys_for_every_workload_and_strategy() {
    let (rows, ratios) = bench_json(&[
        "hit",
        "mixed",
        "direct",
        "starve",
        "fault",
        "--file-mib",
        "1",
    ]);
    for row in &rows {
        for key in [
            "workload",
            "strategy",
            "threads",
            "ops_per_s",
            "p50_us",
            "p99_us",
        ] {
            assert!(row.get(key).is_some(), "missing {key}: {row}");
        }
        assert!(row["ops_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    let strategies = ["none", "file-exclusive", "invalidate-lock", "two-state"];
    for workload in [
        "hit",
        "mixed-disjoint",
        "mixed-overlap",
        "direct",
        "starve",
        "fault",
    ] {
        for strategy in strategies {
            assert!(
                rows.iter()
                    .any(|r| r["workload"] == workload && r["strategy"] == strategy),
                "no {workload} row for {strategy}"
            );
        }
        let none = rows
            .iter()
            .find(|r| r["workload"] == workload && r["strategy"] == "none")
            .unwrap();
        assert_eq!(none["coherent"], false, "{none}");
    }
    for workload in ["hit", "mixed-disjoint", "mixed-overlap"] {
        assert!(
            rows.iter()
                .any(|r| r["workload"] == workload && r["strategy"] == "kernel"),
            "no kernel baseline for {workload}"
        );
    }
    // Every latency the hit, mixed, direct and starve rows report is a number.
    for row in rows.iter().filter(|r| r["workload"] != "fault") {
        let (p50, p99) = (row["p50_us"].as_f64(), row["p99_us"].as_f64());
        assert!(p50.is_some_and(|p| p > 0.0) && p99 >= p50, "{row}");
    }
    // The targets of the issue are all reported, met or not, or not available
    // when their strategy does not exist yet.
    for (workload, name) in [
        ("hit", "range / best"),
        ("mixed-disjoint", "range / invalidate-lock"),
        ("mixed-disjoint", "invalidate-lock / file-exclusive"),
        ("direct", "range / invalidate-lock"),
        ("direct", "two-state / invalidate-lock"),
        ("starve", "range: punch p99"),
        ("starve", "two-state: punch p99"),
        ("starve", "invalidate-lock: punch p99"),
    ] {
        let ratio = ratios
            .iter()
            .find(|r| r["workload"] == workload && r["name"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no {workload} ratio {name}"));
        for key in ["value", "target", "comparison", "met", "note"] {
            assert!(ratio.get(key).is_some(), "missing {key}: {ratio}");
        }
        match ratio["value"].as_f64() {
            Some(value) => assert!(value > 0.0 && value.is_finite(), "{ratio}"),
            None => assert!(ratio["note"].as_str().unwrap().contains("not available")),
        }
    }
}

#[test]
fn bench_keeps_the_options_of_bench_hit_and_bench_fault() {
    let (rows, ratios) = bench_json(&[
        "hit",
        "--file-mib",
        "1",
        "--threads",
        "1",
        "--seconds-per-run",
        "0.02",
        "--strategy",
        "invalidate-lock",
    ]);
    let names = |op: &str| -> Vec<&str> {
        rows.iter()
            .filter(|r| r["op"] == op)
            .map(|r| r["strategy"].as_str().unwrap())
            .collect()
    };
    // The racy copies' rows depend on the processor: at least the one every
    // processor of its kind runs.
    let (copies, reads): (Vec<&str>, Vec<&str>) = names("read")
        .into_iter()
        .partition(|name| name.starts_with("copy-"));
    assert_eq!(
        reads,
        [
            "invalidate-lock",
            "kernel",
            "memcpy",
            "async",
            "spawn-blocking",
            "moka",
            "quick_cache",
            "foyer"
        ]
    );
    assert!(
        ["copy-rep-movsb", "copy-neon-pairs", "copy-atomic-words"]
            .iter()
            .any(|copy| copies.contains(copy)),
        "{copies:?}"
    );
    assert_eq!(names("overwrite"), ["invalidate-lock", "kernel"]);
    assert!(!ratios.is_empty());
    let (rows, _) = bench_json(&["fault", "--file-mib", "1", "--strategy", "two-state"]);
    assert!(rows.iter().all(|r| r["workload"] == "fault"));
    assert!(rows.iter().any(|r| r["strategy"] == "two-state"));
}

#[test]
fn bench_prints_a_table_and_writes_a_chart() {
    let dir = tempfile::tempdir().unwrap();
    let chart = dir.path().join("bench.svg");
    let out = filemap(&[
        "bench",
        "hit",
        "starve",
        "--runs",
        "1",
        "--seconds",
        "0.05",
        "--file-mib",
        "1",
        "--plot",
        chart.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No terminal: no progress bar on stderr, status lines instead, the last
    // when every step is done.
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr
            .lines()
            .all(|line| line.starts_with("filemap bench: ")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .last()
            .unwrap()
            .starts_with("filemap bench: done, "),
        "{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("none*"), "{stdout}");
    assert!(stdout.contains("target <= 10"), "{stdout}");
    let svg = std::fs::read_to_string(&chart).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
}

#[test]
fn bench_open_prints_the_kernel_ratio_and_the_resource_figures() {
    let out = filemap(&[
        "bench",
        "open",
        "--strategy",
        "range",
        "--runs",
        "1",
        "--seconds",
        "0.05",
        "--files",
        "100",
        "--mappings",
        "2000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    for strategy in ["range", "kernel"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("open") && l.contains(strategy)),
            "no {strategy} row: {stdout}"
        );
    }
    let ratio = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with("open") && l.contains(name))
            .unwrap_or_else(|| panic!("no {name} figure: {stdout}"))
    };
    assert!(ratio("range / kernel, open-read-close ops/s").contains("x (target >= 1:"));
    // The resource figures are counts and sizes: no `x` after them. (Where
    // descriptors run out before 2,000, fewer mappings are measured.)
    for (name, target) in [
        ("threads added per 10,000 idle mappings", "(target <= 1:"),
        (
            "descriptors added per 10,000 idle mappings",
            "(target <= 1:",
        ),
        ("process VMAs", "(target <= 2000:"),
        ("resident bytes per idle open mapping", "(target <= 1024:"),
    ] {
        let line = ratio(name);
        assert!(line.contains(&format!("  {target}")), "{line}");
    }
    assert!(
        stdout.contains("note: open: (a) no mapping open: "),
        "{stdout}"
    );
    assert!(stdout.contains("descriptor limit"), "{stdout}");
}

/// Mount points at or under `dir`, in this process's mount namespace (the
/// one `filemap` mounts in).
fn mounted_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let dir = dir.canonicalize().unwrap();
    filemap_bench::mount::mount_points()
        .unwrap()
        .into_iter()
        .filter(|point| point.starts_with(&dir))
        .collect()
}

/// A tiny `filemap bench mount` whose temporary files go to a directory of
/// the test's, which it must leave empty and with nothing mounted on it.
fn bench_mount(extra: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec![
        "bench",
        "mount",
        "--runs",
        "1",
        "--seconds",
        "0.05",
        "--file-mib",
        "4",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_filemap"))
        .args(&args)
        .env("TMPDIR", tmp.path())
        .output()
        .expect("the filemap binary runs");
    // A run that cannot mount fails here, with the reason on stderr.
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mounted_under(tmp.path()), Vec::<std::path::PathBuf>::new());
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bench_mount_prints_every_target_the_table_and_the_targets() {
    let stdout = bench_mount(&[]);
    for op in ["cached-read", "uncached-read", "write-fsync"] {
        for target in ["filemap", "passthrough", "host"] {
            assert!(
                stdout.lines().any(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    fields.starts_with(&["mount", target, op])
                }),
                "no {op} row of {target}: {stdout}"
            );
        }
    }
    // The table: a row per target, then filemap's ratios to the others.
    for row in [
        "filemap ",
        "passthrough ",
        "host ",
        "filemap / passthrough ",
        "filemap / host ",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(row)),
            "no table row {row:?}: {stdout}"
        );
    }
    let ratio = |name: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with("mount") && l.contains(name))
            .unwrap_or_else(|| panic!("no ratio {name}: {stdout}"))
    };
    for name in [
        "filemap / passthrough, cached 4 KiB random reads/s, 1 thread",
        "filemap / passthrough, cached 4 KiB random reads/s, 2 threads",
        "filemap / passthrough, uncached sequential 1 MiB reads",
    ] {
        assert!(ratio(name).contains("x (target >= 1: "), "{}", ratio(name));
    }
    assert!(!ratio("filemap / host, random 4 KiB writes/s").contains("target"));
    assert!(stdout.contains("note: mount: uncached-read: "), "{stdout}");
}

#[test]
fn bench_mount_json_has_the_contract_keys() {
    let stdout = bench_mount(&["--json", "--threads", "2", "--strategy", "two-state"]);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is a JSON object"))
        .collect();
    let rows: Vec<_> = lines.iter().filter(|l| l.get("op").is_some()).collect();
    let ratios: Vec<_> = lines.iter().filter(|l| l.get("name").is_some()).collect();
    // One cached-read thread count, the sequential read, the writes.
    assert_eq!(rows.len(), 3 * 3, "{stdout}");
    for row in &rows {
        for key in [
            "workload",
            "strategy",
            "op",
            "threads",
            "ops_per_s",
            "p50_us",
            "p99_us",
        ] {
            assert!(row.get(key).is_some(), "missing {key}: {row}");
        }
        assert_eq!(row["workload"], "mount");
        assert!(row["ops_per_s"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(rows
        .iter()
        .any(|r| r["op"] == "cached-read" && r["threads"] == 2 && r["workers"] == 2));
    assert_eq!(ratios.len(), 2 * 3, "{stdout}");
    for ratio in &ratios {
        assert!(ratio["value"].as_f64().is_some_and(|v| v > 0.0), "{ratio}");
    }
    assert!(
        stdout.contains("two-state"),
        "the mount's strategy is noted: {stdout}"
    );
}

#[test]
fn bench_bad_usage_exits_two_and_says_why() {
    for args in [
        &["bench", "nonsense"][..],
        &["bench", "--runs", "0"][..],
        &["bench", "--seconds", "0"][..],
        &["bench", "mixed", "--threads", "0"][..],
        &["bench", "--strategy", "bogus"][..],
        &["bench", "mixed", "--cache-bytes", "4096"][..],
        &["bench", "hit", "--file-mib", "0"][..],
        &["bench", "hit", "--plot", "/nonexistent-dir/chart.svg"][..],
        &["bench", "open", "--files", "0"][..],
        &["bench", "open", "--mappings", "10"][..],
        &["bench", "mount", "--file-mib", "0"][..],
        &["bench", "mount", "--budget", "1048576"][..],
    ] {
        let out = filemap(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no reason");
        assert!(out.stdout.is_empty(), "{args:?} ran anyway");
    }
}

/// A short `--scenario differential` run: a JSON row per backend (all four by
/// default) with the contract keys, a JSON line per divergence with its
/// reproducer, and an exit code that says whether anything diverged.
#[test]
fn torture_differential_json_has_a_row_per_backend_and_exits_by_its_findings() {
    let out = filemap(&[
        "torture",
        "--scenario",
        "differential",
        "--strategy",
        "range",
        "--seconds",
        "2",
        "--shrink-seconds",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code();
    assert!(matches!(code, Some(0 | 1)), "exit {code:?}: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is a JSON object"))
        .collect();
    let (rows, divergences): (Vec<_>, Vec<_>) =
        lines.iter().partition(|l| l.get("sequences").is_some());
    let backends: Vec<&str> = rows
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert_eq!(
        backends,
        ["volume-mem", "volume-file", "volume-direct", "hostfile"],
        "{stdout}"
    );
    for row in &rows {
        for key in ["strategy", "scenario", "ops", "divergences", "ops_per_s"] {
            assert!(row.get(key).is_some(), "missing {key}: {row}");
        }
        assert_eq!(row["strategy"], "range");
        assert_eq!(row["scenario"], "differential");
        assert!(row["ops"].as_u64().unwrap() > 0, "{row}");
    }
    for divergence in &divergences {
        for key in ["kind", "op", "signature", "summary", "reproducer"] {
            assert!(divergence.get(key).is_some(), "missing {key}: {divergence}");
        }
        assert!(divergence["reproducer"].as_str().unwrap().contains("calls"));
    }
    let diverged: u64 = rows
        .iter()
        .map(|r| r["divergences"].as_u64().unwrap())
        .sum();
    assert_eq!(code == Some(0), diverged == 0, "{stdout}\n{stderr}");
    assert_eq!(diverged == 0, divergences.is_empty(), "{stdout}");
}

#[test]
fn torture_differential_bad_usage_exits_two() {
    for args in [
        &["torture", "--scenario", "differential", "--device", "mem"][..],
        &["torture", "--scenario", "differential", "--seconds", "nan"][..],
        &["torture", "--backend", "volume-mem", "--seconds", "0"][..],
    ] {
        let out = filemap(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?} printed no reason");
    }
}
