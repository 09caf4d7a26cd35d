//! `bench soak --duration D`: the hub (the real binary, in a child process so
//! its RSS and open files are measured alone) under everything at once, then
//! a check that it is back where it started.
//!
//! Phases, in order:
//! 1. **flood**: one source (127.0.0.2) holds `--flood` silent or trickling
//!    connections (reopening, a second later, each one the hub closes) while connections from
//!    other sources (127.0.0.3...) each connect, start HTTP/2 and ask the
//!    hub's health service: share served and p99 time to the answer.
//! 2. **fake peers**: `--fake-peers` sessions that speak HTTP/2 but never
//!    announce connect and leave: hub RSS before, at the peak, after.
//! 3. **slow readers**: a caller's p99 to one agent, then again while
//!    another caller holds 64 never-read streams to the same agent.
//! 4. **churn** for `--duration`: `--agents` agent slots connecting and
//!    leaving (mostly drained, some stopped hard, some superseded by a new
//!    session of the same name), `--callers` callers doing mixed calls and
//!    never-read streams, silent connections arriving from several sources.
//!
//! At the end every agent leaves; the soak fails (exit 1) on any
//! unexplained error, a non-empty registry, or RSS / open files not back
//! near the start. An error is explained only when its agent was stopped
//! hard, or was draining and the call was refused (NOT_FOUND, or
//! UNAVAILABLE "leaving"); a call cut on a draining agent is not.

use std::{
    collections::HashMap,
    pin::Pin,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Args;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic::{transport::Channel, Code, Request, Response, Status, Streaming};

use crate::sys;
use backchannel_demo::pb::testing::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    EchoRequest, EchoResponse,
};
use backchannel_sidecar::agent::{Agent, AgentConfig};

/// `bench soak` options.
#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long the churn phase runs (seconds, or 20s, 10m).
    #[arg(long, default_value = "20s", value_parser = backchannel_sidecar::hub::flags::positive_seconds)]
    pub duration: Duration,
    /// Agent slots in the churn phase (default: 300, or 100 under a minute).
    #[arg(long, value_parser = backchannel_sidecar::hub::flags::at_least_one)]
    pub agents: Option<usize>,
    /// Caller connections in the churn phase.
    #[arg(long, default_value_t = 16, value_parser = backchannel_sidecar::hub::flags::at_least_one)]
    pub callers: usize,
    /// Silent connections one source holds in the flood phase (default:
    /// 10,000, or 2,000 under a minute).
    #[arg(long, value_parser = backchannel_sidecar::hub::flags::count)]
    pub flood: Option<usize>,
    /// Fake peers in the fake-peer phase (default: 10,000, or 2,000 under a
    /// minute).
    #[arg(long, value_parser = backchannel_sidecar::hub::flags::count)]
    pub fake_peers: Option<usize>,
    /// Write the hub's log (stderr; RUST_LOG applies) to this file.
    #[arg(long, value_name = "FILE")]
    pub hub_log: Option<std::path::PathBuf>,
}

// ---------------------------------------------------------------- the service

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Clone)]
struct Svc;

fn reply(message: String) -> EchoResponse {
    EchoResponse {
        message,
        server: "soak".into(),
    }
}

#[tonic::async_trait]
impl Echo for Svc {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let msg = request.into_inner().message;
        if let Some(ms) = msg.strip_prefix("sleep:") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        }
        Ok(Response::new(reply(msg)))
    }

    type ServerStreamStream = BoxStream<EchoResponse>;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let r = request.into_inner();
        let s = futures::stream::iter(0..r.count).map(move |_| Ok(reply(r.message.clone())));
        Ok(Response::new(Box::pin(s)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let mut s = request.into_inner();
        let mut all = String::new();
        while let Some(m) = s.message().await? {
            all.push_str(&m.message);
        }
        Ok(Response::new(reply(all)))
    }

    type BidiStream = BoxStream<EchoResponse>;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let s = request.into_inner().map(|m| m.map(|m| reply(m.message)));
        Ok(Response::new(Box::pin(s)))
    }
}

// ---------------------------------------------------------------- the hub process

/// The `backchannel` binary: `$BACKCHANNEL_BIN`, else the one built next to
/// this benchmark (`cargo build --release -p backchannel-cli`).
pub(crate) fn hub_binary() -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("BACKCHANNEL_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let bin = exe.with_file_name("backchannel");
    if !bin.exists() {
        bail!(
            "no backchannel binary at {} (build it with `cargo build --release -p backchannel-cli`, or set BACKCHANNEL_BIN)",
            bin.display()
        );
    }
    Ok(bin)
}

