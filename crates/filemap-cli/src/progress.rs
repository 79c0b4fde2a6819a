//! What a long run shows on stderr while it works: a progress bar when stderr
//! is a terminal; when it is not (a CI log, a file), a one-line status every
//! few seconds and one at the end, so that a piped run is never silent.
//! stdout is left to the results.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a status line is printed when stderr is not a terminal.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(3);

/// How far a run has come: seconds of a timed run, or steps of a fixed list.
#[derive(Clone, Copy)]
pub enum Length {
    Seconds(f64),
    Steps(u64),
}

/// A run's progress on stderr: see the module's documentation.
pub struct Progress {
    /// The command, first on every status line (`filemap torture`).
    command: &'static str,
    /// What runs (`volume/range`), after the command.
    label: String,
    length: Length,
    display: Display,
}

enum Display {
    Bar(ProgressBar),
    Lines { started: Instant, last: Instant },
}

impl Progress {
    /// A bar if stderr is a terminal, status lines otherwise.
    pub fn new(command: &'static str, label: impl Into<String>, length: Length) -> Progress {
        let label = label.into();
        let display = if std::io::stderr().is_terminal() {
            let bar = bar(length);
            bar.set_prefix(label.clone());
            Display::Bar(bar)
        } else {
            let now = Instant::now();
            Display::Lines {
                started: now,
                last: now,
            }
        };
        Progress {
            command,
            label,
            length,
            display,
        }
    }

    /// Moves to `position` (seconds or steps, as the length), saying what
    /// happens now.
    pub fn update(&mut self, position: f64, message: &str) {
        match &mut self.display {
            Display::Bar(bar) => {
                let position = match self.length {
                    Length::Seconds(seconds) => (position.min(seconds) * 1000.0) as u64,
                    Length::Steps(_) => position as u64,
                };
                bar.set_position(position);
                bar.set_message(message.to_owned());
            }
            Display::Lines { started, last } => {
                if last.elapsed() < STATUS_INTERVAL {
                    return;
                }
                *last = Instant::now();
                let done = match self.length {
                    Length::Seconds(seconds) => format!("{position:.1} of {seconds} s"),
                    Length::Steps(steps) => format!(
                        "step {} of {steps}, {:.0} s",
                        position as u64 + 1,
                        started.elapsed().as_secs_f64()
                    ),
                };
                self.line(&format!("{done}, {message}"));
            }
        }
    }

    /// Ends the display: clears the bar, or prints `summary` as the last
    /// status line.
    pub fn finish(self, summary: &str) {
        match &self.display {
            Display::Bar(bar) => bar.finish_and_clear(),
            Display::Lines { .. } => self.line(summary),
        }
    }

    /// Ends the display with nothing more to say (the run failed: its error
    /// follows).
    pub fn abandon(self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
        }
    }

    /// Ends the display for a run that failed with `error`: prints
    /// `command: error` and gives the exit code `code` to return.
    pub fn failed(self, error: &dyn std::fmt::Display, code: u8) -> std::process::ExitCode {
        let command = self.command;
        self.abandon();
        eprintln!("{command}: {error}");
        std::process::ExitCode::from(code)
    }

    fn line(&self, text: &str) {
        if self.label.is_empty() {
            eprintln!("{}: {text}", self.command);
        } else {
            eprintln!("{}: {}: {text}", self.command, self.label);
        }
    }
}

/// A bar on stderr over `length`: a timed run's bar shows its label in front,
/// a list of steps the step count.
fn bar(length: Length) -> ProgressBar {
    let (len, template) = match length {
        Length::Seconds(seconds) => (
            (seconds * 1000.0) as u64,
            "{prefix:>25} [{bar:30}] {elapsed:>4} {msg}",
        ),
        Length::Steps(steps) => (steps, "[{bar:30}] {pos}/{len} {elapsed:>4} {msg}"),
    };
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
