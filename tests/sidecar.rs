//! End-to-end tests of `backchannel hub` and `backchannel agent`: a plain
//! caller → hub → agent → a private gRPC service, over real sockets.

mod common;

use std::{
    pin::Pin,
    time::{Duration, Instant},
};

use backchannel_demo::pb::testing::{
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    EchoRequest, EchoResponse,
};
use backchannel_sidecar::{
    agent::{Agent, AgentConfig},
    hub::{Hub, HubConfig},
    pb::hub::{peer_event::Kind, peers_client::PeersClient, ListPeersRequest, WatchPeersRequest},
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{
    metadata::MetadataValue, transport::Channel, Code, Request, Response, Status, Streaming,
};

const T: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------- the private service

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The service behind the agent. Reports cancellations on `events`.
#[derive(Clone)]
struct Private {
    name: String,
    events: mpsc::UnboundedSender<String>,
}

/// Sends `what` when dropped: how the service observes a cancel.
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
            let _guard = OnDrop(self.events.clone(), "unary dropped".into());
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            std::mem::forget(_guard);
        }
        let mut resp = Response::new(self.reply(msg));
        if let Some(v) = md.get("x-req") {
            resp.metadata_mut().insert("x-echo", v.clone());
        }
        if let Some(v) = md.get_bin("x-data-bin") {
            resp.metadata_mut().insert_bin("x-data-bin", v.clone());
        }
        let saw = if md.get("backchannel-peer").is_some() {
            "yes"
        } else {
            "no"
        };
        resp.metadata_mut()
            .insert("x-saw-peer-header", MetadataValue::from_static(saw));
        Ok(resp)
    }

    type ServerStreamStream = BoxStream<EchoResponse>;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let r = request.into_inner();
        let this = self.clone();
        match r.message.as_str() {
            "hang" => {
                // One message, then nothing until the caller goes away.
                let guard = OnDrop(self.events.clone(), "stream cancelled".into());
                let first = futures::stream::iter([Ok(this.reply("first".into()))]);
                let rest = futures::stream::pending().map(move |()| {
                    let _ = &guard;
                    Ok(EchoResponse::default())
                });
                Ok(Response::new(Box::pin(first.chain(rest))))
            }
            "fail" => {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert("x-trailer", MetadataValue::from_static("t1"));
                let status = Status::with_details_and_metadata(
                    Code::Aborted,
                    "boom",
                    bytes::Bytes::from_static(b"\x01\x02details"),
                    md,
                );
                let s = futures::stream::iter([
                    Ok(this.reply("a".into())),
                    Ok(this.reply("b".into())),
                    Err(status),
                ]);
                Ok(Response::new(Box::pin(s)))
            }
            _ => {
                let s = futures::stream::iter(0..r.count)
                    .map(move |i| Ok(this.reply(format!("{}-{i}", r.message))));
                Ok(Response::new(Box::pin(s)))
            }
        }
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

async fn private_service(name: &str) -> PrivateService {
    let (tx, rx) = mpsc::unbounded_channel();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let svc = Private {
        name: name.into(),
        events: tx,
    };
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    PrivateService {
        addr,
        events: rx,
        task,
    }
}

// ---------------------------------------------------------------- fixtures

async fn start_hub() -> Hub {
    Hub::start(HubConfig {
        metrics: Some("127.0.0.1:0".into()),
        grace: Duration::from_secs(5),
        ..HubConfig::default()
    })
    .await
    .expect("hub starts")
}

fn agent_cfg(hub: &Hub, name: &str, private: &PrivateService) -> AgentConfig {
    let mut cfg = AgentConfig::new(hub.addr.unwrap().to_string(), name, private.addr.clone());
    cfg.labels = vec![("env".into(), "test".into())];
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(500);
    cfg
}

async fn start_agent(hub: &Hub, name: &str, private: &PrivateService) -> Agent {
    let agent = Agent::start(agent_cfg(hub, name, private)).unwrap();
    agent.wait_sessions(1, T).await.unwrap();
    hub.wait_for_name(name, T).await.expect("name registered");
    agent
}

