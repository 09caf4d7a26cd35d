//! The data lane over real sessions on loopback TCP: Gitaly sidechannels
//! beside a call, and tunnels opened by either side.

use std::time::Duration;

use backchannel::{
    ClientBuilder, Registry, ServerHandshaker, SessionConfig, SidechannelError, TunnelError,
    TunnelRequest, Tunnels,
};
use backchannel_testkit::{
    pattern::{read_stream, stream_slice, write_stream},
    pb::bench::{
        bench_client::BenchClient,
        bench_server::{Bench, BenchServer},
        DownloadRequest, Payload, Summary,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tonic::{service::Routes, Request, Response, Status, Streaming};

const MIB: u64 = 1024 * 1024;

/// Bench.Echo opens the call's sidechannel: it reads the client's bytes
/// (stream 1) to the flush packet, then sends back the number of bytes the
/// request names (stream 2). Upload/Download are unused.
#[derive(Clone)]
struct SideBench(Registry);

#[tonic::async_trait]
impl Bench for SideBench {
    async fn echo(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let back: u64 = String::from_utf8_lossy(&req.get_ref().data)
            .parse()
            .unwrap_or(0);
        let mut side = match self.0.open_sidechannel(&req).await {
            Ok(s) => s,
            Err(e @ SidechannelError::NoSidechannelId) => return Err(e.into()),
            Err(e) => return Err(Status::aborted(e.to_string())),
        };
        let got = read_stream(&mut side, 1)
            .await
            .map_err(|e| Status::data_loss(format!("{:?}: {e}", e.kind())))?;
        write_stream(&mut side, 2, back).await;
        side.shutdown()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(Payload {
            data: got.to_string().into(),
        }))
    }
    async fn upload(&self, _: Request<Streaming<Payload>>) -> Result<Response<Summary>, Status> {
        Err(Status::unimplemented(""))
    }
    type DownloadStream = futures::stream::Empty<Result<Payload, Status>>;
    async fn download(
        &self,
        _: Request<DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        Err(Status::unimplemented(""))
    }
}

/// Echoes a tunnel's bytes back, then shuts down when the opener did.
fn echo_tunnels() -> Tunnels {
    Tunnels::new()
        .handle("echo", |t| async move {
            if let Ok(t) = t.accept().await {
                let (mut r, mut w) = tokio::io::split(t);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
        })
        // Reads stream 3 to EOF, then (only then) sends 1 MiB of stream 4:
        // half-close in both directions.
        .handle("half", |t| async move {
            if let Ok(mut t) = t.accept().await {
                let got = read_stream(&mut t, 3).await.unwrap();
                assert_eq!(got, 3 * MIB);
                write_stream(&mut t, 4, MIB).await;
                t.shutdown().await.unwrap();
            }
        })
        .handle("whoami", |t| async move {
            let who = t.request().metadata("who").unwrap_or("nobody").to_string();
            if who == "mallory" {
                let _ = t
                    .refuse(backchannel::RefusalKind::Denied, "not you, mallory")
                    .await;
                return;
            }
            if let Ok(mut t) = t.accept().await {
                let _ = t
                    .write_all(format!("{} {}", t.side(), who).as_bytes())
                    .await;
                let _ = t.shutdown().await;
            }
        })
}

struct Server {
    addr: std::net::SocketAddr,
    registry: Registry,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
        for p in self.registry.list() {
            self.registry.close(p.id);
        }
    }
}

async fn server(tunnels: Tunnels, config: SessionConfig) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = Registry::new();
    let incoming = listenmux::ListenMux::builder()
        .handshaker(ServerHandshaker::new(registry.clone(), config).tunnels(tunnels))
        .build()
        .incoming(listener);
    let routes = Routes::new(BenchServer::new(SideBench(registry.clone())));
    let task = tokio::spawn(async move {
        let _ = listenmux::server_builder()
            .add_routes(routes)
            .serve_with_incoming(incoming)
            .await;
    });
    Server {
        addr,
        registry,
        task,
    }
}

async fn first_peer(registry: &Registry) -> backchannel::PeerId {
    let mut events = registry.subscribe();
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(p) = registry.list().first() {
                return p.id;
            }
            let _ = events.recv().await;
        }
    })
    .await
    .expect("a peer connects")
}

