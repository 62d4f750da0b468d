//! Progress of the long offline tools (`export`, `merge`): an indicatif bar
//! on stderr when stderr is a terminal; otherwise nothing, or, for tools
//! whose caller wants a trace, a line on stderr at every 5% step.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What the numbers count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Chunks,
}

/// Percent between two progress lines when stderr is not a terminal.
const LINE_STEP_PERCENT: u64 = 5;

pub struct Progress {
    bar: Option<ProgressBar>,
    lines: bool,
    label: String,
    unit: Unit,
    total: u64,
    /// The last 5% step a line was printed for.
    last_step: Option<u64>,
}

impl Progress {
    /// A progress display for `total` units of work. `lines`: print periodic
    /// lines when stderr is not a terminal (else stay silent there).
    pub fn new(label: &str, total: u64, unit: Unit, lines: bool) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = match unit {
                Unit::Bytes => "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                Unit::Chunks => "{msg} [{wide_bar}] {pos}/{len} chunks {eta}",
            };
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(label.to_string());
            bar
        });
        Progress {
            bar,
            lines,
            label: label.to_string(),
            unit,
            total,
            last_step: None,
        }
    }

    /// `done` units of `total` are done.
    pub fn set(&mut self, done: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        if !self.lines {
            return;
        }
        let percent = (done.min(self.total) * 100)
            .checked_div(self.total)
            .unwrap_or(100);
        let step = percent / LINE_STEP_PERCENT;
        if self.last_step == Some(step) {
            return;
        }
        self.last_step = Some(step);
        let unit = match self.unit {
            Unit::Bytes => "bytes",
            Unit::Chunks => "chunks",
        };
        eprintln!("{}: {done}/{} {unit} ({percent}%)", self.label, self.total);
    }

    pub fn finish(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
