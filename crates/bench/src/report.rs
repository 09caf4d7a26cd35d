//! Results: one [`Record`] per measured run, summaries across rounds, the
//! table, JSON lines and the progress line.

use std::{
    io::{IsTerminal, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// Latency histogram in microseconds (1 us .. 100 s, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

/// Records `d` into `h`, clamped to the histogram's range.
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, 100_000_000);
    h.saturating_record(us);
}

/// One measured run of one path.
#[derive(Clone, Debug)]
pub struct Record {
    /// `echo`, `upload`, `download`, `copy`.
    pub workload: String,
    /// Parameters, e.g. `1KiB c=32` or `64KiB msgs`.
    pub case: String,
    /// `plain`, `forward`, `reverse`, `raw-tcp`, `raw-yamux`, ...
    pub path: String,
    /// Round number (from 1).
    pub round: usize,
    /// Completed operations (calls, or messages for streaming).
    pub ops: u64,
    /// Payload bytes moved (one direction).
    pub bytes: u64,
    /// Wall time of the measurement.
    pub secs: f64,
    /// CPU seconds of this process during the measurement (client and
    /// server: everything runs in-process).
    pub cpu: f64,
    /// Latency percentiles in microseconds.
    pub p50_us: u64,
    /// 99th percentile, us.
    pub p99_us: u64,
    /// Maximum, us.
    pub max_us: u64,
    /// Peak RSS of the process so far, KiB.
    pub peak_rss_kib: u64,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

impl Record {
    /// A record of a successful run.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        workload: &str,
        case: &str,
        path: &str,
        round: usize,
        ops: u64,
        bytes: u64,
        secs: f64,
        cpu: f64,
        hist: &Histogram<u64>,
    ) -> Self {
        Record {
            workload: workload.into(),
            case: case.into(),
            path: path.into(),
            round,
            ops,
            bytes,
            secs,
            cpu,
            p50_us: hist.value_at_quantile(0.5),
            p99_us: hist.value_at_quantile(0.99),
            max_us: hist.max(),
            peak_rss_kib: super::sys::peak_rss_kib(),
            error: None,
        }
    }

    /// A record of a failed run.
    pub fn failed(workload: &str, case: &str, path: &str, round: usize, err: String) -> Self {
        Record {
            workload: workload.into(),
            case: case.into(),
            path: path.into(),
            round,
            ops: 0,
            bytes: 0,
            secs: 0.0,
            cpu: 0.0,
            p50_us: 0,
            p99_us: 0,
            max_us: 0,
            peak_rss_kib: super::sys::peak_rss_kib(),
            error: Some(err),
        }
    }

    /// Operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Megabytes (10^6) per second.
    pub fn mb_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
}

/// The median over rounds of one (workload, case, path), with its ratio to
/// the baseline path of the same case (computed round by round, so both
/// sides of each ratio ran back to back).
#[derive(Clone, Debug)]
pub struct Summary {
    /// The median record (field by field).
    pub med: Record,
    /// Median operations per second.
    pub ops_s: f64,
    /// Median MB/s.
    pub mb_s: f64,
    /// Rounds that succeeded / ran.
    pub ok_rounds: usize,
    /// Rounds in total.
    pub rounds: usize,
    /// The path this one is compared with (`plain` or `raw-tcp`).
    pub baseline: Option<String>,
    /// Median of per-round throughput ratios (this / baseline).
    pub tput_ratio: Option<f64>,
    /// Median of per-round p50 latency ratios (this / baseline).
    pub p50_ratio: Option<f64>,
    /// First error seen, if any.
    pub error: Option<String>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The baseline a path is compared with.
pub fn baseline_of(path: &str) -> Option<&'static str> {
    match path {
        "plain" | "raw-tcp" | "remote-plain" | "remote-backchannel" => None,
        "raw-yamux" | "raw-tokio-yamux" => Some("raw-tcp"),
        "hub" => Some("forward"),
        _ => Some("plain"),
    }
}

