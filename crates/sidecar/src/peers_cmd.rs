//! `backchannel peers`: the hub's admin view in a terminal (`Peers.List`),
//! as a table or JSON, once or refreshed with `--watch`.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! use backchannel_sidecar::peers_cmd::{fetch, render_table};
//! let peers = fetch(&"127.0.0.1:7000".parse()?, &Default::default()).await?;
//! print!("{}", render_table(&peers));
//! # Ok(()) }
//! ```

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::{
    addr::Target,
    pb::hub::{peers_client::PeersClient, ListPeersRequest, Peer},
};

/// Command-line flags of `backchannel peers`.
#[derive(clap::Args, Debug, Clone)]
pub struct PeersArgs {
    /// The hub: `host:port`, `tcp://host:port` or `unix:PATH`.
    #[arg(long, value_name = "ADDR", value_parser = crate::hub::flags::hub_addr)]
    pub hub: String,
    /// Refresh the view every --interval until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: seconds between refreshes (or 500ms, 1m).
    #[arg(long, value_name = "SECONDS", default_value = "2", value_parser = crate::hub::flags::backoff_seconds)]
    pub interval: Duration,
    /// JSON instead of a table (with --watch: one JSON document per line).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: AdminConn,
}

/// How to reach the hub's admin API: TLS and a bearer token.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AdminConn {
    /// PEM CA certificate(s) to verify the hub with: enables TLS.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate (an admin identity on hubs with a policy).
    #[arg(long, value_name = "FILE", requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The hub's name in its certificate (default: the host part of --hub).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// A file holding an admin bearer token (sent only over TLS, or to a
    /// loopback or Unix-socket hub).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// Runs the command: prints the peers once, or every interval.
pub async fn run(args: PeersArgs) -> anyhow::Result<()> {
    let hub: Target = args.hub.parse()?;
    loop {
        let peers = fetch(&hub, &args.conn).await?;
        let out = if args.json {
            let doc = serde_json::Value::Array(peers.iter().map(peer_json).collect());
            if args.watch {
                format!("{doc}\n")
            } else {
                format!("{doc:#}\n")
            }
        } else {
            render_table(&peers)
        };
        if args.watch && !args.json && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            // Clear the screen and home the cursor: a live view.
            print!("\x1b[2J\x1b[H");
        }
        print!("{out}");
        if !args.watch {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = crate::signal::shutdown() => return Ok(()),
        }
    }
}

/// Calls `Peers.List` on `hub`.
pub async fn fetch(hub: &Target, conn: &AdminConn) -> anyhow::Result<Vec<Peer>> {
    let channel = connect(hub, conn).await?;
    let mut client = PeersClient::new(channel);
    let mut req = tonic::Request::new(ListPeersRequest::default());
    if let Some(path) = &conn.token_file {
        crate::agent::token::check_transport(hub, conn.tls_ca.is_some())?;
        let token = crate::agent::token::read(path)?;
        req.metadata_mut().insert(
            crate::hub::identity::AUTHORIZATION,
            crate::agent::token::header_value(&token)?,
        );
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), client.list(req))
        .await
        .map_err(|_| anyhow::anyhow!("Peers.List on {hub}: no answer within 10 s"))?
        .map_err(|s| anyhow::anyhow!("Peers.List on {hub}: {:?}: {}", s.code(), s.message()))?;
    Ok(resp.into_inner().peers)
}

async fn connect(hub: &Target, conn: &AdminConn) -> anyhow::Result<Channel> {
    let ep = Endpoint::from_static("http://localhost").connect_timeout(Duration::from_secs(10));
    let tls = match &conn.tls_ca {
        None => None,
        Some(ca) => {
            let cert_key = conn.tls_cert.as_deref().zip(conn.tls_key.as_deref());
            let mut cfg = (*crate::tls::client_config(ca, cert_key)?).clone();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            let name = conn
                .tls_server_name
                .clone()
                .or_else(|| hub.host().map(str::to_string))
                .unwrap_or_else(|| "localhost".into());
            let name = rustls_pki_types::ServerName::try_from(name)
                .context("--tls-server-name: not a valid DNS name or IP address")?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), name))
        }
    };
    let target = hub.clone();
    let channel = ep
        .connect_with_connector(tower::service_fn(move |_| {
            let (hub, tls) = (target.clone(), tls.clone());
            async move {
                let io: Box<dyn listenmux::Io> = match &hub {
                    Target::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
                    Target::Tcp { host, port } => {
                        let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                        s.set_nodelay(true)?;
                        Box::new(s)
                    }
                };
                let io: Box<dyn listenmux::Io> = match tls {
                    None => io,
                    Some((connector, name)) => Box::new(connector.connect(name, io).await?),
                };
                Ok::<_, std::io::Error>(TokioIo::new(io))
            }
        }))
        .await
        .with_context(|| format!("connecting to the hub at {hub}"))?;
    Ok(channel)
}

