//! `backchannel-bench`: backchannel's paths against plain tonic and
//! tokio-yamux, in one process, with ratios taken within each run.
//!
//! Every path runs in this process on loopback TCP, back to back within
//! each round, so ratios are taken between runs seconds apart:
//!
//! | path | what |
//! |---|---|
//! | `plain` | tonic client -> tonic server over TCP (the baseline) |
//! | `forward` | backchannel client -> server on yamux stream 1 (listenmux, handshake) |
//! | `reverse` | server -> client through `Registry::backchannel` |
//! | `hub` | caller -> hub -> agent -> service (in-process `hub::Hub` and `agent::Agent`) |
//! | `tokio-yamux` | tonic over a bare tokio-yamux session: the independent yamux implementation as a reference |
//! | `raw-tcp` / `raw-yamux` / `raw-tokio-yamux` | the `copy` workload: bytes through one TCP socket / one backchannel-yamux stream / one tokio-yamux stream |

pub mod chart;
pub mod cluster;
pub mod multi;
pub mod paths;
pub mod peers;
pub mod report;
pub mod soak;
pub mod sys;
pub mod tunnel;
pub mod workload;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};

use report::{Counters, Progress, Record};
use workload::{conn, Conn};

/// A workload of `--workloads`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Unary calls of `--size` bytes at each `--concurrency`.
    Echo,
    /// Client streaming of `--total` bytes in each `--message-size`.
    Upload,
    /// Server streaming of `--total` bytes in each `--message-size`.
    Download,
    /// Raw bytes through one TCP socket / yamux stream (no gRPC).
    Copy,
}

/// A gRPC path of `--paths`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// tonic client -> tonic server over TCP (the baseline).
    Plain,
    /// backchannel client -> server on yamux stream 1.
    Forward,
    /// server -> client through the registry.
    Reverse,
    /// caller -> hub -> agent -> service.
    Hub,
    /// tonic over a bare tokio-yamux session (the "before").
    TokioYamux,
    /// Every path above.
    All,
}

impl PathKind {
    const EVERY: [PathKind; 5] = [
        PathKind::Plain,
        PathKind::Forward,
        PathKind::Reverse,
        PathKind::Hub,
        PathKind::TokioYamux,
    ];

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Plain => "plain",
            PathKind::Forward => "forward",
            PathKind::Reverse => "reverse",
            PathKind::Hub => "hub",
            PathKind::TokioYamux => "tokio-yamux",
            PathKind::All => "all",
        }
    }
}

/// `backchannel bench` options.
#[derive(Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Workloads to run (`copy`: raw bytes through one stream).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "echo,upload,download,copy"
    )]
    workloads: Vec<Workload>,
    /// gRPC paths to compare ("all" for every one).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain,forward,reverse"
    )]
    paths: Vec<PathKind>,
    /// Echo payload size.
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    size: u64,
    /// Echo concurrency levels (calls in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    concurrency: Vec<usize>,
    /// Seconds per echo measurement.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Bytes per upload/download.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    total: u64,
    /// Message sizes for upload/download.
    #[arg(long, value_delimiter = ',', default_value = "64KiB,1MiB", value_parser = parse_size)]
    message_size: Vec<u64>,
    /// Bytes per raw copy.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    copy_total: u64,
    /// Write size of the raw copy.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    copy_chunk: u64,
    /// Rounds; reported values are medians, ratios are medians of per-round
    /// ratios.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// yamux max stream window for both ends (default: SessionConfig's 4 MiB).
    #[arg(long, value_parser = parse_size)]
    window: Option<u64>,
    /// One JSON line per result on stdout (instead of the table).
    #[arg(long)]
    json: bool,
    /// Write an SVG chart of the ratios here.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Run every path tiny (a few seconds) and fail if any path fails.
    #[arg(long)]
    smoke: bool,
    /// Run the workloads against a running server at ADDR (host:port)
    /// instead of in-process servers.
    #[arg(long, value_name = "ADDR")]
    connect: Option<String>,
    /// With --connect: plain gRPC, no backchannel handshake.
    #[arg(long, requires = "connect")]
    plain: bool,
}

