//! A cluster of hubs on a real `redis-server` (started by each test on a
//! free loopback port): callers on any hub reach the agents of every hub,
//! fenced name ownership, failover after `kill -9`, drain on SIGTERM, Redis
//! going away and coming back, forged hops.

use std::{
    pin::Pin,
    process::Stdio,
    time::{Duration, Instant},
};

use backchannel::ClientBuilder;
use backchannel_demo::pb::testing::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    EchoRequest, EchoResponse,
};
use backchannel_directory::{Directory, RedisConfig, RedisDirectory, Refreshed, Registration};
use backchannel_sidecar::{
    agent::{Agent, AgentConfig},
    hub::{cluster::ClusterConfig, Hub, HubConfig},
    pb::hub::{
        peer_event::Kind as PeerEventKind, peers_client::PeersClient,
        registration_client::RegistrationClient, AnnounceRequest, ListPeersRequest,
        WatchPeersRequest,
    },
    tunnel::cli::{Dialer, TunnelArgs},
};
use backchannel_testkit::pattern::{check_stream, read_stream, write_stream};
use futures::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tonic::{
    metadata::MetadataValue, transport::Channel, Code, Request, Response, Status, Streaming,
};

const T: Duration = Duration::from_secs(20);
const TOKEN: &str = "cluster-test-token-0123456789";

// ---------------------------------------------------------------- redis

/// A `redis-server` child on a free loopback port, killed on drop.
struct Redis {
    port: u16,
    child: Option<std::process::Child>,
    /// Extra `redis-server` arguments (passwords, ACL users, TLS; `{port}`
    /// stands for the port).
    args: Vec<String>,
    /// The `user:password@` a client needs (empty: none).
    userinfo: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Redis {
    async fn start() -> Redis {
        Self::start_with(&[], "").await
    }

    /// With `args` for `redis-server`, reached as `userinfo` (`:pw@`).
    async fn start_with(args: &[&str], userinfo: &str) -> Redis {
        let mut r = Redis {
            port: free_port(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            userinfo: userinfo.into(),
        };
        r.restart().await;
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port, with no data.
    async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(
                self.args
                    .iter()
                    .map(|a| a.replace("{port}", &self.port.to_string())),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test.sh installs it)");
        self.child = Some(child);
        if self.args.iter().any(|a| a == "--tls-port") {
            // TLS only: ready once it accepts connections.
            let deadline = Instant::now() + T;
            while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_err()
            {
                assert!(Instant::now() < deadline, "redis-server did not start");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            return;
        }
        // Ready once it answers PING.
        let url = format!("redis://{}127.0.0.1:{}", self.userinfo, self.port);
        let client = redis::Client::open(url).unwrap();
        let deadline = Instant::now() + T;
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
                if pong.is_ok() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------- the private service

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[derive(Clone)]
struct Private {
    name: String,
    events: mpsc::UnboundedSender<String>,
}

struct OnDrop(mpsc::UnboundedSender<String>, String);
impl Drop for OnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(self.1.clone());
    }
}

impl Private {
    fn reply(&self, message: String) -> EchoResponse {
        EchoResponse {
            message,
            server: self.name.clone(),
        }
    }
}

#[tonic::async_trait]
impl Echo for Private {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let md = request.metadata().clone();
        let msg = request.into_inner().message;
        if let Some(ms) = msg.strip_prefix("sleep:") {
            let guard = OnDrop(self.events.clone(), "unary dropped".into());
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            std::mem::forget(guard);
        }
        let mut resp = Response::new(self.reply(msg));
        for k in [
            "backchannel-caller",
            "backchannel-hop",
            "backchannel-hop-token",
            "x-req",
        ] {
            let v = md
                .get(k)
                .cloned()
                .unwrap_or(MetadataValue::from_static("-"));
            resp.metadata_mut().insert(
                tonic::metadata::MetadataKey::from_bytes(format!("x-saw-{k}").as_bytes()).unwrap(),
                v,
            );
        }
        Ok(resp)
    }

    type ServerStreamStream = BoxStream<EchoResponse>;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let r = request.into_inner();
        let this = self.clone();
        if r.message == "hang" {
            let guard = OnDrop(self.events.clone(), "stream cancelled".into());
            let first = futures::stream::iter([Ok(this.reply("first".into()))]);
            let rest = futures::stream::pending().map(move |()| {
                let _ = &guard;
                Ok(EchoResponse::default())
            });
            return Ok(Response::new(Box::pin(first.chain(rest))));
        }
        if r.message == "fail" {
            let s =
                futures::stream::iter([Ok(this.reply("a".into())), Err(Status::aborted("boom"))]);
            return Ok(Response::new(Box::pin(s)));
        }
        let s = futures::stream::iter(0..r.count)
            .map(move |i| Ok(this.reply(format!("{}-{i}", r.message))));
        Ok(Response::new(Box::pin(s)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let mut stream = request.into_inner();
        let mut all = String::new();
        while let Some(m) = stream.message().await? {
            all.push_str(&m.message);
        }
        Ok(Response::new(self.reply(all)))
    }

    type BidiStream = BoxStream<EchoResponse>;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let this = self.clone();
        let s = request
            .into_inner()
            .map(move |m| m.map(|m| this.reply(m.message)));
        Ok(Response::new(Box::pin(s)))
    }
}

struct PrivateService {
    addr: String,
    events: mpsc::UnboundedReceiver<String>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PrivateService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn private(name: &str) -> (Private, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Private {
            name: name.into(),
            events: tx,
        },
        rx,
    )
}

async fn private_service(name: &str) -> PrivateService {
    let (svc, events) = private(name);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    PrivateService { addr, events, task }
}

// ---------------------------------------------------------------- hubs and callers

fn token_file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), TOKEN).unwrap();
    f
}

