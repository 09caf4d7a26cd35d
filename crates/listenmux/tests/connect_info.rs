//! tonic's `Request::remote_addr()`, `local_addr()` and `peer_certs()` behind
//! a `ListenMux`, over real TCP and TLS sockets, read by a real tonic server.

mod support;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use listenmux::{ConnInfo, ListenMux, ListenMuxBuilder, Transport};
use rustls_pki_types::{CertificateDer, ServerName};
use support::pki::pki;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Endpoint;
use tonic_health::pb::{
    health_client::HealthClient, health_server::HealthServer, HealthCheckRequest,
};

/// What the handler saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
    certs: Option<Vec<CertificateDer<'static>>>,
    info: Option<ConnInfo>,
}

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A health server behind `mux`, built by `listenmux::server_builder`, whose
/// interceptor records tonic's view of every request.
async fn serve(mux: ListenMuxBuilder) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let health = tonic_health::server::HealthService::from_health_reporter(
        tonic_health::server::HealthReporter::new(),
    );
    let svc = HealthServer::with_interceptor(health, move |req: tonic::Request<()>| {
        record.lock().unwrap().push(Seen {
            remote: req.remote_addr(),
            local: req.local_addr(),
            certs: req.peer_certs().map(|c| c.to_vec()),
            info: req.extensions().get::<ConnInfo>().cloned(),
        });
        Ok(req)
    });
    let incoming = mux.build().incoming(listener);
    let task = tokio::spawn(async move {
        listenmux::server_builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await
            .unwrap();
    });
    Server { addr, seen, task }
}

async fn check(channel: tonic::transport::Channel) {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("health check");
}

/// A channel over one TCP connection to `addr`, reporting its local address.
async fn tcp_channel(addr: SocketAddr) -> (tonic::transport::Channel, SocketAddr) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let slot = Mutex::new(Some(tcp));
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let tcp = slot.lock().unwrap().take();
            async move {
                tcp.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
            }
        }))
        .await
        .unwrap();
    (channel, local)
}

/// A channel over one TLS connection to `addr`, reporting its local address.
async fn tls_channel(
    addr: SocketAddr,
    config: Arc<tokio_rustls::rustls::ClientConfig>,
) -> (tonic::transport::Channel, SocketAddr) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let slot = Mutex::new(Some(tls));
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let tls = slot.lock().unwrap().take();
            async move {
                tls.map(TokioIo::new)
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
            }
        }))
        .await
        .unwrap();
    (channel, local)
}

fn last(server: &Server) -> Seen {
    server
        .seen
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a request was seen")
}

#[tokio::test]
async fn remote_and_local_addr_over_tcp() {
    let server = serve(ListenMux::builder()).await;
    let (channel, local) = tcp_channel(server.addr).await;
    check(channel).await;
    let seen = last(&server);
    assert_eq!(seen.remote, Some(local), "{seen:?}");
    assert_eq!(seen.local, Some(server.addr));
    assert!(seen.certs.is_none());
    let info = seen.info.expect("ConnInfo in the extensions");
    assert_eq!(info.transport(), Transport::Tcp);
    assert!(!info.is_tls());
}

#[tokio::test]
async fn remote_addr_and_peer_certs_over_tls_with_a_client_certificate() {
    let pki = pki(true);
    let server = serve(ListenMux::builder().tls(pki.server.clone().into())).await;
    let (channel, local) = tls_channel(server.addr, pki.client.clone()).await;
    check(channel).await;
    let seen = last(&server);
    assert_eq!(seen.remote, Some(local), "{seen:?}");
    assert_eq!(seen.local, Some(server.addr));
    assert_eq!(seen.certs.as_deref(), Some(&[pki.client_cert.clone()][..]));
    let info = seen.info.expect("ConnInfo in the extensions");
    assert!(info.is_tls());
    assert_eq!(info.peer_certs().map(|c| c.len()), Some(1));
}

#[tokio::test]
async fn tls_without_a_client_certificate_has_an_address_and_no_certs() {
    let pki = pki(false);
    let server = serve(ListenMux::builder().tls(pki.server.clone().into())).await;
    let (channel, local) = tls_channel(server.addr, pki.anonymous_client.clone()).await;
    check(channel).await;
    let seen = last(&server);
    assert_eq!(seen.remote, Some(local));
    assert!(seen.certs.is_none(), "{seen:?}");
    assert!(seen.info.expect("ConnInfo").is_tls());
}

#[tokio::test]
async fn without_the_layer_tonic_sees_only_the_conn_info() {
    // The layer is what makes tonic's accessors answer: a bare
    // `Server::builder()` still gets the ConnInfo, but no TcpConnectInfo.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    let health = tonic_health::server::HealthService::from_health_reporter(
        tonic_health::server::HealthReporter::new(),
    );
    let svc = HealthServer::with_interceptor(health, move |req: tonic::Request<()>| {
        let info = req.extensions().get::<ConnInfo>().cloned();
        *record.lock().unwrap() = Some((req.remote_addr(), info));
        Ok(req)
    });
    let incoming = ListenMux::builder().build().incoming(listener);
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming),
    );
    let (channel, local) = tcp_channel(addr).await;
    check(channel).await;
    let (remote, info) = seen.lock().unwrap().clone().unwrap();
    assert_eq!(remote, None);
    assert_eq!(info.unwrap().remote_addr(), Some(local));
    task.abort();
}

#[tokio::test]
async fn one_mux_serves_several_listeners_and_shares_its_stats() {
    let mux = ListenMux::builder()
        .sniff_timeout(Duration::from_secs(5))
        .build();
    let clone = mux.clone();
    let (a, b) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let incoming = futures::stream::select(mux.incoming(a), clone.incoming(b));
    let task = tokio::spawn(
        listenmux::server_builder()
            .add_service(tonic_health::server::health_reporter().1)
            .serve_with_incoming(incoming),
    );
    check(tcp_channel(addr_a).await.0).await;
    check(tcp_channel(addr_b).await.0).await;
    let snap = mux.stats().snapshot();
    assert_eq!(snap.accepted, 2, "{snap:?}");
    assert_eq!(snap.plain, 2, "{snap:?}");
    task.abort();
}
