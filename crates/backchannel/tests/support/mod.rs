//! A real backchannel server for the tests: listenmux + ServerHandshaker +
//! a tonic health service whose interceptor records what handlers see.
#![allow(dead_code)]

pub mod pki;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use backchannel::{PeerId, Registry, RequestExt, ServerHandshaker, SessionConfig};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, health_server::HealthServer,
    HealthCheckRequest,
};

/// What a handler saw of one request, through tonic's accessors and
/// `RequestExt`.
#[derive(Clone, Debug)]
pub struct Seen {
    pub remote: Option<SocketAddr>,
    pub certs: Option<Vec<CertificateDer<'static>>>,
    pub peer: Option<PeerId>,
}

pub type Log = Arc<Mutex<Vec<Seen>>>;

/// A health service recording every request in `log`; with `fail`, every
/// call ends with `UNKNOWN` from the handler side.
pub fn health_routes(log: Log, fail: bool) -> Routes {
    let health = tonic_health::server::HealthService::from_health_reporter(
        tonic_health::server::HealthReporter::new(),
    );
    Routes::new(HealthServer::with_interceptor(
        health,
        move |req: tonic::Request<()>| {
            log.lock().unwrap().push(Seen {
                remote: req.remote_addr(),
                certs: req.peer_certs().map(|c| c.to_vec()),
                peer: req.peer_id().ok(),
            });
            if fail {
                return Err(tonic::Status::unknown("the handler says unknown"));
            }
            Ok(req)
        },
    ))
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub registry: Registry,
    pub log: Log,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Serves on `listener`, with TLS when `tls` is given.
    pub async fn start(
        listener: TcpListener,
        tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    ) -> TestServer {
        let addr = listener.local_addr().unwrap();
        let registry = Registry::new();
        let log = Log::default();
        let mut mux = listenmux::ListenMux::builder().handshaker(ServerHandshaker::new(
            registry.clone(),
            SessionConfig::server().with_handshake_timeout(Duration::from_secs(5)),
        ));
        if let Some(tls) = tls {
            mux = mux.tls(tls.into());
        }
        let incoming = mux.build().incoming(listener);
        let routes = health_routes(log.clone(), false);
        let task = tokio::spawn(async move {
            listenmux::server_builder()
                .add_routes(routes)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        TestServer {
            addr,
            registry,
            log,
            task: Some(task),
        }
    }

    pub async fn tcp() -> TestServer {
        Self::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), None).await
    }

    /// Stops accepting (the listener is closed) and ends every session.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        for peer in self.registry.list() {
            self.registry.close(peer.id);
        }
        for peer in self.registry.list() {
            tokio::time::timeout(Duration::from_secs(10), self.registry.wait_gone(peer.id))
                .await
                .expect("sessions end after close");
        }
    }

    pub fn last(&self) -> Seen {
        self.log
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request was seen")
    }

    /// Waits (event-driven, bounded) for the first peer and returns its ID.
    pub async fn first_peer(&self) -> PeerId {
        let mut events = self.registry.subscribe();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(p) = self.registry.list().first() {
                    return p.id;
                }
                let _ = events.recv().await;
            }
        })
        .await
        .expect("a peer connects")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        for peer in self.registry.list() {
            self.registry.close(peer.id);
        }
    }
}

/// A health check over `channel`.
pub async fn check<C>(channel: C) -> Result<ServingStatus, tonic::Status>
where
    C: tonic::client::GrpcService<tonic::body::Body>,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await?;
    Ok(r.into_inner().status())
}
