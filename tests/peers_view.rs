//! The hub's view of its peers' sessions: the flow (RTT, windows, ceiling)
//! in `Peers.List`, in the metrics, and `backchannel peers` printing it.

use std::time::{Duration, Instant};

use backchannel_sidecar::{
    agent::{Agent, AgentConfig},
    hub::{Hub, HubConfig},
    pb::hub::{peers_client::PeersClient, ListPeersRequest},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

/// A private gRPC service for the agent to expose (health, enough here).
async fn private_service() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (_reporter, health) = tonic_health::server::health_reporter();
    let task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
            .unwrap();
    });
    (addr, task)
}

async fn http_get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_list_metrics_and_the_peers_command_show_each_sessions_flow() {
    let (private, task) = private_service().await;
    let hub = Hub::start(HubConfig {
        metrics: Some("127.0.0.1:0".into()),
        ..HubConfig::default()
    })
    .await
    .unwrap();
    let hub_addr = hub.addr.unwrap().to_string();
    let mut cfg = AgentConfig::new(hub_addr.clone(), "box", private);
    cfg.labels = vec![("site".into(), "lab".into())];
    let agent = Agent::start(cfg).unwrap();
    agent.wait_sessions(1, T).await.unwrap();
    hub.wait_for_name("box", T).await.unwrap();

    // The hub probes each session's round trip as it starts.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{hub_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut peers = PeersClient::new(channel);
    let start = Instant::now();
    let peer = loop {
        let list = peers
            .list(ListPeersRequest::default())
            .await
            .unwrap()
            .into_inner();
        let p = list
            .peers
            .into_iter()
            .find(|p| p.name == "box")
            .expect("listed");
        if p.flow.as_ref().is_some_and(|f| f.rtt_us > 0) {
            break p;
        }
        assert!(start.elapsed() < T, "no RTT measured: {p:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let flow = peer.flow.unwrap();
    // Loopback: well under a second; the agent's window is 4 MiB.
    assert!(flow.rtt_us < 1_000_000, "{flow:?}");
    assert_eq!(flow.recv_window, 4 << 20, "{flow:?}");
    assert_eq!(flow.max_buffered, 256 << 20, "{flow:?}");
    assert!(flow.recv_ceiling_bytes_per_sec > 0, "{flow:?}");

    // Metrics: one series per peer, labelled with its name.
    let metrics = hub.metrics_addr.unwrap().to_string();
    let text = http_get(&metrics, "/metrics").await;
    let rtt_line = text
        .lines()
        .find(|l| l.starts_with("backchannel_hub_peer_rtt_seconds{peer=\"box\"}"))
        .unwrap_or_else(|| panic!("no RTT series in:\n{text}"));
    let rtt: f64 = rtt_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(rtt > 0.0 && rtt < 1.0, "{rtt_line}");

    // The command: JSON and the table.
    let bin = env!("CARGO_BIN_EXE_backchannel");
    let out = tokio::process::Command::new(bin)
        .args(["peers", "--hub", &hub_addr, "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"name\": \"box\""), "{json}");
    assert!(json.contains("\"site\": \"lab\""), "{json}");
    assert!(json.contains("\"rtt_us\""), "{json}");
    let out = tokio::process::Command::new(bin)
        .args(["peers", "--hub", &hub_addr])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("NAME"), "{table}");
    let row = lines.next().expect("a row for the agent");
    assert!(
        row.starts_with("box ") && row.contains("site=lab"),
        "{table}"
    );

    // A hub that is not there: a clear error, exit status 1.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = l.local_addr().unwrap().to_string();
    drop(l);
    let out = tokio::process::Command::new(bin)
        .args(["peers", "--hub", &dead])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to the hub at"), "{err}");

    agent.stop().await;
    hub.shutdown().await;
    task.abort();
}
