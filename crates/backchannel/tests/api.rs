//! The backchannel API over real sockets: what handlers see of their caller
//! (address, certificates, peer ID), typed errors naming the failed step,
//! and how the channels report failures.

mod support;

use std::time::Duration;

use backchannel::{ClientBuilder, Error, PeerId, Step};
use rustls_pki_types::ServerName;
use support::{check, health_routes, pki::pki, Log, TestServer};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

#[tokio::test]
async fn forward_calls_see_the_tcp_peer_address_and_the_peer_id() {
    let server = TestServer::tcp().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let client = ClientBuilder::new()
        .connect_io(
            tcp,
            &server.addr.to_string(),
            health_routes(Log::default(), false),
        )
        .await
        .unwrap();
    assert_eq!(
        check(client.channel()).await.unwrap(),
        ServingStatus::Serving
    );
    let seen = server.last();
    assert_eq!(seen.remote, Some(local), "{seen:?}");
    assert_eq!(seen.peer, Some(PeerId::new(1)));
    assert!(seen.certs.is_none());
    assert_eq!(
        server.registry.get(PeerId::new(1)).unwrap().remote_addr,
        Some(local)
    );
}

#[tokio::test]
async fn forward_calls_over_tls_see_the_client_certificate() {
    let pki = pki(true);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TestServer::start(listener, Some(pki.server.clone())).await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let client = ClientBuilder::new()
        .tls(
            pki.client.clone().into(),
            ServerName::try_from("localhost").unwrap(),
        )
        .connect_io(tcp, "localhost", health_routes(Log::default(), false))
        .await
        .unwrap();
    assert_eq!(
        check(client.channel()).await.unwrap(),
        ServingStatus::Serving
    );
    let seen = server.last();
    assert_eq!(seen.remote, Some(local), "{seen:?}");
    assert_eq!(seen.peer, Some(PeerId::new(1)));
    assert_eq!(seen.certs.as_deref(), Some(&[pki.client_cert.clone()][..]));
}

#[tokio::test]
async fn plain_grpc_clients_have_an_address_and_no_peer_id() {
    let server = TestServer::tcp().await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(check(channel).await.unwrap(), ServingStatus::Serving);
    let seen = server.last();
    assert!(seen.remote.is_some());
    assert_eq!(seen.peer, None);
}

#[tokio::test]
async fn reverse_calls_reach_the_client_and_a_handler_unknown_stays_unknown() {
    let server = TestServer::tcp().await;
    let client_log = Log::default();
    let client = ClientBuilder::new()
        .connect_tcp(
            &server.addr.to_string(),
            health_routes(client_log.clone(), false),
        )
        .await
        .unwrap();
    let peer = server.first_peer().await;
    let channel = server.registry.backchannel(peer).unwrap();
    assert_eq!(check(channel).await.unwrap(), ServingStatus::Serving);
    assert_eq!(client_log.lock().unwrap().len(), 1);
    drop(client);

    // A status the peer's handler sends is passed on as it is: only a lost
    // transport becomes UNAVAILABLE.
    let failing = ClientBuilder::new()
        .connect_tcp(
            &server.addr.to_string(),
            health_routes(Log::default(), true),
        )
        .await
        .unwrap();
    let mut events = server.registry.subscribe();
    let peer = loop {
        if let Some(p) = server.registry.list().into_iter().find(|p| p.id != peer) {
            break p.id;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    };
    let err = check(server.registry.backchannel(peer).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown, "{err:?}");
    assert_eq!(err.message(), "the handler says unknown");

    // A session that is gone: UNAVAILABLE, with the cause.
    let channel = server.registry.backchannel(peer).unwrap();
    failing.close();
    server.registry.wait_gone(peer).await;
    let err = check(channel).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains(&format!("peer {peer}")), "{err:?}");
}

#[tokio::test]
async fn the_forward_channel_reports_a_lost_session_as_unavailable() {
    let mut server = TestServer::tcp().await;
    let client = ClientBuilder::new()
        .connect_tcp(
            &server.addr.to_string(),
            health_routes(Log::default(), false),
        )
        .await
        .unwrap();
    assert_eq!(
        check(client.channel()).await.unwrap(),
        ServingStatus::Serving
    );
    server.kill().await;
    tokio::time::timeout(Duration::from_secs(10), client.closed())
        .await
        .expect("the client sees its session end");
    let err = check(client.channel()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("connection to server"), "{err:?}");
}

#[tokio::test]
async fn connecting_to_a_closed_port_is_a_connect_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    drop(listener);
    let err = ClientBuilder::new()
        .connect_tcp(&addr, health_routes(Log::default(), false))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert_eq!(err.step(), Some(Step::Connect));
}

#[tokio::test]
async fn a_bad_authority_is_a_typed_error_not_a_fallback() {
    let (a, _b) = tokio::io::duplex(64);
    let err = ClientBuilder::new()
        .connect_io(a, "not an authority/", health_routes(Log::default(), false))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidAuthority { authority, .. } if authority == "not an authority/"),
        "{err:?}"
    );
    let err = ClientBuilder::new()
        .reconnecting_tcp("host:port:extra", health_routes(Log::default(), false))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidAuthority { .. }), "{err:?}");
}

#[tokio::test]
async fn tls_to_a_server_without_tls_fails_in_the_tls_step() {
    let server = TestServer::tcp().await;
    let pki = pki(false);
    let err = ClientBuilder::new()
        .config(backchannel::SessionConfig::client().with_handshake_timeout(Duration::from_secs(5)))
        .tls(
            pki.anonymous_client.clone().into(),
            ServerName::try_from("localhost").unwrap(),
        )
        .connect_tcp(
            &server.addr.to_string(),
            health_routes(Log::default(), false),
        )
        .await
        .unwrap_err();
    assert_eq!(err.step(), Some(Step::Tls), "{err:?}");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_in_the_named_step() {
    // Accepts TCP and reads nothing: with TLS the client waits for the
    // ServerHello, and the timeout names the TLS step.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
        drop(s);
    });
    let pki = pki(false);
    let err = ClientBuilder::new()
        .config(
            backchannel::SessionConfig::client().with_handshake_timeout(Duration::from_millis(200)),
        )
        .tls(
            pki.anonymous_client.clone().into(),
            ServerName::try_from("localhost").unwrap(),
        )
        .connect_tcp(&addr, health_routes(Log::default(), false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { step: Step::Tls, after } if after == Duration::from_millis(200)),
        "{err:?}"
    );
    hold.abort();
}

#[tokio::test]
async fn the_forward_endpoint_settings_apply() {
    // A user agent set on the Endpoint reaches the server.
    let server = TestServer::tcp().await;
    let endpoint = tonic::transport::Endpoint::from_static("http://hub.test")
        .user_agent("backchannel-test/1")
        .unwrap()
        .timeout(Duration::from_secs(5));
    let client = ClientBuilder::new()
        .endpoint(endpoint)
        .connect_tcp(
            &server.addr.to_string(),
            health_routes(Log::default(), false),
        )
        .await
        .unwrap();
    assert_eq!(
        check(client.channel()).await.unwrap(),
        ServingStatus::Serving
    );
}
