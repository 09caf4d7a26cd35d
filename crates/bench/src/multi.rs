//! `backchannel-bench multi`: caller, proxy, agent and service as separate
//! processes, as users run them.
//!
//! Paths, measured back to back in every round:
//!
//! | path | processes |
//! |---|---|
//! | `direct` | caller -> service |
//! | `nginx` | caller -> nginx `grpc_pass` (2 workers, upstream keepalive 64, h2c) -> service; skipped when `nginx` is not installed |
//! | `nginx2` | caller -> nginx -> nginx -> service: two proxy processes in a row, as a routed call crosses (hub, agent); the floor a second process sets on this machine |
//! | `hub` | caller -> `backchannel hub` -> `backchannel agent` -> service |
//! | `hub-1t` | as `hub`, both with `--threads 1` |
//! | `hub-proxy` | as `hub`, the agent with `--proxy-calls` (it terminates HTTP/2) |
//!
//! The service and the caller are this binary's hidden `multi-serve` and
//! `multi-call` subcommands (testkit's `BenchService`, the in-process
//! bench's workloads); hub and agent are the release `backchannel` binary
//! (next to this one, or `$BACKCHANNEL_BIN`). CPU is read from
//! `/proc/PID/stat` (utime + stime) of every process before and after each
//! run and reported per call (echo) or per GB moved (streams).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Args;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::{fmt_size, parse_size, report::Counters, workload};

/// `multi` options.
#[derive(Args, Debug, Clone)]
pub struct MultiArgs {
    /// Paths to measure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,nginx,nginx2,hub,hub-1t,hub-proxy"
    )]
    pub paths: Vec<String>,
    /// Echo payload size.
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    pub size: u64,
    /// Echo concurrency levels (calls in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub concurrency: Vec<usize>,
    /// Seconds per echo measurement.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Bytes per upload/download.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub total: u64,
    /// Message size of upload/download.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub message_size: u64,
    /// Rounds; values reported are medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip the streaming workloads.
    #[arg(long)]
    pub no_streams: bool,
    /// One JSON line per result on stdout (instead of the table).
    #[arg(long)]
    pub json: bool,
    /// Write an SVG chart of every path's throughput as a ratio of nginx's.
    #[arg(long)]
    pub chart: Option<PathBuf>,
    /// Keep the processes' logs in this directory (default: a temporary one,
    /// removed at the end).
    #[arg(long)]
    pub logs: Option<PathBuf>,
}

/// The job of one `multi-call` process.
#[derive(Args, Debug, Clone)]
pub struct CallArgs {
    /// `host:port` of the server to call (plain gRPC, h2c).
    #[arg(long)]
    pub addr: String,
    /// Sets `backchannel-peer` on every call.
    #[arg(long)]
    pub peer: Option<String>,
    /// `echo`, `upload` or `download`.
    #[arg(long)]
    pub job: String,
    /// Echo payload.
    #[arg(long, default_value = "1KiB", value_parser = parse_size)]
    pub size: u64,
    /// Echo calls in flight.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Echo seconds.
    #[arg(long, default_value_t = 3.0)]
    pub duration: f64,
    /// Stream bytes.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub total: u64,
    /// Stream message size.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub message_size: u64,
}

// ------------------------------------------------------------ child processes

/// `multi-serve`: a plain tonic server with the Bench service on loopback;
/// prints `listening on ADDR` and serves until killed.
pub async fn serve() -> anyhow::Result<()> {
    let (addr, _task) = crate::paths::plain_server().await?;
    println!("listening on {addr}");
    // Serves until the bench kills this process.
    std::future::pending::<()>().await;
    Ok(())
}

