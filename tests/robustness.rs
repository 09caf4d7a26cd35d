//! No single client can deny service to anyone else: slow readers, fake
//! peers, floods of silent connections, agent drain, flag validation. Real
//! hub, agents, services and sockets; floods are bounded in count and time.

mod common;

use std::{
    pin::Pin,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use backchannel::ClientBuilder;
use backchannel_demo::pb::testing::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    EchoRequest, EchoResponse,
};
use backchannel_sidecar::{
    agent::{Agent, AgentConfig},
    hub::{Hub, HubConfig},
    pb::hub::{registration_client::RegistrationClient, AnnounceRequest},
};
use futures::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{transport::Channel, Code, Request, Response, Status, Streaming};

const T: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- service

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Unary: echoes, or sleeps first for "sleep:MS". Server stream: `count`
/// copies of the request's message; counts the bytes it produced.
#[derive(Clone)]
struct Svc {
    name: String,
    produced: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl Echo for Svc {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let msg = request.into_inner().message;
        if let Some(ms) = msg.strip_prefix("sleep:") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        Ok(Response::new(EchoResponse {
            message: msg,
            server: self.name.clone(),
        }))
    }

    type ServerStreamStream = BoxStream<EchoResponse>;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let r = request.into_inner();
        let (name, produced) = (self.name.clone(), self.produced.clone());
        let s = futures::stream::unfold(0u32, move |i| {
            let (msg, name, produced) = (r.message.clone(), name.clone(), produced.clone());
            async move {
                (i < r.count).then(|| {
                    produced.fetch_add(msg.len() as u64, Ordering::Relaxed);
                    (
                        Ok(EchoResponse {
                            message: msg,
                            server: name,
                        }),
                        i + 1,
                    )
                })
            }
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn client_stream(
        &self,
        _request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        Err(Status::unimplemented("not here"))
    }

    type BidiStream = BoxStream<EchoResponse>;

    async fn bidi(
        &self,
        _request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        Err(Status::unimplemented("not here"))
    }
}

struct Service {
    addr: String,
    produced: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn service(name: &str) -> Service {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let produced = Arc::new(AtomicU64::new(0));
    let svc = Svc {
        name: name.into(),
        produced: produced.clone(),
    };
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    Service {
        addr,
        produced,
        task,
    }
}

// ---------------------------------------------------------------- fixtures

async fn hub_with(cfg: HubConfig) -> Hub {
    Hub::start(HubConfig {
        listen: Some("127.0.0.1:0".into()),
        ..cfg
    })
    .await
    .expect("hub starts")
}

fn agent_cfg(hub: &Hub, name: &str, svc: &Service) -> AgentConfig {
    let mut cfg = AgentConfig::new(hub.addr.unwrap().to_string(), name, svc.addr.clone());
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(500);
    cfg
}

async fn agent(hub: &Hub, name: &str, svc: &Service) -> Agent {
    let a = Agent::start(agent_cfg(hub, name, svc)).unwrap();
    a.wait_sessions(1, T).await.unwrap();
    hub.wait_for_name(name, T).await.expect("name registered");
    a
}

async fn caller(hub: &Hub) -> EchoClient<Channel> {
    EchoClient::new(common::plain_channel(&hub.addr.unwrap().to_string()).await)
}

fn to<T>(peer: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("backchannel-peer", peer.parse().unwrap());
    r.set_timeout(Duration::from_secs(5));
    r
}

fn echo(message: &str, count: u32) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        count,
    }
}

/// Polls `f` until it holds, failing the test after `T`.
async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99).div_ceil(100) - 1]
}

async fn unary_latencies(c: &mut EchoClient<Channel>, peer: &str, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let r = c.unary(to(peer, echo(&format!("m{i}"), 0))).await;
        assert!(r.is_ok(), "call {i} failed: {:?}", r.err());
        lat.push(t.elapsed());
    }
    lat
}

