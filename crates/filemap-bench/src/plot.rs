//! An SVG chart of a report: one panel per workload, one bar per strategy (and
//! baseline) of the figure the workload's targets are set on.

use std::io;
use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, SegmentValue, ValueFormatter};
use plotters::prelude::*;

use crate::{Report, Row};

/// What a panel shows of a workload: the operation, how to pick the thread
/// setting, the figure and its axis label.
struct Panel {
    workload: &'static str,
    op: &'static str,
    /// Take the rows of the largest thread setting (else the smallest).
    largest_threads: bool,
    figure: fn(&Row) -> f64,
    axis: &'static str,
    /// What the thread setting counts, for the caption.
    threads: &'static str,
}

/// The panels, in the order drawn; a workload not in the report is skipped.
const PANELS: [Panel; 7] = [
    Panel {
        workload: "hit",
        op: "read",
        largest_threads: true,
        figure: |r| r.ops_per_s,
        axis: "4 KiB hits/s (all threads)",
        threads: "threads",
    },
    Panel {
        workload: "mixed-disjoint",
        op: "read",
        largest_threads: false,
        figure: |r| r.ops_per_s,
        axis: "reads/s, punches elsewhere",
        threads: "readers",
    },
    Panel {
        workload: "mixed-overlap",
        op: "read",
        largest_threads: false,
        figure: |r| r.ops_per_s,
        axis: "reads/s, punches on them",
        threads: "readers",
    },
    Panel {
        workload: "direct",
        op: "all",
        largest_threads: false,
        figure: |r| r.ops_per_s,
        axis: "ops/s, reads + direct writes",
        threads: "readers",
    },
    Panel {
        workload: "starve",
        op: "punch",
        largest_threads: true,
        figure: |r| r.p99_us,
        axis: "punch p99 under storm, us (lower is better)",
        threads: "storm threads",
    },
    Panel {
        workload: "fault",
        op: "uncached-fault",
        largest_threads: false,
        figure: |r| r.ops_per_s,
        axis: "uncached pages faulted in/s",
        threads: "thread",
    },
    Panel {
        workload: "open",
        op: "open-read-close",
        largest_threads: false,
        figure: |r| r.ops_per_s,
        axis: "small files opened, read, closed/s",
        threads: "thread",
    },
];

/// Writes an SVG chart of `report` to `path`: one panel per workload measured,
/// bars per strategy, on a log scale when the bars span more than a decade.
/// Incoherent strategies are drawn grey and marked `*`.
pub fn write_svg(report: &Report, path: &Path) -> io::Result<()> {
    let panels: Vec<(&Panel, Vec<&Row>)> = PANELS
        .iter()
        .filter_map(|panel| {
            let rows = panel_rows(report, panel);
            (!rows.is_empty()).then_some((panel, rows))
        })
        .collect();
    if panels.is_empty() {
        return Err(io::Error::other("nothing to plot: the report has no rows"));
    }
    let columns = panels.len().min(2);
    let lines = panels.len().div_ceil(columns);
    let size = (640 * columns as u32, 340 * lines as u32);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let areas = root.split_evenly((lines, columns));
    for ((panel, rows), area) in panels.iter().zip(areas.iter()) {
        draw_panel(area, panel, rows)?;
    }
    root.present().map_err(plot_error)?;
    Ok(())
}

