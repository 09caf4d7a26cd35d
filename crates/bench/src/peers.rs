//! `bench peers N`: N idle backchannel peers on one server. The clients run
//! in a child process of this binary (`peers-child`) so the server's
//! RSS is measured alone.

use std::{
    collections::HashSet,
    process::Stdio,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{
    paths,
    report::{new_histogram, record},
    sys, workload, PeersArgs,
};
use backchannel_testkit::pb::bench;

/// What `peers` measured.
pub struct PeersResult {
    /// Peers connected.
    pub peers: usize,
    /// Seconds from the first connect to the N-th registered peer.
    pub connect_secs: f64,
    /// Server RSS growth per idle peer, bytes.
    pub server_bytes_per_peer: f64,
    /// Client-process RSS growth per peer, bytes (0 in-process).
    pub client_bytes_per_peer: f64,
    /// Reverse-call latency (first call on a peer: opens a yamux stream and
    /// an h2 connection), p50/p99/max us.
    pub cold: (u64, u64, u64),
    /// Reverse-call latency on an already open backchannel, p50/p99/max us.
    pub warm: (u64, u64, u64),
    /// Server RSS growth per peer that has an open reverse channel, bytes.
    pub server_bytes_per_called_peer: f64,
    /// Reverse calls made (cold + warm).
    pub calls: usize,
    /// The file-descriptor limit (old, raised).
    pub nofile: (u64, u64),
}

impl PeersResult {
    /// Connect rate, peers per second.
    pub fn rate(&self) -> f64 {
        self.peers as f64 / self.connect_secs.max(1e-9)
    }

    /// Human-readable report.
    pub fn text(&self) -> String {
        format!(
            "peers: {} connected in {:.2} s = {:.0} peers/s (target >= 2000/s)\n\
             server RSS per idle peer: {:.1} KiB (target <= 32 KiB); client process: {:.1} KiB/peer\n\
             reverse calls to random peers (1 KiB echo, sequential, {} calls):\n\
             \x20 first call on a peer (opens stream + h2): p50 {} us, p99 {} us, max {} us\n\
             \x20 later calls:                               p50 {} us, p99 {} us, max {} us\n\
             server RSS per peer with an open reverse channel: {:.1} KiB\n\
             RLIMIT_NOFILE raised in-process from {} to {}\n",
            self.peers,
            self.connect_secs,
            self.rate(),
            self.server_bytes_per_peer / 1024.0,
            self.client_bytes_per_peer / 1024.0,
            self.calls,
            self.cold.0,
            self.cold.1,
            self.cold.2,
            self.warm.0,
            self.warm.1,
            self.warm.2,
            self.server_bytes_per_called_peer / 1024.0,
            self.nofile.0,
            self.nofile.1,
        )
    }

    /// One JSON line.
    pub fn json(&self) -> String {
        serde_json::json!({
            "kind": "peers",
            "peers": self.peers,
            "connect_secs": self.connect_secs,
            "connect_per_sec": self.rate(),
            "server_rss_bytes_per_idle_peer": self.server_bytes_per_peer,
            "client_rss_bytes_per_peer": self.client_bytes_per_peer,
            "reverse_cold_p50_us": self.cold.0,
            "reverse_cold_p99_us": self.cold.1,
            "reverse_cold_max_us": self.cold.2,
            "reverse_warm_p50_us": self.warm.0,
            "reverse_warm_p99_us": self.warm.1,
            "reverse_warm_max_us": self.warm.2,
            "server_rss_bytes_per_called_peer": self.server_bytes_per_called_peer,
            "nofile": self.nofile.1,
            "path": "backchannel",
        })
        .to_string()
    }
}

/// Connects `n` backchannel clients to `addr`, `concurrency` at a time;
/// `done` counts them. Returns the clients (dropping them disconnects).
pub async fn connect_peers(
    addr: &str,
    n: usize,
    concurrency: usize,
    window: Option<u32>,
    done: Arc<AtomicUsize>,
) -> anyhow::Result<Vec<backchannel::Client>> {
    let (_, cfg) = paths::session_configs(window);
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..concurrency.clamp(1, n.max(1)))
        .map(|_| {
            let (addr, cfg, next, done) =
                (addr.to_string(), cfg.clone(), next.clone(), done.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    mine.push(paths::bc_client(&addr, cfg.clone()).await?);
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(mine)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.context("connect task panicked")??);
    }
    Ok(all)
}

/// The child process: connects, reports on stdout, waits for stdin to close.
pub async fn child(
    addr: String,
    n: usize,
    concurrency: usize,
    window: Option<u32>,
) -> anyhow::Result<()> {
    let _ = sys::raise_nofile();
    sys::trim_heap();
    let rss0 = sys::rss_kib();
    println!("start");
    let done = Arc::new(AtomicUsize::new(0));
    let clients = match connect_peers(&addr, n, concurrency, window, done).await {
        Ok(c) => c,
        Err(e) => {
            println!("error {e:#}");
            bail!(e);
        }
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    sys::trim_heap();
    let rss1 = sys::rss_kib();
    println!("ready {} {}", clients.len(), rss1.saturating_sub(rss0));
    let mut stdin = BufReader::new(tokio::io::stdin());
    let mut line = String::new();
    let _ = stdin.read_line(&mut line).await;
    drop(clients);
    Ok(())
}

/// Runs `peers N`.
pub async fn run(a: &PeersArgs, quiet: bool) -> anyhow::Result<PeersResult> {
    let nofile = sys::raise_nofile().unwrap_or((0, 0));
    let n = a.n;
    let window = a.window.map(|w| w as u32);
    let (server_cfg, _) = paths::session_configs(window);
    let server = paths::bc_server(server_cfg).await?;
    // Warm the allocator and runtime with one peer before the baseline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    sys::trim_heap();
    let rss0 = sys::rss_kib();

    let mut child = None;
    let mut in_process = None;
    let mut in_process_clients = None;
    let done = Arc::new(AtomicUsize::new(0));
    let t0;
    let mut client_kib = 0u64;
    if a.in_process {
        t0 = Instant::now();
        let addr = server.addr.clone();
        let d = done.clone();
        let conc = a.concurrency;
        in_process = Some(tokio::spawn(async move {
            connect_peers(&addr, n, conc, window, d).await
        }));
    } else {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(["peers-child", "--addr", &server.addr])
            .args([
                "-n",
                &n.to_string(),
                "--concurrency",
                &a.concurrency.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(w) = window {
            cmd.args(["--window", &w.to_string()]);
        }
        let mut c = cmd.spawn().context("starting the client process")?;
        let mut lines = BufReader::new(c.stdout.take().context("child stdout")?).lines();
        match lines.next_line().await? {
            Some(l) if l == "start" => {}
            other => bail!("client process did not start: {other:?}"),
        }
        t0 = Instant::now();
        child = Some((c, lines));
    }

    // Wait until the server has registered all N peers.
    let limit = Duration::from_secs(60 + n as u64 / 100);
    let mut last_print = Instant::now();
    while server.registry.len() < n {
        if t0.elapsed() > limit {
            bail!(
                "only {} of {n} peers registered after {:?}",
                server.registry.len(),
                limit
            );
        }
        if in_process.as_ref().is_some_and(|t| t.is_finished()) {
            if let Some(t) = in_process.take() {
                in_process_clients = Some(t.await.context("connect task")??);
            }
        }
        if let Some((c, _)) = &mut child {
            if let Some(status) = c.try_wait()? {
                bail!("client process exited early ({status})");
            }
        }
        if !quiet && last_print.elapsed() > Duration::from_millis(500) {
            eprintln!(
                "peers: {} registered after {:.1} s",
                server.registry.len(),
                t0.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    if let Some(t) = in_process.take() {
        in_process_clients = Some(t.await.context("connect task")??);
    }
    let _clients = in_process_clients;
    if let Some((_, lines)) = &mut child {
        loop {
            match lines.next_line().await? {
                Some(l) if l.starts_with("ready ") => {
                    client_kib = l
                        .split_whitespace()
                        .nth(2)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    break;
                }
                Some(l) if l.starts_with("error ") => bail!("client process: {l}"),
                Some(_) => continue,
                None => bail!("client process ended early"),
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    sys::trim_heap();
    let rss1 = sys::rss_kib();

    // Reverse calls to random peers: first a cold call on each chosen peer
    // (opens a yamux stream and an h2 connection), then a warm one.
    let ids: Vec<backchannel::PeerId> = server.registry.list().iter().map(|p| p.id).collect();
    let mut rng = backchannel_testkit::Rng::from_time();
    let want = a.calls.min(ids.len());
    let mut chosen = Vec::with_capacity(want);
    let mut seen = HashSet::new();
    while chosen.len() < want {
        let id = ids[rng.below(ids.len())];
        if seen.insert(id) {
            chosen.push(id);
        }
    }
    let payload = backchannel_testkit::pattern(0, 1024);
    let (mut cold, mut warm) = (new_histogram(), new_histogram());
    let mut clients = Vec::with_capacity(want);
    for &id in &chosen {
        let mut c = workload::client(workload::conn(server.registry.backchannel(id)?));
        let t = Instant::now();
        let r = c
            .echo(bench::Payload {
                data: payload.clone(),
            })
            .await
            .with_context(|| format!("reverse call to peer {id}"))?;
        record(&mut cold, t.elapsed());
        anyhow::ensure!(
            r.get_ref().data == payload,
            "reverse echo returned other bytes"
        );
        clients.push(c);
    }
    for _ in 0..want {
        let c = &mut clients[rng.below(want)];
        let t = Instant::now();
        c.echo(bench::Payload {
            data: payload.clone(),
        })
        .await?;
        record(&mut warm, t.elapsed());
    }
    sys::trim_heap();
    let rss2 = sys::rss_kib();
    if let Some((mut c, _)) = child.take() {
        if let Some(mut stdin) = c.stdin.take() {
            let _ = stdin.write_all(b"bye\n").await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), c.wait()).await;
    }
    let q = |h: &hdrhistogram::Histogram<u64>| {
        (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max())
    };
    Ok(PeersResult {
        peers: n,
        connect_secs,
        server_bytes_per_peer: rss1.saturating_sub(rss0) as f64 * 1024.0 / n.max(1) as f64,
        client_bytes_per_peer: client_kib as f64 * 1024.0 / n.max(1) as f64,
        cold: q(&cold),
        warm: q(&warm),
        server_bytes_per_called_peer: if want > 0 {
            rss2.saturating_sub(rss1) as f64 * 1024.0 / want as f64
        } else {
            0.0
        },
        calls: 2 * want,
        nofile,
    })
}