/// `multi-call`: runs one job and prints its result as one JSON line.
pub async fn call(a: CallArgs) -> anyhow::Result<()> {
    let ch = crate::paths::plain_channel(&a.addr).await?;
    let conn = match &a.peer {
        Some(p) => {
            workload::conn_with_header(ch, "backchannel-peer", http::HeaderValue::from_str(p)?)
        }
        None => workload::conn(ch),
    };
    let counters = Arc::new(Counters::default());
    let cpu0 = crate::sys::cpu_seconds();
    let run = match a.job.as_str() {
        "echo" => {
            workload::echo(
                conn,
                a.size as usize,
                a.concurrency,
                Duration::from_secs_f64(a.duration),
                20,
                counters,
            )
            .await?
        }
        "upload" => workload::upload(conn, a.total, a.message_size as usize, counters).await?,
        "download" => workload::download(conn, a.total, a.message_size as usize, counters).await?,
        j => bail!("unknown job {j:?}"),
    };
    let cpu = crate::sys::cpu_seconds() - cpu0;
    println!(
        "{}",
        serde_json::json!({
            "ops": run.ops,
            "bytes": run.bytes,
            "secs": run.secs,
            "p50_us": run.hist.value_at_quantile(0.5),
            "p99_us": run.hist.value_at_quantile(0.99),
            "cpu": cpu,
        })
    );
    Ok(())
}

// ------------------------------------------------------------ process helpers

/// CPU seconds (utime + stime) of process `pid`, from `/proc/PID/stat`.
pub fn proc_cpu(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: split after its ')'.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the file are 12 and 13 after the name.
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (tick(11) + tick(12)) / hz
}

/// The children of `pid` (nginx's workers).
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit_once(')')?.1.to_string();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

struct Proc {
    name: &'static str,
    child: tokio::process::Child,
    /// The PIDs whose CPU counts for it (nginx: master and workers).
    pids: Vec<u32>,
}

impl Proc {
    fn cpu(&self) -> f64 {
        self.pids.iter().map(|&p| proc_cpu(p)).sum()
    }
}

