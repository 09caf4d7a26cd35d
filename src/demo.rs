//! `backchannel demo`: a server and a client on loopback; forward calls,
//! reverse calls and a plain gRPC client on the same port, printed as they
//! happen.

use std::time::Instant;

use anyhow::{bail, Context};
use backchannel::{ClientBuilder, Registry, ServerHandshaker, SessionConfig};
use listenmux::{ListenMux, MuxConfig};
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
    let incoming = ListenMux::new(MuxConfig::default())
        .register(ServerHandshaker::new(
            registry.clone(),
            SessionConfig::server(),
        ))
        .incoming(listener);
    let server = tokio::spawn(
        Server::builder()
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
