//! `backchannel demo`: a server and a client on loopback; forward calls,
//! reverse calls and a plain gRPC client on the same port; then the sidecar:
//! a hub, a private service reachable only through an agent, and plain
//! callers reaching it by name. Printed as it happens.

use std::time::Instant;

use anyhow::{bail, Context};
use backchannel::{ClientBuilder, Registry, ServerHandshaker, SessionConfig};
use listenmux::ListenMux;
use tonic::{service::Routes, transport::Server};

use crate::{
    pb::testing::{
        callback_client::CallbackClient, callback_server::CallbackServer, echo_client::EchoClient,
        echo_server::EchoServer, CallMeBackRequest, EchoRequest,
    },
    services::{CallbackService, EchoService},
};

struct Steps {
    start: Instant,
    passed: u32,
    failed: u32,
}

impl Steps {
    fn ok(&mut self, what: &str) {
        self.passed += 1;
        println!(
            "[{:>7.1} ms] ok    {what}",
            self.start.elapsed().as_secs_f64() * 1e3
        );
    }
    fn fail(&mut self, what: &str, err: &dyn std::fmt::Display) {
        self.failed += 1;
        println!(
            "[{:>7.1} ms] FAIL  {what}: {err}",
            self.start.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Runs the demo; returns an error if any step failed.
pub async fn run() -> anyhow::Result<()> {
    let mut s = Steps {
        start: Instant::now(),
        passed: 0,
        failed: 0,
    };

    // 1. A server: one TCP port for backchannel clients and plain gRPC clients.
    let registry = Registry::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = ListenMux::builder()
        .handshaker(ServerHandshaker::new(
            registry.clone(),
            SessionConfig::server(),
        ))
        .build()
        .incoming(listener);
    let server = tokio::spawn(
        // With the connect-info layer, handlers see `request.remote_addr()`.
        listenmux::server_builder()
            .trace_fn(backchannel::request_span)
            .add_service(EchoServer::new(EchoService::new("server")))
            .add_service(CallbackServer::new(CallbackService {
                registry: registry.clone(),
            }))
            .serve_with_incoming(incoming),
    );
    s.ok(&format!(
        "server listening on {addr} (backchannel + plain gRPC on one port)"
    ));

    // 2. A backchannel client that serves its own Echo service.
    let client = ClientBuilder::new()
        .connect_tcp(
            &addr.to_string(),
            Routes::new(EchoServer::new(EchoService::new("demo-client"))),
        )
        .await
        .context("connecting the backchannel client")?;
    let mut events = registry.subscribe();
    let peer = match registry.list().first() {
        Some(p) => p.id,
        None => match events.recv().await? {
            backchannel::PeerEvent::Connected(p) => p.id,
            other => bail!("unexpected registry event {other:?}"),
        },
    };
    s.ok(&format!(
        "client connected: magic sent, yamux session up, server registered it as peer {peer}"
    ));

    // 3. Forward call: client -> server on yamux stream 1.
    match EchoClient::new(client.channel())
        .unary(EchoRequest {
            message: "hello server".into(),
            count: 0,
        })
        .await
    {
        Ok(r) => s.ok(&format!(
            "forward call: client -> server Echo.Unary, answered by '{}': '{}'",
            r.get_ref().server,
            r.get_ref().message
        )),
        Err(e) => s.fail("forward call", &e),
    }

    // 4. Reverse call from inside a server handler: the server learns the
    //    caller's peer ID from the request and calls it back.
    match CallbackClient::new(client.channel())
        .call_me_back(CallMeBackRequest {
            message: "ping".into(),
            count: 0,
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let reply = r.reply.unwrap_or_default();
            if reply.server == "demo-client" {
                s.ok(&format!(
                    "reverse call in a handler: server -> peer {} Echo.Unary, answered by '{}'",
                    r.peer_id, reply.server
                ))
            } else {
                s.fail(
                    "reverse call in a handler",
                    &format!("answered by '{}'", reply.server),
                )
            }
        }
        Err(e) => s.fail("reverse call in a handler", &e),
    }

    // 5. A reverse call the server starts on its own, from the registry.
    match registry.backchannel(peer) {
        Ok(ch) => match EchoClient::new(ch)
            .server_stream(EchoRequest {
                message: "tick".into(),
                count: 3,
            })
            .await
        {
            Ok(r) => {
                let mut stream = r.into_inner();
                let mut got = Vec::new();
                while let Some(m) = stream.message().await? {
                    got.push(format!("{}@{}", m.message, m.server));
                }
                s.ok(&format!(
                    "reverse streaming call from the registry: {}",
                    got.join(", ")
                ));
            }
            Err(e) => s.fail("reverse streaming call", &e),
        },
        Err(e) => s.fail("registry lookup", &e),
    }

    // 6. A plain gRPC client on the same port.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    match EchoClient::new(plain.clone())
        .unary(EchoRequest {
            message: "hello from a plain client".into(),
            count: 0,
        })
        .await
    {
        Ok(r) => s.ok(&format!(
            "plain gRPC client on the same port: answered by '{}'",
            r.get_ref().server
        )),
        Err(e) => s.fail("plain client", &e),
    }
    match CallbackClient::new(plain)
        .call_me_back(CallMeBackRequest::default())
        .await
    {
        Err(e) if e.code() == tonic::Code::FailedPrecondition => s.ok(&format!(
            "plain client asking for a backchannel gets FAILED_PRECONDITION ('{}')",
            e.message()
        )),
        other => s.fail("plain client backchannel", &format!("{other:?}")),
    }

    // 7. Disconnect: the registry forgets the peer.
    client.close();
    registry.wait_gone(peer).await;
    if registry.is_empty() {
        s.ok(&format!(
            "client closed; peer {peer} removed from the registry"
        ));
    } else {
        s.fail("disconnect", &"registry not empty");
    }

    server.abort();

    // 8-15. The sidecar: hub, private service, agent, callers by name.
    sidecar(&mut s).await?;

    println!(
        "\nsummary: {} passed, {} failed ({:.1} ms)",
        s.passed,
        s.failed,
        s.start.elapsed().as_secs_f64() * 1e3
    );
    if s.failed > 0 {
        bail!("{} demo step(s) failed", s.failed);
    }
    Ok(())
}

/// Adds `backchannel-peer: <peer>` to a request: all a plain gRPC caller
/// needs to reach a service behind an agent.
fn routed<T>(peer: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = peer.parse() {
        r.metadata_mut()
            .insert(backchannel_sidecar::hub::routing::PEER_HEADER, v);
    }
    r
}

async fn sidecar(s: &mut Steps) -> anyhow::Result<()> {
    use backchannel_sidecar::{
        agent::{Agent, AgentConfig},
        hub::{Hub, HubConfig},
        pb::hub::{peers_client::PeersClient, ListPeersRequest},
    };
    use std::time::Duration;
    let wait = Duration::from_secs(10);
    println!();

    // 8. The hub.
    let hub = Hub::start(HubConfig {
        grace: Duration::from_secs(2),
        ..HubConfig::default()
    })
    .await
    .context("starting the hub")?;
    let hub_addr = hub.addr.context("hub address")?;
    s.ok(&format!(
        "hub listening on {hub_addr} (agents and plain gRPC callers on one port)"
    ));

    // 9. A private service: only the agent is told its address.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let private_addr = l.local_addr()?;
    let private = tokio::spawn(
        Server::builder()
            .add_service(EchoServer::new(EchoService::new("private-inventory")))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    s.ok(&format!(
        "private gRPC service on {private_addr} (callers are never told this address)"
    ));

    // 10. The agent dials out to the hub and announces its name.
    let mut cfg = AgentConfig::new(hub_addr.to_string(), "inventory", private_addr.to_string());
    cfg.labels = vec![("env".into(), "demo".into())];
    let agent = Agent::start(cfg)?;
    agent.wait_sessions(1, wait).await?;
    let peer = hub
        .wait_for_name("inventory", wait)
        .await
        .context("the agent's name did not reach the hub")?;
    s.ok(&format!(
        "agent connected out to the hub and announced 'inventory' (peer {peer}, env=demo)"
    ));

    // 11. A plain caller reaches the private service by name.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{hub_addr}"))?
        .connect()
        .await?;
    let mut caller = EchoClient::new(ch.clone());
    match caller
        .unary(routed(
            "inventory",
            EchoRequest {
                message: "how many widgets?".into(),
                count: 0,
            },
        ))
        .await
    {
        Ok(r) => s.ok(&format!(
            "plain caller -> hub -> agent -> private service, unary by name: answered by '{}': '{}'",
            r.get_ref().server,
            r.get_ref().message
        )),
        Err(e) => s.fail("unary call by name", &e),
    }

    // 12. Server streaming through the hub.
    match caller
        .server_stream(routed(
            "inventory",
            EchoRequest {
                message: "item".into(),
                count: 3,
            },
        ))
        .await
    {
        Ok(r) => {
            let mut stream = r.into_inner();
            let mut got = Vec::new();
            while let Some(m) = stream.message().await? {
                got.push(m.message);
            }
            s.ok(&format!("server streaming by name: {}", got.join(", ")));
        }
        Err(e) => s.fail("server streaming by name", &e),
    }

    // 13. Bidi streaming through the hub.
    let reqs = futures::stream::iter(["a", "b", "c"].map(|m| EchoRequest {
        message: m.into(),
        count: 0,
    }));
    match caller.bidi(routed("inventory", reqs)).await {
        Ok(r) => {
            let mut stream = r.into_inner();
            let mut got = Vec::new();
            while let Some(m) = stream.message().await? {
                got.push(m.message);
            }
            s.ok(&format!("bidi streaming by name: {}", got.join(", ")));
        }
        Err(e) => s.fail("bidi streaming by name", &e),
    }

    // 14. A reverse call started by the hub itself.
    match hub.registry().backchannel(peer) {
        Ok(bc) => match EchoClient::new(bc)
            .unary(EchoRequest {
                message: "hub calling".into(),
                count: 0,
            })
            .await
        {
            Ok(r) => s.ok(&format!(
                "reverse call from the hub to peer {peer}: answered by '{}'",
                r.get_ref().server
            )),
            Err(e) => s.fail("reverse call from the hub", &e),
        },
        Err(e) => s.fail("reverse call from the hub", &e),
    }

    // 15. The admin API and an unknown name.
    match PeersClient::new(ch).list(ListPeersRequest::default()).await {
        Ok(r) => {
            let peers = r.into_inner().peers;
            let desc: Vec<String> = peers
                .iter()
                .map(|p| {
                    format!(
                        "peer {} '{}' from {} ({} calls)",
                        p.id, p.name, p.remote_addr, p.calls_total
                    )
                })
                .collect();
            s.ok(&format!("Peers.List: {}", desc.join("; ")));
        }
        Err(e) => s.fail("Peers.List", &e),
    }
    match caller.unary(routed("nobody", EchoRequest::default())).await {
        Err(e) if e.code() == tonic::Code::NotFound => {
            s.ok(&format!("unknown name: NOT_FOUND ('{}')", e.message()))
        }
        other => s.fail("unknown name", &format!("{other:?}")),
    }

    agent.stop().await;
    hub.shutdown().await;
    private.abort();
    s.ok("agent stopped, hub shut down");
    Ok(())
}
