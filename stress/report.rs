//! Reports: the percentile table, outcome counts, `.hgrm` files, the JSON
//! summary and the SVG chart.

use crate::invariants::Verdict;
use crate::record::Record;
use hdrhistogram::Histogram;
use pidring::Stage;
use pidring::metrics::Percentiles;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Percentiles of one named distribution (an engine stage, or one the
/// harness derives, such as kill lateness under spike).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StageRow {
    /// snake_case stage name.
    pub stage: String,
    /// The distribution (flattened into the row's JSON object).
    #[serde(flatten)]
    pub latency: Percentiles,
}

impl StageRow {
    /// Percentiles of a histogram.
    pub fn from_histogram(stage: &str, h: &Histogram<u64>) -> StageRow {
        StageRow {
            stage: stage.to_string(),
            latency: Percentiles::of(h),
        }
    }
}

/// One window of the run (one second, or a few for long runs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Second {
    /// Seconds since the start (window start).
    pub t: u64,
    /// Window length, seconds.
    #[serde(default = "one")]
    pub secs: u64,
    /// Checks submitted in this window.
    pub submitted: u64,
    /// Results received in this window.
    pub completed: u64,
    /// Timed-out results received in this window.
    pub timeouts: u64,
    /// p99 per stage (µs) of results received in this window.
    pub p99_us: BTreeMap<String, u64>,
}

fn one() -> u64 {
    1
}

/// The 1-minute load average now (0 if unreadable).
pub fn load_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0.0)
}

/// What the canaries saw.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CanaryReport {
    /// Canary processes that ran to the end of their life or were killed.
    pub canaries: u64,
    /// Signals the canaries' handlers counted.
    pub signals: u64,
    /// Canaries killed by an uncatchable signal (SIGKILL) — also hits.
    pub killed: u64,
    /// Canaries that got a PID some check of this run had before (recycling happened).
    pub on_recycled_check_pid: u64,
    /// `pid_max` in the namespace, and how it was set.
    pub pid_space: String,
}

impl CanaryReport {
    /// Total hits (must be 0).
    pub fn hits(&self) -> u64 {
        self.signals + self.killed
    }
}

/// Where the figures came from.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Host {
    /// Hostname.
    pub hostname: String,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
}

impl Host {
    /// Read this machine's description.
    pub fn detect() -> Host {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        Host {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu,
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }

    /// One line.
    pub fn line(&self) -> String {
        format!(
            "{} — {} CPU(s) {}, Linux {}",
            self.hostname, self.cpus, self.cpu, self.kernel
        )
    }
}

/// The whole run, as written to `summary.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// `pidring` (in-process), `pidring-daemon` or `tokio`.
    pub executor: String,
    /// Backend in use.
    pub backend: String,
    /// Profile name.
    pub profile: String,
    /// The command line.
    pub command: String,
    /// The machine.
    pub host: Host,
    /// Seconds from first submission to last result.
    pub elapsed_s: f64,
    /// Submissions attempted.
    pub submitted: u64,
    /// Refused (queue full).
    pub rejected: u64,
    /// Results received.
    pub results: u64,
    /// Largest number of submissions in one second.
    pub peak_rate_per_s: u64,
    /// Percentiles per stage.
    pub stages: Vec<StageRow>,
    /// Kill lateness of checks whose deadline fell in a spike (or just after).
    pub kill_lateness_under_spike: Option<StageRow>,
    /// Results per ending.
    pub outcomes: BTreeMap<String, u64>,
    /// Results per behaviour and ending.
    pub behaviours: BTreeMap<String, BTreeMap<String, u64>>,
    /// The canary test, if run.
    pub canary: Option<CanaryReport>,
    /// The engine's counters, if in-process.
    pub engine_counters: Option<serde_json::Value>,
    /// Invariant verdicts.
    pub invariants: Vec<Verdict>,
    /// Mean of the 1-minute load average sampled each second of the run.
    #[serde(default)]
    pub load_1m_mean: f64,
    /// Largest 1-minute load average seen during the run.
    #[serde(default)]
    pub load_1m_max: f64,
    /// Timeline in windows of one second (a few for long runs).
    pub timeline: Vec<Second>,
    /// Spike windows (start, end) in seconds, for the chart.
    #[serde(default)]
    pub spike_windows: Vec<(f64, f64)>,
    /// Whether every invariant holds.
    pub ok: bool,
}