/// The rows a panel draws: its workload's rows of its operation at one thread
/// setting, and of every baseline measured for that operation.
fn panel_rows<'a>(report: &'a Report, panel: &Panel) -> Vec<&'a Row> {
    let candidates: Vec<&Row> = report
        .rows
        .iter()
        .filter(|r| r.workload == panel.workload && r.op == panel.op)
        .filter(|r| (panel.figure)(r).is_finite() && (panel.figure)(r) > 0.0)
        .collect();
    let threads = if panel.largest_threads {
        candidates.iter().map(|r| r.threads).max()
    } else {
        candidates.iter().map(|r| r.threads).min()
    };
    candidates
        .into_iter()
        .filter(|r| Some(r.threads) == threads)
        .collect()
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    panel: &Panel,
    rows: &[&Row],
) -> io::Result<()> {
    let values: Vec<f64> = rows.iter().map(|r| (panel.figure)(r)).collect();
    let max = values.iter().copied().fold(f64::MIN, f64::max);
    let min = values.iter().copied().fold(f64::MAX, f64::min);
    let threads = rows[0].threads;
    let caption = format!("{} ({threads} {})", panel.workload, panel.threads);
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70);
    if max / min > 10.0 {
        // Bars span decades: a log axis keeps the small ones visible.
        let low = min / 2.0;
        let y = (low..max * 2.0).log_scale();
        let y_desc = format!("{} (log)", panel.axis);
        draw_bars(&mut builder, y, y_desc, low, rows, &values)
    } else {
        let y = 0.0..max * 1.15;
        draw_bars(&mut builder, y, panel.axis, 0.0, rows, &values)
    }
}

/// Draws the mesh and a bar per row, from `low` up to its value, on the y axis
/// `y`: a linear range or a log scale, which plotters gives different types.
fn draw_bars<DB, Y>(
    builder: &mut ChartBuilder<'_, '_, DB>,
    y: Y,
    y_desc: impl Into<String>,
    low: f64,
    rows: &[&Row],
    values: &[f64],
) -> io::Result<()>
where
    DB: DrawingBackend,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let names: Vec<String> = rows
        .iter()
        .map(|r| {
            if r.coherent {
                r.strategy.clone()
            } else {
                format!("{}*", r.strategy)
            }
        })
        .collect();
    let label = |x: &SegmentValue<usize>| match x {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            names.get(*i).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    let bar = |i: usize, r: &Row, value: f64| {
        let color = if r.coherent {
            Palette99::pick(i).filled()
        } else {
            RGBColor(170, 170, 170).filled()
        };
        let mut rectangle = Rectangle::new(
            [
                (SegmentValue::Exact(i), low),
                (SegmentValue::Exact(i + 1), value),
            ],
            color,
        );
        // Gaps between the bars.
        rectangle.set_margin(0, 0, 4, 4);
        rectangle
    };
    // A segmented range over `0..=n - 1`: one segment per bar.
    let x = (0..rows.len() - 1).into_segmented();
    let mut chart = builder.build_cartesian_2d(x, y).map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 11))
        .y_desc(y_desc)
        .y_label_formatter(&|v| short(*v))
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(
            rows.iter()
                .zip(values)
                .enumerate()
                .map(|(i, (r, &v))| bar(i, r, v)),
        )
        .map_err(plot_error)?;
    Ok(())
}

/// `1.2M`, `350k`, `12`: axis labels that fit.
fn short(value: f64) -> String {
    match value.abs() {
        v if v >= 1e6 => format!("{:.1}M", value / 1e6),
        v if v >= 1e3 => format!("{:.0}k", value / 1e3),
        v if v >= 10.0 => format!("{value:.0}"),
        _ => format!("{value:.2}"),
    }
}

fn plot_error<E: std::fmt::Display>(error: E) -> io::Error {
    io::Error::other(format!("plotting failed: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{timed_row, Histogram, Measured, RowKey};

    #[test]
    fn a_report_plots_as_well_formed_svg() {
        let mut report = Report::default();
        let mut single = Histogram::new();
        single.record(5000);
        report.rows.push(timed_row(
            RowKey {
                workload: "fault",
                strategy: "two-state",
                op: "uncached-fault",
                threads: 1,
            },
            &[Measured::new(7.0, single, 1)],
        ));
        for (workload, op, threads) in [("hit", "read", 2), ("starve", "punch", 4)] {
            for (strategy, rate) in [
                ("none", 100.0),
                ("invalidate-lock", 5.0),
                ("kernel", 2000.0),
            ] {
                let mut latency = Histogram::new();
                latency.record(1000 * rate as u64);
                report.rows.push(timed_row(
                    RowKey {
                        workload,
                        strategy,
                        op,
                        threads,
                    },
                    &[Measured::new(rate, latency, threads)],
                ));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        write_svg(&report, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("invalidate-lock") && svg.contains("none*"));
        assert!(write_svg(&Report::default(), &path).is_err());
    }
}