fn cluster_cfg(
    redis: &Redis,
    id: &str,
    token: &tempfile::NamedTempFile,
    ns: &str,
) -> ClusterConfig {
    let mut c = ClusterConfig::new(redis.url(), "127.0.0.1:0");
    c.hub_id = id.into();
    c.namespace = ns.into();
    c.ttl = Duration::from_secs(3);
    c.refresh = Duration::from_millis(500);
    c.token_file = Some(token.path().to_path_buf());
    c
}

async fn hub(redis: &Redis, id: &str, token: &tempfile::NamedTempFile, ns: &str) -> Hub {
    Hub::start(HubConfig {
        cluster: Some(cluster_cfg(redis, id, token, ns)),
        grace: Duration::from_secs(5),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn caller(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn to(peer: &str, msg: &str) -> Request<EchoRequest> {
    let mut r = Request::new(EchoRequest {
        message: msg.into(),
        count: 3,
    });
    r.metadata_mut()
        .insert("backchannel-peer", peer.parse().unwrap());
    r
}

/// Calls `peer` through `ch` until it answers (bounded): how a caller waits
/// for a name to become routable.
async fn until_reachable(ch: &Channel, peer: &str) -> Duration {
    let start = Instant::now();
    loop {
        let r = EchoClient::new(ch.clone()).unary(to(peer, "ping")).await;
        if r.is_ok() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < T,
            "'{peer}' never became reachable: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fate(s: &Status) -> String {
    s.metadata()
        .get("backchannel-fate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

fn agent(hubs: &[&Hub], name: &str, expose: &str) -> Agent {
    let addrs: Vec<String> = hubs.iter().map(|h| h.addr.unwrap().to_string()).collect();
    let mut cfg = AgentConfig::new(addrs[0].clone(), name, expose);
    cfg.also_hubs = addrs[1..].to_vec();
    cfg.backoff_max = Duration::from_millis(500);
    Agent::start(cfg).unwrap()
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_hubs_every_caller_reaches_every_agent() {
    let redis = Redis::start().await;
    let tok = token_file();
    let hubs = [
        hub(&redis, "a", &tok, "t1").await,
        hub(&redis, "b", &tok, "t1").await,
        hub(&redis, "c", &tok, "t1").await,
    ];
    let mut svcs = Vec::new();
    let mut agents = Vec::new();
    for (i, h) in hubs.iter().enumerate() {
        let s = private_service(&format!("svc{i}")).await;
        agents.push(agent(&[h], &format!("agent{i}"), &s.addr));
        svcs.push(s);
    }
    for a in &agents {
        a.wait_sessions(1, T).await.unwrap();
    }
    for h in &hubs {
        let ch = caller(&h.addr.unwrap().to_string()).await;
        for i in 0..3 {
            let name = format!("agent{i}");
            until_reachable(&ch, &name).await;
            let mut c = EchoClient::new(ch.clone());
            // Unary, with metadata both ways; the hop headers never reach
            // the service, the caller's identity does.
            let mut req = to(&name, "hi");
            req.metadata_mut().insert("x-req", "v1".parse().unwrap());
            let r = c.unary(req).await.unwrap();
            assert_eq!(r.get_ref().server, format!("svc{i}"));
            assert_eq!(r.metadata().get("x-saw-x-req").unwrap(), "v1");
            assert_eq!(r.metadata().get("x-saw-backchannel-hop").unwrap(), "-");
            assert_eq!(
                r.metadata().get("x-saw-backchannel-hop-token").unwrap(),
                "-"
            );
            assert_eq!(
                r.metadata().get("x-saw-backchannel-caller").unwrap(),
                "anonymous"
            );
            // Server streaming, and a failing stream's status.
            let got: Vec<String> = c
                .server_stream(to(&name, "s"))
                .await
                .unwrap()
                .into_inner()
                .map(|m| m.unwrap().message)
                .collect()
                .await;
            assert_eq!(got, ["s-0", "s-1", "s-2"]);
            let mut s = c
                .server_stream(to(&name, "fail"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(s.message().await.unwrap().unwrap().message, "a");
            assert_eq!(s.message().await.unwrap_err().code(), Code::Aborted);
            // Client streaming.
            let mut req = Request::new(futures::stream::iter(["x", "y", "z"].map(|m| {
                EchoRequest {
                    message: m.into(),
                    count: 0,
                }
            })));
            req.metadata_mut()
                .insert("backchannel-peer", name.parse().unwrap());
            assert_eq!(c.client_stream(req).await.unwrap().get_ref().message, "xyz");
            // Bidi.
            let (tx, rx) = mpsc::channel(4);
            let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
            req.metadata_mut()
                .insert("backchannel-peer", name.parse().unwrap());
            let mut resp = c.bidi(req).await.unwrap().into_inner();
            for m in ["p", "q"] {
                tx.send(EchoRequest {
                    message: m.into(),
                    count: 0,
                })
                .await
                .unwrap();
                assert_eq!(resp.message().await.unwrap().unwrap().message, m);
            }
            drop(tx);
            assert!(resp.message().await.unwrap().is_none());
        }
    }
    // Deadline and cancel across the hop: hub a's caller, agent2 on hub c.
    let ch = caller(&hubs[0].addr.unwrap().to_string()).await;
    let mut c = EchoClient::new(ch.clone());
    let mut req = to("agent2", "sleep:3000");
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = c.unary(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
    let ev = tokio::time::timeout(T, svcs[2].events.recv())
        .await
        .unwrap();
    assert_eq!(ev.as_deref(), Some("unary dropped"));
    let mut s = c
        .server_stream(to("agent2", "hang"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().message, "first");
    drop(s);
    let ev = tokio::time::timeout(T, svcs[2].events.recv())
        .await
        .unwrap();
    assert_eq!(ev.as_deref(), Some("stream cancelled"));
    // An unknown name: NOT_FOUND, not sent.
    let err = c.unary(to("nobody", "x")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(fate(&err), "not-sent");
    // Peers.List shows the whole cluster, or this hub only.
    let mut pc = PeersClient::new(ch.clone());
    let all = pc
        .list(ListPeersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .peers;
    let mut seen: Vec<(String, String)> = all
        .iter()
        .filter(|p| !p.name.is_empty())
        .map(|p| (p.name.clone(), p.hub_id.clone()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [("agent0", "a"), ("agent1", "b"), ("agent2", "c")]
            .map(|(n, h)| (n.to_string(), h.to_string()))
    );
    let local = pc
        .list(ListPeersRequest { local_only: true })
        .await
        .unwrap()
        .into_inner()
        .peers;
    assert_eq!(local.len(), 1);
    assert_eq!(local[0].name, "agent0");
    // Peers.Watch too: the whole cluster as EXISTING, then the other hubs'
    // changes; or this hub only.
    let mut watch = pc
        .watch(WatchPeersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut existing = Vec::new();
    for _ in 0..all.len() {
        let ev = tokio::time::timeout(T, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(ev.kind, PeerEventKind::Existing as i32, "{ev:?}");
        let p = ev.peer.unwrap();
        existing.push((p.name, p.hub_id));
    }
    existing.retain(|(n, _)| !n.is_empty());
    existing.sort();
    assert_eq!(existing, seen);
    let mut local_watch = pc
        .watch(WatchPeersRequest {
            local_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let ev = tokio::time::timeout(T, local_watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let p = ev.peer.unwrap();
    assert_eq!((p.name.as_str(), p.hub_id.as_str()), ("agent0", "a"));
    let mut agents = agents.into_iter();
    let (a0, a1) = (agents.next().unwrap(), agents.next().unwrap());
    a1.stop().await;
    let left = loop {
        let ev = tokio::time::timeout(T, watch.message())
            .await
            .expect("the other hub's release reaches the watcher")
            .unwrap()
            .unwrap();
        let p = ev.peer.clone().unwrap();
        if ev.kind == PeerEventKind::Left as i32 && p.name == "agent1" {
            break p;
        }
    };
    assert_eq!(left.hub_id, "b");
    for a in std::iter::once(a0).chain(agents) {
        a.stop().await;
    }
    for h in hubs {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_hop_header_is_refused() {
    let redis = Redis::start().await;
    let tok = token_file();
    let a = hub(&redis, "a", &tok, "t2").await;
    let s = private_service("svc").await;
    let ag = agent(&[&a], "db", &s.addr);
    ag.wait_sessions(1, T).await.unwrap();
    let ch = caller(&a.addr.unwrap().to_string()).await;
    until_reachable(&ch, "db").await;
    let mut c = EchoClient::new(ch);
    for token in [None, Some("wrong-token-0123456789")] {
        let mut req = to("db", "x");
        req.metadata_mut()
            .insert("backchannel-hop", "a".parse().unwrap());
        req.metadata_mut()
            .insert("backchannel-caller", "admin".parse().unwrap());
        if let Some(t) = token {
            req.metadata_mut()
                .insert("backchannel-hop-token", t.parse().unwrap());
        }
        let err = c.unary(req).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
        assert_eq!(fate(&err), "not-sent");
    }
    // A caller's own backchannel-caller is replaced by the hub's view.
    let mut req = to("db", "x");
    req.metadata_mut()
        .insert("backchannel-caller", "admin".parse().unwrap());
    let r = c.unary(req).await.unwrap();
    assert_eq!(
        r.metadata().get("x-saw-backchannel-caller").unwrap(),
        "anonymous"
    );
    // A hub outside a cluster refuses hops too.
    let solo = Hub::start(HubConfig::default()).await.unwrap();
    let mut c2 = EchoClient::new(caller(&solo.addr.unwrap().to_string()).await);
    let mut req = to("db", "x");
    req.metadata_mut()
        .insert("backchannel-hop", "a".parse().unwrap());
    assert_eq!(
        c2.unary(req).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    ag.stop().await;
    a.shutdown().await;
    solo.shutdown().await;
}

fn tunnel_args(hub: &Hub, peer: &str, service: &str) -> TunnelArgs {
    TunnelArgs {
        hub: hub.addr.unwrap().to_string(),
        peer: peer.into(),
        service: service.into(),
        listen: None,
        stdio: true,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        tls_server_name: None,
        token_file: None,
        timeout: Duration::from_secs(10),
    }
}

/// A TCP echo service that half-closes when its client does.
async fn tcp_echo() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tunnels_cross_hubs_like_calls() {
    const MIB: u64 = 1024 * 1024;
    let redis = Redis::start().await;
    let tok = token_file();
    let a = hub(&redis, "a", &tok, "tun").await;
    let b = hub(&redis, "b", &tok, "tun").await;
    // The agent is on hub b only; callers come to hub a.
    let svc = private_service("tbox").await;
    let mut cfg = AgentConfig::new(b.addr.unwrap().to_string(), "tbox", &svc.addr);
    cfg.expose_tcp = vec![("echo".into(), tcp_echo().await)];
    let ag = Agent::start(cfg).unwrap();
    ag.wait_sessions(1, T).await.unwrap();
    until_reachable(&caller(&a.addr.unwrap().to_string()).await, "tbox").await;

    // 64 MiB each way, byte-checked, with the caller's half-close carried
    // across both hubs to the service and back.
    let dialer = Dialer::new(&tunnel_args(&a, "tbox", "echo")).unwrap();
    let (mut r, mut w) = dialer.open().await.unwrap();
    let send = async {
        write_stream(&mut w, 31, 64 * MIB).await;
        w.shutdown().await.unwrap();
    };
    let ((), got) = tokio::join!(send, read_stream(&mut r, 31));
    assert_eq!(got.unwrap(), 64 * MIB);

    // The far side's refusal reaches the caller, naming the hub it crossed.
    let e = Dialer::new(&tunnel_args(&a, "tbox", "nope"))
        .unwrap()
        .open()
        .await
        .err()
        .expect("refused");
    let e = format!("{e:#}");
    assert!(e.contains("no tunnel service 'nope'"), "{e}");
    assert!(e.contains("on hub 'b'"), "{e}");
    // A name no hub holds.
    let e = Dialer::new(&tunnel_args(&a, "nobody", "echo"))
        .unwrap()
        .open()
        .await
        .err()
        .expect("refused");
    assert!(format!("{e:#}").contains("no peer 'nobody'"), "{e:#}");

    // A caller cannot forge a hop to reach hub b's peers directly.
    for token in [None, Some("wrong-token-0123456789")] {
        let tcp = tokio::net::TcpStream::connect(b.addr.unwrap())
            .await
            .unwrap();
        let mut req = backchannel::TunnelRequest::new("echo")
            .with_metadata("peer", "tbox")
            .with_metadata("backchannel-hop", "a")
            .with_metadata("backchannel-caller", "admin");
        if let Some(t) = token {
            req = req.with_metadata("backchannel-hop-token", t);
        }
        match backchannel::tunnel::connect(tcp, req, "hub b").await {
            Err(backchannel::TunnelError::Refused { kind, reason, .. }) => {
                assert_eq!(kind, backchannel::RefusalKind::Denied, "{reason}");
                assert!(reason.contains("backchannel-hop"), "{reason}");
            }
            other => panic!("a forged hop was not refused: {other:?}"),
        }
    }

    // The agent dies mid-tunnel: the caller on the other hub gets an
    // error naming the peer, never a clean end.
    let (mut r, mut w) = dialer.open().await.unwrap();
    write_stream(&mut w, 32, MIB).await;
    let mut buf = vec![0u8; MIB as usize];
    r.read_exact(&mut buf).await.unwrap();
    check_stream(32, 0, &buf);
    ag.stop().await;
    let mut rest = Vec::new();
    let e = tokio::time::timeout(T, r.read_to_end(&mut rest))
        .await
        .expect("the caller's side ends promptly")
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionAborted, "{e}");
    assert!(e.to_string().contains("tbox"), "{e}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A backchannel client announcing `name` on `hub` (no reconnects), serving
/// `svc`: the generation the hub gave, and the client.
async fn announce_raw(hub: &Hub, name: &str, svc: Private) -> (Option<u64>, backchannel::Client) {
    let routes = tonic::service::Routes::new(EchoServer::new(svc));
    let client = ClientBuilder::new()
        .connect_tcp(&hub.addr.unwrap().to_string(), routes)
        .await
        .unwrap();
    let r = RegistrationClient::new(client.channel())
        .announce(AnnounceRequest {
            name: name.into(),
            labels: Default::default(),
        })
        .await;
    // The loser of a race may have its session closed before the answer.
    (r.ok().map(|r| r.into_inner().generation), client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_name_on_two_hubs_one_wins() {
    let redis = Redis::start().await;
    let tok = token_file();
    let a = hub(&redis, "a", &tok, "t3").await;
    let b = hub(&redis, "b", &tok, "t3").await;
    let c = hub(&redis, "c", &tok, "t3").await;
    let (sa, _ea) = private("on-a");
    let (sb, _eb) = private("on-b");
    let ((ga, ca), (gb, cb)) =
        tokio::join!(announce_raw(&a, "dup", sa), announce_raw(&b, "dup", sb));
    let dir = RedisDirectory::start(RedisConfig {
        namespace: "t3".into(),
        ..RedisConfig::new(redis.url())
    })
    .unwrap();
    // Exactly one session stays: the one the directory names.
    let start = Instant::now();
    while !(ca.is_closed() || cb.is_closed()) {
        assert!(start.elapsed() < T, "neither session was closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cur = dir.lookup("dup").await.unwrap().unwrap();
    let (winner, won, lost, gen_l) = if cur.hub_id == "a" {
        ("on-a", &ca, &cb, gb)
    } else {
        ("on-b", &cb, &ca, ga)
    };
    assert!(lost.is_closed(), "the loser's session is closed");
    assert!(
        !won.is_closed(),
        "the winner's session stays: lost closed {}, entry {cur:?}, ga {ga:?} gb {gb:?}",
        lost.is_closed()
    );
    let gen_w = cur.generation;
    if let Some(g) = gen_l {
        assert!(gen_w > g, "the generation grows: {g} then {gen_w}");
    }
    let gen_l = gen_l.unwrap_or(gen_w - 1);
    // Every call, from any hub, goes to the winner.
    for h in [&a, &b, &c] {
        let ch = caller(&h.addr.unwrap().to_string()).await;
        until_reachable(&ch, "dup").await;
        for _ in 0..20 {
            let r = EchoClient::new(ch.clone())
                .unary(to("dup", "x"))
                .await
                .unwrap();
            assert_eq!(r.get_ref().server, winner);
        }
    }
    // A hub never overwrites a newer generation: the loser's entry is lost.
    let mut stale = cur.clone();
    stale.generation = gen_l;
    stale.hub_id = if winner == "on-a" {
        "b".into()
    } else {
        "a".into()
    };
    assert!(
        matches!(dir.refresh(&stale).await.unwrap(), Refreshed::Lost(Some(e)) if e.generation == gen_w)
    );
    assert!(!dir.release(&stale).await.unwrap());
    // Another identity cannot take a live name through the directory.
    let err = dir
        .claim(Registration::new("dup", "x", "h:1", 1, "someone-else"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("another identity"), "{err}");
    for h in [a, b, c] {
        h.shutdown().await;
    }
}

/// A Redis that wants a password: hubs given it in a file form the cluster;
/// a hub with a wrong one cannot route to the others' agents and says why,
/// without echoing any password; bad password flags stop the hub at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_with_a_password() {
    const PW: &str = "redis-pw-0123456789";
    let redis = Redis::start_with(&["--requirepass", PW], &format!(":{PW}@")).await;
    let tok = token_file();
    let secret = |text: &str| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    };
    let good = secret(&format!("{PW}\n"));
    let wrong = secret("not-the-password");
    let start = |id: &'static str, pw: Option<&tempfile::NamedTempFile>| {
        let mut c = cluster_cfg(&redis, id, &tok, "t-auth");
        c.redis_password_file = pw.map(|f| f.path().to_path_buf());
        Hub::start(HubConfig {
            cluster: Some(c),
            grace: Duration::from_secs(5),
            ..Default::default()
        })
    };
    let a = start("a", Some(&good)).await.unwrap();
    let b = start("b", Some(&good)).await.unwrap();
    let c = start("c", Some(&wrong)).await.unwrap();
    let sa = private_service("svc-a").await;
    let aa = agent(&[&a], "on-a", &sa.addr);
    aa.wait_sessions(1, T).await.unwrap();

    // Through b, with the password: routed to a's agent.
    let chb = caller(&b.addr.unwrap().to_string()).await;
    until_reachable(&chb, "on-a").await;
    let r = EchoClient::new(chb.clone())
        .unary(to("on-a", "via b"))
        .await
        .unwrap();
    assert_eq!(r.get_ref().server, "svc-a");

    // Through c, with a wrong password: refused, saying why.
    let chc = caller(&c.addr.unwrap().to_string()).await;
    let e = EchoClient::new(chc)
        .unary(to("on-a", "via c"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let m = e.message().to_string();
    assert!(m.contains("cluster directory is unreachable"), "{m}");
    assert!(!m.contains(PW) && !m.contains("not-the-password"), "{m}");

    // The binary with a wrong password says why on stderr, once, without
    // the password.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_backchannel"))
        .args(["hub", "--listen", "127.0.0.1:0", "--cluster", &redis.url()])
        .args(["--advertise", "127.0.0.1:0", "--hub-id", "w"])
        .args(["--cluster-namespace", "t-auth"])
        .arg("--cluster-token-file")
        .arg(tok.path())
        .arg("--cluster-password-file")
        .arg(wrong.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (reader, rx) = lines_of(child.stderr.take().unwrap());
    let line = loop {
        let line = rx
            .recv_timeout(T)
            .expect("the hub logs why Redis refuses it");
        if line.contains("cannot subscribe to Redis") {
            break line;
        }
    };
    assert!(line.contains("authentication failed"), "{line}");
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap();
    let rest: Vec<String> = rx.try_iter().collect();
    for l in std::iter::once(&line).chain(&rest) {
        assert!(!l.contains("not-the-password") && !l.contains(PW), "{l}");
    }

    // Flags that cannot work stop the hub at start.
    let empty = secret("  \n");
    let e = start("d", Some(&empty)).await.err().unwrap().to_string();
    assert!(e.contains("empty"), "{e}");
    let mut both = cluster_cfg(&redis, "e", &tok, "t-auth");
    both.redis = format!("redis://:{PW}@127.0.0.1:{}", redis.port);
    both.redis_password_file = Some(good.path().to_path_buf());
    let e = Hub::start(HubConfig {
        cluster: Some(both),
        ..Default::default()
    })
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("not both") && !e.contains(PW), "{e}");
    let mut missing = cluster_cfg(&redis, "f", &tok, "t-auth");
    missing.redis_password_file = Some("/nonexistent/redis-pw".into());
    let e = Hub::start(HubConfig {
        cluster: Some(missing),
        ..Default::default()
    })
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("--cluster-password-file /nonexistent/redis-pw"),
        "{e}"
    );

    aa.stop().await;
    for h in [a, b, c] {
        h.shutdown().await;
    }

    // An ACL user (the default user off): found with its name and password.
    let acl = Redis::start_with(
        &[
            "--user",
            "default",
            "off",
            "--user",
            "hubs",
            "on",
            &format!(">{PW}"),
            "~*",
            "&*",
            "+@all",
        ],
        &format!("hubs:{PW}@"),
    )
    .await;
    let dir = |user: Option<&str>| {
        let mut rc = RedisConfig::new(acl.url());
        rc.username = user.map(Into::into);
        rc.password = Some(PW.into());
        rc.namespace = "t-acl".into();
        assert!(!format!("{rc:?}").contains(PW), "Debug hides the password");
        RedisDirectory::start(rc).unwrap()
    };
    let as_hubs = dir(Some("hubs"));
    let reg = || Registration::new("acl-peer", "h", "127.0.0.1:1", 1, "anonymous");
    as_hubs
        .claim(reg())
        .await
        .expect("the ACL user claims a name");
    let e = dir(None).claim(reg()).await.unwrap_err().to_string();
    assert!(!e.contains(PW), "{e}");
}

/// Redis over TLS, checking clients: hubs with the CA and a client
/// certificate form the cluster; one without a client certificate cannot
/// reach Redis; certificates with a plaintext URL stop the hub at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = backchannel_testkit::pki::Pki::new(dir.path());
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let redis = Redis::start_with(
        &[
            "--port",
            "0",
            "--tls-port",
            "{port}",
            "--tls-cert-file",
            &path(&pki.server_cert),
            "--tls-key-file",
            &path(&pki.server_key),
            "--tls-ca-cert-file",
            &path(&pki.ca),
            "--tls-auth-clients",
            "yes",
        ],
        "",
    )
    .await;
    let port = redis.port;
    let tok = token_file();
    let start = |id: &'static str, client_cert: bool, url: String| {
        let mut c = cluster_cfg(&redis, id, &tok, "t-tls");
        c.redis = url;
        c.redis_tls_ca = Some(pki.ca.clone());
        c.redis_tls_client = client_cert.then(|| (pki.client_cert.clone(), pki.client_key.clone()));
        Hub::start(HubConfig {
            cluster: Some(c),
            grace: Duration::from_secs(5),
            ..Default::default()
        })
    };
    let tls_url = format!("rediss://localhost:{port}");
    let a = start("a", true, tls_url.clone()).await.unwrap();
    let b = start("b", true, tls_url.clone()).await.unwrap();
    let c = start("c", false, tls_url.clone()).await.unwrap();
    let sa = private_service("svc-a").await;
    let aa = agent(&[&a], "on-a", &sa.addr);
    aa.wait_sessions(1, T).await.unwrap();
    let chb = caller(&b.addr.unwrap().to_string()).await;
    until_reachable(&chb, "on-a").await;
    let r = EchoClient::new(chb).unary(to("on-a", "tls")).await.unwrap();
    assert_eq!(r.get_ref().server, "svc-a");
    let chc = caller(&c.addr.unwrap().to_string()).await;
    let e = EchoClient::new(chc)
        .unary(to("on-a", "no cert"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        e.message().contains("cluster directory is unreachable"),
        "{e:?}"
    );

    let e = start("d", true, format!("redis://localhost:{port}"))
        .await
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("not rediss://"), "{e:#}");

    aa.stop().await;
    for h in [a, b, c] {
        h.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_keeps_local_routes_and_recovers() {
    let mut redis = Redis::start().await;
    let tok = token_file();
    let a = hub(&redis, "a", &tok, "t4").await;
    let b = hub(&redis, "b", &tok, "t4").await;
    let sa = private_service("svc-a").await;
    let sb = private_service("svc-b").await;
    let aa = agent(&[&a], "on-a", &sa.addr);
    let ab = agent(&[&b], "on-b", &sb.addr);
    aa.wait_sessions(1, T).await.unwrap();
    ab.wait_sessions(1, T).await.unwrap();
    let cha = caller(&a.addr.unwrap().to_string()).await;
    until_reachable(&cha, "on-a").await;
    until_reachable(&cha, "on-b").await;

    // Local calls under load while Redis goes away and comes back.
    let load = {
        let ch = cha.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut n = 0u64;
            while !s.is_cancelled() {
                let r = EchoClient::new(ch.clone()).unary(to("on-a", "x")).await;
                assert!(r.is_ok(), "a local route failed with Redis down: {r:?}");
                n += 1;
            }
            n
        });
        (stop, task)
    };
    redis.kill();
    // Cross-hub calls fail fast with UNAVAILABLE naming the cause.
    let start = Instant::now();
    let err = loop {
        let r = EchoClient::new(cha.clone()).unary(to("on-b", "x")).await;
        match r {
            Err(e) if e.code() == Code::Unavailable => break e,
            _ => {
                assert!(
                    start.elapsed() < T,
                    "cross-hub calls kept working without Redis"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(err.message().contains("cluster directory"), "{err:?}");
    assert_eq!(fate(&err), "not-sent");
    let t0 = Instant::now();
    let _ = EchoClient::new(cha.clone())
        .unary(to("on-b", "x"))
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "not fast: {:?}",
        t0.elapsed()
    );
    // Redis comes back empty: the hubs record their names again.
    redis.restart().await;
    let back = until_reachable(&cha, "on-b").await;
    println!("cross-hub route back {back:?} after Redis restarted");
    let (stop, task) = load;
    stop.cancel();
    let n = task.await.unwrap();
    assert!(n > 0);
    aa.stop().await;
    ab.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}

// ---------------------------------------------------------------- hubs as processes

struct HubProc {
    child: std::process::Child,
    addr: String,
    _out: std::thread::JoinHandle<()>,
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hub_proc(redis: &Redis, id: &str, tok: &tempfile::NamedTempFile, ns: &str) -> HubProc {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_backchannel"))
        .args([
            "hub",
            "--listen",
            "127.0.0.1:0",
            "--cluster",
            &redis.url(),
            "--advertise",
            "127.0.0.1:0",
            "--hub-id",
            id,
            "--cluster-namespace",
            ns,
            "--cluster-ttl",
            "3",
            "--cluster-refresh",
            "0.5",
            "--cluster-token-file",
            tok.path().to_str().unwrap(),
            "--grace",
            "10",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (out, rx) = lines_of(child.stdout.take().unwrap());
    let addr = loop {
        let line = rx.recv_timeout(T).expect("hub printed its address");
        if let Some(a) = line.strip_prefix("hub listening on ") {
            break a.trim().to_string();
        }
    };
    HubProc {
        child,
        addr,
        _out: out,
    }
}

/// A thread that hands each line of `r` (a child's stdout or stderr) to the
/// receiver, until it ends.
fn lines_of(
    r: impl std::io::Read + Send + 'static,
) -> (
    std::thread::JoinHandle<()>,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        for line in std::io::BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (t, rx)
}

fn signal(p: &HubProc, sig: &str) {
    std::process::Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap();
}

fn proc_agent(hubs: &[&HubProc], name: &str, expose: &str) -> Agent {
    let mut cfg = AgentConfig::new(hubs[0].addr.clone(), name, expose);
    cfg.also_hubs = hubs[1..].iter().map(|h| h.addr.clone()).collect();
    cfg.backoff_initial = Duration::from_millis(100);
    cfg.backoff_max = Duration::from_millis(500);
    Agent::start(cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_hub_agents_come_back_elsewhere() {
    let redis = Redis::start().await;
    let tok = token_file();
    let hubs = [
        hub_proc(&redis, "a", &tok, "t5"),
        hub_proc(&redis, "b", &tok, "t5"),
        hub_proc(&redis, "c", &tok, "t5"),
    ];
    let s = private_service("svc").await;
    let lone = private_service("lone").await;
    // `mover` knows all three hubs, `lone` only hub a.
    let mover = proc_agent(&[&hubs[0], &hubs[1], &hubs[2]], "mover", &s.addr);
    let stay = proc_agent(&[&hubs[0]], "lone", &lone.addr);
    mover.wait_sessions(1, T).await.unwrap();
    stay.wait_sessions(1, T).await.unwrap();
    let chb = caller(&hubs[1].addr).await;
    let chc = caller(&hubs[2].addr).await;
    until_reachable(&chb, "mover").await;
    until_reachable(&chb, "lone").await;

    let killed = Instant::now();
    signal(&hubs[0], "-KILL");
    mover.wait_sessions(2, T).await.unwrap();
    let reconnected = killed.elapsed();
    let via_b = until_reachable(&chb, "mover").await;
    let via_c = until_reachable(&chc, "mover").await;
    let failover = killed.elapsed();
    // `lone` has no other hub: once its entry expires (TTL 3 s), callers get
    // NOT_FOUND, never a hop to the dead hub.
    let gone = loop {
        let err = EchoClient::new(chb.clone())
            .unary(to("lone", "x"))
            .await
            .unwrap_err();
        assert_eq!(fate(&err), "not-sent", "{err:?}");
        if err.code() == Code::NotFound {
            break killed.elapsed();
        }
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(killed.elapsed() < T, "the dead hub's entry never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        gone < Duration::from_secs(3) + Duration::from_secs(2),
        "{gone:?}"
    );
    for _ in 0..10 {
        let err = EchoClient::new(chc.clone())
            .unary(to("lone", "x"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    println!(
        "kill -9: agent reconnected after {reconnected:?}, reachable from every hub after {failover:?} (b +{via_b:?}, c +{via_c:?}); dead hub's names gone after {gone:?} (TTL 3 s)"
    );
    mover.stop().await;
    stay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drain_moves_agents_without_failing_calls() {
    let redis = Redis::start().await;
    let tok = token_file();
    let hubs = [
        hub_proc(&redis, "a", &tok, "t6"),
        hub_proc(&redis, "b", &tok, "t6"),
    ];
    let s = private_service("svc").await;
    let ag = proc_agent(&[&hubs[0], &hubs[1]], "mover", &s.addr);
    ag.wait_sessions(1, T).await.unwrap();
    let chb = caller(&hubs[1].addr).await;
    let cha = caller(&hubs[0].addr).await;
    until_reachable(&chb, "mover").await;
    // Calls in flight through hub a (local) and through b -> a (hop).
    let mut inflight = Vec::new();
    for ch in [&cha, &chb, &cha, &chb] {
        let ch = ch.clone();
        inflight.push(tokio::spawn(async move {
            EchoClient::new(ch).unary(to("mover", "sleep:1500")).await
        }));
    }
    // Wait until the agent forwards them all.
    let start = Instant::now();
    while ag.calls_in_flight() < 4 {
        assert!(start.elapsed() < T, "calls never reached the agent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let termed = Instant::now();
    signal(&hubs[0], "-TERM");
    for c in inflight {
        let r = c.await.unwrap();
        assert!(
            r.is_ok(),
            "an in-flight call failed during the drain: {r:?}"
        );
    }
    ag.wait_sessions(2, T).await.unwrap();
    let back = until_reachable(&chb, "mover").await;
    let total = termed.elapsed();
    println!("SIGTERM drain: in-flight calls finished; agent reachable again {total:?} after SIGTERM (last wait {back:?})");
    ag.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hops_over_tls() {
    let redis = Redis::start().await;
    let tok = token_file();
    let dir = tempfile::tempdir().unwrap();
    let pki = backchannel_testkit::pki::Pki::new(dir.path());
    let mut hubs = Vec::new();
    for id in ["a", "b"] {
        let mut c = cluster_cfg(&redis, id, &tok, "t7");
        c.advertise = "localhost:0".into();
        c.tls_ca = Some(pki.ca.clone());
        hubs.push(
            Hub::start(HubConfig {
                cluster: Some(c),
                tls_cert: Some(pki.server_cert.clone()),
                tls_key: Some(pki.server_key.clone()),
                ..Default::default()
            })
            .await
            .unwrap(),
        );
    }
    let s = private_service("svc").await;
    let mut cfg = AgentConfig::new(hubs[0].addr.unwrap().to_string(), "tls-agent", &s.addr);
    cfg.tls_ca = Some(pki.ca.clone());
    cfg.tls_server_name = Some("localhost".into());
    let ag = Agent::start(cfg).unwrap();
    ag.wait_sessions(1, T).await.unwrap();
    let ca = std::fs::read_to_string(&pki.ca).unwrap();
    let ch = Channel::from_shared(format!(
        "https://localhost:{}",
        hubs[1].addr.unwrap().port()
    ))
    .unwrap()
    .tls_config(
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name("localhost"),
    )
    .unwrap()
    .connect()
    .await
    .unwrap();
    until_reachable(&ch, "tls-agent").await;
    let r = EchoClient::new(ch.clone())
        .unary(to("tls-agent", "x"))
        .await
        .unwrap();
    assert_eq!(r.get_ref().server, "svc");
    // Over TLS too, a hop without the cluster token is refused.
    let mut req = to("tls-agent", "x");
    req.metadata_mut()
        .insert("backchannel-hop", "a".parse().unwrap());
    req.metadata_mut()
        .insert("backchannel-caller", "x".parse().unwrap());
    let err = EchoClient::new(ch).unary(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    ag.stop().await;
    for h in hubs {
        h.shutdown().await;
    }
}
