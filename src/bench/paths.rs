//! The paths under test, set up in-process on loopback TCP.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context as _};
use backchannel::{Client, ClientBuilder, Registry, ServerHandshaker, SessionConfig};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use listenmux::{ListenMux, MuxConfig};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_yamux::session::SessionType;
use tonic::{
    service::Routes,
    transport::{Channel, Endpoint, Server},
};

use super::{
    workload::{self, Conn},
    yamux::{self, RawStream},
};
use crate::pb::bench::bench_server::BenchServer;

/// Aborts a task when dropped.
pub struct Task(pub tokio::task::JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn bench_routes() -> Routes {
    Routes::new(BenchServer::new(crate::services::BenchService))
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
    let incoming = ListenMux::new(MuxConfig::default())
        .register(ServerHandshaker::new(registry.clone(), config))
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
/// [`crate::hub::Hub`], an [`crate::agent::Agent`] that publishes a plain
/// Bench server (BenchService) under the name `bench`, and a plain channel to
/// the hub whose requests carry `backchannel-peer: bench`. Its baseline is
/// `forward` (issue 5 target: >= 0.6x).
pub async fn hub_conn() -> anyhow::Result<(Conn, Vec<Keep>)> {
    let (service_addr, service) = plain_server().await?;
    let hub = crate::hub::Hub::start(crate::hub::HubConfig::default())
        .await
        .context("starting the hub")?;
    let hub_addr = hub
        .addr
        .ok_or_else(|| anyhow!("the hub has no TCP address"))?
        .to_string();
    let agent = crate::agent::Agent::start(crate::agent::AgentConfig::new(
        hub_addr.clone(),
        "bench",
        service_addr,
    ))?;
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
        crate::router::PEER_HEADER,
        http::HeaderValue::from_static("bench"),
    );
    Ok((
        conn,
        vec![Box::new(hub), Box::new(agent), Box::new(service)],
    ))
}

/// The prototype path: tonic over a raw tokio-yamux session (no listenmux,
/// no handshake), both ends `YamuxStream`s; `vectored` turns on the
/// coalescing of h2's header and payload slices into one yamux frame.
pub async fn proto_channel(vectored: bool, window: u32) -> anyhow::Result<(Channel, Task)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let (_control, mut streams) =
                    yamux::spawn_session(tcp, yamux::config(window, 1), SessionType::Server);
                let Some(first) = streams.recv().await else {
                    return;
                };
                let conn = listenmux::Connection::new(
                    Box::new(yamux::raw_stream(first, vectored)),
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
    let (mut control, _inbound) =
        yamux::spawn_session(tcp, yamux::config(window, 1), SessionType::Client);
    let stream = yamux::raw_stream(control.open_stream().await?, vectored);
    let slot = Arc::new(Mutex::new(Some(stream)));
    let ch = Endpoint::from_static("http://proto.local")
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

/// A connected TCP socket pair on loopback: (client end, server end).
pub async fn tcp_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (c, (s, _)) = (c?, s?);
    c.set_nodelay(true)?;
    s.set_nodelay(true)?;
    Ok((c, s))
}

/// One yamux stream over loopback TCP: the client end is a raw tokio-yamux
/// stream ([`RawStream`]), the server end is what backchannel's public
/// [`ServerHandshaker`] hands the gRPC server (its `YamuxStream`, stream 1).
pub async fn yamux_pair(
    server: SessionConfig,
    window: u32,
) -> anyhow::Result<(RawStream, listenmux::BoxIo, Vec<Task>)> {
    let (mut c, s) = tcp_pair().await?;
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
    let (mut control, _inbound) =
        yamux::spawn_session(c, yamux::config(window, 256), SessionType::Client);
    let stream = control.open_stream().await?;
    let server_io = server_side.await??;
    Ok((yamux::raw_stream(stream, false), server_io, Vec::new()))
}
