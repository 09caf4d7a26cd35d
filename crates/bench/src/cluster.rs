//! `bench cluster`: three clustered hubs on one `redis-server` (started
//! here on a free loopback port unless `--redis` is given), in one run:
//! - a routed call to an agent on the same hub vs on another hub (one
//!   hub-to-hub hop): unary p50/p99 (1 KiB echo) and streaming throughput
//!   (download), interleaved so both see the same machine;
//! - registration: N peers spread over the three hubs, time until every
//!   name is recorded (routable from every hub), checked by real calls.

use std::{
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use backchannel_directory::{Directory, RedisConfig, RedisDirectory};
use backchannel_sidecar::{
    agent::{Agent, AgentConfig},
    hub::{cluster::ClusterConfig, Hub, HubConfig},
    pb::hub::{registration_client::RegistrationClient, AnnounceRequest},
};
use backchannel_testkit::{
    pb::bench::{bench_client::BenchClient, bench_server::BenchServer, DownloadRequest, Payload},
    BenchService,
};
use futures::StreamExt;
use tonic::{transport::Channel, Request};

use super::report::{new_histogram, record};

/// `bench cluster` options.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Peers registered over the three hubs.
    #[arg(long, default_value_t = 10_000)]
    pub peers: usize,
    /// Unary calls per path.
    #[arg(long, default_value_t = 2000)]
    pub calls: usize,
    /// Bytes per streaming download (each path, each of 3 rounds).
    #[arg(long, default_value = "128MiB", value_parser = super::parse_size)]
    pub bytes: u64,
    /// Use this Redis instead of starting `redis-server`.
    #[arg(long)]
    pub redis: Option<String>,
}

struct RedisChild(std::process::Child);
impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start_redis() -> anyhow::Result<(RedisChild, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    let child = RedisChild(child);
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((child, format!("redis://{addr}")))
}

async fn bench_service() -> anyhow::Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(BenchServer::new(BenchService))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l).map(|s| {
                s.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            })),
    );
    Ok(addr)
}

fn to<T>(peer: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("backchannel-peer", peer.parse().expect("ASCII name"));
    r
}

