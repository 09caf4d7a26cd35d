//! The hub's data path: the hub's HTTP/2 client connections to a peer
//! (`router::h2::H2Upstream`) spliced by the agent onto the exposed service.
//! Backpressure with streams nobody reads, the second upstream connection
//! of a busy caller, a service that dies mid-call, and the proxying agent
//! kept behind `splice = false`. (The four RPC shapes, trailers, deadlines
//! and cancels over this path are in tests/sidecar.rs.)

mod common;

use std::time::{Duration, Instant};

use backchannel_sidecar::{
    agent::{Agent, AgentConfig},
    hub::{Hub, HubConfig},
};
use backchannel_testkit::{
    check_pattern, pattern,
    pb::bench::{bench_client::BenchClient, bench_server::BenchServer, DownloadRequest, Payload},
    BenchService,
};
use tokio::net::TcpListener;
use tonic::{transport::Channel, Code, Request};

const T: Duration = Duration::from_secs(20);

struct Service {
    addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bench_service() -> Service {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(BenchServer::new(BenchService).max_decoding_message_size(8 << 20))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await;
    });
    Service { addr, task }
}

/// A TCP relay in front of `target` whose connections can be cut.
struct Relay {
    addr: String,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.cut.send(true);
        self.task.abort();
    }
}

async fn relay(target: String) -> Relay {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (cut, c) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let target = target.clone();
            let mut c = c.clone();
            tokio::spawn(async move {
                let Ok(mut b) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                    _ = c.wait_for(|cut| *cut) => {}
                }
            });
        }
    });
    Relay { addr, cut, task }
}

async fn hub() -> Hub {
    Hub::start(HubConfig {
        grace: Duration::from_secs(2),
        ..HubConfig::default()
    })
    .await
    .expect("hub starts")
}

async fn agent_with(hub: &Hub, name: &str, expose: &str, splice: bool) -> Agent {
    let mut cfg = AgentConfig::new(hub.addr.unwrap().to_string(), name, expose);
    cfg.backoff_initial = Duration::from_millis(50);
    cfg.backoff_max = Duration::from_millis(500);
    cfg.splice = splice;
    let a = Agent::start(cfg).unwrap();
    a.wait_sessions(1, T).await.unwrap();
    hub.wait_for_name(name, T).await.expect("name registered");
    a
}

async fn caller(hub: &Hub) -> BenchClient<Channel> {
    BenchClient::new(common::plain_channel(&hub.addr.unwrap().to_string()).await)
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20)
}

