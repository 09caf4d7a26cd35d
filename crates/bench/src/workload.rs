//! The workloads (echo, upload, download over gRPC; a raw byte copy). They
//! run against [`backchannel_testkit::BenchService`].

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};
use futures::StreamExt;
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::{body::Body, transport::Channel, Status};

use super::report::{new_histogram, record, Counters};
use backchannel_testkit::{
    pattern::PATTERN_MAX_SLICE,
    pb::bench::{self, bench_client::BenchClient},
    {check_pattern as is_pattern, pattern},
};

/// What one measured run produced.
pub struct Run {
    /// Operations (calls or messages).
    pub ops: u64,
    /// Payload bytes (one direction).
    pub bytes: u64,
    /// Wall time.
    pub secs: f64,
    /// Latencies (call latency, or the gap between messages).
    pub hist: Histogram<u64>,
}

/// A gRPC connection of any path: a tonic [`Channel`], possibly with a layer
/// (the hub path adds the `backchannel-peer` header).
pub type Conn = tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Status>;

/// A [`Conn`] over any gRPC service: a tonic `Channel`, a
/// `backchannel::PeerChannel`...
pub fn conn<S>(svc: S) -> Conn
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
{
    Conn::new(tower::ServiceExt::map_err(svc, |e: S::Error| {
        Status::from_error(e.into())
    }))
}

/// A [`Conn`] over `ch` that adds `name: value` to every request.
pub fn conn_with_header(ch: Channel, name: &'static str, value: http::HeaderValue) -> Conn {
    conn(tower::ServiceExt::map_request(
        ch,
        move |mut req: http::Request<Body>| {
            req.headers_mut().insert(name, value.clone());
            req
        },
    ))
}

/// A bench client with limits large enough for any message size we send.
pub fn client(ch: Conn) -> BenchClient<Conn> {
    BenchClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Unary echo of `size` bytes from `concurrency` tasks for `duration`
/// (after `warmup` calls per task).
pub async fn echo(
    ch: Conn,
    size: usize,
    concurrency: usize,
    duration: Duration,
    warmup: usize,
    counters: Arc<Counters>,
) -> anyhow::Result<Run> {
    let payload = pattern(0, size);
    let mut c = client(ch);
    for _ in 0..warmup {
        let r = c
            .echo(bench::Payload {
                data: payload.clone(),
            })
            .await?;
        ensure!(r.get_ref().data == payload, "echo returned other bytes");
    }
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let mut c = c.clone();
            let payload = payload.clone();
            let counters = counters.clone();
            tokio::spawn(async move {
                let mut h = new_histogram();
                let mut ops = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = c
                        .echo(bench::Payload {
                            data: payload.clone(),
                        })
                        .await?;
                    record(&mut h, t.elapsed());
                    ensure!(r.get_ref().data == payload, "echo returned other bytes");
                    ops += 1;
                    counters.add(payload.len() as u64);
                }
                Ok::<_, anyhow::Error>((ops, h))
            })
        })
        .collect();
    let mut hist = new_histogram();
    let mut ops = 0;
    for t in tasks {
        let (n, h) = t.await.context("echo task panicked")??;
        ops += n;
        hist.add(&h).ok();
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Run {
        ops,
        bytes: ops * size as u64,
        secs,
        hist,
    })
}

/// Client streaming: `total` bytes in messages of `msg` bytes.
pub async fn upload(
    ch: Conn,
    total: u64,
    msg: usize,
    counters: Arc<Counters>,
) -> anyhow::Result<Run> {
    let msg = msg.max(1) as u64;
    let hist = Arc::new(Mutex::new(new_histogram()));
    let h = hist.clone();
    let start = Instant::now();
    let mut last = start;
    let messages = total.div_ceil(msg);
    let stream = futures::stream::iter(0..messages).map(move |i| {
        let now = Instant::now();
        if i > 0 {
            record(&mut h.lock().unwrap_or_else(|e| e.into_inner()), now - last);
        }
        last = now;
        let off = i * msg;
        let n = msg.min(total - off) as usize;
        counters.add(n as u64);
        bench::Payload {
            data: pattern(off, n),
        }
    });
    let summary = client(ch).upload(stream).await?.into_inner();
    let secs = start.elapsed().as_secs_f64();
    if summary.bytes != total || summary.messages != messages {
        bail!(
            "server received {} bytes in {} messages, sent {total} in {messages}",
            summary.bytes,
            summary.messages
        );
    }
    let hist = hist.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(Run {
        ops: messages,
        bytes: total,
        secs,
        hist,
    })
}

/// Server streaming: `total` bytes in messages of `msg` bytes.
pub async fn download(
    ch: Conn,
    total: u64,
    msg: usize,
    counters: Arc<Counters>,
) -> anyhow::Result<Run> {
    let start = Instant::now();
    let mut s = client(ch)
        .download(bench::DownloadRequest {
            bytes: total,
            chunk_size: msg.clamp(1, u32::MAX as usize) as u32,
        })
        .await?
        .into_inner();
    let mut hist = new_histogram();
    let (mut bytes, mut ops) = (0u64, 0u64);
    let mut last = Instant::now();
    while let Some(p) = s.message().await? {
        let now = Instant::now();
        record(&mut hist, now - last);
        last = now;
        ensure!(is_pattern(&p.data, bytes), "data mismatch in message {ops}");
        bytes += p.data.len() as u64;
        ops += 1;
        counters.add(p.data.len() as u64);
    }
    ensure!(bytes == total, "received {bytes} bytes, expected {total}");
    Ok(Run {
        ops,
        bytes,
        secs: start.elapsed().as_secs_f64(),
        hist,
    })
}

/// Copies `total` pattern bytes from `w` to `r` in writes of `chunk` bytes;
/// the reader checks them. Latency: time per `chunk` bytes received.
pub async fn copy<W, R>(
    mut w: W,
    mut r: R,
    total: u64,
    chunk: usize,
    counters: Arc<Counters>,
) -> anyhow::Result<Run>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin,
{
    let chunk = chunk.clamp(1, PATTERN_MAX_SLICE) as u64;
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut off = 0u64;
        while off < total {
            let n = chunk.min(total - off) as usize;
            w.write_all(&pattern(off, n)).await?;
            off += n as u64;
        }
        w.flush().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut hist = new_histogram();
    let (mut got, mut next_mark, mut last) = (0u64, chunk, Instant::now());
    while got < total {
        let n = r.read(&mut buf).await?;
        ensure!(n > 0, "stream ended after {got} of {total} bytes");
        ensure!(is_pattern(&buf[..n], got), "data mismatch at offset {got}");
        got += n as u64;
        counters.add(n as u64);
        while got >= next_mark {
            let now = Instant::now();
            record(&mut hist, now - last);
            last = now;
            next_mark += chunk;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    // Keep the writer alive until the reader has everything (dropping a
    // yamux stream early resets it).
    let _w = writer.await.context("writer panicked")??;
    Ok(Run {
        ops: total.div_ceil(chunk),
        bytes: total,
        secs,
        hist,
    })
}
