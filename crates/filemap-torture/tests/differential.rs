//! filemap against the Linux kernel: the same random sequences of calls on a
//! `Mapping` and on a host file, compared after every call (see
//! `filemap_torture::differential`).
//!
//! One test runs a fixed seed for about 30 s over every backend and strategy
//! and asserts that nothing diverged, printing each divergence's shrunk
//! reproducer otherwise. Another proves the comparison has teeth: a backend
//! whose `zero_range` zeroes only the first half of its range must be caught.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use filemap::backend::Backend;
use filemap::Strategy;
use filemap_torture::differential::{
    run, DiffBackend, DifferentialConfig, DifferentialReport, DivergenceKind,
};

/// The seed of the fixed run: change it only together with a fix of what a
/// new seed finds.
const SEED: u64 = 20_260_101;

/// Seconds of the fixed run; `FILEMAP_DIFFERENTIAL_SECONDS` overrides it.
fn seconds() -> f64 {
    std::env::var("FILEMAP_DIFFERENTIAL_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30.0)
}

/// The rows and every divergence with its reproducer, for the test's output.
fn describe(report: &DifferentialReport) -> String {
    let mut text = format!(
        "{} calls in {} sequences, {:.1} s ({:.0} calls/s); {:.1} s shrinking; kernel largest size {}, O_DIRECT {}\n",
        report.ops,
        report.sequences,
        report.seconds,
        report.ops_per_s,
        report.shrink_seconds,
        report.kernel.max_file_size,
        report.kernel.direct_io
    );
    for row in &report.rows {
        text.push_str(&format!(
            "{:<14} {:<16} {:>5} sequences {:>7} calls {:>4} diverged\n",
            row.backend, row.strategy, row.sequences, row.ops, row.divergences
        ));
    }
    for note in &report.notes {
        text.push_str(&format!("note: {note}\n"));
    }
    for (i, d) in report.divergences.iter().enumerate() {
        text.push_str(&format!(
            "\ndivergence {}: {} in {} (seen {} times, under {})\n{}\nshrunk from {} to {} calls:\n{}",
            i + 1,
            d.kind.name(),
            d.op,
            d.occurrences,
            d.seen_under.join(", "),
            d.summary,
            d.original_calls,
            d.shrunk_calls,
            d.reproducer
        ));
    }
    text
}

#[test]
fn filemap_matches_the_kernel_on_every_backend_and_strategy() {
    let config = DifferentialConfig {
        seconds: seconds(),
        seed: SEED,
        backends: DiffBackend::ALL.to_vec(),
        strategies: Strategy::ALL.to_vec(),
        shrink_seconds: 20.0,
        max_shrunk: 6,
        ..DifferentialConfig::default()
    };
    let report = run(&config, |_| {}).expect("the differential run starts");
    let text = describe(&report);
    if report.is_clean() {
        println!("{text}");
    }
    for backend in DiffBackend::ALL {
        for strategy in Strategy::ALL {
            let row = report
                .rows
                .iter()
                .find(|r| r.backend == backend.name() && r.strategy == strategy.name())
                .expect("a row per backend and strategy");
            assert!(
                row.sequences > 0 && row.ops > 0,
                "{}/{} ran nothing",
                row.backend,
                row.strategy
            );
        }
    }
    assert!(
        report.is_clean(),
        "{} sequences diverged from the kernel ({} distinct divergences):\n{text}",
        report.diverged_sequences(),
        report.divergences.len()
    );
}

/// A backend that forwards every call but `zero_range`, which zeroes only
/// the first half of its range (nothing of a one-byte range).
#[derive(Debug)]
struct HalfZeroRange {
    inner: Arc<dyn Backend>,
}

impl Backend for HalfZeroRange {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn is_empty(&self) -> io::Result<bool> {
        self.inner.is_empty()
    }

    fn max_file_size(&self) -> u64 {
        self.inner.max_file_size()
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_pages(index, buf)
    }

    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_pages(index, buf)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        // Broken on purpose: the second half keeps its data.
        if len / 2 == 0 {
            return Ok(());
        }
        self.inner.zero_range(offset, len / 2)
    }

    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.collapse_range(offset, len)
    }

    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.insert_range(offset, len)
    }

    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_direct(offset, buf)
    }

    fn write_direct(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_direct(offset, buf)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }

    fn remove(&self) -> io::Result<()> {
        self.inner.remove()
    }
}

