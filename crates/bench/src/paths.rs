//! The paths under test, set up in-process on loopback TCP.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context as _};
use backchannel::{Client, ClientBuilder, Registry, ServerHandshaker, SessionConfig};
use backchannel_testkit::tokio_yamux::{self as tokio_yamux_compat, TokioYamuxStream};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use listenmux::ListenMux;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_yamux::session::SessionType;
use tonic::{
    service::Routes,
    transport::{Channel, Endpoint, Server},
};

use super::workload::{self, Conn};
use backchannel_testkit::pb::bench::bench_server::BenchServer;

/// Aborts a task when dropped.
pub struct Task(pub tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn bench_routes() -> Routes {
    Routes::new(BenchServer::new(backchannel_testkit::BenchService))
}

/// A plain tonic server (no listenmux) on loopback.
pub async fn plain_server() -> anyhow::Result<(String, Task)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(l).map(|s| {
        s.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let task = tokio::spawn(async move {
        let _ = Server::builder()
            .add_routes(bench_routes())
            .serve_with_incoming(incoming)
            .await;
    });
    Ok((addr, Task(task)))
}

/// A plain tonic channel to `addr`.
pub async fn plain_channel(addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// Session settings for both roles, with `window` if given.
pub fn session_configs(window: Option<u32>) -> (SessionConfig, SessionConfig) {
    let (mut s, mut c) = (SessionConfig::server(), SessionConfig::client());
    if let Some(w) = window {
        s = s.with_window(w);
        c = c.with_window(w);
    }
    (s, c)
}

/// A backchannel server (listenmux + handshaker + tonic) serving Bench.
pub struct BcServer {
    /// `host:port`.
    pub addr: String,
    /// Its peers.
    pub registry: Registry,
    _task: Task,
}

/// Starts a [`BcServer`] on loopback.
pub async fn bc_server(config: SessionConfig) -> anyhow::Result<BcServer> {
    let registry = Registry::new();
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?.to_string();
    let incoming = ListenMux::builder()
        .handshaker(ServerHandshaker::new(registry.clone(), config))
        .build()
        .incoming(l);
    let task = tokio::spawn(async move {
        let _ = Server::builder()
            .add_routes(bench_routes())
            .serve_with_incoming(incoming)
            .await;
    });
    Ok(BcServer {
        addr,
        registry,
        _task: Task(task),
    })
}

/// A backchannel client that serves Bench on its backchannel.
pub async fn bc_client(addr: &str, config: SessionConfig) -> anyhow::Result<Client> {
    ClientBuilder::new()
        .config(config)
        .connect_tcp(addr, bench_routes())
        .await
        .with_context(|| format!("backchannel handshake with {addr}"))
}

/// Things a path keeps alive while it is measured.
pub type Keep = Box<dyn std::any::Any + Send + Sync>;

/// The hub-routed path: caller -> hub -> agent -> service. An in-process
/// [`backchannel_sidecar::hub::Hub`], an [`backchannel_sidecar::agent::Agent`] that publishes a plain
/// Bench server (BenchService) under the name `bench`, and a plain channel to
/// the hub whose requests carry `backchannel-peer: bench`. Its baseline is
/// `forward` (target: >= 0.6x).
pub async fn hub_conn() -> anyhow::Result<(Conn, Vec<Keep>)> {
    let (service_addr, service) = plain_server().await?;
    let hub = backchannel_sidecar::hub::Hub::start(backchannel_sidecar::hub::HubConfig::default())
        .await
        .context("starting the hub")?;
    let hub_addr = hub
        .addr
        .ok_or_else(|| anyhow!("the hub has no TCP address"))?
        .to_string();
    let agent = backchannel_sidecar::agent::Agent::start(
        backchannel_sidecar::agent::AgentConfig::new(hub_addr.clone(), "bench", service_addr),
    )?;
    agent
        .wait_sessions(1, std::time::Duration::from_secs(10))
        .await?;
    // The agent announces its name after the session is up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !agent.status().announced {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the agent never announced itself to the hub");
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let ch = plain_channel(&hub_addr).await?;
    let conn = workload::conn_with_header(
        ch,
        backchannel_sidecar::hub::routing::PEER_HEADER,
        http::HeaderValue::from_static("bench"),
    );
    Ok((
        conn,
        vec![Box::new(hub), Box::new(agent), Box::new(service)],
    ))
}

/// The `tokio-yamux` path, the "before": tonic over a bare tokio-yamux
/// session (no listenmux, no handshake), both ends the stream wrapper the
/// library used with tokio-yamux (stall fix, coalesced vectored writes).
pub async fn tokio_yamux_channel(window: u32) -> anyhow::Result<(Channel, Task)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let (_control, mut streams) = tokio_yamux_compat::spawn_session(
                    tcp,
                    tokio_yamux_compat::config(window, 1),
                    SessionType::Server,
                );
                let Some(first) = streams.recv().await else {
                    return;
                };
                let conn = listenmux::Connection::new(
                    Box::new(TokioYamuxStream::new(first)),
                    listenmux::ConnInfo::default(),
                );
                let incoming = futures::stream::once(async move { Ok::<_, std::io::Error>(conn) })
                    .chain(futures::stream::pending());
                let _ = Server::builder()
                    .add_routes(bench_routes())
                    .serve_with_incoming(incoming)
                    .await;
            });
        }
    });
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut control, _inbound) = tokio_yamux_compat::spawn_session(
        tcp,
        tokio_yamux_compat::config(window, 1),
        SessionType::Client,
    );
    let stream = TokioYamuxStream::new(control.open_stream().await?);
    let slot = Arc::new(Mutex::new(Some(stream)));
    let ch = Endpoint::from_static("http://tokio-yamux.local")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            async move {
                s.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("stream already used"))
            }
        }))
        .await?;
    Ok((ch, Task(task)))
}

