//! The reconnecting client against a server that dies and comes back on the
//! same port: real sockets, real sessions.

mod support;

use std::{net::SocketAddr, time::Duration};

use backchannel::{Backoff, ClientBuilder, ConnectionEvent, ReconnectingClient, Step};
use support::{check, health_routes, Log, TestServer};
use tokio::{net::TcpListener, sync::broadcast};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

const WAIT: Duration = Duration::from_secs(20);

fn fast_backoff() -> Backoff {
    Backoff::default()
        .with_initial(Duration::from_millis(20))
        .with_max(Duration::from_millis(200))
}

/// The next event matching `want`, skipping others (bounded).
async fn next_event(
    events: &mut broadcast::Receiver<ConnectionEvent>,
    want: impl Fn(&ConnectionEvent) -> bool,
) -> ConnectionEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(e) if want(&e) => return e,
                Ok(_) => continue,
                Err(e) => panic!("event stream: {e}"),
            }
        }
    })
    .await
    .expect("the expected connection event")
}

fn connected(e: &ConnectionEvent) -> bool {
    matches!(e, ConnectionEvent::Connected { .. })
}

/// The server calls the client back on its current session.
async fn reverse_call(server: &TestServer) -> ServingStatus {
    let peer = server.first_peer().await;
    check(server.registry.backchannel(peer).unwrap())
        .await
        .expect("reverse call")
}

async fn start(addr: SocketAddr) -> TestServer {
    TestServer::start(TcpListener::bind(addr).await.unwrap(), None).await
}

