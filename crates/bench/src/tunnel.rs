//! `backchannel-bench tunnel`: bytes through a tunnel against a raw TCP
//! socket on loopback, in the same run: direct TCP, one library tunnel on
//! a backchannel session, caller → hub → agent → service (the sidecar's
//! `backchannel tunnel` path), and a chain of two `socat -b 262144`
//! relays when socat is installed. MB/s and CPU seconds per GB (this
//! process, plus the socat processes for the chain).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::sys;

/// `bench tunnel` options.
#[derive(Args, Debug, Clone)]
pub struct TunnelBenchArgs {
    /// Bytes per measurement.
    #[arg(long, default_value = "1GiB", value_parser = crate::parse_size)]
    pub total: u64,
    /// Rounds (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// yamux stream window of the library-tunnel session (both sides;
    /// default: the sessions' default, 4 MiB).
    #[arg(long, value_parser = crate::parse_size)]
    pub window: Option<u64>,
    /// Only the cases whose name contains one of these (comma-separated;
    /// `direct tcp` always runs: it is the baseline), e.g. `library`.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

const CHUNK: usize = 256 * 1024;

/// A sink: counts to EOF, then closes.
async fn sink() -> anyhow::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = l.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tcp.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// Writes `total` bytes, shuts down, waits for the other end's EOF.
async fn push<R, W>(mut r: R, mut w: W, total: u64) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let buf = vec![0x5au8; CHUNK];
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    w.shutdown().await?;
    let mut end = [0u8; 1];
    let n = r.read(&mut end).await?;
    anyhow::ensure!(n == 0, "unexpected bytes back");
    Ok(())
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Sample {
    secs: f64,
    cpu: f64,
}

async fn measure<F: std::future::Future<Output = anyhow::Result<()>>>(
    f: F,
) -> anyhow::Result<Sample> {
    let (c0, k0) = (sys::cpu_seconds(), children_cpu());
    let t = Instant::now();
    f.await?;
    let secs = t.elapsed().as_secs_f64();
    Ok(Sample {
        secs,
        cpu: sys::cpu_seconds() - c0 + children_cpu() - k0,
    })
}

async fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port())
}