fn raise_nofile() {
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(
    from: [u8; 4],
    to: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind((std::net::Ipv4Addr::from(from), 0).into())?;
    s.connect(to).await
}

/// Completes when the server closes `s` (EOF or reset).
async fn closed_by_server(mut s: tokio::net::TcpStream) {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

// ---------------------------------------------------------------- 1. slow readers

/// A caller over a bare hyper HTTP/2 connection: its response bodies are
/// only read when polled, so an unread stream really stalls.
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

async fn raw_caller(hub: &Hub) -> EchoClient<RawH2> {
    let addr = hub.addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_reset_streams(1024)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    EchoClient::with_origin(RawH2(send), format!("http://{addr}").parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_read_calls_from_one_caller_leave_other_callers_served() {
    let hub = hub_with(HubConfig::default()).await;
    let svc = service("svc").await;
    let _agent = agent(&hub, "svc", &svc).await;
    let mut good = caller(&hub).await;
    let _ = unary_latencies(&mut good, "svc", 20).await; // warm up
    let baseline = p99(unary_latencies(&mut good, "svc", 200).await);

    // 64 server streams of 64 KiB messages, never read: far beyond the 16
    // stream windows one shared HTTP/2 connection had room for.
    let mut slow = raw_caller(&hub).await;
    let big = "x".repeat(64 * 1024);
    let mut stalled = Vec::new();
    for _ in 0..64 {
        let mut r = Request::new(echo(&big, 1_000_000));
        r.metadata_mut()
            .insert("backchannel-peer", "svc".parse().unwrap());
        stalled.push(slow.server_stream(r).await.expect("stream starts"));
    }
    // Wait for the stall: the service has filled every window it can and
    // produces nothing more.
    wait_until("the service to fill the windows", || {
        svc.produced.load(Ordering::Relaxed) > 40 << 20
    })
    .await;
    let mut last = 0;
    wait_until("the service to stop producing", || {
        let now = svc.produced.load(Ordering::Relaxed);
        let settled = now == last;
        last = now;
        settled
    })
    .await;
    let produced = svc.produced.load(Ordering::Relaxed);

    // Other callers of the same agent: a new connection and the old one.
    let mut other = caller(&hub).await;
    let during_new = p99(unary_latencies(&mut other, "svc", 200).await);
    let during_old = p99(unary_latencies(&mut good, "svc", 200).await);
    println!(
        "slow readers: baseline p99 {baseline:?}; with 64 never-read streams ({} MiB buffered) p99 {during_new:?} (new caller), {during_old:?} (old caller)",
        produced >> 20
    );
    assert_eq!(
        hub.state().calls_in_flight(),
        64,
        "the stalled streams are still open"
    );
    drop(stalled);
    wait_until("the stalled calls to end", || {
        hub.state().calls_in_flight() == 0
    })
    .await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------- 2. fake peers

/// The magic and a yamux SYN for stream 1, and then nothing: no HTTP/2.
const FAKE_HELLO: &[u8] = b"backchannel\x00\x01\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_never_speak_http2_never_become_peers() {
    raise_nofile();
    let hub = hub_with(HubConfig {
        max_peers: 100,
        handshake_timeout: Duration::from_millis(800),
        ..HubConfig::default()
    })
    .await;
    let addr = hub.addr.unwrap();
    let mut fakes = Vec::new();
    for i in 0..400u32 {
        // Spread over sources so the per-source limit does not refuse them.
        let from = [127, 0, 1, (i % 200) as u8 + 1];
        let mut s = connect_from(from, addr).await.unwrap();
        s.write_all(FAKE_HELLO).await.unwrap();
        fakes.push(tokio::spawn(closed_by_server(s)));
    }
    // A real agent gets in while they wait, and is the only peer.
    let svc = service("real").await;
    let _a = agent(&hub, "real", &svc).await;
    assert_eq!(hub.registry().len(), 1);
    let mut c = caller(&hub).await;
    assert_eq!(
        c.unary(to("real", echo("hi", 0)))
            .await
            .unwrap()
            .get_ref()
            .server,
        "real"
    );
    // Every fake is closed once the handshake timeout passes.
    let started = Instant::now();
    for f in fakes {
        tokio::time::timeout(T, f)
            .await
            .expect("fake session closed")
            .unwrap();
    }
    println!(
        "400 fake sessions closed {:?} after the agent was served",
        started.elapsed()
    );
    assert_eq!(hub.registry().len(), 1);
    assert!(
        hub.mux_stats().handshake_timeouts >= 400,
        "{:?}",
        hub.mux_stats()
    );
    hub.shutdown().await;
}

#[tokio::test]
async fn a_refused_peer_learns_the_peer_limit() {
    let hub = hub_with(HubConfig {
        max_peers: 1,
        ..HubConfig::default()
    })
    .await;
    let svc = service("a").await;
    let _a = agent(&hub, "a", &svc).await;
    let addr = hub.addr.unwrap().to_string();
    let refused = ClientBuilder::new()
        .connect_tcp(&addr, common::client_routes("b"))
        .await
        .expect("the handshake itself completes");
    let err = RegistrationClient::new(refused.channel())
        .announce(AnnounceRequest {
            name: "b".into(),
            labels: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("peer limit of 1"), "{err:?}");
    tokio::time::timeout(T, refused.closed())
        .await
        .expect("refused session closed");
    assert_eq!(hub.registry().len(), 1);
    hub.shutdown().await;
}

#[tokio::test]
async fn announce_timeout_closes_silent_sessions_and_an_open_hub_keeps_them() {
    // With --announce-timeout: a session that never announces is closed.
    let strict = hub_with(HubConfig {
        announce_timeout: Some(Duration::from_millis(300)),
        ..HubConfig::default()
    })
    .await;
    let svc = service("named").await;
    let _named = agent(&strict, "named", &svc).await;
    let silent = ClientBuilder::new()
        .connect_tcp(
            &strict.addr.unwrap().to_string(),
            common::client_routes("g"),
        )
        .await
        .unwrap();
    tokio::time::timeout(T, silent.closed())
        .await
        .expect("unannounced session closed");
    assert!(
        strict.state().peer_named("named").is_some(),
        "the named agent stays"
    );
    assert_eq!(strict.registry().len(), 1);
    assert_eq!(strict.state().metrics.announce_timeouts.get(), 1);
    strict.shutdown().await;

    // Without it (the default): a Gitaly-style client that never announces
    // stays, routable by its peer ID.
    let open = hub_with(HubConfig::default()).await;
    let gitaly = ClientBuilder::new()
        .connect_tcp(&open.addr.unwrap().to_string(), common::client_routes("g"))
        .await
        .unwrap();
    wait_until("the client to be a peer", || open.registry().len() == 1).await;
    let id = open.registry().list()[0].id.to_string();
    let mut c = caller(&open).await;
    let r = c.unary(to(&id, echo("by id", 0))).await.unwrap();
    assert_eq!(r.get_ref().server, "g");
    assert!(!gitaly.is_closed());
    open.shutdown().await;
}

// ---------------------------------------------------------------- 3. silent connections

/// One source holds far more silent connections than the hub has pending
/// slots; connections from other sources are served.
async fn flood_then_serve_others(hub: &Hub, silent: usize, others: usize) -> (usize, Duration) {
    let addr = hub.addr.unwrap();
    let mut held = Vec::new();
    for i in 0..silent {
        match connect_from([127, 0, 0, 2], addr).await {
            Ok(mut s) => {
                // Half silent, half trickling the first bytes of the magic.
                if i % 2 == 1 {
                    let _ = s.write_all(b"back").await;
                }
                held.push(s);
            }
            Err(e) => panic!("flood connect {i}: {e}"),
        }
    }
    let accepted = silent as u64;
    wait_until("the hub to accept the flood", || {
        hub.mux_stats().accepted >= accepted
    })
    .await;
    // New connections from other sources: each opens HTTP/2 and makes a
    // health-less, routed call to the agent.
    let mut served = 0;
    let mut lat = Vec::new();
    for i in 0..others {
        let from = [127, 0, 0, 3 + (i % 50) as u8];
        let t = Instant::now();
        let ok = async {
            let tcp = connect_from(from, addr).await.ok()?;
            let (send, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .ok()?;
            tokio::spawn(conn);
            let mut c =
                EchoClient::with_origin(RawH2(send), format!("http://{addr}").parse().unwrap());
            let r = c.unary(to("svc", echo("hello", 0))).await.ok()?;
            Some(r.get_ref().server == "svc")
        };
        if tokio::time::timeout(Duration::from_secs(5), ok).await == Ok(Some(true)) {
            served += 1;
            lat.push(t.elapsed());
        }
    }
    drop(held);
    (served, p99(lat))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_with_thousands_of_silent_connections_does_not_lock_others_out() {
    raise_nofile();
    let hub = hub_with(HubConfig::default()).await;
    let svc = service("svc").await;
    let _a = agent(&hub, "svc", &svc).await;
    let (served, p99) = flood_then_serve_others(&hub, 3000, 200).await;
    let s = hub.mux_stats();
    println!("3000 silent from one source: {served}/200 others served, p99 {p99:?}; {s:?}");
    assert!(served >= 198, "{served}/200 served; {s:?}");
    assert!(s.rejected_source_limit >= 3000 - 256, "{s:?}");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_all_slots_are_taken_the_biggest_source_is_evicted() {
    raise_nofile();
    // The flooding source may take every slot; newcomers evict it.
    let hub = hub_with(HubConfig {
        max_pending: 64,
        max_pending_per_source: 64,
        ..HubConfig::default()
    })
    .await;
    let svc = service("svc").await;
    let _a = agent(&hub, "svc", &svc).await;
    let (served, _) = flood_then_serve_others(&hub, 200, 100).await;
    let s = hub.mux_stats();
    assert!(served >= 99, "{served}/100 served; {s:?}");
    assert!(s.evicted >= 1, "{s:?}");
    assert!(
        s.rejected_overload + s.rejected_source_limit >= 200 - 64,
        "{s:?}"
    );
    hub.shutdown().await;
}

// ---------------------------------------------------------------- 4. drain

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_agent_finishes_its_calls_and_gets_no_new_ones() {
    let hub = hub_with(HubConfig::default()).await;
    let svc = service("svc").await;
    let mut cfg = agent_cfg(&hub, "svc", &svc);
    cfg.grace = Duration::from_secs(10);
    let a = Agent::start(cfg).unwrap();
    a.wait_sessions(1, T).await.unwrap();
    hub.wait_for_name("svc", T).await.unwrap();
    let mut c = caller(&hub).await;
    let mut c2 = c.clone();
    let slow = tokio::spawn(async move { c2.unary(to("svc", echo("sleep:1500", 0))).await });
    wait_until("the call to reach the agent", || a.calls_in_flight() == 1).await;
    let drain = tokio::spawn(a.drain());
    wait_until("the hub to drop the name", || {
        hub.state().peer_named("svc").is_none()
    })
    .await;
    // New calls are not routed to the leaving agent...
    let err = c.unary(to("svc", echo("late", 0))).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    // ...while the call in flight finishes.
    assert_eq!(slow.await.unwrap().unwrap().get_ref().message, "sleep:1500");
    let d = tokio::time::timeout(T, drain)
        .await
        .unwrap()
        .unwrap()
        .expect("drained a session");
    assert!(d.hub_told);
    assert_eq!(d.cut, 0);
    wait_until("the session to end", || hub.registry().is_empty()).await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_session_finishes_its_calls() {
    let hub = hub_with(HubConfig::default()).await;
    let old_svc = service("old").await;
    let new_svc = service("new").await;
    let old = agent(&hub, "svc", &old_svc).await;
    let old_id = hub.state().peer_named("svc").unwrap();
    let mut c = caller(&hub).await;
    let mut c2 = c.clone();
    let slow = tokio::spawn(async move { c2.unary(to("svc", echo("sleep:1500", 0))).await });
    wait_until("the call to reach the old agent", || {
        old.calls_in_flight() == 1
    })
    .await;
    // Same name, newer session: it takes over.
    let new = Agent::start(agent_cfg(&hub, "svc", &new_svc)).unwrap();
    new.wait_sessions(1, T).await.unwrap();
    wait_until("the name to move", || {
        hub.state().peer_named("svc") != Some(old_id)
    })
    .await;
    assert_eq!(
        c.unary(to("svc", echo("x", 0)))
            .await
            .unwrap()
            .get_ref()
            .server,
        "new"
    );
    // The old session's call ends normally, and then the old session goes.
    let r = slow
        .await
        .unwrap()
        .expect("the superseded session's call finishes");
    assert_eq!(r.get_ref().server, "old");
    tokio::time::timeout(T, hub.registry().wait_gone(old_id))
        .await
        .unwrap();
    old.stop().await;
    new.stop().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------- 5. flags, with the real binary

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_backchannel")
}

#[test]
fn bad_flags_exit_2_naming_the_flag_and_the_rule() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&["hub", "--grace", "-5"], "--grace", "negative"),
        (&["hub", "--grace", "NaN"], "--grace", "NaN"),
        (&["hub", "--max-peers", "0"], "--max-peers", "at least 1"),
        (&["hub", "--threads", "0"], "--threads", "1..=1024"),
        (
            &[
                "hub",
                "--cluster",
                "rediss://127.0.0.1:1",
                "--advertise",
                "127.0.0.1:1",
                "--cluster-redis-cert",
                "c.pem",
            ],
            "--cluster-redis-key",
            "required",
        ),
        (&["agent", "--threads", "x"], "--threads", "invalid digit"),
        (
            &["hub", "--listen", "notahostport"],
            "--listen",
            "HOST:PORT",
        ),
        (
            &["hub", "--handshake-timeout", "0"],
            "--handshake-timeout",
            "more than 0",
        ),
        (
            &["hub", "--announce-timeout", "inf"],
            "--announce-timeout",
            "finite",
        ),
        (
            &["hub", "--max-pending-per-source", "0"],
            "--max-pending-per-source",
            "at least 1",
        ),
        (
            &[
                "agent",
                "--hub",
                "notahostport",
                "--name",
                "a",
                "--expose",
                "127.0.0.1:1",
            ],
            "--hub",
            "HOST:PORT",
        ),
        (
            &[
                "agent",
                "--hub",
                "127.0.0.1:1",
                "--name",
                "a",
                "--expose",
                "127.0.0.1:1",
                "--max-backoff",
                "0",
            ],
            "--max-backoff",
            "more than 0",
        ),
        (
            &[
                "agent",
                "--hub",
                "127.0.0.1:1",
                "--name",
                "a",
                "--expose",
                "127.0.0.1:1",
                "--max-backoff",
                "0.01",
            ],
            "--max-backoff",
            "at least 0.1",
        ),
        (
            &[
                "agent",
                "--hub",
                "127.0.0.1:1",
                "--name",
                "a",
                "--expose",
                "127.0.0.1:1",
                "--grace",
                "-1",
            ],
            "--grace",
            "negative",
        ),
        (
            &[
                "agent",
                "--hub",
                "127.0.0.1:1",
                "--name",
                "a b",
                "--expose",
                "127.0.0.1:1",
            ],
            "--name",
            "may only contain",
        ),
        (
            &[
                "agent",
                "--hub",
                "127.0.0.1:1",
                "--name",
                "a",
                "--expose",
                "127.0.0.1:1",
                "--label",
                "novalue",
            ],
            "--label",
            "KEY=VALUE",
        ),
    ];
    for (args, flag, rule) in cases {
        let out = Command::new(bin()).args(*args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag) && err.contains(rule), "{args:?}: {err}");
    }
}

/// Starts the binary with stderr captured line by line.
fn spawn(args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx2.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, rx)
}

/// The first line containing `needle`, waiting at most `T`.
fn line_with(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return l,
            Ok(_) => {}
            Err(_) => panic!("no line with '{needle}' in {T:?}"),
        }
    }
}

fn sigterm_and_wait(child: &mut std::process::Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + T;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "process did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unreachable_hub_is_retried_and_a_tls_mismatch_is_named() {
    // Nothing listens there: the agent keeps retrying (and says so).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().to_string();
    drop(l);
    let (mut a, rx) = spawn(&[
        "agent",
        "--hub",
        &dead,
        "--name",
        "a",
        "--expose",
        "127.0.0.1:1",
        "--max-backoff",
        "0.2",
    ]);
    line_with(&rx, "cannot connect to the hub");
    line_with(&rx, "cannot connect to the hub");
    assert!(a.try_wait().unwrap().is_none(), "still retrying");
    assert!(sigterm_and_wait(&mut a).success());

    // A plaintext agent against a TLS hub is told so.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&cert, c.cert.pem()).unwrap();
    std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
    let (mut hub, hub_rx) = spawn(&[
        "hub",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let line = line_with(&hub_rx, "hub listening on ");
    let addr = line.rsplit(' ').next().unwrap().to_string();
    let (mut a, rx) = spawn(&[
        "agent",
        "--hub",
        &addr,
        "--name",
        "a",
        "--expose",
        "127.0.0.1:1",
        "--max-backoff",
        "0.2",
    ]);
    line_with(
        &rx,
        "the hub speaks TLS but this agent connects in plaintext: pass --tls-ca",
    );
    assert!(sigterm_and_wait(&mut a).success());
    assert!(sigterm_and_wait(&mut hub).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_agent_binary_and_exits_0() {
    let hub = hub_with(HubConfig::default()).await;
    let svc = service("svc").await;
    let hub_addr = hub.addr.unwrap().to_string();
    let (mut a, rx) = spawn(&[
        "agent", "--hub", &hub_addr, "--name", "svc", "--expose", &svc.addr, "--grace", "10",
    ]);
    let rx = tokio::task::spawn_blocking(move || {
        line_with(&rx, "announced");
        rx
    })
    .await
    .unwrap();
    let mut c = caller(&hub).await;
    let slow = tokio::spawn(async move { c.unary(to("svc", echo("sleep:1500", 0))).await });
    wait_until("the call to be routed", || {
        hub.state().calls_in_flight() == 1
    })
    .await;
    let status = tokio::task::spawn_blocking(move || {
        let s = sigterm_and_wait(&mut a);
        line_with(&rx, "every call finished");
        s
    });
    assert_eq!(
        slow.await
            .unwrap()
            .expect("in-flight call finishes")
            .get_ref()
            .message,
        "sleep:1500"
    );
    assert!(status.await.unwrap().success(), "exit 0");
    wait_until("the session to end", || hub.registry().is_empty()).await;
    hub.shutdown().await;
}
