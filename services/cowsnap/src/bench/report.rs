//! The benchmarks' report: each figure with its baseline, ratio and target
//! (and, where there is one, a ceiling and the spread of its rounds), printed
//! as a table or as one JSON object. A missed target is reported as a miss,
//! never hidden; the exit code does not depend on it (speed is measured, not
//! asserted). [`Report`] is `bench store`'s; `bench nbd` builds its own from
//! the same [`Figure`]s and [`render_table`].

use serde::Serialize;
use serde::ser::SerializeMap;

/// Which way a target points.
#[derive(Clone, Copy, Debug, Serialize)]
pub enum Cmp {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
}

/// What a target is about: the ratio to the baseline, or the value itself.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum On {
    Ratio,
    Value,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Goal {
    pub on: On,
    pub cmp: Cmp,
    pub threshold: f64,
}

impl Goal {
    pub fn ratio_at_least(t: f64) -> Option<Goal> {
        Some(Goal {
            on: On::Ratio,
            cmp: Cmp::AtLeast,
            threshold: t,
        })
    }

    pub fn ratio_at_most(t: f64) -> Option<Goal> {
        Some(Goal {
            on: On::Ratio,
            cmp: Cmp::AtMost,
            threshold: t,
        })
    }

    pub fn value_at_least(t: f64) -> Option<Goal> {
        Some(Goal {
            on: On::Value,
            cmp: Cmp::AtLeast,
            threshold: t,
        })
    }

    pub fn value_at_most(t: f64) -> Option<Goal> {
        Some(Goal {
            on: On::Value,
            cmp: Cmp::AtMost,
            threshold: t,
        })
    }

    fn met(&self, value: f64, ratio: f64) -> bool {
        let x = match self.on {
            On::Ratio => ratio,
            On::Value => value,
        };
        match self.cmp {
            Cmp::AtLeast => x >= self.threshold,
            Cmp::AtMost => x <= self.threshold,
        }
    }

    fn describe(&self, unit: &str) -> String {
        let op = match self.cmp {
            Cmp::AtLeast => "≥",
            Cmp::AtMost => "≤",
        };
        match self.on {
            On::Ratio => format!("ratio {op} {}", self.threshold),
            On::Value => format!("{op} {} {unit}", self.threshold),
        }
    }
}

/// One measured figure against its baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub label: String,
    pub value: f64,
    pub unit: &'static str,
    pub baseline: f64,
    /// What the baseline is (raw device figure, bound, ...).
    pub baseline_label: String,
    /// `value / baseline`.
    pub ratio: f64,
    /// `None`: reported for information, no target.
    pub target: Option<Goal>,
    pub target_text: Option<String>,
    /// `None` when there is no target.
    pub pass: Option<bool>,
    /// `pass`, `miss` or `info`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// A second reference the value is compared with (the raw device when
    /// the baseline is another implementation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling_label: Option<String>,
    /// `value / ceiling`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling_ratio: Option<f64>,
    /// Every side's rounds when the figure is the best of several.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<Rounds>,
}

/// The rounds of one side of a figure: each value, the best and the spread.
#[derive(Clone, Debug, Serialize)]
pub struct Rounds {
    pub side: &'static str,
    /// The highest value (every figure with rounds is higher-is-better).
    pub best: f64,
    pub min: f64,
    /// `(best - min) / best`.
    pub spread: f64,
    pub values: Vec<f64>,
}

impl Rounds {
    pub fn new(side: &'static str, values: Vec<f64>) -> Rounds {
        let best = values.iter().copied().fold(0.0, f64::max);
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let min = if min.is_finite() { min } else { 0.0 };
        Rounds {
            side,
            best,
            min,
            spread: if best > 0.0 { (best - min) / best } else { 0.0 },
            values,
        }
    }
}