#[derive(Subcommand, Debug, Clone)]
enum BenchCommand {
    /// Connect N idle backchannel peers to one server: connect rate, server
    /// RSS per peer, reverse-call latency to random peers.
    Peers(PeersArgs),
    /// The hub under churn, floods, fake peers and slow readers for a
    /// while; checks it is back where it started (`soak --duration 20s`).
    Soak(soak::SoakArgs),
    /// caller, proxy (nginx `grpc_pass`, or hub + agent) and service as
    /// separate processes: latency, throughput and CPU of every process.
    Multi(multi::MultiArgs),
    /// (internal) the service process of `multi`.
    #[command(hide = true)]
    MultiServe,
    /// (internal) the caller process of `multi`.
    #[command(hide = true)]
    MultiCall(multi::CallArgs),
    /// Three clustered hubs on redis-server: same-hub vs cross-hub routed
    /// calls, and registering many peers over the three.
    Cluster(cluster::ClusterArgs),
    /// Bytes through a tunnel (library, and hub+agent) against direct TCP
    /// and a chain of two socat relays.
    Tunnel(tunnel::TunnelBenchArgs),
    /// (internal) the client process of `peers`.
    #[command(hide = true)]
    PeersChild {
        #[arg(long)]
        addr: String,
        #[arg(short)]
        n: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long)]
        window: Option<u32>,
    },
}

/// `bench peers` options.
#[derive(Args, Debug, Clone)]
pub struct PeersArgs {
    /// Number of peers.
    #[arg(default_value_t = 10_000)]
    pub n: usize,
    /// Connects in flight.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Reverse calls to random peers (cold, then as many warm).
    #[arg(long, default_value_t = 500)]
    pub calls: usize,
    /// Run the clients in this process (server RSS then includes them).
    #[arg(long)]
    pub in_process: bool,
    /// yamux max stream window.
    #[arg(long, value_parser = parse_size)]
    pub window: Option<u64>,
    /// One JSON line on stdout.
    #[arg(long)]
    pub json: bool,
}

/// Parses `1024`, `64KiB`, `1MiB`, `1GiB` (also K/M/G, KB/MB/GB as binary).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mul = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("bad size unit in {s:?}")),
    };
    Ok((n * mul as f64) as u64)
}

/// Formats a byte count as `64KiB`, `1MiB`...
pub fn fmt_size(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{}GiB", n >> 30),
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{}MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{}KiB", n >> 10),
        n => format!("{n}B"),
    }
}

/// Runs `backchannel bench`.
pub async fn run(mut a: BenchArgs) -> anyhow::Result<()> {
    match a.command.take() {
        Some(BenchCommand::Peers(p)) => {
            let r = peers::run(&p, false).await?;
            if p.json {
                println!("{}", r.json());
            } else {
                print!("{}", r.text());
            }
            return Ok(());
        }
        Some(BenchCommand::Soak(s)) => return soak::run(&s).await,
        Some(BenchCommand::Multi(m)) => return multi::run(&m).await,
        Some(BenchCommand::MultiServe) => return multi::serve().await,
        Some(BenchCommand::MultiCall(c)) => return multi::call(c).await,
        Some(BenchCommand::Cluster(c)) => return cluster::run(&c).await,
        Some(BenchCommand::Tunnel(t)) => return tunnel::run(&t).await,
        Some(BenchCommand::PeersChild {
            addr,
            n,
            concurrency,
            window,
        }) => return peers::child(addr, n, concurrency, window).await,
        None => {}
    }
    if a.smoke {
        return smoke(a).await;
    }
    let records = if let Some(addr) = a.connect.clone() {
        run_remote(&a, &addr).await?
    } else {
        run_local(&a, false).await?
    };
    finish(&a, &records)
}