/// A fresh microsecond histogram (1 µs .. 1 h, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// One histogram per stage from the records.
pub fn stage_histograms(records: &[Record]) -> Vec<(Stage, Histogram<u64>)> {
    Stage::ALL
        .iter()
        .map(|s| {
            let mut h = histogram();
            for r in records {
                if let Some(v) = r.stage(*s) {
                    let _ = h.record(v.clamp(1, 3_600_000_000));
                }
            }
            (*s, h)
        })
        .collect()
}

/// The per-stage percentile table, for people.
pub fn render_table(rows: &[StageRow]) -> String {
    pidring::metrics::render_percentile_table(rows.iter().map(|r| (r.stage.as_str(), &r.latency)))
}

/// HdrHistogram's percentile-distribution text (`.hgrm`), values in ms,
/// as `outputPercentileDistribution(out, 5, 1000.0)` prints it.
pub fn hgrm(h: &Histogram<u64>) -> String {
    const SCALE: f64 = 1000.0;
    let mut out = format!(
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if !h.is_empty() {
        let mut total = 0u64;
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let value = h.highest_equivalent(v.value_iterated_to()) as f64 / SCALE;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{value:12.3} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let sub_buckets = 2u64.pow((2.0 * 10f64.powi(3)).log2().ceil() as u32);
    let _ = writeln!(
        out,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / SCALE,
        h.stdev() / SCALE
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / SCALE,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    out
}

/// Timeline in windows of `window` seconds from records and per-second submission counts.
pub fn timeline(records: &[Record], submitted_per_s: &[u64], window: u64) -> Vec<Second> {
    let window = window.max(1);
    let last = records
        .iter()
        .map(|r| r.received_us / 1_000_000)
        .max()
        .unwrap_or(0)
        .max(submitted_per_s.len().saturating_sub(1) as u64);
    let n = (last / window) as usize + 1;
    let mut buckets: Vec<Vec<&Record>> = vec![Vec::new(); n];
    for r in records {
        buckets[(r.received_us / 1_000_000 / window) as usize].push(r);
    }
    buckets
        .iter()
        .enumerate()
        .map(|(i, rs)| {
            let mut p99 = BTreeMap::new();
            for s in Stage::ALL {
                let mut v: Vec<u64> = rs.iter().filter_map(|r| r.stage(s)).collect();
                if !v.is_empty() {
                    v.sort_unstable();
                    let idx = ((v.len() as f64 * 0.99).ceil() as usize).clamp(1, v.len()) - 1;
                    p99.insert(s.as_str().to_string(), v[idx]);
                }
            }
            let from = i * window as usize;
            let to = (from + window as usize).min(submitted_per_s.len());
            Second {
                t: from as u64,
                secs: window,
                submitted: submitted_per_s
                    .get(from..to)
                    .map(|x| x.iter().sum())
                    .unwrap_or(0),
                completed: rs.len() as u64,
                timeouts: rs.iter().filter(|r| r.ending.timed_out()).count() as u64,
                p99_us: p99,
            }
        })
        .collect()
}

/// Write `.hgrm` files, `summary.json` and `latency.svg` into `dir`.
pub fn write_out(
    dir: &Path,
    summary: &Summary,
    hists: &[(Stage, Histogram<u64>)],
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (stage, h) in hists {
        let path = dir.join(format!("{}.hgrm", stage.as_str()));
        std::fs::write(&path, hgrm(h))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let path = dir.join("summary.json");
    let json = serde_json::to_string_pretty(summary).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let path = dir.join("latency.svg");
    svg(&path, summary).map_err(|e| format!("cannot draw {}: {e}", path.display()))?;
    Ok(())
}

/// The chart: submission/completion rate on top, p99 per stage per second below.
pub fn svg(path: &Path, s: &Summary) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(260);
    let tmax = s
        .timeline
        .last()
        .map(|x| (x.t + x.secs) as f64)
        .unwrap_or(2.0)
        .max(2.0);
    let per_s = |x: &Second, n: u64| n as f64 / x.secs.max(1) as f64;
    let mid = |x: &Second| x.t as f64 + x.secs as f64 / 2.0;
    let rate_max = s
        .timeline
        .iter()
        .map(|x| per_s(x, x.submitted.max(x.completed)))
        .fold(1.0, f64::max)
        * 1.15;
    let title = format!(
        "pidring-stress: {} profile, {} ({}) — {} checks, {}, load avg {:.0} (max {:.0})",
        s.profile,
        s.executor,
        s.backend,
        s.results,
        s.host.line(),
        s.load_1m_mean,
        s.load_1m_max
    );
    let mut c = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..tmax, 0f64..rate_max)?;
    c.configure_mesh()
        .y_desc("checks / s")
        .light_line_style(WHITE)
        .draw()?;
    let shade = RGBColor(255, 200, 200).mix(0.35).filled();
    c.draw_series(
        s.spike_windows
            .iter()
            .map(|(a, b)| Rectangle::new([(*a, 0.0), (*b, rate_max)], shade)),
    )?;
    type Column = fn(&Second) -> u64;
    let series: [(&str, RGBColor, Column); 3] = [
        ("submitted/s", BLUE, |x| x.submitted),
        ("completed/s", GREEN, |x| x.completed),
        ("timed out/s", RED, |x| x.timeouts),
    ];
    for (name, color, f) in series {
        c.draw_series(LineSeries::new(
            s.timeline.iter().map(|x| (mid(x), per_s(x, f(x)))),
            color.stroke_width(2),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;

    let all: Vec<u64> = s
        .timeline
        .iter()
        .flat_map(|x| x.p99_us.values().copied())
        .collect();
    let ymax = (all.iter().copied().max().unwrap_or(1000) as f64 / 1000.0 * 2.0).max(1.0);
    let mut c = ChartBuilder::on(&bottom)
        .caption(
            match s.timeline.first().map(|x| x.secs).unwrap_or(1) {
                1 => "p99 per stage, per second (ms, log scale)".to_string(),
                n => format!("p99 per stage, per {n} s window (ms, log scale)"),
            },
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..tmax, (0.001f64..ymax).log_scale())?;
    c.configure_mesh()
        .x_desc("seconds since start (shaded: spikes)")
        .y_desc("ms")
        .draw()?;
    c.draw_series(
        s.spike_windows
            .iter()
            .map(|(a, b)| Rectangle::new([(*a, 0.001), (*b, ymax)], shade)),
    )?;
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(127, 127, 127),
    ];
    for (i, stage) in Stage::ALL.iter().enumerate() {
        let name = stage.as_str();
        let color = colors[i % colors.len()];
        let pts: Vec<(f64, f64)> = s
            .timeline
            .iter()
            .filter_map(|x| {
                x.p99_us
                    .get(name)
                    .map(|v| (mid(x), (*v as f64 / 1000.0).max(0.001)))
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        c.draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_has_the_standard_shape() {
        let mut h = histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap(); // 1..1000 ms
        }
        let text = hgrm(&h);
        let mut lines = text.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next(), Some(""));
        let rows: Vec<Vec<f64>> = text
            .lines()
            .skip(2)
            .take_while(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect())
            .collect();
        assert!(rows.len() > 20);
        // Values and counts never go down; the last row reaches 100% and all values.
        for w in rows.windows(2) {
            assert!(w[1][0] >= w[0][0] && w[1][1] >= w[0][1] && w[1][2] >= w[0][2]);
        }
        let last = rows.last().unwrap();
        assert_eq!(last.len(), 3);
        assert_eq!(last[1], 1.0);
        assert_eq!(last[2], 1000.0);
        assert!((last[0] - 1000.0).abs() < 1.0, "{last:?}");
        assert!(text.contains("#[Max     ="));
        assert!(text.contains("Total count    =         1000]"));
    }

    #[test]
    fn timeline_buckets_by_second() {
        use crate::record::Ending;
        let rec = |t_us: u64, total: u64, ending| {
            let mut stages_us = [None; Stage::ALL.len()];
            stages_us[Stage::Total.index()] = Some(total);
            Record {
                seq: 0,
                ending,
                pid: None,
                stages_us,
                received_us: t_us,
                output_cut: false,
                truncated: false,
            }
        };
        let recs = vec![
            rec(100, 10, Ending::Exited(0)),
            rec(900_000, 20, Ending::TimedOutTerm),
            rec(2_500_000, 30, Ending::Exited(0)),
        ];
        let tl = timeline(&recs, &[5, 0, 1], 1);
        assert_eq!(tl.len(), 3);
        assert_eq!(
            (tl[0].submitted, tl[0].completed, tl[0].timeouts),
            (5, 2, 1)
        );
        assert_eq!(tl[0].p99_us["total"], 20);
        assert_eq!(tl[1].completed, 0);
        assert_eq!(tl[2].p99_us["total"], 30);
        let tl = timeline(&recs, &[5, 0, 1], 2);
        assert_eq!(tl.len(), 2);
        assert_eq!((tl[0].secs, tl[0].submitted, tl[0].completed), (2, 5, 2));
        assert_eq!((tl[1].t, tl[1].submitted, tl[1].completed), (2, 1, 1));
    }
}