/// One yamux stream over loopback TCP: the client end is a bare
/// backchannel-yamux client stream, the server end is what backchannel's
/// public [`ServerHandshaker`] hands the gRPC server (stream 1).
pub async fn yamux_pair(
    server: SessionConfig,
    window: u32,
) -> anyhow::Result<(backchannel::YamuxStream, listenmux::BoxIo, Vec<Task>)> {
    let (mut c, s) = backchannel_testkit::tcp_pair().await?;
    c.write_all(&backchannel::MAGIC).await?;
    let server_side = tokio::spawn(async move {
        let mut s = s;
        let mut magic = [0u8; 11];
        s.read_exact(&mut magic).await?;
        let hs = ServerHandshaker::new(Registry::new(), server);
        let info = listenmux::ConnInfo::default();
        match listenmux::Handshaker::handshake(&hs, Box::new(s), info).await {
            Ok(listenmux::Handshaked::Connection(conn)) => Ok(conn.into_parts().0),
            Ok(listenmux::Handshaked::Dispatched) => Err(anyhow!("handshaker kept the connection")),
            Err(e) => Err(anyhow!("server handshake: {e}")),
        }
    });
    let cfg = backchannel_yamux::Config::default()
        .with_max_stream_window(window)
        .with_keepalive(None);
    let (control, _inbound, conn) =
        backchannel_yamux::session(c, cfg, backchannel_yamux::Mode::Client);
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut stream = control.open_stream()?;
    // The server makes a session a peer only once HTTP/2 starts on stream 1:
    // send the client preface and an empty SETTINGS frame, and drop them
    // again at the server end (they come first, replayed).
    const H2_START: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    stream.write_all(H2_START).await?;
    let mut server_io = server_side.await??;
    let mut start = [0u8; H2_START.len()];
    server_io.read_exact(&mut start).await?;
    anyhow::ensure!(
        start == H2_START,
        "the server end did not replay the HTTP/2 start"
    );
    Ok((stream, server_io, vec![Task(driver)]))
}

/// The "before" of [`yamux_pair`]: one tokio-yamux stream over loopback TCP,
/// both ends wrapped for tonic (`backchannel_testkit::tokio_yamux`).
pub async fn tokio_yamux_pair(
    window: u32,
) -> anyhow::Result<(TokioYamuxStream, TokioYamuxStream, Vec<Task>)> {
    let (c, s) = backchannel_testkit::tcp_pair().await?;
    let (_sc, mut inbound) = tokio_yamux_compat::spawn_session(
        s,
        tokio_yamux_compat::config(window, 1),
        SessionType::Server,
    );
    let (mut control, _ci) = tokio_yamux_compat::spawn_session(
        c,
        tokio_yamux_compat::config(window, 256),
        SessionType::Client,
    );
    let mut client = TokioYamuxStream::new(control.open_stream().await?);
    // tokio-yamux sends the SYN with the first data frame.
    client.write_all(b"x").await?;
    let mut server = TokioYamuxStream::new(
        inbound
            .recv()
            .await
            .ok_or_else(|| anyhow!("tokio-yamux server session ended"))?,
    );
    let mut x = [0u8; 1];
    server.read_exact(&mut x).await?;
    Ok((client, server, Vec::new()))
}