impl Figure {
    pub fn new(
        label: &str,
        value: f64,
        unit: &'static str,
        baseline: f64,
        baseline_label: &str,
        target: Option<Goal>,
    ) -> Figure {
        let ratio = value / baseline;
        let pass = target.map(|t| t.met(value, ratio));
        Figure {
            label: label.to_string(),
            value,
            unit,
            baseline,
            baseline_label: baseline_label.to_string(),
            ratio,
            target_text: target.map(|t| t.describe(unit)),
            target,
            pass,
            result: match pass {
                Some(true) => "pass",
                Some(false) => "miss",
                None => "info",
            },
            note: None,
            ceiling: None,
            ceiling_label: None,
            ceiling_ratio: None,
            rounds: Vec::new(),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Figure {
        self.note = Some(note.into());
        self
    }

    /// Adds a second reference (`value / ceiling` is reported, no target).
    pub fn ceiling(mut self, ceiling: f64, label: &str) -> Figure {
        self.ceiling = Some(ceiling);
        self.ceiling_label = Some(label.to_string());
        self.ceiling_ratio = Some(self.value / ceiling);
        self
    }

    pub fn rounds(mut self, rounds: Vec<Rounds>) -> Figure {
        self.rounds = rounds;
        self
    }
}

/// Figures in the order they were measured, serialised as a JSON object
/// keyed by figure id.
#[derive(Default, Debug)]
pub struct Figures(pub Vec<(&'static str, Figure)>);

impl Serialize for Figures {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl Figures {
    pub fn push(&mut self, id: &'static str, f: Figure) {
        self.0.push((id, f));
    }

    /// (targets met, targets missed).
    pub fn tally(&self) -> (usize, usize) {
        let count = |p: bool| self.0.iter().filter(|(_, f)| f.pass == Some(p)).count();
        (count(true), count(false))
    }

    /// The figures as a table (label, value, baseline, ratio, target,
    /// result, under the six headings `head`), then their notes after a
    /// blank line, if any.
    pub fn table(&self, head: &[&str; 6]) -> String {
        let rows: Vec<Vec<String>> = self
            .0
            .iter()
            .map(|(_, f)| {
                vec![
                    f.label.clone(),
                    format!("{} {}", num(f.value), f.unit),
                    format!("{} ({})", num(f.baseline), f.baseline_label),
                    format!("{:.2}", f.ratio),
                    f.target_text.clone().unwrap_or_else(|| "-".into()),
                    f.result.to_string(),
                ]
            })
            .collect();
        let mut o = render_table(head, &rows, &[1, 3]);
        let notes = self.notes();
        if !notes.is_empty() {
            o.push('\n');
            o.push_str(&notes);
        }
        o
    }

    /// `note (label): text` lines, one per figure that has a note.
    pub fn notes(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        for (_, f) in &self.0 {
            if let Some(n) = &f.note {
                let _ = writeln!(o, "note ({}): {n}", f.label);
            }
        }
        o
    }
}

/// Lays out a table: columns as wide as their widest cell, two spaces
/// apart; the columns in `right` are right-aligned.
pub fn render_table(head: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    let mut w = vec![0usize; head.len()];
    for r in std::iter::once(&head).chain(rows) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let mut o = String::new();
    for r in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            let pad = " ".repeat(w[i] - c.chars().count());
            if right.contains(&i) {
                line.push_str(&pad);
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&pad);
            }
            line.push_str("  ");
        }
        o.push_str(line.trim_end());
        o.push('\n');
    }
    o
}

/// The raw device figures every ratio is taken against.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// Sequential O_DIRECT read, chunk-sized I/O, `depth` in flight (MB/s).
    pub read_mb_s: f64,
    /// Sequential O_DIRECT overwrite of allocated blocks, chunk-sized I/O (MB/s).
    pub write_mb_s: f64,
    /// 4 KiB random O_DIRECT overwrites, `depth` in flight (IOPS).
    pub random_write_4k_iops: f64,
    /// First write of the scratch files (allocating), 1 MiB I/O, 8 in flight (MB/s).
    pub prewrite_mb_s: f64,
    /// `1/(1/R + 2/W)`: the best a first write with one snapshot can do (MB/s).
    pub first_write_bound_mb_s: f64,
    /// `1/(1/R + 9/W)`: the same with eight snapshots (MB/s).
    pub first_write_bound_8_mb_s: f64,
    /// Mean `fdatasync` latency after one chunk-sized write, one at a time (ms).
    pub flush_ms: f64,
    /// Mean latency of one chunk-sized `RWF_DSYNC` write, one at a time (ms).
    pub dsync_write_ms: f64,
    /// Mean latency of a commit's device request: a flush and a
    /// chunk-sized `RWF_DSYNC` write as one request, after a plain write,
    /// one at a time (ms).
    pub commit_ms: f64,
}

/// Everything one run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub backend: &'static str,
    pub chunk_sectors: u32,
    pub chunk_bytes: u64,
    pub depth: usize,
    pub quick: bool,
    pub dir: String,
    /// What was done to make the baseline and the engine comparable.
    pub preparation: String,
    /// Bytes of the origin region written and read by the bandwidth figures.
    pub region_bytes: u64,
    /// Bytes of the origin region of the eight-snapshot figure.
    pub region_8_bytes: u64,
    pub random_write_ops: u64,
    pub load_exceptions: u64,
    pub baseline: Baseline,
    pub figures: Figures,
    pub commits: serde_json::Value,
    pub targets_met: usize,
    pub targets_missed: usize,
    pub elapsed_secs: f64,
}

impl Report {
    pub fn tally(&mut self) {
        (self.targets_met, self.targets_missed) = self.figures.tally();
    }

    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let b = &self.baseline;
        let _ = writeln!(
            o,
            "cowsnap bench store: I/O backend {}, chunk {} sectors ({} KiB), {} I/Os in flight{}",
            self.backend,
            self.chunk_sectors,
            self.chunk_bytes / 1024,
            self.depth,
            if self.quick { ", quick mode" } else { "" }
        );
        let _ = writeln!(o, "scratch directory: {}", self.dir);
        let _ = writeln!(o, "preparation: {}", self.preparation);
        let _ = writeln!(
            o,
            "raw device (same files, same backend, same I/O sizes and depth): R {:.0} MB/s, W {:.0} MB/s ({} KiB sequential), \
             4 KiB random write {:.0} IOPS; allocating first write {:.0} MB/s",
            b.read_mb_s,
            b.write_mb_s,
            self.chunk_bytes / 1024,
            b.random_write_4k_iops,
            b.prewrite_mb_s
        );
        let _ = writeln!(
            o,
            "durability, one at a time: flush {:.2} ms, {} KiB DSYNC write {:.2} ms; commit (both as one request) {:.2} ms",
            b.flush_ms,
            self.chunk_bytes / 1024,
            b.dsync_write_ms,
            b.commit_ms
        );
        let _ = writeln!(
            o,
            "bounds: first write 1/(1/R+2/W) = {:.0} MB/s with 1 snapshot, 1/(1/R+9/W) = {:.0} MB/s with 8",
            b.first_write_bound_mb_s, b.first_write_bound_8_mb_s
        );
        let _ = writeln!(o);
        o.push_str(
            &self
                .figures
                .table(&["figure", "value", "baseline", "ratio", "target", "result"]),
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "targets: {} met, {} missed; {:.1} s",
            self.targets_met, self.targets_missed, self.elapsed_secs
        );
        o
    }
}

/// A number with as many digits as it deserves.
pub fn num(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}