fn to<T>(peer: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("backchannel-peer", peer.parse().unwrap());
    r
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < T, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads a download to its end, checking every byte; returns the count.
async fn read_all(s: &mut tonic::Streaming<Payload>) -> Result<u64, tonic::Status> {
    let mut n = 0u64;
    while let Some(p) = s.message().await? {
        assert!(check_pattern(&p.data, n), "wrong bytes at offset {n}");
        n += p.data.len() as u64;
    }
    Ok(n)
}

const BIG: u64 = 64 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_downloads_hold_back_only_themselves_and_lose_no_byte() {
    let hub = hub().await;
    let svc = bench_service().await;
    let agent = agent_with(&hub, "svc", &svc.addr, true).await;
    let mut slow = caller(&hub).await;
    // 20 downloads from one caller connection, far bigger than every window
    // on the way, that nobody reads for now.
    let mut unread = Vec::new();
    for _ in 0..20 {
        let s = slow
            .download(to(
                "svc",
                DownloadRequest {
                    bytes: BIG,
                    chunk_size: 64 << 10,
                },
            ))
            .await
            .unwrap()
            .into_inner();
        unread.push(s);
    }
    wait_until("20 calls in flight at the agent", || {
        agent.calls_in_flight() == 20
    })
    .await;
    // Beyond 16 calls in flight, the caller's calls to the peer use a second
    // HTTP/2 connection (a second spliced connection at the agent).
    assert_eq!(agent.spliced_connections().0, 2);
    // Another caller still gets through, uploads included. (The stalled
    // caller's own connection is held back by its own connection window.)
    let mut other = caller(&hub).await;
    {
        let c = &mut other;
        for i in 0..20u64 {
            let data = pattern(i, 1024);
            let r = c
                .echo(to("svc", Payload { data: data.clone() }))
                .await
                .unwrap();
            assert_eq!(r.get_ref().data, data);
        }
        let up = futures::stream::iter((0..32u64).map(|i| Payload {
            data: pattern(i * 65536, 65536),
        }));
        let r = tokio::time::timeout(T, c.upload(to("svc", up)))
            .await
            .expect("not held back");
        assert_eq!(r.unwrap().get_ref().bytes, 32 * 65536);
    }
    // Then every stalled download arrives whole.
    let reads = unread
        .into_iter()
        .map(|mut s| async move { read_all(&mut s).await });
    let all = tokio::time::timeout(T, futures::future::join_all(reads));
    for n in all.await.expect("the stalled downloads resume") {
        assert_eq!(n.unwrap(), BIG);
    }
    wait_until("the agent to count the calls as finished", || {
        agent.calls_in_flight() == 0
    })
    .await;
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_dying_mid_call_ends_it_unavailable_never_as_a_clean_end() {
    let hub = hub().await;
    let svc = bench_service().await;
    let relay = relay(svc.addr.clone()).await;
    let agent = agent_with(&hub, "svc", &relay.addr, true).await;
    let mut c = caller(&hub).await;
    let mut s = c
        .download(to(
            "svc",
            DownloadRequest {
                bytes: BIG,
                chunk_size: 64 << 10,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let first = s.message().await.unwrap().unwrap();
    assert!(check_pattern(&first.data, 0));
    let _ = relay.cut.send(true);
    let mut n = first.data.len() as u64;
    let err = loop {
        match tokio::time::timeout(T, s.message()).await.unwrap() {
            Ok(Some(p)) => {
                assert!(check_pattern(&p.data, n), "wrong bytes at offset {n}");
                n += p.data.len() as u64;
            }
            Ok(None) => panic!("the call ended cleanly after {n} of {BIG} bytes"),
            Err(e) => break e,
        }
    };
    assert!(n < BIG);
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("'svc'"), "{}", err.message());
    wait_until("the agent to drop the spliced connection", || {
        agent.spliced_connections().0 == 0 && agent.calls_in_flight() == 0
    })
    .await;
    // A service that cannot be reached at all: UNAVAILABLE naming it.
    let gone = relay.addr.clone();
    drop(relay);
    let start = Instant::now();
    while tokio::net::TcpStream::connect(&gone).await.is_ok() {
        assert!(start.elapsed() < T, "the relay still accepts");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let st = c
        .echo(to(
            "svc",
            Payload {
                data: pattern(0, 8),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("exposed service"), "{}", st.message());
    agent.stop().await;
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxying_agent_still_carries_every_shape_whole() {
    let hub = hub().await;
    let svc = bench_service().await;
    let agent = agent_with(&hub, "svc", &svc.addr, false).await;
    let mut c = caller(&hub).await;
    let data = pattern(7, 4096);
    let r = c
        .echo(to("svc", Payload { data: data.clone() }))
        .await
        .unwrap();
    assert_eq!(r.get_ref().data, data);
    let up = futures::stream::iter((0..64u64).map(|i| Payload {
        data: pattern(i * 65536, 65536),
    }));
    assert_eq!(
        c.upload(to("svc", up)).await.unwrap().get_ref().bytes,
        64 << 16
    );
    let mut s = c
        .download(to(
            "svc",
            DownloadRequest {
                bytes: 8 << 20,
                chunk_size: 64 << 10,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read_all(&mut s).await.unwrap(), 8 << 20);
    assert_eq!(agent.spliced_connections(), (0, 0));
    agent.stop().await;
    hub.shutdown().await;
}