/// Runs `bench cluster`.
pub async fn run(a: &ClusterArgs) -> anyhow::Result<()> {
    let _ = super::sys::raise_nofile();
    let (_redis, url) = match &a.redis {
        Some(u) => (None, u.clone()),
        None => {
            let (c, u) = start_redis().await?;
            (Some(c), u)
        }
    };
    let ns = format!("bench{}", std::process::id());
    let token =
        std::env::temp_dir().join(format!("backchannel-bench-cluster-{}", std::process::id()));
    std::fs::write(&token, "bench-cluster-token-0123456789")?;
    let mut hubs = Vec::new();
    for id in ["a", "b", "c"] {
        let mut c = ClusterConfig::new(url.clone(), "127.0.0.1:0");
        c.hub_id = id.into();
        c.namespace = ns.clone();
        c.token_file = Some(token.clone());
        hubs.push(
            Hub::start(HubConfig {
                cluster: Some(c),
                max_peers: a.peers + 100,
                isolated_callers_per_peer: 0,
                ..Default::default()
            })
            .await?,
        );
    }
    let _ = std::fs::remove_file(&token);
    let addrs: Vec<String> = hubs
        .iter()
        .map(|h| h.addr.expect("tcp").to_string())
        .collect();

    // Same hub vs cross hub.
    let svc = bench_service().await?;
    let agent = Agent::start(AgentConfig::new(addrs[0].clone(), "svc", svc))?;
    agent.wait_sessions(1, Duration::from_secs(10)).await?;
    let same = Channel::from_shared(format!("http://{}", addrs[0]))?
        .connect()
        .await?;
    let cross = Channel::from_shared(format!("http://{}", addrs[1]))?
        .connect()
        .await?;
    let start = Instant::now();
    while BenchClient::new(cross.clone())
        .echo(to("svc", Payload::default()))
        .await
        .is_err()
    {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(10),
            "svc never routable from hub b"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let payload = Payload {
        data: vec![7u8; 1024].into(),
    };
    let (mut hs, mut hc) = (new_histogram(), new_histogram());
    for i in 0..a.calls + 100 {
        for (ch, h) in [(&same, &mut hs), (&cross, &mut hc)] {
            let t = Instant::now();
            BenchClient::new(ch.clone())
                .echo(to("svc", payload.clone()))
                .await?;
            if i >= 100 {
                record(h, t.elapsed());
            }
        }
    }
    let mut tput = [Vec::new(), Vec::new()];
    for _ in 0..3 {
        for (k, ch) in [&same, &cross].into_iter().enumerate() {
            let t = Instant::now();
            let mut s = BenchClient::new(ch.clone())
                .download(to(
                    "svc",
                    DownloadRequest {
                        bytes: a.bytes,
                        chunk_size: 64 << 10,
                    },
                ))
                .await?
                .into_inner();
            let mut got = 0u64;
            while let Some(m) = s.next().await {
                got += m?.data.len() as u64;
            }
            anyhow::ensure!(got == a.bytes, "download truncated: {got} of {}", a.bytes);
            tput[k].push(got as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64);
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (ts, tc) = (med(&mut tput[0]), med(&mut tput[1]));
    let p = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q);
    println!(
        "cluster: routed call, same hub vs cross hub (one hop), 3 hubs + redis on this machine"
    );
    println!(
        "  unary 1 KiB echo ({} calls each, interleaved): same p50 {} us p99 {} us | cross p50 {} us p99 {} us | cross/same p50 {:.2}x",
        a.calls,
        p(&hs, 0.5),
        p(&hs, 0.99),
        p(&hc, 0.5),
        p(&hc, 0.99),
        p(&hc, 0.5) as f64 / p(&hs, 0.5).max(1) as f64
    );
    println!(
        "  download {} MiB (median of 3): same {:.0} MiB/s | cross {:.0} MiB/s | cross/same {:.2}x",
        a.bytes >> 20,
        ts,
        tc,
        tc / ts.max(1e-9)
    );
    agent.stop().await;

    // Registration of many peers over the three hubs.
    let dir = RedisDirectory::start(RedisConfig {
        namespace: ns.clone(),
        ..RedisConfig::new(url.clone())
    })?;
    // Baseline in the same run: the same registrations on three hubs that
    // are not clustered.
    let mut solo = Vec::new();
    for _ in 0..3 {
        solo.push(
            Hub::start(HubConfig {
                max_peers: a.peers + 100,
                ..Default::default()
            })
            .await?,
        );
    }
    let solo_addrs: Vec<String> = solo
        .iter()
        .map(|h| h.addr.expect("tcp").to_string())
        .collect();
    let t = Instant::now();
    let base = register(&solo_addrs, a.peers).await;
    let base_secs = t.elapsed().as_secs_f64();
    let base_n = base.len();
    for c in &base {
        c.close();
    }
    drop(base);
    for h in solo {
        h.shutdown().await;
    }
    let start = Instant::now();
    let clients = register(&addrs, a.peers).await;
    let announced = start.elapsed();
    let n = clients.len();
    loop {
        let listed = dir.list().await.map(|v| v.len()).unwrap_or(0);
        if listed >= n {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "only {listed} of {n} names recorded"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recorded = start.elapsed();
    // Every name from a hub that does not hold it (a real call each).
    let chans: Vec<Channel> = {
        let mut v = Vec::new();
        for a in &addrs {
            v.push(
                Channel::from_shared(format!("http://{a}"))?
                    .connect()
                    .await?,
            );
        }
        v
    };
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    futures::stream::iter(0..a.peers)
        .for_each_concurrent(128, |i| {
            let ch = chans[(i + 1) % 3].clone();
            let failures = failures.clone();
            async move {
                let r = BenchClient::new(ch)
                    .echo(to(&format!("r{i}"), Payload::default()))
                    .await;
                if r.is_err() {
                    failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
        .await;
    let routable = start.elapsed();
    println!(
        "  registration baseline (3 hubs, no cluster): {base_n} of {} peers announced in {base_secs:.2} s",
        a.peers
    );
    println!(
        "  registration: {n} of {} peers over 3 hubs announced in {:.2} s ({:.2}x the baseline), all recorded (routable from every hub) at {:.2} s; a cross-hub call to each announced name: done at {:.2} s, {} failed",
        a.peers,
        announced.as_secs_f64(),
        announced.as_secs_f64() / base_secs.max(1e-9),
        recorded.as_secs_f64(),
        routable.as_secs_f64(),
        // The names that never announced fail NOT_FOUND, as they should.
        failures
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(a.peers - n)
    );
    for c in &clients {
        c.close();
    }
    for h in hubs {
        h.shutdown().await;
    }
    Ok(())
}

/// `n` backchannel clients announcing `r0`..`rN` over `addrs` in turn
/// (128 at a time): the ones that announced.
async fn register(addrs: &[String], n: usize) -> Vec<backchannel::Client> {
    let clients = Arc::new(tokio::sync::Mutex::new(Vec::with_capacity(n)));
    futures::stream::iter(0..n)
        .for_each_concurrent(128, |i| {
            let addr = addrs[i % addrs.len()].clone();
            let clients = clients.clone();
            async move {
                let routes = tonic::service::Routes::new(BenchServer::new(BenchService));
                let Ok(c) = backchannel::ClientBuilder::new()
                    .connect_tcp(&addr, routes)
                    .await
                else {
                    return;
                };
                let r = RegistrationClient::new(c.channel())
                    .announce(AnnounceRequest {
                        name: format!("r{i}"),
                        labels: Default::default(),
                    })
                    .await;
                if r.is_ok() {
                    clients.lock().await.push(c);
                }
            }
        })
        .await;
    let v = std::mem::take(&mut *clients.lock().await);
    v
}