/// A peer as a JSON object (durations in microseconds, bytes as numbers).
pub fn peer_json(p: &Peer) -> serde_json::Value {
    let flow = p.flow.unwrap_or_default();
    serde_json::json!({
        "id": p.id,
        "name": p.name,
        "generation": p.generation,
        "identity": p.identity,
        "labels": p.labels,
        "remote_addr": p.remote_addr,
        "connected_since": p.connected_since.map(|t| t.to_string()),
        "calls_in_flight": p.calls_in_flight,
        "calls_total": p.calls_total,
        "bytes_to_peer": p.bytes_to_peer,
        "bytes_from_peer": p.bytes_from_peer,
        "flow": p.flow.as_ref().map(|_| serde_json::json!({
            "rtt_us": flow.rtt_us,
            "send_window": flow.send_window,
            "recv_window": flow.recv_window,
            "bytes_in_flight": flow.bytes_in_flight,
            "send_ceiling_bytes_per_sec": flow.send_ceiling_bytes_per_sec,
            "recv_ceiling_bytes_per_sec": flow.recv_ceiling_bytes_per_sec,
            "buffered": flow.buffered,
            "max_buffered": flow.max_buffered,
            "window_stalls": flow.window_stalls,
            "windows_grown": flow.windows_grown,
            "streams": flow.streams,
        })),
    })
}

/// The peers as an aligned text table, one row per peer.
pub fn render_table(peers: &[Peer]) -> String {
    let header = [
        "NAME", "ID", "GEN", "LABELS", "ADDRESS", "SINCE", "INFLIGHT", "CALLS", "TO", "FROM",
        "RTT", "CEILING",
    ];
    let now = std::time::SystemTime::now();
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for p in peers {
        let mut labels: Vec<_> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let since = p
            .connected_since
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .and_then(|t| now.duration_since(t).ok())
            .map_or_else(|| "-".into(), human_duration);
        let flow = p.flow.unwrap_or_default();
        rows.push(vec![
            if p.name.is_empty() {
                "-".into()
            } else {
                p.name.clone()
            },
            p.id.to_string(),
            p.generation.to_string(),
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
            if p.remote_addr.is_empty() {
                "-".into()
            } else {
                p.remote_addr.clone()
            },
            since,
            p.calls_in_flight.to_string(),
            p.calls_total.to_string(),
            human_bytes(p.bytes_to_peer),
            human_bytes(p.bytes_from_peer),
            if flow.rtt_us == 0 {
                "-".into()
            } else {
                human_rtt(flow.rtt_us)
            },
            if flow.send_ceiling_bytes_per_sec == 0 {
                "-".into()
            } else {
                format!("{}/s", human_bytes(flow.send_ceiling_bytes_per_sec))
            },
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn human_rtt(us: u64) -> String {
    if us < 1000 {
        format!("{us}us")
    } else if us < 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{}ms", us / 1000)
    }
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::hub::SessionFlow;

    #[test]
    fn the_table_aligns_and_shows_the_flow() {
        let p = Peer {
            id: 3,
            name: "db".into(),
            generation: 2,
            remote_addr: "10.0.0.7:51000".into(),
            calls_total: 12,
            bytes_to_peer: 3 * 1024 * 1024,
            flow: Some(SessionFlow {
                rtt_us: 80_000,
                send_ceiling_bytes_per_sec: 50 * 1024 * 1024,
                ..Default::default()
            }),
            ..Default::default()
        };
        let t = render_table(&[
            p,
            Peer {
                id: 4,
                ..Default::default()
            },
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME  ID  GEN"), "{t}");
        assert!(
            lines[1].contains("3.0 MiB") && lines[1].contains("80ms"),
            "{t}"
        );
        assert!(lines[1].contains("50.0 MiB/s"), "{t}");
        assert!(lines[2].starts_with("-     4"), "{t}");
        // Columns line up: the ID column starts at the same place.
        let col = |l: &str| l.find(char::is_numeric).unwrap();
        assert_eq!(col(lines[1]), col(lines[2]));
        let j = peer_json(&Peer {
            id: 4,
            ..Default::default()
        });
        assert_eq!(j["id"], 4);
        assert!(j["flow"].is_null());
    }

    #[test]
    fn units() {
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_rtt(250), "250us");
        assert_eq!(human_rtt(2500), "2.5ms");
        assert_eq!(human_duration(Duration::from_secs(3725)), "1h2m");
    }
}
