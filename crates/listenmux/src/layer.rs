//! Exposing a [`ConnInfo`] the way tonic's own transports do.

use std::task::{Context, Poll};

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::ConnInfo;

/// A tower layer for a tonic server behind a [`ListenMux`](crate::ListenMux):
/// it copies each request's [`ConnInfo`] into the extension types tonic's
/// accessors read ([`TcpConnectInfo`], and [`TlsConnectInfo`] when the mux
/// terminated TLS). `Request::remote_addr()`, `local_addr()` and
/// `peer_certs()` then answer as they do behind tonic's `TcpIncoming`, and so
/// do tower layers keyed on them.
///
/// Add it first, so that it runs before the layers that look for those
/// extensions; [`server_builder`] does that for you.
///
/// ```
/// let server = tonic::transport::Server::builder().layer(listenmux::ConnectInfoLayer::new());
/// # drop(server);
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectInfoLayer {
    _private: (),
}

impl ConnectInfoLayer {
    /// The layer.
    pub fn new() -> Self {
        ConnectInfoLayer { _private: () }
    }
}

impl<S> tower::Layer<S> for ConnectInfoLayer {
    type Service = ConnectInfoService<S>;

    fn layer(&self, inner: S) -> ConnectInfoService<S> {
        ConnectInfoService { inner }
    }
}

/// The service of a [`ConnectInfoLayer`].
#[derive(Clone, Debug)]
pub struct ConnectInfoService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for ConnectInfoService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        insert_tonic_connect_info(request.extensions_mut());
        self.inner.call(request)
    }
}

/// Adds [`TcpConnectInfo`] (and [`TlsConnectInfo`] over TLS) derived from the
/// [`ConnInfo`] in `extensions`, if there is one and they are not there yet.
fn insert_tonic_connect_info(extensions: &mut http::Extensions) {
    let Some(info) = extensions.get::<ConnInfo>() else {
        return;
    };
    let tcp = info.tcp_connect_info();
    let tls = info.tls_connect_info().cloned();
    if extensions.get::<TcpConnectInfo>().is_none() {
        extensions.insert(tcp);
    }
    if let Some(tls) = tls {
        if extensions.get::<TlsConnectInfo<TcpConnectInfo>>().is_none() {
            extensions.insert(tls);
        }
    }
}

/// `tonic::transport::Server::builder()` with a [`ConnectInfoLayer`] as its
/// outermost layer: the server to run behind a [`ListenMux`](crate::ListenMux).
///
/// ```no_run
/// # async fn run(routes: tonic::service::Routes) -> Result<(), Box<dyn std::error::Error>> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
/// let incoming = listenmux::ListenMux::builder().build().incoming(listener);
/// listenmux::server_builder()
///     .add_routes(routes)
///     .serve_with_incoming(incoming)
///     .await?;
/// # Ok(()) }
/// ```
pub fn server_builder() -> tonic::transport::Server<
    tower::layer::util::Stack<ConnectInfoLayer, tower::layer::util::Identity>,
> {
    tonic::transport::Server::builder().layer(ConnectInfoLayer::new())
}
