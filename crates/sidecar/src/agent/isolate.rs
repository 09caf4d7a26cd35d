//! The agent's side of caller isolation: every HTTP/2 connection the hub
//! opens on the session (one per caller connection, see
//! [`crate::hub::isolation`]) is forwarded to the exposed service over a
//! connection of its own, so a caller that stops reading holds only its own
//! connection's flow-control credit, on both hops.
//!
//! A connection to the service opens with the first call of its hub
//! connection and is dropped once that hub connection has had no call in
//! flight for [`IDLE`].

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use backchannel::InboundInfo;
use tonic::{body::Body, transport::Channel};

use crate::router::{deadline_of, forward, BoxFuture, CallObserver};

/// How long an unused connection to the service is kept.
pub const IDLE: Duration = Duration::from_secs(30);

/// Most connections to the service kept at once; beyond it, calls share the
/// common one.
pub const MAX_CONNECTIONS: usize = 512;

struct Entry {
    channel: Channel,
    in_flight: Arc<AtomicUsize>,
    last_used: Instant,
}

struct Inner {
    make: Box<dyn Fn() -> anyhow::Result<Channel> + Send + Sync>,
    shared: Channel,
    target: Arc<str>,
    by_conn: Mutex<HashMap<u32, Entry>>,
    last_sweep: Mutex<Instant>,
    in_flight: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Forwards every request to the exposed service, over one service
/// connection per inbound hub connection. Cheap to clone.
#[derive(Clone)]
pub struct PerConnection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PerConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerConnection").finish_non_exhaustive()
    }
}

impl PerConnection {
    /// `make` opens a (lazy) channel to the service; `shared` serves calls
    /// that arrive without [`InboundInfo`] or beyond [`MAX_CONNECTIONS`].
    pub fn new(
        make: impl Fn() -> anyhow::Result<Channel> + Send + Sync + 'static,
        shared: Channel,
        target: impl Into<Arc<str>>,
    ) -> Self {
        PerConnection {
            inner: Arc::new(Inner {
                make: Box::new(make),
                shared,
                target: target.into(),
                by_conn: Mutex::new(HashMap::new()),
                last_sweep: Mutex::new(Instant::now()),
                in_flight: AtomicUsize::new(0),
                idle: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Calls being forwarded now.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::SeqCst)
    }

    /// Completes when no call is being forwarded.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.inner.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// A catch-all [`tonic::service::Routes`].
    pub fn into_routes(self) -> tonic::service::Routes {
        let svc = self;
        let router = axum::Router::new().fallback_service(tower::service_fn(
            move |req: http::Request<axum::body::Body>| {
                let mut svc = svc.clone();
                let req = req.map(Body::new);
                async move { tower::Service::call(&mut svc, req).await }
            },
        ));
        tonic::service::Routes::from(router)
    }

    fn channel_for(&self, conn: Option<u32>) -> (Channel, Option<Arc<AtomicUsize>>) {
        let Some(id) = conn else {
            return (self.inner.shared.clone(), None);
        };
        let now = Instant::now();
        let mut map = self.inner.by_conn.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut last = self
                .inner
                .last_sweep
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if now.duration_since(*last) >= IDLE / 3 {
                *last = now;
                map.retain(|_, e| {
                    e.in_flight.load(Ordering::SeqCst) > 0 || now.duration_since(e.last_used) < IDLE
                });
            }
        }
        if let Some(e) = map.get_mut(&id) {
            e.last_used = now;
            return (e.channel.clone(), Some(e.in_flight.clone()));
        }
        if map.len() >= MAX_CONNECTIONS {
            return (self.inner.shared.clone(), None);
        }
        match (self.inner.make)() {
            Ok(channel) => {
                let in_flight = Arc::new(AtomicUsize::new(0));
                map.insert(
                    id,
                    Entry {
                        channel: channel.clone(),
                        in_flight: in_flight.clone(),
                        last_used: now,
                    },
                );
                (channel, Some(in_flight))
            }
            Err(_) => (self.inner.shared.clone(), None),
        }
    }
}

/// Counts a call in flight until its response (or the request) is dropped.
struct InFlight {
    conn: Option<Arc<AtomicUsize>>,
    all: Arc<Inner>,
}

impl InFlight {
    fn start(conn: Option<Arc<AtomicUsize>>, all: Arc<Inner>) -> Self {
        if let Some(c) = &conn {
            c.fetch_add(1, Ordering::SeqCst);
        }
        all.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight { conn, all }
    }
}

impl CallObserver for InFlight {}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            c.fetch_sub(1, Ordering::SeqCst);
        }
        if self.all.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.all.idle.notify_waiters();
        }
    }
}

impl tower::Service<http::Request<Body>> for PerConnection {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let deadline = deadline_of(req.headers());
        let conn = req.extensions().get::<InboundInfo>().map(|i| i.stream_id);
        let (channel, counter) = self.channel_for(conn);
        let observer = Arc::new(InFlight::start(counter, self.inner.clone()));
        let fut = forward(channel, req, self.inner.target.clone(), deadline, observer);
        Box::pin(async move { Ok(fut.await) })
    }
}