fn no_routes() -> Routes {
    Routes::new(tonic_health::server::health_reporter().1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidechannel_64mib_each_way_beside_a_call() {
    let srv = server(Tunnels::new(), SessionConfig::server()).await;
    let client = ClientBuilder::new()
        .connect_tcp(&srv.addr.to_string(), no_routes())
        .await
        .unwrap();
    let mut api = BenchClient::new(client.channel());
    let mut waiter = client.sidechannel();
    let mut req = Request::new(Payload {
        data: (64 * MIB).to_string().into(),
    });
    waiter.attach(&mut req);
    let call = tokio::spawn(async move { api.echo(req).await });
    let mut side = tokio::time::timeout(Duration::from_secs(10), waiter.accept())
        .await
        .expect("the server opens the sidechannel")
        .unwrap();
    let (mut r, mut w) = tokio::io::split(&mut side);
    let up = async {
        write_stream(&mut w, 1, 64 * MIB).await;
        w.shutdown().await.unwrap(); // the flush packet
    };
    let down = read_stream(&mut r, 2);
    let ((), got) = tokio::join!(up, down);
    assert_eq!(got.unwrap(), 64 * MIB);
    let resp = call.await.unwrap().unwrap().into_inner();
    assert_eq!(resp.data, (64 * MIB).to_string().as_bytes());
}

#[tokio::test]
async fn sidechannel_errors() {
    let srv = server(Tunnels::new(), SessionConfig::server()).await;
    let client = ClientBuilder::new()
        .connect_tcp(&srv.addr.to_string(), no_routes())
        .await
        .unwrap();
    let mut api = BenchClient::new(client.channel());
    // No ID on the call.
    let err = api.echo(Payload::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("gitaly-sidechannel-id"), "{err}");
    // An ID nobody waits for: the client closes the stream, the server's
    // open fails as refused.
    let mut req = Request::new(Payload::default());
    req.metadata_mut()
        .insert("gitaly-sidechannel-id", "987654".parse().unwrap());
    let err = api.echo(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Aborted, "{err}");
    assert!(err.message().contains("refused"), "{err}");
    // A waiter dropped before the server opens: same.
    let waiter = client.sidechannel();
    let mut req = Request::new(Payload::default());
    waiter.attach(&mut req);
    drop(waiter);
    let err = api.echo(req).await.unwrap_err();
    assert!(err.message().contains("refused"), "{err}");
    // The client's side ends without the flush packet: unexpected EOF.
    let mut waiter = client.sidechannel();
    let mut req = Request::new(Payload::default());
    waiter.attach(&mut req);
    let call = tokio::spawn({
        let mut api = api.clone();
        async move { api.echo(req).await }
    });
    let mut side = waiter.accept().await.unwrap();
    side.write_all(stream_slice(1, 0, 7)).await.unwrap();
    side.flush().await.unwrap();
    drop(side);
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::DataLoss, "{err}");
    assert!(err.message().contains("UnexpectedEof"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_both_ways_byte_checked_with_half_close() {
    let srv = server(echo_tunnels(), SessionConfig::server()).await;
    let client = ClientBuilder::new()
        .tunnels(echo_tunnels())
        .connect_tcp(&srv.addr.to_string(), no_routes())
        .await
        .unwrap();
    let peer = first_peer(&srv.registry).await;

    // Server -> client and client -> server, 128 MiB echoed each.
    let down = srv
        .registry
        .open_tunnel(peer, TunnelRequest::new("echo"))
        .await
        .unwrap();
    let up = client
        .open_tunnel(TunnelRequest::new("echo"))
        .await
        .unwrap();
    let run = |t: backchannel::Tunnel, seed: u64| async move {
        let (mut r, mut w) = tokio::io::split(t);
        let send = async {
            write_stream(&mut w, seed, 128 * MIB).await;
            w.shutdown().await.unwrap();
        };
        let ((), got) = tokio::join!(send, read_stream(&mut r, seed));
        got.unwrap()
    };
    let (a, b) = tokio::join!(run(down, 11), run(up, 12));
    assert_eq!((a, b), (128 * MIB, 128 * MIB));

    // Half-close: the opener shuts down writing, the other side keeps sending.
    for t in [
        srv.registry
            .open_tunnel(peer, TunnelRequest::new("half"))
            .await
            .unwrap(),
        client
            .open_tunnel(TunnelRequest::new("half"))
            .await
            .unwrap(),
    ] {
        let mut t = t;
        write_stream(&mut t, 3, 3 * MIB).await;
        t.shutdown().await.unwrap();
        let err = t.write_all(b"x").await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
        assert_eq!(read_stream(&mut t, 4).await.unwrap(), MIB);
    }

    // Metadata, the side's name, refusal with a reason, unknown service.
    let mut t = client
        .open_tunnel(TunnelRequest::new("whoami").with_metadata("who", "alice"))
        .await
        .unwrap();
    let mut s = String::new();
    t.read_to_string(&mut s).await.unwrap();
    assert_eq!(s, format!("peer {peer} alice"));
    let err = srv
        .registry
        .open_tunnel(
            peer,
            TunnelRequest::new("whoami").with_metadata("who", "mallory"),
        )
        .await
        .unwrap_err();
    match &err {
        TunnelError::Refused { kind, reason, .. } => {
            assert_eq!(*kind, backchannel::RefusalKind::Denied);
            assert_eq!(reason, "not you, mallory");
        }
        other => panic!("{other}"),
    }
    let err = client
        .open_tunnel(TunnelRequest::new("nope"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            TunnelError::Refused {
                kind: backchannel::RefusalKind::UnknownService,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("no tunnel service 'nope'"),
        "{err}"
    );
    assert!(TunnelRequest::new("bad name")
        .with_timeout(Duration::from_secs(1))
        .service()
        .contains(' '));
    assert!(matches!(
        client.open_tunnel(TunnelRequest::new("bad name")).await,
        Err(TunnelError::Invalid(_))
    ));
    // The session still carries calls.
    let mut api = BenchClient::new(client.channel());
    let err = api.upload(futures::stream::empty()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_tunnels() {
    let srv = server(echo_tunnels(), SessionConfig::server()).await;
    let client = ClientBuilder::new()
        .tunnels(echo_tunnels())
        .connect_tcp(&srv.addr.to_string(), no_routes())
        .await
        .unwrap();
    let peer = first_peer(&srv.registry).await;
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let (client, registry) = (client.clone(), srv.registry.clone());
        tasks.push(tokio::spawn(async move {
            let t = if i % 2 == 0 {
                client.open_tunnel(TunnelRequest::new("echo")).await
            } else {
                registry.open_tunnel(peer, TunnelRequest::new("echo")).await
            };
            let (mut r, mut w) = tokio::io::split(t.unwrap());
            let send = async {
                write_stream(&mut w, 100 + i, MIB).await;
                w.shutdown().await.unwrap();
            };
            let ((), got) = tokio::join!(send, read_stream(&mut r, 100 + i));
            got.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), MIB);
    }
}

#[tokio::test]
async fn a_server_without_tunnels_refuses_client_streams() {
    let srv = server(Tunnels::new(), SessionConfig::server()).await;
    let client = ClientBuilder::new()
        .connect_tcp(&srv.addr.to_string(), no_routes())
        .await
        .unwrap();
    let err = client
        .open_tunnel(TunnelRequest::new("echo").with_timeout(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(matches!(err, TunnelError::NoAnswer { .. }), "{err}");
    // And the client's peer without tunnels refuses the server's.
    let peer = first_peer(&srv.registry).await;
    let err = srv
        .registry
        .open_tunnel(peer, TunnelRequest::new("echo"))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            TunnelError::Refused {
                kind: backchannel::RefusalKind::UnknownService,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tunnel_does_not_slow_calls_or_other_tunnels() {
    // The server's handler writes into a tunnel the client never reads:
    // the stream's window fills and its writer waits; the session's calls
    // and other tunnels go on.
    let (filled_tx, mut filled_rx) = tokio::sync::mpsc::channel::<u64>(1);
    let tunnels = echo_tunnels().handle("flood", move |t| {
        let filled_tx = filled_tx.clone();
        async move {
            if let Ok(mut t) = t.accept().await {
                let mut sent = 0u64;
                loop {
                    let w = tokio::time::timeout(
                        Duration::from_millis(500),
                        t.write_all(stream_slice(9, sent, 64 * 1024)),
                    )
                    .await;
                    match w {
                        Ok(Ok(())) => sent += 64 * 1024,
                        // Blocked: the window is full.
                        Err(_) => break,
                        Ok(Err(_)) => return,
                    }
                }
                let _ = filled_tx.send(sent).await;
                let _ = tokio::io::copy(&mut t, &mut tokio::io::sink()).await;
                std::future::pending::<()>().await;
            }
        }
    });
    let srv = server(tunnels, SessionConfig::server()).await;
    let client = ClientBuilder::new()
        .connect_tcp(&srv.addr.to_string(), no_routes())
        .await
        .unwrap();
    let _stalled = client
        .open_tunnel(TunnelRequest::new("flood"))
        .await
        .unwrap();
    let buffered = tokio::time::timeout(Duration::from_secs(30), filled_rx.recv())
        .await
        .unwrap()
        .unwrap();
    // Bounded by the stream window (4 MiB) plus what TCP buffers.
    assert!(
        buffered <= 4 * MIB + 16 * MIB,
        "{buffered} bytes went out unread"
    );
    let mut api = BenchClient::new(client.channel());
    for _ in 0..20 {
        let err = api.upload(futures::stream::empty()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unimplemented);
    }
    let mut t = client
        .open_tunnel(TunnelRequest::new("echo"))
        .await
        .unwrap();
    write_stream(&mut t, 5, 8 * MIB).await;
    t.shutdown().await.unwrap();
    assert_eq!(read_stream(&mut t, 5).await.unwrap(), 8 * MIB);
}

#[tokio::test]
async fn session_loss_is_an_error_never_a_clean_eof() {
    let srv = server(echo_tunnels(), SessionConfig::server()).await;
    let client = ClientBuilder::new()
        .connect_tcp(&srv.addr.to_string(), no_routes())
        .await
        .unwrap();
    let mut t = client
        .open_tunnel(TunnelRequest::new("echo"))
        .await
        .unwrap();
    t.write_all(b"ping").await.unwrap();
    let mut four = [0u8; 4];
    t.read_exact(&mut four).await.unwrap();
    let peer = srv.registry.list()[0].id;
    assert!(srv.registry.close(peer));
    let mut rest = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut rest))
        .await
        .expect("the tunnel ends promptly")
        .unwrap_err();
    assert!(
        err.to_string().contains("tunnel 'echo' with server"),
        "{err}"
    );
}

#[tokio::test]
async fn silent_or_truncated_inbound_streams_are_closed_after_the_sniff_timeout() {
    // A raw yamux client: magic, stream 1 with an HTTP/2 preface and
    // SETTINGS (so the server makes it a peer), then streams that never
    // finish their first bytes.
    let srv = server(
        echo_tunnels(),
        SessionConfig::server().with_handshake_timeout(Duration::from_millis(500)),
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    tcp.write_all(b"backchannel").await.unwrap();
    let (control, _incoming, conn) = backchannel_yamux::session(
        tcp,
        backchannel_yamux::Config::default(),
        backchannel_yamux::Mode::Client,
    );
    tokio::spawn(conn);
    let mut first = control.open_stream().unwrap();
    first
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    first.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    let _ = first_peer(&srv.registry).await;
    for start in [&b""[..], b"bc-tun", b"bc-tunnel/1\x00"] {
        let mut s = control.open_stream().unwrap();
        s.write_all(start).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the server closes the stream");
        assert!(matches!(r, Ok(0) | Err(_)), "{start:?}: {r:?}");
        assert!(started.elapsed() >= Duration::from_millis(400), "{start:?}");
    }
    // Garbage is closed at once (no magic starts with it), and the session
    // still serves a real tunnel.
    let mut s = control.open_stream().unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), s.read(&mut [0u8; 16]))
        .await
        .expect("garbage is closed at once");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let t = backchannel::tunnel::connect(
        control.open_stream().unwrap(),
        TunnelRequest::new("whoami").with_metadata("who", "raw"),
        "server",
    )
    .await;
    let mut t = t.unwrap();
    let mut out = String::new();
    t.read_to_string(&mut out).await.unwrap();
    assert!(out.ends_with(" raw"), "{out}");
}
