//! Shared set-up for the end-to-end tests: a real server (listenmux +
//! backchannel + tonic) on a real socket, and real clients.
#![allow(dead_code)]

use std::{path::PathBuf, sync::Arc, time::Duration};

use backchannel::{Client, ClientBuilder, Registry, ServerHandshaker, SessionConfig};
use backchannel_demo::{
    pb::testing::{callback_server::CallbackServer, echo_server::EchoServer},
    services::{CallbackService, EchoService},
};
use backchannel_testkit::{pb::bench::bench_server::BenchServer, BenchService};
use listenmux::{ListenMux, MuxConfig, Stats};
use tonic::{service::Routes, transport::Server};

/// Where a test server listens.
pub enum Bind {
    Tcp,
    Unix(tempfile::TempDir),
    Tls(Arc<tokio_rustls::rustls::ServerConfig>),
}

/// A running server: Echo("server"), Callback and Bench on one port.
pub struct TestServer {
    pub registry: Registry,
    pub stats: Arc<Stats>,
    /// `host:port` for TCP/TLS, the socket path for Unix.
    pub addr: String,
    pub unix_path: Option<PathBuf>,
    task: tokio::task::JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start_server(bind: Bind, mux: MuxConfig, session: SessionConfig) -> TestServer {
    start_server_with(
        bind,
        mux,
        session,
        Server::builder().trace_fn(backchannel::request_span),
    )
    .await
}

pub async fn start_server_with(
    bind: Bind,
    mux: MuxConfig,
    session: SessionConfig,
    server: Server,
) -> TestServer {
    let registry = Registry::new();
    let mut lm = ListenMux::builder()
        .config(mux)
        .handshaker(ServerHandshaker::new(registry.clone(), session));
    let mut server = server.layer(listenmux::ConnectInfoLayer::new());
    let router = server
        .add_service(EchoServer::new(EchoService::new("server")))
        .add_service(CallbackServer::new(CallbackService {
            registry: registry.clone(),
        }))
        .add_service(BenchServer::new(BenchService));
    let (addr, unix_path, dir, incoming) = match bind {
        Bind::Tcp | Bind::Tls(_) => {
            if let Bind::Tls(cfg) = &bind {
                lm = lm.tls(tokio_rustls::TlsAcceptor::from(cfg.clone()));
            }
            let lm = lm.build();
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let stats = lm.stats();
            (addr, None, None, (lm.incoming(l), stats))
        }
        Bind::Unix(dir) => {
            let lm = lm.build();
            let path = dir.path().join("server.sock");
            let l = tokio::net::UnixListener::bind(&path).unwrap();
            let stats = lm.stats();
            (
                path.display().to_string(),
                Some(path),
                Some(dir),
                (lm.incoming(l), stats),
            )
        }
    };
    let (incoming, stats) = incoming;
    let task = tokio::spawn(async move {
        router.serve_with_incoming(incoming).await.unwrap();
    });
    TestServer {
        registry,
        stats,
        addr,
        unix_path,
        task,
        _dir: dir,
    }
}

pub async fn tcp_server() -> TestServer {
    start_server(Bind::Tcp, MuxConfig::default(), SessionConfig::server()).await
}

/// The routes a test client serves on its backchannel: Echo(name) and Bench.
pub fn client_routes(name: &str) -> Routes {
    Routes::new(EchoServer::new(EchoService::new(name))).add_service(BenchServer::new(BenchService))
}

pub async fn connect(server: &TestServer, name: &str) -> Client {
    ClientBuilder::new()
        .connect_tcp(&server.addr, client_routes(name))
        .await
        .expect("backchannel client connects")
}

pub async fn plain_channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("plain client connects")
}

/// A self-signed certificate for `localhost`: (server config, client config).
pub fn tls_configs() -> (
    Arc<tokio_rustls::rustls::ServerConfig>,
    Arc<tokio_rustls::rustls::ClientConfig>,
) {
    let (s, c, _) = tls_configs_with_pem();
    (s, c)
}

/// Like [`tls_configs`], plus the certificate as PEM (the CA for plain tonic
/// TLS clients).
pub fn tls_configs_with_pem() -> (
    Arc<tokio_rustls::rustls::ServerConfig>,
    Arc<tokio_rustls::rustls::ClientConfig>,
    String,
) {
    backchannel_testkit::pki::self_signed()
}

/// Waits (event-driven, bounded) until the registry holds `n` peers.
pub async fn wait_peers(registry: &Registry, n: usize) {
    let mut events = registry.subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        while registry.len() != n {
            let _ = events.recv().await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("registry did not reach {n} peers (has {})", registry.len()));
}

#[allow(unused_imports)]
pub use backchannel_testkit::pki::Pki;