async fn caller(hub: &Hub) -> EchoClient<Channel> {
    EchoClient::new(common::plain_channel(&hub.addr.unwrap().to_string()).await)
}

/// A caller over a bare hyper HTTP/2 connection: unlike tonic's Channel it
/// runs no deadline timer of its own, so the status seen is the hub's.
async fn raw_caller(hub: &Hub) -> EchoClient<RawH2> {
    let addr = hub.addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    EchoClient::with_origin(RawH2(send), format!("http://{addr}").parse().unwrap())
}

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

fn to<T>(peer: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("backchannel-peer", peer.parse().unwrap());
    r
}

fn echo(message: &str, count: u32) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        count,
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn all_four_rpc_shapes_through_hub_by_name_and_id() {
    let hub = start_hub().await;
    let private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    let mut c = caller(&hub).await;

    let r = c
        .unary(to("svc", echo("hello", 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.message.as_str(), r.server.as_str()),
        ("hello", "private")
    );

    let id = agent
        .status()
        .peer_id
        .expect("hub told the agent its peer ID");
    let r = c
        .unary(to(&id.to_string(), echo("by id", 0)))
        .await
        .unwrap();
    assert_eq!(r.get_ref().message, "by id");

    let mut s = c
        .server_stream(to("svc", echo("s", 5)))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        got.push(m.message);
    }
    assert_eq!(got, ["s-0", "s-1", "s-2", "s-3", "s-4"]);

    let msgs = futures::stream::iter(["a", "b", "c"].map(|m| echo(m, 0)));
    let r = c.client_stream(to("svc", msgs)).await.unwrap().into_inner();
    assert_eq!(r.message, "abc");

    // Bidi in lock step: each answer arrives before the next request is
    // sent, so nothing is buffered to the end of the stream.
    let (tx, rx) = mpsc::channel(1);
    let mut answers = c
        .bidi(to("svc", tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5 {
        tx.send(echo(&format!("m{i}"), 0)).await.unwrap();
        let a = tokio::time::timeout(T, answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(a.message, format!("m{i}"));
    }
    drop(tx);
    assert!(answers.message().await.unwrap().is_none());

    // The hub counted the calls and bytes for this peer.
    let peers = hub.state().list();
    let p = peers.iter().find(|p| p.name == "svc").unwrap();
    assert!(p.calls_total >= 5, "{p:?}");
    assert!(p.bytes_to_peer > 0 && p.bytes_from_peer > 0, "{p:?}");
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn metadata_status_details_and_trailers_round_trip() {
    let hub = start_hub().await;
    let private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    let mut c = caller(&hub).await;

    let mut req = to("svc", echo("md", 0));
    req.metadata_mut().insert("x-req", "v1".parse().unwrap());
    req.metadata_mut()
        .insert_bin("x-data-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
    let r = c.unary(req).await.unwrap();
    assert_eq!(r.metadata().get("x-echo").unwrap(), "v1");
    assert_eq!(
        r.metadata()
            .get_bin("x-data-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[0, 1, 2, 255]
    );
    assert_eq!(
        r.metadata().get("x-saw-peer-header").unwrap(),
        "no",
        "the routing key is consumed by the hub"
    );

    let mut s = c
        .server_stream(to("svc", echo("fail", 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().message, "a");
    assert_eq!(s.message().await.unwrap().unwrap().message, "b");
    let st = s.message().await.unwrap_err();
    assert_eq!(st.code(), Code::Aborted);
    assert_eq!(st.message(), "boom");
    assert_eq!(st.details(), b"\x01\x02details");
    assert_eq!(st.metadata().get("x-trailer").unwrap(), "t1");
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn deadline_exceeded_comes_back_as_deadline_exceeded() {
    let hub = start_hub().await;
    let private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    let mut c = raw_caller(&hub).await;

    // Before the response headers.
    let mut req = to("svc", echo("sleep:10000", 0));
    req.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let st = c.unary(req).await.unwrap_err();
    assert_eq!(st.code(), Code::DeadlineExceeded, "{st:?}");
    assert!(start.elapsed() < Duration::from_secs(5));

    // Mid-stream, after the response headers.
    let mut req = to("svc", echo("hang", 0));
    req.set_timeout(Duration::from_millis(300));
    let mut s = c.server_stream(req).await.unwrap().into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().message, "first");
    let st = tokio::time::timeout(T, s.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(st.code(), Code::DeadlineExceeded, "{st:?}");
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn caller_cancel_reaches_the_private_service() {
    let hub = start_hub().await;
    let mut private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    let mut c = caller(&hub).await;

    let mut s = c
        .server_stream(to("svc", echo("hang", 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().message, "first");
    assert_eq!(hub.state().calls_in_flight(), 1);
    drop(s); // the caller cancels
    let ev = tokio::time::timeout(T, private.events.recv())
        .await
        .expect("cancel observed");
    assert_eq!(ev.as_deref(), Some("stream cancelled"));
    wait_until("the hub to count the call as finished", || {
        hub.state().calls_in_flight() == 0
    })
    .await;

    // A unary call cancelled while the service is still working on it.
    let mut c2 = c.clone();
    let call = tokio::spawn(async move { c2.unary(to("svc", echo("sleep:10000", 0))).await });
    wait_until("the unary call to be in flight", || {
        hub.state().calls_in_flight() == 1
    })
    .await;
    call.abort();
    let ev = tokio::time::timeout(T, private.events.recv())
        .await
        .expect("cancel observed");
    assert_eq!(ev.as_deref(), Some("unary dropped"));
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn unknown_peer_is_not_found_and_names_the_peer() {
    let hub = start_hub().await;
    let mut c = caller(&hub).await;
    let st = c.unary(to("nobody", echo("x", 0))).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert!(st.message().contains("'nobody'"), "{}", st.message());
    let st = c.unary(to("4242", echo("x", 0))).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound);
    assert!(st.message().contains("4242"), "{}", st.message());
    // Without the key, the call is the hub's own (it has no Echo service).
    let st = c.unary(echo("x", 0)).await.unwrap_err();
    assert_eq!(st.code(), Code::Unimplemented);
    hub.shutdown().await;
}

#[tokio::test]
async fn peer_gone_mid_call_is_unavailable_naming_the_peer() {
    let hub = start_hub().await;
    let private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    let mut c = caller(&hub).await;
    let mut s = c
        .server_stream(to("svc", echo("hang", 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.message().await.unwrap().unwrap().message, "first");
    agent.stop().await;
    let st = tokio::time::timeout(T, s.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("'svc'"), "{}", st.message());
    hub.shutdown().await;
}

#[tokio::test]
async fn agent_restart_ends_with_the_name_reachable_again() {
    let hub = start_hub().await;
    let private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    let mut c = caller(&hub).await;
    c.unary(to("svc", echo("before", 0))).await.unwrap();
    let old = agent.status().peer_id.unwrap();

    agent.stop().await;
    hub.registry()
        .wait_gone(backchannel::PeerId::new(old))
        .await;
    let st = c.unary(to("svc", echo("while down", 0))).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound);

    let agent = start_agent(&hub, "svc", &private).await;
    assert_ne!(agent.status().peer_id, Some(old));
    let r = c.unary(to("svc", echo("after", 0))).await.unwrap();
    assert_eq!(r.get_ref().message, "after");
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn newest_agent_with_a_name_wins() {
    let hub = start_hub().await;
    let p1 = private_service("first").await;
    let p2 = private_service("second").await;
    // The first agent must not come back during the test.
    let mut cfg = agent_cfg(&hub, "svc", &p1);
    cfg.backoff_initial = Duration::from_secs(60);
    let a1 = Agent::start(cfg).unwrap();
    a1.wait_sessions(1, T).await.unwrap();
    let id1 = a1.status().peer_id.unwrap();
    let a2 = start_agent(&hub, "svc", &p2).await;
    let id2 = a2.status().peer_id.unwrap();
    assert_ne!(id1, id2);
    hub.registry()
        .wait_gone(backchannel::PeerId::new(id1))
        .await; // the superseded session is closed
    let mut c = caller(&hub).await;
    let r = c.unary(to("svc", echo("who", 0))).await.unwrap();
    assert_eq!(r.get_ref().server, "second");
    a1.stop().await;
    a2.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn hub_restart_ends_with_the_name_reachable_again() {
    let hub = start_hub().await;
    let addr = hub.addr.unwrap();
    let private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    caller(&hub)
        .await
        .unary(to("svc", echo("before", 0)))
        .await
        .unwrap();

    hub.shutdown().await;
    // A new hub on the same port (bounded retries while the port frees up).
    let start = Instant::now();
    let hub = loop {
        match Hub::start(HubConfig {
            listen: Some(addr.to_string()),
            ..HubConfig::default()
        })
        .await
        {
            Ok(h) => break h,
            Err(e) => {
                assert!(start.elapsed() < T, "cannot rebind {addr}: {e:#}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    hub.wait_for_name("svc", T)
        .await
        .expect("agent reconnected");
    agent.wait_sessions(2, T).await.unwrap();
    let r = caller(&hub)
        .await
        .unary(to("svc", echo("after", 0)))
        .await
        .unwrap();
    assert_eq!(r.get_ref().message, "after");
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn admin_list_watch_health_and_reflection() {
    let hub = start_hub().await;
    let ch = common::plain_channel(&hub.addr.unwrap().to_string()).await;
    let mut peers = PeersClient::new(ch.clone());
    let mut watch = peers
        .watch(WatchPeersRequest::default())
        .await
        .unwrap()
        .into_inner();

    let private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    let id = agent.status().peer_id.unwrap();
    let ev = tokio::time::timeout(T, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.kind(), ev.peer.as_ref().unwrap().id),
        (Kind::Joined, id)
    );
    let ev = tokio::time::timeout(T, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind(), Kind::Announced);
    assert_eq!(ev.peer.as_ref().unwrap().name, "svc");

    let list = peers
        .list(ListPeersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .peers;
    assert_eq!(list.len(), 1);
    let p = &list[0];
    assert_eq!((p.id, p.name.as_str()), (id, "svc"));
    assert_eq!(p.labels.get("env").map(String::as_str), Some("test"));
    assert!(p.remote_addr.starts_with("127.0.0.1:"), "{p:?}");
    assert!(p.connected_since.is_some());

    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(l)) =
        resp.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<_> = l.service.iter().map(|s| s.name.as_str()).collect();
    for want in [
        "backchannel.hub.v1.Peers",
        "backchannel.hub.v1.Registration",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(&want), "{names:?}");
    }

    agent.stop().await;
    let ev = tokio::time::timeout(T, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((ev.kind(), ev.peer.unwrap().id), (Kind::Left, id));
    hub.shutdown().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish() {
    let hub = start_hub().await;
    let private = private_service("private").await;
    let agent = start_agent(&hub, "svc", &private).await;
    let mut c = caller(&hub).await;
    let mut c2 = c.clone();
    let call = tokio::spawn(async move { c2.unary(to("svc", echo("sleep:300", 0))).await });
    wait_until("the call to be in flight", || {
        hub.state().calls_in_flight() == 1
    })
    .await;
    hub.begin_shutdown();
    let r = tokio::time::timeout(T, call).await.unwrap().unwrap();
    assert_eq!(r.unwrap().get_ref().message, "sleep:300");
    // A new call is refused (UNAVAILABLE, or the connection is gone).
    let st = c.unary(to("svc", echo("late", 0))).await.unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn agent_keeps_serving_against_a_server_without_registration() {
    // A Gitaly-style server: backchannel handshake, but no Registration RPC.
    let server = common::tcp_server().await;
    let private = private_service("private").await;
    let mut cfg = AgentConfig::new(server.addr.clone(), "svc", private.addr.clone());
    cfg.backoff_initial = Duration::from_millis(50);
    let agent = Agent::start(cfg).unwrap();
    agent.wait_sessions(1, T).await.unwrap();
    assert!(!agent.status().announced);
    common::wait_peers(&server.registry, 1).await;
    let id = server.registry.list()[0].id;
    // The server calls back; the agent's proxy answers from the private service.
    let ch = server.registry.backchannel(id).unwrap();
    let r = EchoClient::new(ch).unary(echo("reverse", 0)).await.unwrap();
    assert_eq!(r.get_ref().server, "private");
    assert!(agent.status().connected);
    agent.stop().await;
}

#[tokio::test]
async fn tls_hub_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::Pki::new(dir.path());
    let hub = Hub::start(HubConfig {
        tls_cert: Some(pki.server_cert.clone()),
        tls_key: Some(pki.server_key.clone()),
        client_ca: Some(pki.ca.clone()),
        ..HubConfig::default()
    })
    .await
    .unwrap();
    let private = private_service("private").await;
    let mut cfg = agent_cfg(&hub, "svc", &private);
    cfg.hub = format!("localhost:{}", hub.addr.unwrap().port());
    cfg.tls_ca = Some(pki.ca.clone());
    cfg.tls_cert = Some(pki.client_cert.clone());
    cfg.tls_key = Some(pki.client_key.clone());
    let agent = Agent::start(cfg).unwrap();
    agent.wait_sessions(1, T).await.unwrap();
    hub.wait_for_name("svc", T).await.unwrap();

    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&pki.ca)))
        .identity(Identity::from_pem(
            read(&pki.client_cert),
            read(&pki.client_key),
        ))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://localhost:{}", hub.addr.unwrap().port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = EchoClient::new(ch)
        .unary(to("svc", echo("over tls", 0)))
        .await
        .unwrap();
    assert_eq!(r.get_ref().message, "over tls");
    agent.stop().await;
    hub.shutdown().await;
}

// ---------------------------------------------------------------- the real binary

/// A child process killed on drop.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str]) -> (Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_backchannel"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            println!("child: {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Child(child), rx)
}

/// The first stdout line starting with `prefix`, minus the prefix.
fn line_after(rx: &std::sync::mpsc::Receiver<String>, prefix: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line starting with '{prefix}'"));
        if let Some(rest) = line.strip_prefix(prefix) {
            return rest.trim().to_string();
        }
    }
}

fn sigterm_and_wait(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.0.id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            return st;
        }
        assert!(
            start.elapsed() < T,
            "process {pid} did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn real_binary_hub_and_agent() {
    let private = private_service("private").await;
    // One thread each (the single-threaded runtime): routing, metrics and
    // the SIGTERM drain work there as with one thread per core.
    let (mut hub, hub_out) = spawn(&[
        "--threads",
        "1",
        "hub",
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--grace",
        "2",
    ]);
    let addr = line_after(&hub_out, "hub listening on ");
    let metrics = line_after(&hub_out, "metrics on http://");
    let metrics = metrics.trim_end_matches("/metrics").to_string();
    let (mut agent, agent_out) = spawn(&[
        "agent",
        "--threads",
        "1",
        "--hub",
        &addr,
        "--name",
        "bin-svc",
        "--label",
        "env=ci",
        "--expose",
        &private.addr,
    ]);
    line_after(&agent_out, "agent 'bin-svc' announced");

    let mut c = EchoClient::new(common::plain_channel(&addr).await);
    // The announce may still be on its way: poll, bounded.
    let start = Instant::now();
    let r = loop {
        match c.unary(to("bin-svc", echo("hi", 0))).await {
            Ok(r) => break r.into_inner(),
            Err(st) if st.code() == Code::NotFound && start.elapsed() < T => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(st) => panic!("{st:?}"),
        }
    };
    assert_eq!((r.message.as_str(), r.server.as_str()), ("hi", "private"));
    let mut s = c
        .server_stream(to("bin-svc", echo("s", 3)))
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while s.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 3);

    let text = http_get(&metrics, "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    assert!(text.contains("\nbackchannel_hub_peers 1\n"), "{text}");
    assert!(
        text.contains("backchannel_hub_calls_total{code=\"OK\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("backchannel_hub_sessions_opened_total 1"),
        "{text}"
    );

    let st = sigterm_and_wait(&mut agent);
    assert!(st.success(), "agent exit: {st:?}");
    let st = sigterm_and_wait(&mut hub);
    assert!(st.success(), "hub exit: {st:?}");
}

// ---------------------------------------------------------------- a non-Rust client

/// Python grpcio (tests/python/call_through_hub.py) calls through the hub
/// with nothing but the `backchannel-peer` metadata key.
#[tokio::test]
async fn python_grpcio_client_calls_through_the_hub() {
    let have_grpc = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have_grpc {
        if std::env::var("BACKCHANNEL_SKIP_PYTHON").as_deref() == Ok("1") {
            eprintln!("skipping: python3 with grpcio not found (BACKCHANNEL_SKIP_PYTHON=1)");
            return;
        }
        panic!(
            "python3 with grpcio is needed for this test: `python3 -m pip install grpcio` \
             (or set BACKCHANNEL_SKIP_PYTHON=1 to skip it)"
        );
    }
    let hub = start_hub().await;
    let private = private_service("private").await;
    let agent = start_agent(&hub, "py-svc", &private).await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/call_through_hub.py"
    );
    let addr = hub.addr.unwrap().to_string();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .args([script, &addr, "py-svc"])
                .output()
                .unwrap()
        }),
    )
    .await
    .expect("python client finished in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all 6 checks ok"), "{stdout}");
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test]
async fn unix_sockets_for_the_hub_and_the_exposed_service() {
    let dir = tempfile::tempdir().unwrap();
    let hub_sock = dir.path().join("hub.sock");
    let svc_sock = dir.path().join("svc.sock");
    let hub = Hub::start(HubConfig {
        listen: Some("127.0.0.1:0".into()),
        unix: Some(hub_sock.clone()),
        ..HubConfig::default()
    })
    .await
    .unwrap();
    let l = tokio::net::UnixListener::bind(&svc_sock).unwrap();
    let (tx, _rx) = mpsc::unbounded_channel();
    let svc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(Private {
                name: "unix-private".into(),
                events: tx,
            }))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(l)),
    );
    let cfg = AgentConfig::new(
        format!("unix:{}", hub_sock.display()),
        "svc",
        format!("unix:{}", svc_sock.display()),
    );
    let agent = Agent::start(cfg).unwrap();
    agent.wait_sessions(1, T).await.unwrap();
    hub.wait_for_name("svc", T).await.unwrap();
    let r = caller(&hub)
        .await
        .unary(to("svc", echo("via unix", 0)))
        .await
        .unwrap();
    assert_eq!(r.get_ref().server, "unix-private");
    agent.stop().await;
    hub.shutdown().await;
    assert!(!hub_sock.exists(), "the hub removes its socket on shutdown");
    svc.abort();
}

#[tokio::test]
async fn announcements_are_validated_and_newest_session_keeps_the_name() {
    use backchannel_sidecar::pb::hub::{registration_client::RegistrationClient, AnnounceRequest};
    let hub = start_hub().await;
    let addr = hub.addr.unwrap().to_string();
    let a = backchannel::ClientBuilder::new()
        .connect_tcp(&addr, tonic::service::Routes::default())
        .await
        .unwrap();
    let b = backchannel::ClientBuilder::new()
        .connect_tcp(&addr, tonic::service::Routes::default())
        .await
        .unwrap();
    let announce = |c: &backchannel::Client, name: &str, labels: Vec<(String, String)>| {
        let mut rc = RegistrationClient::new(c.channel());
        let req = AnnounceRequest {
            name: name.to_string(),
            labels: labels.into_iter().collect(),
        };
        async move { rc.announce(req).await }
    };
    for bad in ["", "12", "has space", "ünïcode", &"x".repeat(254)] {
        let err = announce(&a, bad, vec![]).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    let many: Vec<_> = (0..33)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    assert_eq!(
        announce(&a, "ok", many).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let huge = vec![("k".to_string(), "v".repeat(100_000))];
    let err = announce(&a, "ok", huge).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
        ),
        "{err:?}"
    );

    // b (the newer session) takes the name; a late announce by a is refused.
    let rb = announce(&b, "svc", vec![]).await.unwrap().into_inner();
    let err = announce(&a, "svc", vec![]).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains(&rb.peer_id.to_string()), "{err:?}");
    assert!(!b.is_closed());
    hub.shutdown().await;
}