#[tokio::test]
async fn the_same_channel_works_again_after_the_server_comes_back() {
    let mut server = TestServer::tcp().await;
    let addr = server.addr;
    let client_log = Log::default();
    let client: ReconnectingClient = ClientBuilder::new()
        .backoff(fast_backoff())
        .reconnecting_tcp(&addr.to_string(), health_routes(client_log.clone(), false))
        .unwrap();
    let mut events = client.subscribe();
    let channel = client.channel();

    // First session.
    assert_eq!(
        tokio::time::timeout(WAIT, client.wait_connected())
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        check(channel.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(reverse_call(&server).await, ServingStatus::Serving);
    assert_eq!(client_log.lock().unwrap().len(), 1);

    // The server dies: listener closed, sessions ended.
    server.kill().await;
    let e = next_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(e, ConnectionEvent::Disconnected { session: 1, .. }),
        "{e:?}"
    );
    assert!(!client.is_connected());
    let err = check(channel.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    // It keeps dialling, and each failure says it was the connect step.
    let e = next_event(&mut events, |e| {
        matches!(e, ConnectionEvent::ConnectFailed { .. })
    })
    .await;
    match e {
        ConnectionEvent::ConnectFailed { error, .. } => {
            assert_eq!(error.step(), Some(Step::Connect), "{error:?}")
        }
        other => panic!("{other:?}"),
    }
    let err = check(channel.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Back on the same port, with a fresh registry.
    let server = start(addr).await;
    let e = next_event(&mut events, connected).await;
    match e {
        ConnectionEvent::Connected {
            session,
            remote_addr,
        } => {
            assert_eq!(session, 2);
            assert_eq!(remote_addr, Some(addr));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(client.session(), Some(2));
    // The same channel, the same reverse routes on the new session.
    assert_eq!(
        check(channel.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(reverse_call(&server).await, ServingStatus::Serving);
    assert_eq!(client_log.lock().unwrap().len(), 2);
    assert_eq!(server.registry.len(), 1, "one session at a time");

    client.close();
    let e = next_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(
            e,
            ConnectionEvent::Disconnected {
                session: 2,
                reason: backchannel::DisconnectReason::Closed
            }
        ),
        "{e:?}"
    );
    server.first_peer().await;
    let peer = server.registry.list()[0].id;
    tokio::time::timeout(WAIT, server.registry.wait_gone(peer))
        .await
        .expect("close ends the session");
    assert!(!client.is_connected());
}

#[tokio::test]
async fn a_client_started_before_its_server_connects_when_it_appears() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = ClientBuilder::new()
        .backoff(fast_backoff())
        .reconnecting_tcp(&addr.to_string(), health_routes(Log::default(), false))
        .unwrap();
    let mut events = client.subscribe();
    let err = check(client.channel()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    next_event(&mut events, |e| {
        matches!(e, ConnectionEvent::ConnectFailed { .. })
    })
    .await;

    let server = start(addr).await;
    next_event(&mut events, connected).await;
    assert_eq!(
        check(client.channel()).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(reverse_call(&server).await, ServingStatus::Serving);
}

#[tokio::test]
async fn every_reconnect_is_a_new_peer_on_the_server() {
    let server = TestServer::tcp().await;
    let client = ClientBuilder::new()
        .backoff(fast_backoff())
        .reconnecting_tcp(
            &server.addr.to_string(),
            health_routes(Log::default(), false),
        )
        .unwrap();
    let mut events = client.subscribe();
    tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .unwrap();
    let first = server.first_peer().await;
    // The server drops this one peer; the client dials a new session.
    server.registry.close(first);
    server.registry.wait_gone(first).await;
    next_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Connected { session: 2, .. })
    })
    .await;
    assert_eq!(
        check(client.channel()).await.unwrap(),
        ServingStatus::Serving
    );
    let second = server.last().peer.expect("a multiplexed caller");
    assert!(second > first, "{second} after {first}");
    assert_eq!(reverse_call(&server).await, ServingStatus::Serving);
}

#[tokio::test]
async fn dropping_every_handle_stops_dialling_and_ends_the_session() {
    let server = TestServer::tcp().await;
    let client = ClientBuilder::new()
        .backoff(fast_backoff())
        .reconnecting_tcp(
            &server.addr.to_string(),
            health_routes(Log::default(), false),
        )
        .unwrap();
    tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .unwrap();
    let peer = server.first_peer().await;
    let channel = client.channel();
    drop(client);
    // The channel still holds the client up.
    assert_eq!(
        check(channel.clone()).await.unwrap(),
        ServingStatus::Serving
    );
    drop(channel);
    tokio::time::timeout(WAIT, server.registry.wait_gone(peer))
        .await
        .expect("the session ends with the last handle");
}

#[tokio::test]
async fn reconnect_ends_the_session_and_dials_a_new_one() {
    let server = TestServer::tcp().await;
    let client = ClientBuilder::new()
        .backoff(fast_backoff())
        .reconnecting_tcp(
            &server.addr.to_string(),
            health_routes(Log::default(), false),
        )
        .unwrap();
    let mut events = client.subscribe();
    tokio::time::timeout(WAIT, client.wait_connected())
        .await
        .unwrap();
    let first = server.first_peer().await;
    client.reconnect();
    next_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Disconnected { session: 1, .. })
    })
    .await;
    tokio::time::timeout(WAIT, server.registry.wait_gone(first))
        .await
        .expect("the server sees the peer leave");
    next_event(&mut events, |e| {
        matches!(e, ConnectionEvent::Connected { session: 2, .. })
    })
    .await;
    assert_eq!(
        check(client.channel()).await.unwrap(),
        ServingStatus::Serving
    );
    let second = server.last().peer.expect("a multiplexed caller");
    assert!(second > first, "{second} after {first}");
}

#[tokio::test]
async fn several_servers_are_dialled_in_turn() {
    // A port nothing listens on, then two live servers.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let s1 = TestServer::tcp().await;
    let s2 = TestServer::tcp().await;
    let addrs = [dead, s1.addr, s2.addr].map(|a| a.to_string());
    let client = ClientBuilder::new()
        .backoff(fast_backoff())
        .reconnecting_tcp_any(&addrs, health_routes(Log::default(), false))
        .unwrap();
    let mut events = client.subscribe();
    let first = next_event(&mut events, connected).await;
    assert!(
        matches!(first, ConnectionEvent::Connected { remote_addr: Some(a), .. } if a == s1.addr),
        "{first:?}"
    );
    assert_eq!(reverse_call(&s1).await, ServingStatus::Serving);
    // s1 drops the session: the next dial goes to s2.
    let peer = s1.first_peer().await;
    s1.registry.close(peer);
    let second = next_event(&mut events, connected).await;
    assert!(
        matches!(second, ConnectionEvent::Connected { remote_addr: Some(a), .. } if a == s2.addr),
        "{second:?}"
    );
    assert_eq!(reverse_call(&s2).await, ServingStatus::Serving);
    assert_eq!(
        check(client.channel()).await.unwrap(),
        ServingStatus::Serving
    );
    // No server address at all is an error, not a client that never dials.
    let none: [&str; 0] = [];
    assert!(ClientBuilder::new()
        .reconnecting_tcp_any(&none, health_routes(Log::default(), false))
        .is_err());
}