/// Groups records into summaries, in first-seen order.
pub fn summarize(records: &[Record]) -> Vec<Summary> {
    let mut keys: Vec<(String, String, String)> = Vec::new();
    for r in records {
        let k = (r.workload.clone(), r.case.clone(), r.path.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let tput = |r: &Record| {
        if r.bytes > 0 {
            r.mb_per_sec()
        } else {
            r.ops_per_sec()
        }
    };
    keys.into_iter()
        .map(|(w, c, p)| {
            let rs: Vec<&Record> = records
                .iter()
                .filter(|r| r.workload == w && r.case == c && r.path == p)
                .collect();
            let ok: Vec<&Record> = rs.iter().copied().filter(|r| r.error.is_none()).collect();
            let m = |f: &dyn Fn(&Record) -> f64| median(ok.iter().map(|r| f(r)).collect());
            let mut med = Record::failed(&w, &c, &p, 0, String::new());
            med.error = None;
            if !ok.is_empty() {
                med.secs = m(&|r| r.secs).unwrap_or(0.0);
                med.ops = (m(&|r| r.ops_per_sec()).unwrap_or(0.0) * med.secs) as u64;
                med.bytes = (m(&|r| r.mb_per_sec()).unwrap_or(0.0) * 1e6 * med.secs) as u64;
                med.cpu = m(&|r| r.cpu).unwrap_or(0.0);
                med.p50_us = m(&|r| r.p50_us as f64).unwrap_or(0.0) as u64;
                med.p99_us = m(&|r| r.p99_us as f64).unwrap_or(0.0) as u64;
                med.max_us = ok.iter().map(|r| r.max_us).max().unwrap_or(0);
                med.peak_rss_kib = ok.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0);
            }
            let baseline = baseline_of(&p).map(str::to_string);
            let (mut tr, mut lr) = (Vec::new(), Vec::new());
            if let Some(b) = &baseline {
                for r in &ok {
                    let base = records.iter().find(|x| {
                        x.workload == w
                            && x.case == c
                            && &x.path == b
                            && x.round == r.round
                            && x.error.is_none()
                    });
                    if let Some(base) = base {
                        if tput(base) > 0.0 {
                            tr.push(tput(r) / tput(base));
                        }
                        if base.p50_us > 0 {
                            lr.push(r.p50_us as f64 / base.p50_us as f64);
                        }
                    }
                }
            }
            Summary {
                ops_s: m(&|r| r.ops_per_sec()).unwrap_or(0.0),
                mb_s: m(&|r| r.mb_per_sec()).unwrap_or(0.0),
                error: rs.iter().find_map(|r| r.error.clone()),
                ok_rounds: ok.len(),
                rounds: rs.len(),
                tput_ratio: median(tr),
                p50_ratio: median(lr),
                baseline,
                med,
            }
        })
        .collect()
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

/// The results table (medians over rounds).
pub fn table(summaries: &[Summary]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<9} {:<15} {:<13} {:>10} {:>9} {:>8} {:>8} {:>8} {:>7} {:>8} {:>9} {:>7}\n",
        "workload",
        "case",
        "path",
        "ops/s",
        "MB/s",
        "p50 us",
        "p99 us",
        "max us",
        "cpu s",
        "peakMiB",
        "tput/base",
        "p50/base"
    ));
    for s in summaries {
        let r = &s.med;
        if s.ok_rounds == 0 {
            out.push_str(&format!(
                "{:<9} {:<15} {:<13} FAILED: {}\n",
                r.workload,
                r.case,
                r.path,
                s.error.as_deref().unwrap_or("?")
            ));
            continue;
        }
        out.push_str(&format!(
            "{:<9} {:<15} {:<13} {:>10.0} {:>9.1} {:>8} {:>8} {:>8} {:>7.2} {:>8.0} {:>9} {:>7}{}\n",
            r.workload,
            r.case,
            r.path,
            s.ops_s,
            s.mb_s,
            r.p50_us,
            r.p99_us,
            r.max_us,
            r.cpu,
            r.peak_rss_kib as f64 / 1024.0,
            fmt_ratio(s.tput_ratio),
            fmt_ratio(s.p50_ratio),
            if s.ok_rounds < s.rounds {
                format!("  ({}/{} rounds failed)", s.rounds - s.ok_rounds, s.rounds)
            } else {
                String::new()
            }
        ));
    }
    out
}

/// One JSON line for a summary.
pub fn json_line(s: &Summary) -> String {
    let r = &s.med;
    serde_json::json!({
        "kind": "result",
        "workload": r.workload,
        "case": r.case,
        "path": r.path,
        "rounds": s.rounds,
        "ok_rounds": s.ok_rounds,
        "ops_per_sec": s.ops_s,
        "mb_per_sec": s.mb_s,
        "p50_us": r.p50_us,
        "p99_us": r.p99_us,
        "max_us": r.max_us,
        "cpu_s": r.cpu,
        "peak_rss_kib": r.peak_rss_kib,
        "baseline": s.baseline,
        "throughput_ratio": s.tput_ratio,
        "p50_ratio": s.p50_ratio,
        "error": s.error,
    })
    .to_string()
}

/// Counters a running workload updates, read by the progress line.
#[derive(Default)]
pub struct Counters {
    /// Operations done.
    pub ops: AtomicU64,
    /// Bytes moved.
    pub bytes: AtomicU64,
}

impl Counters {
    /// Adds one operation of `bytes` bytes.
    pub fn add(&self, bytes: u64) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// A progress line on stderr, redrawn every 250 ms while a measurement runs
/// (on a terminal), or one line per measurement otherwise.
pub struct Progress {
    stop: Arc<AtomicBool>,
    task: Option<std::thread::JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `label` with the live counters; `quiet` shows nothing.
    pub fn start(label: String, counters: Arc<Counters>, quiet: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if quiet {
            return Progress { stop, task: None };
        }
        let tty = std::io::stderr().is_terminal();
        if !tty {
            eprintln!("running {label}");
            return Progress { stop, task: None };
        }
        let s = stop.clone();
        let task = std::thread::spawn(move || {
            let start = Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let secs = start.elapsed().as_secs_f64();
                let ops = counters.ops.load(Ordering::Relaxed);
                let bytes = counters.bytes.load(Ordering::Relaxed);
                let mut e = std::io::stderr().lock();
                let _ = write!(
                    e,
                    "\r\x1b[K{label}: {secs:5.1}s {ops} ops {:.0} ops/s {:.1} MB/s",
                    ops as f64 / secs,
                    bytes as f64 / secs / 1e6
                );
                let _ = e.flush();
            }
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        });
        Progress {
            stop,
            task: Some(task),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.task.take() {
            let _ = t.join();
        }
    }
}
