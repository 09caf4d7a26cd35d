//! The hot frame path: bytes through one yamux stream pair over an
//! in-memory duplex, for backchannel-yamux (the server end is stream 1 as
//! the public `ServerHandshaker` hands it to tonic) and, as the "before",
//! for tokio-yamux with the wrapper the library used. The duplex alone is
//! the baseline. Also the frame header codec.
//!
//! `cargo bench -p backchannel --bench frames -- --warm-up-time 1 --measurement-time 3`

use std::time::{Duration, Instant};

use backchannel_testkit::tokio_yamux as yamux;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use listenmux::{BoxIo, Handshaked, Handshaker};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_yamux::session::SessionType;

type Io = Box<dyn listenmux::Io>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// (client end, server end) of one backchannel-yamux stream over a duplex.
async fn pair() -> (Io, BoxIo) {
    let (c, s) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let hs = backchannel::ServerHandshaker::new(
            backchannel::Registry::new(),
            backchannel::SessionConfig::server(),
        );
        match hs
            .handshake(Box::new(s), listenmux::ConnInfo::default())
            .await
        {
            Ok(Handshaked::Connection(conn)) => conn.into_parts().0,
            _ => panic!("server handshake failed"),
        }
    });
    let cfg = backchannel_yamux::Config::default()
        .with_max_stream_window(4 << 20)
        .with_keepalive(None);
    let (control, _incoming, conn) =
        backchannel_yamux::session(c, cfg, backchannel_yamux::Mode::Client);
    tokio::spawn(conn);
    let stream = control.open_stream().expect("open stream 1");
    (Box::new(stream), server.await.expect("server"))
}

/// The same with tokio-yamux at both ends (the previous transport).
async fn tokio_yamux_pair() -> (Io, Io) {
    let (c, s) = tokio::io::duplex(1 << 20);
    let (_sc, mut inbound) =
        yamux::spawn_session(s, yamux::config(4 << 20, 1), SessionType::Server);
    let (mut control, _ci) =
        yamux::spawn_session(c, yamux::config(4 << 20, 256), SessionType::Client);
    let mut client = yamux::TokioYamuxStream::new(control.open_stream().await.expect("open"));
    client.write_all(b"x").await.expect("syn");
    let mut server = yamux::TokioYamuxStream::new(inbound.recv().await.expect("accept"));
    let mut x = [0u8; 1];
    server.read_exact(&mut x).await.expect("syn byte");
    (Box::new(client), Box::new(server))
}

/// Writes `n` messages of `msg.len()` bytes on `w` and reads them on `r`.
async fn pump<W, R>(w: &mut W, r: &mut R, msg: &[u8], n: u64, buf: &mut [u8])
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    let total = msg.len() as u64 * n;
    let write = async {
        for _ in 0..n {
            w.write_all(msg).await.expect("write");
        }
    };
    let read = async {
        let mut got = 0u64;
        while got < total {
            let k = r.read(buf).await.expect("read");
            assert!(k > 0, "stream ended");
            got += k as u64;
        }
    };
    tokio::join!(write, read);
}

fn frames(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("frames");
    let mut buf = vec![0u8; 256 * 1024];
    for size in [1024usize, 16 * 1024, 64 * 1024] {
        let msg = backchannel_testkit::pattern(0, size);
        g.throughput(Throughput::Bytes(size as u64));
        for (name, (mut client, mut server)) in [
            ("yamux", rt.block_on(pair())),
            ("tokio-yamux", rt.block_on(tokio_yamux_pair())),
        ] {
            g.bench_with_input(
                BenchmarkId::new(format!("{name} c->s"), size),
                &size,
                |b, _| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let t = Instant::now();
                            pump(&mut client, &mut server, &msg, iters, &mut buf).await;
                            t.elapsed()
                        })
                    })
                },
            );
            g.bench_with_input(
                BenchmarkId::new(format!("{name} s->c"), size),
                &size,
                |b, _| {
                    b.iter_custom(|iters| {
                        rt.block_on(async {
                            let t = Instant::now();
                            pump(&mut server, &mut client, &msg, iters, &mut buf).await;
                            t.elapsed()
                        })
                    })
                },
            );
        }
        let (mut a, mut z) = tokio::io::duplex(1 << 20);
        g.bench_with_input(BenchmarkId::new("duplex", size), &size, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let t = Instant::now();
                    pump(&mut a, &mut z, &msg, iters, &mut buf).await;
                    t.elapsed()
                })
            })
        });
    }
    g.finish();
}

fn header_codec(c: &mut Criterion) {
    use backchannel_yamux::frame::{FrameType, Header};
    let h = Header::new(FrameType::Data, 0, 1, 16 * 1024);
    c.bench_function("yamux header encode+decode", |b| {
        b.iter(|| Header::decode(&std::hint::black_box(h).encode()).expect("valid"))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = frames, header_codec
}
criterion_main!(benches);