/// Starts `socat -b 262144 TCP-LISTEN:port TCP:to` (one connection) and
/// waits until it listens.
async fn socat(to: &str) -> anyhow::Result<(tokio::process::Child, String)> {
    let port = free_port().await?;
    let child = tokio::process::Command::new("socat")
        .args([
            "-b",
            "262144",
            &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"),
            &format!("TCP:{to}"),
        ])
        .kill_on_drop(true)
        .spawn()
        .context("starting socat")?;
    let addr = format!("127.0.0.1:{port}");
    let start = Instant::now();
    // socat exposes no readiness signal: probe with a connection attempt
    // only when its listen socket shows up in /proc/net/tcp.
    loop {
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if tcp.contains(&format!(":{port:04X} 00000000:0000 0A")) {
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(5),
            "socat did not listen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok((child, addr))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the comparison and prints a table.
pub async fn run(a: &TunnelBenchArgs) -> anyhow::Result<()> {
    let total = a.total;
    let sink_addr = sink().await?;

    // The library tunnel: a server whose "sink" service counts to EOF.
    let registry = backchannel::Registry::new();
    let sink_tunnels = backchannel::Tunnels::new().handle("sink", |t| async move {
        if let Ok(mut t) = t.accept().await {
            let mut buf = vec![0u8; CHUNK];
            while let Ok(n) = t.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            let _ = t.shutdown().await;
        }
    });
    let (mut server_config, mut client_config) = (
        backchannel::SessionConfig::server(),
        backchannel::SessionConfig::client(),
    );
    if let Some(w) = a.window {
        server_config = server_config.with_window(w as u32);
        client_config = client_config.with_window(w as u32);
    }
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let srv_addr = l.local_addr()?.to_string();
    let incoming = listenmux::ListenMux::builder()
        .handshaker(
            backchannel::ServerHandshaker::new(registry.clone(), server_config)
                .tunnels(sink_tunnels),
        )
        .build()
        .incoming(l);
    let health = tonic_health::server::health_reporter().1;
    let server = tokio::spawn(async move {
        let _ = listenmux::server_builder()
            .add_service(health)
            .serve_with_incoming(incoming)
            .await;
    });
    let client = backchannel::ClientBuilder::new()
        .config(client_config)
        .connect_tcp(
            &srv_addr,
            tonic::service::Routes::new(tonic_health::server::health_reporter().1),
        )
        .await?;

    // The sidecar path.
    let hub = backchannel_sidecar::hub::Hub::start(Default::default()).await?;
    let hub_addr = hub.addr.context("hub address")?.to_string();
    let mut acfg =
        backchannel_sidecar::agent::AgentConfig::new(hub_addr.clone(), "bench", "127.0.0.1:1");
    acfg.expose_tcp = vec![("sink".into(), sink_addr.clone())];
    let agent = backchannel_sidecar::agent::Agent::start(acfg)?;
    hub.wait_for_name("bench", Duration::from_secs(10))
        .await
        .context("the agent did not announce")?;
    let dialer = backchannel_sidecar::tunnel::cli::Dialer::new(
        &backchannel_sidecar::tunnel::cli::TunnelArgs {
            hub: hub_addr,
            peer: "bench".into(),
            service: "sink".into(),
            listen: None,
            stdio: true,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
            token_file: None,
            timeout: Duration::from_secs(10),
        },
    )?;
    let have_socat = std::process::Command::new("socat")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

    let cases: &[&str] = if have_socat {
        &[
            "direct tcp",
            "library tunnel",
            "hub+agent tunnel",
            "2x socat -b 262144",
        ]
    } else {
        &["direct tcp", "library tunnel", "hub+agent tunnel"]
    };
    let cases: Vec<&str> = cases
        .iter()
        .copied()
        .filter(|c| {
            *c == "direct tcp" || a.only.is_empty() || a.only.iter().any(|o| c.contains(o.as_str()))
        })
        .collect();
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); cases.len()];
    for _round in 0..a.rounds {
        for (i, case) in cases.iter().enumerate() {
            let s = match *case {
                "direct tcp" => {
                    measure(async {
                        let tcp = TcpStream::connect(&sink_addr).await?;
                        tcp.set_nodelay(true)?;
                        let (r, w) = tcp.into_split();
                        push(r, w, total).await
                    })
                    .await?
                }
                "library tunnel" => {
                    measure(async {
                        let t = client
                            .open_tunnel(backchannel::TunnelRequest::new("sink"))
                            .await?;
                        let (r, w) = tokio::io::split(t);
                        push(r, w, total).await
                    })
                    .await?
                }
                "hub+agent tunnel" => {
                    measure(async {
                        let (r, w) = dialer.open().await?;
                        push(r, w, total).await
                    })
                    .await?
                }
                _ => {
                    let (mut second, second_addr) = socat(&sink_addr).await?;
                    let (mut first, first_addr) = socat(&second_addr).await?;
                    let s = measure(async {
                        let tcp = TcpStream::connect(&first_addr).await?;
                        tcp.set_nodelay(true)?;
                        let (r, w) = tcp.into_split();
                        push(r, w, total).await?;
                        // Their CPU counts once they are reaped.
                        first.wait().await?;
                        second.wait().await?;
                        Ok(())
                    })
                    .await?;
                    s
                }
            };
            results[i].0.push(total as f64 / s.secs / 1e6);
            results[i].1.push(s.cpu / (total as f64 / 1e9));
        }
    }
    let base = median(results[0].0.clone());
    println!(
        "tunnel bench: {} per measurement, {} rounds (medians; ratio to direct tcp in the same run)",
        total, a.rounds
    );
    println!(
        "{:<22} {:>10} {:>8} {:>12}",
        "path", "MB/s", "ratio", "CPU s/GB"
    );
    for (i, case) in cases.iter().enumerate() {
        let mbps = median(results[i].0.clone());
        let cpu = median(results[i].1.clone());
        println!("{case:<22} {mbps:>10.0} {:>8.2} {cpu:>12.2}", mbps / base);
    }
    if cases.contains(&"library tunnel") {
        let st = client.session_stats();
        println!(
            "library tunnel session (client side): {} window stalls, send window {}, rtt {:?}",
            st.window_stalls, st.send_window, st.rtt
        );
    }
    if !have_socat && a.only.is_empty() {
        println!("(socat not installed: no socat chain)");
    }
    agent.stop().await;
    hub.shutdown().await;
    client.close();
    server.abort();
    Ok(())
}