fn finish(a: &BenchArgs, records: &[Record]) -> anyhow::Result<()> {
    let summaries = report::summarize(records);
    if a.json {
        for s in &summaries {
            println!("{}", report::json_line(s));
        }
    } else {
        print!("{}", report::table(&summaries));
    }
    if let Some(path) = &a.chart {
        let title = format!(
            "backchannel bench: throughput vs baseline ({} round(s), medians)",
            a.rounds
        );
        chart::write(path, &summaries, &title)?;
        eprintln!("chart written to {}", path.display());
    }
    Ok(())
}

/// `--smoke`: every path, tiny, and `peers 20` in a child process.
async fn smoke(mut a: BenchArgs) -> anyhow::Result<()> {
    a.rounds = 1;
    a.duration = 0.1;
    a.total = 2 << 20;
    a.message_size = vec![64 << 10, 1 << 20];
    a.copy_total = 4 << 20;
    a.concurrency = vec![1, 4];
    a.workloads = vec![
        Workload::Echo,
        Workload::Upload,
        Workload::Download,
        Workload::Copy,
    ];
    a.paths = vec![PathKind::All];
    let start = Instant::now();
    let records = run_local(&a, true).await?;
    let mut failed: Vec<String> = records
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("{} {} {}: {e}", r.workload, r.case, r.path))
        })
        .collect();
    let p = PeersArgs {
        n: 20,
        concurrency: 8,
        calls: 5,
        in_process: false,
        window: a.window,
        json: false,
    };
    match peers::run(&p, true).await {
        Ok(r) => eprint!("{}", r.text()),
        Err(e) => failed.push(format!("peers: {e:#}")),
    }
    let summaries = report::summarize(&records);
    eprint!("{}", report::table(&summaries));
    if a.json {
        for s in &summaries {
            println!("{}", report::json_line(s));
        }
    }
    if let Some(path) = &a.chart {
        chart::write(path, &summaries, "backchannel bench --smoke")?;
    }
    if !failed.is_empty() {
        bail!(
            "smoke: {} path(s) failed:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    eprintln!(
        "smoke: {} runs ok in {:.1} s",
        records.len() + 1,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The set-up paths of one in-process run.
struct Env {
    channels: Vec<(String, Conn)>,
    window: u32,
    server_cfg: backchannel::SessionConfig,
    _keep: Vec<paths::Task>,
    _hub: Vec<paths::Keep>,
    _servers: Vec<paths::BcServer>,
    _clients: Vec<backchannel::Client>,
}

async fn setup(a: &BenchArgs) -> anyhow::Result<Env> {
    let (server_cfg, client_cfg) = paths::session_configs(a.window.map(|w| w as u32));
    let window = server_cfg.max_stream_window();
    let want: Vec<PathKind> = if a.paths.contains(&PathKind::All) {
        PathKind::EVERY.to_vec()
    } else {
        a.paths.clone()
    };
    let mut env = Env {
        channels: Vec::new(),
        window,
        server_cfg: server_cfg.clone(),
        _keep: Vec::new(),
        _hub: Vec::new(),
        _servers: Vec::new(),
        _clients: Vec::new(),
    };
    let mut bc: Option<(paths::BcServer, backchannel::Client)> = None;
    for &kind in &want {
        let p = kind.name().to_string();
        match kind {
            PathKind::Plain => {
                let (addr, task) = paths::plain_server().await?;
                env._keep.push(task);
                env.channels
                    .push((p.clone(), conn(paths::plain_channel(&addr).await?)));
            }
            PathKind::Forward | PathKind::Reverse => {
                if bc.is_none() {
                    let server = paths::bc_server(server_cfg.clone()).await?;
                    let client = paths::bc_client(&server.addr, client_cfg.clone()).await?;
                    bc = Some((server, client));
                }
                let (server, client) = bc.as_ref().expect("set above");
                let ch = if kind == PathKind::Forward {
                    client.channel()
                } else {
                    // The peer registers when its handshake completes.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let id = loop {
                        if let Some(peer) = server.registry.list().first() {
                            break peer.id;
                        }
                        if Instant::now() > deadline {
                            bail!("the backchannel peer never registered");
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    };
                    server.registry.backchannel(id)?
                };
                env.channels.push((p.clone(), conn(ch)));
            }
            PathKind::Hub => match paths::hub_conn().await {
                Ok((c, keep)) => {
                    env._hub.extend(keep);
                    env.channels.push((p.clone(), c));
                }
                Err(e) => bail!("setting up the hub path: {e:#}"),
            },
            PathKind::TokioYamux => {
                let (ch, task) = paths::tokio_yamux_channel(window).await?;
                env._keep.push(task);
                env.channels.push((p.clone(), conn(ch)));
            }
            PathKind::All => continue, // expanded above
        }
    }
    if let Some((s, c)) = bc {
        env._servers.push(s);
        env._clients.push(c);
    }
    Ok(env)
}

/// One gRPC measurement.
#[derive(Clone, Copy)]
enum Job {
    Echo { size: usize, conc: usize },
    Upload { msg: usize },
    Download { msg: usize },
}

impl Job {
    fn names(&self) -> (&'static str, String) {
        match *self {
            Job::Echo { size, conc } => ("echo", format!("{} c={conc}", fmt_size(size as u64))),
            Job::Upload { msg } => ("upload", format!("{} msgs", fmt_size(msg as u64))),
            Job::Download { msg } => ("download", format!("{} msgs", fmt_size(msg as u64))),
        }
    }
}

fn jobs(a: &BenchArgs) -> anyhow::Result<(Vec<Job>, bool)> {
    let mut jobs = Vec::new();
    let mut copy = false;
    for w in &a.workloads {
        match w {
            Workload::Echo => jobs.extend(a.concurrency.iter().map(|&conc| Job::Echo {
                size: a.size as usize,
                conc,
            })),
            Workload::Upload => jobs.extend(
                a.message_size
                    .iter()
                    .map(|&m| Job::Upload { msg: m as usize }),
            ),
            Workload::Download => jobs.extend(
                a.message_size
                    .iter()
                    .map(|&m| Job::Download { msg: m as usize }),
            ),
            Workload::Copy => copy = true,
        }
    }
    Ok((jobs, copy))
}

async fn measure(
    a: &BenchArgs,
    job: Job,
    path: &str,
    ch: Conn,
    round: usize,
    quiet: bool,
) -> Record {
    let (w, case) = job.names();
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start(
        format!("{w} {case} {path} (round {round}/{})", a.rounds),
        counters.clone(),
        quiet,
    );
    let cpu0 = sys::cpu_seconds();
    let dur = Duration::from_secs_f64(a.duration);
    let run = match job {
        Job::Echo { size, conc } => workload::echo(ch, size, conc, dur, 20, counters).await,
        Job::Upload { msg } => workload::upload(ch, a.total, msg, counters).await,
        Job::Download { msg } => workload::download(ch, a.total, msg, counters).await,
    };
    let cpu = sys::cpu_seconds() - cpu0;
    match run {
        Ok(r) => Record::new(w, &case, path, round, r.ops, r.bytes, r.secs, cpu, &r.hist),
        Err(e) => Record::failed(w, &case, path, round, format!("{e:#}")),
    }
}

async fn run_local(a: &BenchArgs, quiet: bool) -> anyhow::Result<Vec<Record>> {
    let (jobs, copy) = jobs(a)?;
    let env = if jobs.is_empty() {
        None
    } else {
        Some(setup(a).await?)
    };
    let mut records = Vec::new();
    for job in &jobs {
        let env = env.as_ref().expect("set when there are jobs");
        for round in 1..=a.rounds {
            // Rotate the order every round so no path always runs first.
            let n = env.channels.len();
            for k in 0..n {
                let (path, ch) = &env.channels[(k + round - 1) % n];
                let r = measure(a, *job, path, ch.clone(), round, quiet).await;
                if !quiet {
                    if let Some(e) = &r.error {
                        eprintln!("{} {} {path}: FAILED: {e}", r.workload, r.case);
                    }
                }
                records.push(r);
            }
        }
    }
    if copy {
        let cfg = env
            .as_ref()
            .map(|e| (e.server_cfg.clone(), e.window))
            .unwrap_or_else(|| {
                let (s, _) = paths::session_configs(a.window.map(|w| w as u32));
                let w = s.max_stream_window();
                (s, w)
            });
        for up in [true, false] {
            for round in 1..=a.rounds {
                let mut order = ["raw-tcp", "raw-yamux", "raw-tokio-yamux"];
                // Each path goes first in some round.
                order.rotate_left((round - 1) % 3);
                for path in order {
                    let r = copy_run(a, path, up, round, cfg.0.clone(), cfg.1, quiet).await;
                    if !quiet {
                        if let Some(e) = &r.error {
                            eprintln!("copy {path}: FAILED: {e}");
                        }
                    }
                    records.push(r);
                }
            }
        }
    }
    Ok(records)
}

async fn copy_run(
    a: &BenchArgs,
    path: &str,
    up: bool,
    round: usize,
    server_cfg: backchannel::SessionConfig,
    window: u32,
    quiet: bool,
) -> Record {
    let case = format!(
        "{} {}",
        if up { "c->s" } else { "s->c" },
        fmt_size(a.copy_chunk)
    );
    let counters = Arc::new(Counters::default());
    let _progress = Progress::start(
        format!("copy {case} {path} (round {round}/{})", a.rounds),
        counters.clone(),
        quiet,
    );
    let chunk = a.copy_chunk as usize;
    let result = async {
        let cpu0 = sys::cpu_seconds();
        let run = if path == "raw-tcp" {
            let (c, s) = backchannel_testkit::tcp_pair().await?;
            if up {
                workload::copy(c, s, a.copy_total, chunk, counters).await?
            } else {
                workload::copy(s, c, a.copy_total, chunk, counters).await?
            }
        } else if path == "raw-tokio-yamux" {
            let (c, s, _tasks) = paths::tokio_yamux_pair(window).await?;
            if up {
                workload::copy(c, s, a.copy_total, chunk, counters).await?
            } else {
                workload::copy(s, c, a.copy_total, chunk, counters).await?
            }
        } else {
            let (c, s, _tasks) = paths::yamux_pair(server_cfg, window).await?;
            if up {
                workload::copy(c, s, a.copy_total, chunk, counters).await?
            } else {
                workload::copy(s, c, a.copy_total, chunk, counters).await?
            }
        };
        Ok::<_, anyhow::Error>((run, sys::cpu_seconds() - cpu0))
    }
    .await;
    match result {
        Ok((r, cpu)) => Record::new(
            "copy", &case, path, round, r.ops, r.bytes, r.secs, cpu, &r.hist,
        ),
        Err(e) => Record::failed("copy", &case, path, round, format!("{e:#}")),
    }
}

async fn run_remote(a: &BenchArgs, addr: &str) -> anyhow::Result<Vec<Record>> {
    let (jobs, copy) = jobs(a)?;
    if copy {
        eprintln!(
            "copy: not available with --connect (it measures in-process transports), skipped"
        );
    }
    let (path, ch, _client) = if a.plain {
        (
            "remote-plain",
            conn(paths::plain_channel(addr).await?),
            None,
        )
    } else {
        let (_, cfg) = paths::session_configs(a.window.map(|w| w as u32));
        let client = paths::bc_client(addr, cfg).await?;
        ("remote-backchannel", conn(client.channel()), Some(client))
    };
    let mut records = Vec::new();
    for job in jobs {
        for round in 1..=a.rounds {
            let r = measure(a, job, path, ch.clone(), round, false).await;
            if let Some(e) = &r.error {
                eprintln!("{} {} {path}: FAILED: {e}", r.workload, r.case);
            }
            records.push(r);
        }
    }
    if records.iter().all(|r| r.error.is_some()) && !records.is_empty() {
        return Err(anyhow!("every run against {addr} failed"))
            .context("is a Bench service (backchannel.bench.v1) served there?");
    }
    Ok(records)
}