/// Spawns `cmd`, logs stderr to `log`, and waits for a stdout line starting
/// with `prefix`; returns the process and the rest of that line.
async fn spawn_until(
    name: &'static str,
    cmd: &mut tokio::process::Command,
    log: &Path,
    prefix: &str,
) -> anyhow::Result<(Proc, String)> {
    let err = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let rest = loop {
        let l = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .with_context(|| format!("{name} did not start (see {})", log.display()))??
            .with_context(|| format!("{name} exited (see {})", log.display()))?;
        if let Some(r) = l.strip_prefix(prefix) {
            break r.trim().to_string();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let pid = child.id().unwrap_or(0);
    Ok((
        Proc {
            name,
            child,
            pids: vec![pid],
        },
        rest,
    ))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn find_nginx() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX_BIN") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

/// nginx as a gRPC reverse proxy to `upstream`, in the reference
/// configuration: 2 workers, upstream keepalive 64, h2c.
async fn start_nginx(
    bin: &Path,
    dir: &Path,
    upstream: &str,
    name: &'static str,
) -> anyhow::Result<(Proc, String)> {
    let dir = &dir.join(name);
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
master_process on;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 0;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    upstream svc {{
        server {upstream};
        keepalive 64;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://svc;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let log = dir.join("nginx.log");
    let err = std::fs::File::create(&log)?;
    let child = tokio::process::Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting nginx")?;
    let master = child.id().unwrap_or(0);
    let addr = format!("127.0.0.1:{port}");
    let t = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("nginx did not listen on {addr} (see {})", log.display());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut pids = vec![master];
    let t = Instant::now();
    while pids.len() < 3 && t.elapsed() < Duration::from_secs(5) {
        pids = std::iter::once(master).chain(children(master)).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((Proc { name, child, pids }, addr))
}

/// `backchannel hub` and `backchannel agent` (exposing `svc_addr` as peer
/// `bench`), each with `args` before its subcommand, the agent also with
/// `agent_args`; returns them and the hub's address once the peer is
/// routable.
async fn start_hub(
    dir: &Path,
    svc_addr: &str,
    tag: &str,
    args: &[&str],
    agent_args: &[&str],
) -> anyhow::Result<(Vec<Proc>, String)> {
    let bin = crate::soak::hub_binary()?;
    let (hub, hub_addr) = spawn_until(
        "hub",
        tokio::process::Command::new(&bin)
            .args(args)
            .args(["hub", "--listen", "127.0.0.1:0"]),
        &dir.join(format!("hub{tag}.log")),
        "hub listening on ",
    )
    .await?;
    let err = std::fs::File::create(dir.join(format!("agent{tag}.log")))?;
    let agent = tokio::process::Command::new(&bin)
        .args(args)
        .args(["agent", "--hub", &hub_addr, "--name", "bench", "--expose"])
        .arg(svc_addr)
        .args(agent_args)
        .stdout(Stdio::null())
        .stderr(Stdio::from(err))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the agent")?;
    let agent_pid = agent.id().unwrap_or(0);
    wait_routable(&hub_addr, "bench").await?;
    let agent = Proc {
        name: "agent",
        child: agent,
        pids: vec![agent_pid],
    };
    Ok((vec![hub, agent], hub_addr))
}

/// One path: where the caller dials, with which header, through which
/// processes.
struct PathSetup {
    name: String,
    addr: String,
    peer: Option<String>,
    /// The processes of the path between caller and service.
    procs: Vec<Proc>,
}

// ------------------------------------------------------------ the run

/// A job of the run.
#[derive(Clone, Debug)]
struct Job {
    workload: &'static str,
    case: String,
    args: Vec<String>,
}

fn jobs(a: &MultiArgs) -> Vec<Job> {
    let mut v: Vec<Job> = a
        .concurrency
        .iter()
        .map(|c| Job {
            workload: "echo",
            case: format!("{} c={c}", fmt_size(a.size)),
            args: vec![
                "--job=echo".into(),
                format!("--size={}", a.size),
                format!("--concurrency={c}"),
                format!("--duration={}", a.duration),
            ],
        })
        .collect();
    if !a.no_streams {
        for w in ["download", "upload"] {
            v.push(Job {
                workload: w,
                case: format!("{} in {} msgs", fmt_size(a.total), fmt_size(a.message_size)),
                args: vec![
                    format!("--job={w}"),
                    format!("--total={}", a.total),
                    format!("--message-size={}", a.message_size),
                ],
            });
        }
    }
    v
}

/// One measured run.
#[derive(Clone, Debug, Default)]
struct Sample {
    ops: f64,
    bytes: f64,
    secs: f64,
    p50_us: f64,
    p99_us: f64,
    /// CPU seconds by process name.
    cpu: BTreeMap<String, f64>,
}

async fn run_job(exe: &Path, p: &PathSetup, svc: &Proc, job: &Job) -> anyhow::Result<Sample> {
    let before: Vec<f64> = p.procs.iter().map(Proc::cpu).collect();
    let svc0 = svc.cpu();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("multi-call")
        .arg(format!("--addr={}", p.addr))
        .args(&job.args)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(peer) = &p.peer {
        cmd.arg(format!("--peer={peer}"));
    }
    let out = cmd.output().await.context("running the caller")?;
    if !out.status.success() {
        bail!("caller failed ({})", out.status);
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).context("caller output")?;
    let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
    let mut cpu = BTreeMap::new();
    cpu.insert("caller".to_string(), f("cpu"));
    for (pr, b) in p.procs.iter().zip(before) {
        cpu.insert(pr.name.to_string(), pr.cpu() - b);
    }
    cpu.insert("service".to_string(), svc.cpu() - svc0);
    Ok(Sample {
        ops: f("ops"),
        bytes: f("bytes"),
        secs: f("secs"),
        p50_us: f("p50_us"),
        p99_us: f("p99_us"),
        cpu,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Waits until a call through the hub reaches the service.
async fn wait_routable(addr: &str, peer: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let attempt = async {
            let c = workload::conn_with_header(
                crate::paths::plain_channel(addr).await?,
                "backchannel-peer",
                http::HeaderValue::from_str(peer)?,
            );
            let mut b = workload::client(c);
            b.echo(backchannel_testkit::pb::bench::Payload {
                data: backchannel_testkit::pattern(0, 1),
            })
            .await?;
            Ok::<_, anyhow::Error>(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if t.elapsed() > Duration::from_secs(15) => {
                return Err(e).context("the agent never became routable through the hub")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Runs `multi`.
pub async fn run(a: &MultiArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let tmp;
    let dir = match &a.logs {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = TempDir::new()?;
            tmp.0.clone()
        }
    };
    let (svc, svc_addr) = spawn_until(
        "service",
        tokio::process::Command::new(&exe).arg("multi-serve"),
        &dir.join("service.log"),
        "listening on ",
    )
    .await?;
    let mut setups = Vec::new();
    for p in &a.paths {
        match p.as_str() {
            "direct" => setups.push(PathSetup {
                name: "direct".into(),
                addr: svc_addr.clone(),
                peer: None,
                procs: Vec::new(),
            }),
            "nginx" | "nginx2" => match find_nginx() {
                None => eprintln!(
                    "{p}: nginx not installed, path skipped (apt-get install nginx-light, or set NGINX_BIN)"
                ),
                Some(bin) => {
                    let mut procs = Vec::new();
                    let mut upstream = svc_addr.clone();
                    let names: &[&'static str] = if p == "nginx" {
                        &["nginx"]
                    } else {
                        &["nginx-2", "nginx-1"]
                    };
                    for name in names {
                        let (proc_, addr) = start_nginx(&bin, &dir, &upstream, name).await?;
                        eprintln!("{name}: {} (pids {:?})", bin.display(), proc_.pids);
                        procs.push(proc_);
                        upstream = addr;
                    }
                    procs.reverse();
                    setups.push(PathSetup {
                        name: p.clone(),
                        addr: upstream,
                        peer: None,
                        procs,
                    });
                }
            },
            "hub" | "hub-1t" | "hub-proxy" => {
                let (tag, args, agent_args): (&str, &[&str], &[&str]) = match p.as_str() {
                    "hub" => ("", &[], &[]),
                    "hub-1t" => ("-1t", &["--threads", "1"], &[]),
                    _ => ("-proxy", &[], &["--proxy-calls"]),
                };
                let (procs, addr) = start_hub(&dir, &svc_addr, tag, args, agent_args).await?;
                setups.push(PathSetup {
                    name: p.clone(),
                    addr,
                    peer: Some("bench".into()),
                    procs,
                });
            }
            other => bail!("unknown path {other:?} (direct, nginx, nginx2, hub, hub-1t, hub-proxy)"),
        }
    }
    let mut results: Vec<(Job, String, Vec<Sample>)> = Vec::new();
    let mut failed = 0usize;
    for job in jobs(a) {
        let mut by_path: Vec<Vec<Sample>> = vec![Vec::new(); setups.len()];
        for round in 0..a.rounds.max(1) {
            let n = setups.len();
            for k in 0..n {
                let i = (k + round) % n;
                let p = &setups[i];
                eprintln!(
                    "{} {} {} (round {}/{})",
                    job.workload,
                    job.case,
                    p.name,
                    round + 1,
                    a.rounds
                );
                match run_job(&exe, p, &svc, &job).await {
                    Ok(s) => by_path[i].push(s),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{} {} {}: FAILED: {e:#}", job.workload, job.case, p.name)
                    }
                }
            }
        }
        for (p, samples) in setups.iter().zip(by_path) {
            results.push((job.clone(), p.name.clone(), samples));
        }
    }
    print_results(a, &results);
    if let Some(path) = &a.chart {
        chart(path, &results)?;
        eprintln!("chart written to {}", path.display());
    }
    for p in setups.iter_mut() {
        for pr in p.procs.iter_mut() {
            let _ = pr.child.start_kill();
            let _ = pr.child.wait().await;
        }
    }
    drop(svc);
    if failed > 0 {
        bail!("{failed} run(s) failed");
    }
    Ok(())
}

fn print_results(a: &MultiArgs, results: &[(Job, String, Vec<Sample>)]) {
    if !a.json {
        println!("| workload | path | p50 | p99 | throughput | CPU (per call us, or per GB s) |");
        println!("|---|---|---|---|---|---|");
    }
    for (job, path, samples) in results {
        if samples.is_empty() {
            println!("| {} {} | {path} | failed | | | |", job.workload, job.case);
            continue;
        }
        let echo = job.workload == "echo";
        let p50 = median(samples.iter().map(|s| s.p50_us).collect());
        let p99 = median(samples.iter().map(|s| s.p99_us).collect());
        let ops = median(samples.iter().map(|s| s.ops / s.secs.max(1e-9)).collect());
        let mbs = median(
            samples
                .iter()
                .map(|s| s.bytes / s.secs.max(1e-9) / 1e6)
                .collect(),
        );
        let mut names: Vec<&String> = samples[0].cpu.keys().collect();
        let order = [
            "caller", "nginx", "nginx-1", "nginx-2", "hub", "agent", "service",
        ];
        names.sort_by_key(|n| order.iter().position(|o| o == n).unwrap_or(9));
        let cpu: Vec<(String, f64)> = names
            .iter()
            .map(|n| {
                let per = median(
                    samples
                        .iter()
                        .map(|s| {
                            let c = s.cpu.get(*n).copied().unwrap_or(0.0);
                            if echo {
                                c / s.ops.max(1.0) * 1e6
                            } else {
                                c / (s.bytes.max(1.0) / 1e9)
                            }
                        })
                        .collect(),
                );
                (n.to_string(), per)
            })
            .collect();
        if a.json {
            let cpu_obj: serde_json::Map<String, serde_json::Value> =
                cpu.iter().map(|(n, v)| (n.clone(), (*v).into())).collect();
            println!(
                "{}",
                serde_json::json!({
                    "workload": job.workload, "case": job.case, "path": path,
                    "rounds": samples.len(), "p50_us": p50, "p99_us": p99,
                    "ops_per_sec": ops, "mb_per_sec": mbs,
                    if echo { "cpu_us_per_call" } else { "cpu_s_per_gb" }: cpu_obj,
                })
            );
            continue;
        }
        let tput = if echo {
            format!("{ops:.0} ops/s")
        } else {
            format!("{mbs:.0} MB/s")
        };
        let (p50s, p99s) = if echo {
            (format!("{p50:.0} us"), format!("{p99:.0} us"))
        } else {
            ("-".into(), "-".into())
        };
        let total: f64 = cpu.iter().map(|(_, v)| v).sum();
        let cpus: Vec<String> = cpu
            .iter()
            .map(|(n, v)| {
                if echo {
                    format!("{n} {v:.0}")
                } else {
                    format!("{n} {v:.2}")
                }
            })
            .collect();
        let tot = if echo {
            format!("{total:.0}")
        } else {
            format!("{total:.2}")
        };
        println!(
            "| {} {} | {path} | {p50s} | {p99s} | {tput} | {} = {tot} |",
            job.workload,
            job.case,
            cpus.join(", ")
        );
    }
}

/// Throughput (calls/s or MB/s) of one sample.
fn tput(echo: bool, s: &Sample) -> f64 {
    let v = if echo { s.ops } else { s.bytes };
    v / s.secs.max(1e-9)
}

fn chart(path: &Path, results: &[(Job, String, Vec<Sample>)]) -> anyhow::Result<()> {
    let mut summaries = Vec::new();
    for (job, p, samples) in results {
        let echo = job.workload == "echo";
        let Some((_, _, base)) = results
            .iter()
            .find(|(j, bp, _)| j.case == job.case && j.workload == job.workload && bp == "nginx")
        else {
            continue;
        };
        if p == "nginx" || samples.is_empty() || base.is_empty() {
            continue;
        }
        let b = median(base.iter().map(|s| tput(echo, s)).collect());
        let t = median(samples.iter().map(|s| tput(echo, s)).collect());
        let mut med = crate::report::Record::failed(job.workload, &job.case, p, 1, String::new());
        med.error = None;
        med.path = match p.as_str() {
            "hub" => "hub+agent".into(),
            "hub-1t" => "hub+agent, 1 thread".into(),
            "hub-proxy" => "hub+agent --proxy-calls".into(),
            "nginx2" => "nginx x2".into(),
            _ => p.clone(),
        };
        summaries.push(crate::report::Summary {
            med,
            ops_s: 0.0,
            mb_s: 0.0,
            ok_rounds: samples.len(),
            rounds: samples.len(),
            baseline: Some("nginx".into()),
            tput_ratio: Some(t / b.max(1e-9)),
            p50_ratio: None,
            error: None,
        });
    }
    crate::chart::write_noted(
        path,
        &summaries,
        "backchannel-bench multi: throughput / nginx grpc_pass (medians)",
        "black line: parity with nginx grpc_pass (2 workers, keepalive 64); separate processes on one machine",
    )
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<TempDir> {
        let p = std::env::temp_dir().join(format!(
            "backchannel-bench-multi-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
