//! The listenmux sniffer path: accept -> sniff the first 11 bytes -> route
//! (plain gRPC with the bytes replayed, or a handshaker), over an in-memory
//! duplex and over loopback TCP; plus the whole backchannel server handshake
//! (sniff -> yamux session -> stream 1 -> connection for tonic).
//!
//! `cargo bench -p listenmux --bench sniff -- --warm-up-time 1 --measurement-time 3`

use std::{
    io,
    time::{Duration, Instant},
};

use backchannel_testkit::tokio_yamux as yamux;
use criterion::{criterion_group, criterion_main, Criterion};
use futures::StreamExt;
use listenmux::{
    BoxFuture, BoxIo, ConnInfo, Connection, HandshakeError, Handshaked, Handshaker, Incoming,
    ListenMux, Listener, Magic,
};
use tokio::{
    io::{AsyncWriteExt, DuplexStream},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_yamux::session::SessionType;

/// Accepts in-memory connections handed over a channel.
struct ChanListener(mpsc::UnboundedReceiver<DuplexStream>);

impl Listener for ChanListener {
    type Io = DuplexStream;
    async fn accept(&mut self) -> io::Result<(DuplexStream, ConnInfo)> {
        match self.0.recv().await {
            Some(s) => Ok((s, ConnInfo::default())),
            None => std::future::pending().await,
        }
    }
}

/// A handshaker that hands the connection straight back to the server.
struct PassThrough;

impl Handshaker for PassThrough {
    fn magic(&self) -> Magic {
        *b"benchmagic!"
    }
    fn handshake(
        &self,
        io: BoxIo,
        info: ConnInfo,
    ) -> BoxFuture<Result<Handshaked, HandshakeError>> {
        Box::pin(async move { Ok(Handshaked::Connection(Connection::new(io, info))) })
    }
}

const PLAIN: &[u8; 11] = b"PRI * HTTP/";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn mux() -> ListenMux {
    ListenMux::builder().handshaker(PassThrough).build()
}

async fn next(incoming: &mut Incoming) -> Connection {
    incoming
        .next()
        .await
        .expect("incoming ended")
        .expect("no error")
}

fn sniff(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("sniff");

    for (name, first) in [("duplex/plain", PLAIN), ("duplex/magic", b"benchmagic!")] {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut incoming = rt.block_on(async { mux().incoming(ChanListener(rx)) });
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let (mut client, server) = tokio::io::duplex(4096);
                        tx.send(server).expect("listener alive");
                        client.write_all(first).await.expect("write");
                        let conn = next(&mut incoming).await;
                        drop((client, conn));
                    }
                    start.elapsed()
                })
            })
        });
    }

    for (name, first) in [("tcp/plain", PLAIN), ("tcp/magic", b"benchmagic!")] {
        let (mut incoming, addr) = rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = l.local_addr().expect("addr");
            (mux().incoming(l), addr)
        });
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let mut client = TcpStream::connect(addr).await.expect("connect");
                        client.write_all(first).await.expect("write");
                        let conn = next(&mut incoming).await;
                        drop((client, conn));
                    }
                    start.elapsed()
                })
            })
        });
    }

    // The full server handshake of a backchannel peer over a duplex: sniff,
    // yamux server session, the client's stream 1, registry entry.
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let registry = backchannel::Registry::new();
        let mut incoming = rt.block_on(async {
            ListenMux::builder()
                .handshaker(backchannel::ServerHandshaker::new(
                    registry.clone(),
                    backchannel::SessionConfig::server(),
                ))
                .build()
                .incoming(ChanListener(rx))
        });
        g.bench_function("duplex/backchannel-handshake", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let (mut client, server) = tokio::io::duplex(64 * 1024);
                        tx.send(server).expect("listener alive");
                        client.write_all(&backchannel::MAGIC).await.expect("write");
                        let (mut control, _inbound) = yamux::spawn_session(
                            client,
                            yamux::config(256 * 1024, 16),
                            SessionType::Client,
                        );
                        let stream = control.open_stream().await.expect("stream 1");
                        let conn = next(&mut incoming).await;
                        drop((stream, conn, control));
                    }
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = sniff
}
criterion_main!(benches);