#[test]
fn a_backend_whose_zero_range_zeroes_half_is_caught() {
    let started = Instant::now();
    let config = DifferentialConfig {
        seconds: 60.0,
        seed: SEED,
        backends: vec![DiffBackend::VolumeMem, DiffBackend::HostFile],
        strategies: vec![Strategy::Range],
        shrink_seconds: 20.0,
        watch: Some(Arc::new(|kind, op| {
            kind == DivergenceKind::ContentMismatch && op == "zero_range"
        })),
        wrap_backend: Some(Arc::new(|inner| Arc::new(HalfZeroRange { inner }))),
        ..DifferentialConfig::default()
    };
    let report = run(&config, |_| {}).expect("the differential run starts");
    let caught = report
        .divergences
        .iter()
        .find(|d| d.kind == DivergenceKind::ContentMismatch && d.op == "zero_range");
    let Some(caught) = caught else {
        panic!(
            "the broken zero_range was not caught in {:.1} s:\n{}",
            started.elapsed().as_secs_f64(),
            describe(&report)
        );
    };
    println!(
        "the broken zero_range was caught after {} calls, {:.2} s (run and shrink: {:.1} s); \
         shrunk from {} to {} calls:\n{}",
        caught.ops_before,
        caught.seconds_before,
        started.elapsed().as_secs_f64(),
        caught.original_calls,
        caught.shrunk_calls,
        caught.reproducer
    );
    assert!(
        caught.reproduced && caught.reproducer.contains("zero_range("),
        "the reproducer shows the zero_range it blames:\n{}",
        caught.reproducer
    );
}

/// A backend that forwards every call, but whose `punch_hole` first sleeps
/// (`Sleep`) or panics (`Panic`).
#[derive(Debug)]
enum BrokenPunch {
    Sleep(Arc<dyn Backend>),
    Panic(Arc<dyn Backend>),
}

impl BrokenPunch {
    fn inner(&self) -> &Arc<dyn Backend> {
        match self {
            BrokenPunch::Sleep(inner) | BrokenPunch::Panic(inner) => inner,
        }
    }
}

impl Backend for BrokenPunch {
    fn len(&self) -> io::Result<u64> {
        self.inner().len()
    }

    fn max_file_size(&self) -> u64 {
        self.inner().max_file_size()
    }

    fn read_pages(&self, index: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner().read_pages(index, buf)
    }

    fn write_pages(&self, index: u64, buf: &[u8]) -> io::Result<()> {
        self.inner().write_pages(index, buf)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner().set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        match self {
            BrokenPunch::Sleep(_) => std::thread::sleep(std::time::Duration::from_secs(3)),
            BrokenPunch::Panic(_) => panic!("punch_hole broken on purpose"),
        }
        self.inner().punch_hole(offset, len)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner().zero_range(offset, len)
    }

    fn collapse_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner().collapse_range(offset, len)
    }

    fn insert_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner().insert_range(offset, len)
    }

    fn read_direct(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner().read_direct(offset, buf)
    }

    fn write_direct(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.inner().write_direct(offset, buf)
    }

    fn sync(&self) -> io::Result<()> {
        self.inner().sync()
    }

    fn remove(&self) -> io::Result<()> {
        self.inner().remove()
    }
}

/// A call stuck in the backend is reported as a hang within the stall
/// timeout, and a panicking one as a panic: neither stops the run.
#[test]
fn a_stuck_call_is_a_hang_and_a_panicking_one_a_panic() {
    for (kind, wrap) in [
        (
            DivergenceKind::Hang,
            Arc::new(|inner| Arc::new(BrokenPunch::Sleep(inner)) as Arc<dyn Backend>)
                as filemap_torture::differential::BackendWrapper,
        ),
        (
            DivergenceKind::Panic,
            Arc::new(|inner| Arc::new(BrokenPunch::Panic(inner)) as Arc<dyn Backend>),
        ),
    ] {
        let config = DifferentialConfig {
            seconds: 30.0,
            seed: SEED,
            backends: vec![DiffBackend::VolumeMem],
            strategies: vec![Strategy::Range],
            stall_seconds: 1.0,
            shrink_seconds: 5.0,
            watch: Some(Arc::new(move |found, op| {
                found == kind && op == "punch_hole"
            })),
            wrap_backend: Some(wrap),
            ..DifferentialConfig::default()
        };
        let report = run(&config, |_| {}).expect("the differential run starts");
        let found = report
            .divergences
            .iter()
            .find(|d| d.kind == kind && d.op == "punch_hole");
        assert!(
            found.is_some(),
            "no {} in punch_hole:\n{}",
            kind.name(),
            describe(&report)
        );
    }
}