struct HubProc {
    child: tokio::process::Child,
    addr: std::net::SocketAddr,
    metrics: String,
}

impl HubProc {
    async fn start(log: Option<&std::path::Path>) -> anyhow::Result<HubProc> {
        let exe = hub_binary()?;
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).context("creating the hub log")?),
            None => Stdio::null(),
        };
        let mut child = tokio::process::Command::new(exe)
            .args(["hub", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .args(["--grace", "5", "--max-peers", "100000"])
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting the hub")?;
        let mut lines = BufReader::new(child.stdout.take().context("hub stdout")?).lines();
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || metrics.is_none() {
            let l = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
                .await
                .context("hub start")??
                .context("hub exited")?;
            if let Some(a) = l.strip_prefix("hub listening on ") {
                addr = Some(a.parse()?);
            } else if let Some(m) = l.strip_prefix("metrics on http://") {
                metrics = Some(m.trim_end_matches("/metrics").to_string());
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(HubProc {
            child,
            addr: addr.expect("set"),
            metrics: metrics.expect("set"),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The hub's metrics as `name{labels}` -> value.
    async fn metrics(&self) -> anyhow::Result<HashMap<String, f64>> {
        let mut s = tokio::net::TcpStream::connect(&self.metrics).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok(body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect())
    }

    async fn peers(&self) -> u64 {
        self.metrics()
            .await
            .ok()
            .and_then(|m| m.get("backchannel_hub_peers").copied())
            .unwrap_or(-1.0) as u64
    }

    /// Waits until the hub has `n` peers; fails after `limit`.
    async fn wait_peers(&self, n: u64, limit: Duration) -> anyhow::Result<()> {
        let t = Instant::now();
        loop {
            let p = self.peers().await;
            if p == n {
                return Ok(());
            }
            if t.elapsed() > limit {
                bail!("the hub has {p} peers, not {n}, after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// RSS once it has stopped falling (the hub trims its heap after peers
    /// leave), at most `limit` later.
    async fn settled_rss(&self, limit: Duration) -> u64 {
        let t = Instant::now();
        // The hub trims at most once a second, up to a second after a burst
        // of leaves: give it that before judging that RSS has settled.
        tokio::time::sleep(Duration::from_millis(2100).min(limit)).await;
        let mut last = self.rss_kib();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = self.rss_kib();
            if now >= last || t.elapsed() > limit {
                return now.min(last);
            }
            last = now;
        }
    }
}

// ---------------------------------------------------------------- helpers

fn to<T>(peer: &str, msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = peer.parse() {
        r.metadata_mut().insert("backchannel-peer", v);
    }
    r.set_timeout(timeout);
    r
}

fn echo(message: impl Into<String>, count: u32) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        count,
    }
}

fn pct(mut v: Vec<Duration>, p: usize) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    v[((v.len() * p).div_ceil(100)).max(1) - 1]
}

async fn connect_from(
    from: [u8; 4],
    to: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind((std::net::Ipv4Addr::from(from), 0).into())?;
    s.connect(to).await
}

async fn plain(addr: std::net::SocketAddr) -> anyhow::Result<EchoClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(EchoClient::new(ch))
}

/// A caller over a bare hyper connection from `from`: bodies are read only
/// when polled, so an unread stream stays stalled.
#[derive(Clone)]
struct RawH2(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

impl tower::Service<http::Request<tonic::body::Body>> for RawH2 {
    type Response = http::Response<tonic::body::Body>;
    type Error = hyper::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, hyper::Error>> + Send>>;
    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let f = self.0.send_request(req);
        Box::pin(async move { Ok(f.await?.map(tonic::body::Body::new)) })
    }
}

async fn raw_from(from: [u8; 4], addr: std::net::SocketAddr) -> anyhow::Result<EchoClient<RawH2>> {
    let tcp = connect_from(from, addr).await?;
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await?;
    tokio::spawn(conn);
    Ok(EchoClient::with_origin(
        RawH2(send),
        format!("http://{addr}").parse()?,
    ))
}

fn agent_cfg(hub: &HubProc, name: &str, svc: &str) -> AgentConfig {
    let mut c = AgentConfig::new(hub.addr.to_string(), name, svc);
    c.backoff_initial = Duration::from_millis(50);
    c.backoff_max = Duration::from_millis(500);
    c.grace = Duration::from_secs(5);
    c
}

async fn start_agent(hub: &HubProc, name: &str, svc: &str) -> anyhow::Result<Agent> {
    let a = Agent::start(agent_cfg(hub, name, svc))?;
    a.wait_sessions(1, Duration::from_secs(30)).await?;
    Ok(a)
}

// ---------------------------------------------------------------- phases

/// Phase 1: (served, others, p50, p99).
async fn flood(
    hub: &HubProc,
    n: usize,
    others: usize,
) -> anyhow::Result<(usize, usize, Duration, Duration)> {
    let addr = hub.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // The attacker: holds n connections, reopening those the hub closes.
    let attacker = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut held: Vec<tokio::task::JoinHandle<()>> = Vec::with_capacity(n);
            let open = |i: usize| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(mut s) = connect_from([127, 0, 0, 2], addr).await else {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        };
                        if i % 2 == 1 {
                            // Trickle: the first bytes of the magic, then nothing.
                            let _ = s.write_all(b"backc").await;
                        }
                        let mut b = [0u8; 64];
                        loop {
                            tokio::select! {
                                r = s.read(&mut b) => match r {
                                    Ok(0) | Err(_) => break,
                                    Ok(_) => {}
                                },
                                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                                    if stop.load(Ordering::Relaxed) { return; }
                                }
                            }
                        }
                        // Closed by the hub: reopen, a second later.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                })
            };
            for i in 0..n {
                held.push(open(i));
                if i % 500 == 499 {
                    tokio::task::yield_now().await;
                }
            }
            for h in held {
                let _ = h.await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut lat = Vec::new();
    let mut served = 0;
    let results = futures::stream::iter(0..others)
        .map(|i| async move {
            let from = [127, 0, 0, 3 + (i % 60) as u8];
            let t = Instant::now();
            // Connect, HTTP/2, and the hub's own health check: the
            // handshake, without the (busy) agent in this process.
            let call = async {
                let tcp = connect_from(from, addr).await.ok()?;
                let (send, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tcp),
                )
                .await
                .ok()?;
                tokio::spawn(conn);
                let origin = format!("http://{addr}").parse().ok()?;
                let mut h =
                    tonic_health::pb::health_client::HealthClient::with_origin(RawH2(send), origin);
                h.check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .ok()
            };
            let ok = tokio::time::timeout(Duration::from_secs(5), call)
                .await
                .ok()
                .flatten()
                .is_some();
            (ok, t.elapsed())
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for (ok, d) in results {
        if ok {
            served += 1;
            lat.push(d);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), attacker).await;
    Ok((served, others, pct(lat.clone(), 50), pct(lat, 99)))
}

/// Phase 2: RSS (start, peak, after) in KiB.
async fn fake_peers(hub: &HubProc, n: usize) -> anyhow::Result<(u64, u64, u64, u64)> {
    let before_peers = hub.peers().await;
    let start = hub.settled_rss(Duration::from_secs(3)).await;
    let addr = hub.addr.to_string();
    let clients = futures::stream::iter(0..n)
        .map(|_| {
            let addr = addr.clone();
            async move {
                backchannel::ClientBuilder::new()
                    .connect_tcp(&addr, tonic::service::Routes::new(EchoServer::new(Svc)))
                    .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let clients: Vec<_> = clients.into_iter().collect::<Result<_, _>>()?;
    hub.wait_peers(before_peers + n as u64, Duration::from_secs(60))
        .await?;
    let peak = hub.rss_kib();
    drop(clients);
    hub.wait_peers(before_peers, Duration::from_secs(60))
        .await?;
    let t = Instant::now();
    let after = hub.settled_rss(Duration::from_secs(10)).await;
    Ok((start, peak, after, t.elapsed().as_millis() as u64))
}

/// Phase 3: (baseline p99, p99 with 64 never-read streams open).
async fn slow_readers(hub: &HubProc) -> anyhow::Result<(Duration, Duration)> {
    let mut good = plain(hub.addr).await?;
    let run = |n: usize| {
        let mut g = good.clone();
        async move {
            let mut lat = Vec::new();
            for i in 0..n {
                let t = Instant::now();
                g.unary(to(
                    "soak-target",
                    echo(format!("m{i}"), 0),
                    Duration::from_secs(5),
                ))
                .await?;
                lat.push(t.elapsed());
            }
            Ok::<_, Status>(lat)
        }
    };
    let _ = run(50).await?;
    let base = pct(run(500).await?, 99);
    let mut slow = raw_from([127, 0, 0, 1], hub.addr).await?;
    let big = "x".repeat(64 * 1024);
    let mut stalled = Vec::new();
    for _ in 0..64 {
        stalled.push(
            slow.server_stream(to(
                "soak-target",
                echo(&big, 100_000),
                Duration::from_secs(600),
            ))
            .await?,
        );
    }
    // Let the windows fill: wait until the agent's bytes stop arriving.
    let key = "backchannel_hub_bytes_total{direction=\"from_peer\"}";
    let mut last = -1.0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = hub.metrics().await?.get(key).copied().unwrap_or(0.0);
        if now == last {
            break;
        }
        last = now;
    }
    let during = pct(run(500).await?, 99);
    drop(stalled);
    let _ = good
        .unary(to("soak-target", echo("x", 0), Duration::from_secs(5)))
        .await?;
    Ok((base, during))
}

// ---------------------------------------------------------------- phase 4: churn

const UP: u8 = 0;
const DRAINING: u8 = 1;
const STOPPED: u8 = 2;

struct Slot {
    name: String,
    state: AtomicU8,
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    ok: AtomicU64,
    never_read: AtomicU64,
    explained: AtomicU64,
    unexplained: AtomicU64,
    first_unexplained: Mutex<Vec<String>>,
    agents_started: AtomicU64,
    drained: AtomicU64,
    stopped: AtomicU64,
    superseded: AtomicU64,
    silent: AtomicU64,
}

impl Tally {
    fn outcome(&self, slot: &Slot, r: Result<(), Status>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let Err(s) = r else {
            self.ok.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let explained = match slot.state.load(Ordering::SeqCst) {
            STOPPED => true,
            DRAINING => {
                s.code() == Code::NotFound
                    || (s.code() == Code::Unavailable && s.message().contains("leaving"))
            }
            _ => false,
        };
        if explained {
            self.explained.fetch_add(1, Ordering::Relaxed);
        } else {
            self.unexplained.fetch_add(1, Ordering::Relaxed);
            let mut v = self
                .first_unexplained
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if v.len() < 10 {
                v.push(format!("{}: {:?} {}", slot.name, s.code(), s.message()));
            }
        }
    }
}

type Live = Arc<Mutex<Vec<Arc<Slot>>>>;

fn pick(live: &Live, rng: &mut backchannel_testkit::Rng) -> Option<Arc<Slot>> {
    let l = live.lock().unwrap_or_else(|e| e.into_inner());
    let up: Vec<&Arc<Slot>> = l
        .iter()
        .filter(|s| s.state.load(Ordering::SeqCst) == UP)
        .collect();
    (!up.is_empty()).then(|| up[rng.below(up.len())].clone())
}

fn set_live(live: &Live, slot: Arc<Slot>) {
    let mut l = live.lock().unwrap_or_else(|e| e.into_inner());
    l.retain(|s| {
        s.name != slot.name || s.state.load(Ordering::SeqCst) == UP && Arc::ptr_eq(s, &slot)
    });
    l.push(slot);
}

async fn agent_slot(
    hub: Arc<HubProc>,
    svc: String,
    k: usize,
    live: Live,
    tally: Arc<Tally>,
    end: Instant,
) -> anyhow::Result<()> {
    let mut rng = backchannel_testkit::Rng::from_time();
    let name = format!("agent-{k}");
    let new_slot = || {
        Arc::new(Slot {
            name: name.clone(),
            state: AtomicU8::new(UP),
        })
    };
    while Instant::now() < end {
        let a = start_agent(&hub, &name, &svc).await?;
        tally.agents_started.fetch_add(1, Ordering::Relaxed);
        let mut slot = new_slot();
        set_live(&live, slot.clone());
        let mut agent = a;
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(4000) as u64)).await;
        let how = rng.below(10);
        if how == 0 {
            // Superseded: a new session takes the name; the old one drains.
            let b = start_agent(&hub, &name, &svc).await?;
            tally.agents_started.fetch_add(1, Ordering::Relaxed);
            tally.superseded.fetch_add(1, Ordering::Relaxed);
            let newer = new_slot();
            slot.state.store(DRAINING, Ordering::SeqCst);
            set_live(&live, newer.clone());
            let _ = agent.drain().await;
            agent = b;
            slot = newer;
            tokio::time::sleep(Duration::from_millis(500 + rng.below(2000) as u64)).await;
        }
        if how <= 7 {
            slot.state.store(DRAINING, Ordering::SeqCst);
            let _ = agent.drain().await;
            tally.drained.fetch_add(1, Ordering::Relaxed);
        } else {
            slot.state.store(STOPPED, Ordering::SeqCst);
            agent.stop().await;
            tally.stopped.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(rng.below(500) as u64)).await;
    }
    Ok(())
}

async fn caller(
    hub: Arc<HubProc>,
    live: Live,
    tally: Arc<Tally>,
    end: Instant,
) -> anyhow::Result<()> {
    let mut rng = backchannel_testkit::Rng::from_time();
    let mut c = plain(hub.addr).await?;
    let t = Duration::from_secs(10);
    while Instant::now() < end {
        let Some(slot) = pick(&live, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let n = &slot.name;
        let op = rng.below(100);
        let r: Result<(), Status> = async {
            match op {
                0..=39 => c.unary(to(n, echo("hello", 0), t)).await.map(drop),
                40..=59 => {
                    let mut s = c
                        .server_stream(to(n, echo("s", 10 + rng.below(90) as u32), t))
                        .await?
                        .into_inner();
                    while s.message().await?.is_some() {}
                    Ok(())
                }
                60..=74 => {
                    let msgs = futures::stream::iter((0..20).map(|i| echo(format!("{i}"), 0)));
                    c.client_stream(to(n, msgs, t)).await.map(drop)
                }
                75..=89 => {
                    let msgs = futures::stream::iter((0..20).map(|i| echo(format!("{i}"), 0)));
                    let mut s = c.bidi(to(n, msgs, t)).await?.into_inner();
                    while s.message().await?.is_some() {}
                    Ok(())
                }
                90..=94 => c.unary(to(n, echo("sleep:300", 0), t)).await.map(drop),
                _ => {
                    // Never read: open a big stream, hold it, drop it.
                    let s = c
                        .server_stream(to(n, echo("x".repeat(16 * 1024), 100_000), t))
                        .await?;
                    tally.never_read.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500 + rng.below(1500) as u64)).await;
                    drop(s);
                    Ok(())
                }
            }
        }
        .await;
        tally.outcome(&slot, r);
    }
    Ok(())
}

async fn silent_arrivals(hub: Arc<HubProc>, tally: Arc<Tally>, end: Instant) {
    let mut rng = backchannel_testkit::Rng::from_time();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let from = [127, 0, 0, 2 + rng.below(8) as u8];
        let hold = Duration::from_millis(500 + rng.below(2500) as u64);
        let partial = rng.below(2) == 0;
        let addr = hub.addr;
        tally.silent.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Ok(mut s) = connect_from(from, addr).await {
                if partial {
                    let _ = s.write_all(b"backchan").await;
                }
                tokio::time::sleep(hold).await;
            }
        });
    }
}

// ---------------------------------------------------------------- run

/// Runs the soak; prints the report; fails if the hub did not recover.
pub async fn run(a: &SoakArgs) -> anyhow::Result<()> {
    let short = a.duration < Duration::from_secs(60);
    let agents = a.agents.unwrap_or(if short { 100 } else { 300 });
    let flood_n = a.flood.unwrap_or(if short { 2_000 } else { 10_000 });
    let fake_n = a.fake_peers.unwrap_or(if short { 2_000 } else { 10_000 });
    let nofile = sys::raise_nofile().unwrap_or((0, 0));

    let svc_l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let svc = svc_l.local_addr()?.to_string();
    let svc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(Svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(svc_l)),
    );
    let hub = Arc::new(HubProc::start(a.hub_log.as_deref()).await?);
    // Warm up with one agent and a call, then measure the start.
    let target = start_agent(&hub, "soak-target", &svc).await?;
    plain(hub.addr)
        .await?
        .unary(to("soak-target", echo("warm", 0), Duration::from_secs(5)))
        .await?;
    let rss0 = hub.settled_rss(Duration::from_secs(3)).await;
    let fds0 = hub.fds();
    println!(
        "soak: hub pid {}, RSS {} KiB, {} open files; RLIMIT_NOFILE {}",
        hub.pid(),
        rss0,
        fds0,
        nofile.1
    );

    let (served, others, f50, f99) = flood(&hub, flood_n, 500).await?;
    println!(
        "flood: one source holding {flood_n} silent/trickling connections: {served}/{others} new connections from other sources served ({:.1}%), connect + HTTP/2 + health check p50 {:.1} ms, p99 {:.1} ms",
        100.0 * served as f64 / others as f64,
        f50.as_secs_f64() * 1e3,
        f99.as_secs_f64() * 1e3
    );

    let (r_start, r_peak, r_after, trim_ms) = fake_peers(&hub, fake_n).await?;
    println!(
        "fake peers: {fake_n} HTTP/2 sessions that never announce joined and left: hub RSS {r_start} KiB -> {r_peak} KiB -> {r_after} KiB ({:+.1}% of the start, settled {trim_ms} ms after the last left)",
        100.0 * (r_after as f64 - r_start as f64) / r_start as f64
    );

    let (base, during) = slow_readers(&hub).await?;
    println!(
        "slow readers: other caller's p99 {:.2} ms, with 64 never-read streams to the same agent {:.2} ms ({:.2}x)",
        base.as_secs_f64() * 1e3,
        during.as_secs_f64() * 1e3,
        during.as_secs_f64() / base.as_secs_f64().max(1e-9)
    );
    target.drain().await;

    // Phase 4.
    let end = Instant::now() + a.duration;
    let live: Live = Arc::default();
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for k in 0..agents {
        tasks.push(tokio::spawn(agent_slot(
            hub.clone(),
            svc.clone(),
            k,
            live.clone(),
            tally.clone(),
            end,
        )));
    }
    for _ in 0..a.callers {
        tasks.push(tokio::spawn(caller(
            hub.clone(),
            live.clone(),
            tally.clone(),
            end,
        )));
    }
    let silent = tokio::spawn(silent_arrivals(hub.clone(), tally.clone(), end));
    let t0 = Instant::now();
    let mut peak_rss = 0;
    let mut failures = Vec::new();
    for t in tasks {
        while !t.is_finished() {
            peak_rss = peak_rss.max(hub.rss_kib());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Err(e) = t.await? {
            failures.push(format!("{e:#}"));
        }
    }
    let _ = silent.await;
    let took = t0.elapsed();
    let peers_left = hub.wait_peers(0, Duration::from_secs(30)).await;
    // Silent connections still held close within their hold time.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rss1 = hub.settled_rss(Duration::from_secs(10)).await;
    let fds1 = hub.fds();
    let m = hub.metrics().await.unwrap_or_default();
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0) as u64;
    let r = |o: &AtomicU64| o.load(Ordering::Relaxed);
    println!(
        "churn ({:.0} s, {agents} agent slots, {} callers): {} agent sessions ({} drained, {} stopped hard, {} superseded), {} calls ({} ok, {} explained errors, {} unexplained), {} never-read streams, {} silent connections",
        took.as_secs_f64(),
        a.callers,
        r(&tally.agents_started),
        r(&tally.drained),
        r(&tally.stopped),
        r(&tally.superseded),
        r(&tally.calls),
        r(&tally.ok),
        r(&tally.explained),
        r(&tally.unexplained),
        r(&tally.never_read),
        r(&tally.silent),
    );
    println!(
        "hub counters: evicted {}, refused (source limit) {}, refused (overload) {}, handshake timeouts {}, sniff timeouts {}",
        get("backchannel_hub_pending_evicted_total"),
        get("backchannel_hub_pending_refused_total{reason=\"source_limit\"}"),
        get("backchannel_hub_pending_refused_total{reason=\"overload\"}"),
        get("backchannel_hub_handshake_failures_total{reason=\"handshake_timeout\"}"),
        get("backchannel_hub_handshake_failures_total{reason=\"sniff_timeout\"}"),
    );
    println!(
        "end: peers {}, hub RSS {rss0} KiB at the start, {peak_rss} KiB peak during churn, {rss1} KiB at the end ({:+.1}%); open files {fds0} -> {fds1}",
        hub.peers().await,
        100.0 * (rss1 as f64 - rss0 as f64) / rss0 as f64
    );
    for u in tally
        .first_unexplained
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        println!("  unexplained: {u}");
    }
    svc_task.abort();

    let mut problems = failures;
    if r(&tally.unexplained) > 0 {
        problems.push(format!("{} unexplained errors", r(&tally.unexplained)));
    }
    if let Err(e) = peers_left {
        problems.push(format!("registry not empty: {e:#}"));
    }
    if rss1 as f64 > rss0 as f64 * 1.5 + 8192.0 {
        problems.push(format!("RSS {rss1} KiB not back near {rss0} KiB"));
    }
    if fds1 > fds0 + 16 {
        problems.push(format!("{fds1} open files, {fds0} at the start"));
    }
    if served * 100 < others * 99 {
        problems.push(format!("flood: only {served}/{others} served"));
    }
    if !problems.is_empty() {
        bail!("soak failed: {}", problems.join("; "));
    }
    println!("soak: OK");
    Ok(())
}
