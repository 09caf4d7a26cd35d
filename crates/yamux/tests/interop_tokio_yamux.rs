//! Interop with an independent yamux implementation, tokio-yamux, as the
//! peer in both roles, over loopback TCP.
//!
//! tokio-yamux's `StreamHandle` only credits send-window updates when it is
//! read (a write-only task stalls), and stops handling a stream's frames
//! once the peer's FIN arrived. So on its side every writer has a reader
//! polling the same handle (`tokio::io::split`), and our side sends FIN only
//! after it has read everything tokio-yamux writes.

mod common;

use std::{io, time::Duration};

use backchannel_yamux::{Mode, OpenError};
use common::*;
use futures::StreamExt;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_yamux::{session::SessionType, Session, StreamHandle};

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;

fn tcfg(window: u32) -> tokio_yamux::Config {
    tokio_yamux::Config {
        enable_keepalive: false,
        max_stream_window_size: window,
        // How long tokio-yamux waits for the peer after its own GoAway.
        connection_write_timeout: Duration::from_millis(200),
        ..tokio_yamux::Config::default()
    }
}

/// A tokio-yamux session driven by its own task.
struct TokioSide {
    control: tokio_yamux::Control,
    incoming: mpsc::UnboundedReceiver<StreamHandle>,
    /// Ends when the session ends.
    task: JoinHandle<()>,
}

fn tokio_side(io: TcpStream, cfg: tokio_yamux::Config, ty: SessionType) -> TokioSide {
    let mut session = Session::new(io, cfg, ty);
    let control = session.control();
    let (tx, incoming) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(Ok(s)) = session.next().await {
            let _ = tx.send(s);
        }
    });
    TokioSide {
        control,
        incoming,
        task,
    }
}

/// Ours in `mode`, tokio-yamux in the other role.
async fn mixed_pair(
    ours: backchannel_yamux::Config,
    theirs: tokio_yamux::Config,
    mode: Mode,
) -> (Side, TokioSide) {
    let (a, b) = tcp_pair().await;
    let ty = match mode {
        Mode::Client => SessionType::Server,
        Mode::Server => SessionType::Client,
    };
    (start(a, ours, mode), tokio_side(b, theirs, ty))
}

/// Our end of a bulk stream: a write-only task and a read-only task; FIN
/// only after everything from tokio-yamux arrived (see the module docs).
fn ours_both_ways(
    s: backchannel_yamux::Stream,
    n: u64,
    out_seed: u64,
    in_seed: u64,
) -> [JoinHandle<io::Result<()>>; 2] {
    let (mut r, mut w) = tokio::io::split(s);
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        write_pattern(&mut w, out_seed, n, out_seed + 1000).await?;
        let _ = done_rx.await;
        w.shutdown().await
    });
    let reader = tokio::spawn(async move {
        read_pattern(&mut r, in_seed, n, in_seed + 2000).await?;
        let _ = done_tx.send(());
        Ok(())
    });
    [writer, reader]
}

/// tokio-yamux's end: writer and reader on the two halves of one handle.
fn theirs_both_ways(
    h: StreamHandle,
    n: u64,
    out_seed: u64,
    in_seed: u64,
) -> [JoinHandle<io::Result<()>>; 2] {
    let (mut r, mut w) = tokio::io::split(h);
    let writer = tokio::spawn(async move {
        write_pattern(&mut w, out_seed, n, out_seed + 3000).await?;
        w.shutdown().await
    });
    let reader =
        tokio::spawn(async move { read_pattern(&mut r, in_seed, n, in_seed + 4000).await });
    [writer, reader]
}

/// `streams` streams opened by whichever side is the client; `n` bytes each
/// way on each, byte-checked.
async fn bulk(mode: Mode, window: u32, streams: usize, n: u64) {
    let (mut ours, mut theirs) = mixed_pair(quiet(window), tcfg(window), mode).await;
    let mut tasks = Vec::new();
    for i in 0..streams {
        let (our_stream, their_stream) = match mode {
            Mode::Client => {
                let s = ours.control.open_stream().unwrap();
                let h = within("tokio-yamux accept", theirs.incoming.recv())
                    .await
                    .unwrap();
                (s, h)
            }
            Mode::Server => {
                let h = within("tokio-yamux open", theirs.control.open_stream())
                    .await
                    .unwrap();
                let s = within("accept", ours.incoming.accept()).await.unwrap();
                (s, h)
            }
        };
        assert_eq!(our_stream.id(), their_stream.id());
        // Whichever implementation is the client opens them: odd IDs.
        assert_eq!(our_stream.id(), 1 + 2 * i as u32);
        let id = u64::from(our_stream.id());
        tasks.extend(ours_both_ways(our_stream, n, 2 * id, 2 * id + 1));
        tasks.extend(theirs_both_ways(their_stream, n, 2 * id + 1, 2 * id));
    }
    within_for(Duration::from_secs(60), "bulk interop transfer", async {
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    })
    .await;
    assert_eq!(ours.control.num_streams(), 0, "every stream finished");
    ours.control.close();
    assert!(ours.result().await.is_ok());
    within("tokio-yamux session to end", theirs.task)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_ours_client_256k_window() {
    bulk(Mode::Client, 256 * KIB, 3, 4 * MIB as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_ours_client_4m_window() {
    bulk(Mode::Client, 4 * MIB, 3, 4 * MIB as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_ours_server_256k_window() {
    bulk(Mode::Server, 256 * KIB, 3, 4 * MIB as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_ours_server_4m_window() {
    bulk(Mode::Server, 4 * MIB, 3, 4 * MIB as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_write_only_task_into_tokio_yamux_reader() {
    // 32 MiB one way; tokio-yamux only reads, which it does well.
    for mode in [Mode::Client, Mode::Server] {
        let (ours, mut theirs) = mixed_pair(quiet(4 * MIB), tcfg(4 * MIB), mode).await;
        let mut ours = ours;
        let (mut w, mut r) = match mode {
            Mode::Client => {
                let s = ours.control.open_stream().unwrap();
                let h = within("accept", theirs.incoming.recv()).await.unwrap();
                (s, h)
            }
            Mode::Server => {
                let h = within("open", theirs.control.open_stream()).await.unwrap();
                let s = within("accept", ours.incoming.accept()).await.unwrap();
                (s, h)
            }
        };
        let total = 32 * MIB as u64;
        let writer = tokio::spawn(async move {
            write_pattern(&mut w, 77, total, 5).await.unwrap();
            w.shutdown().await.unwrap();
        });
        within_for(
            Duration::from_secs(60),
            "tokio-yamux reads it all",
            read_pattern(&mut r, 77, total, 6),
        )
        .await
        .unwrap();
        within("writer", writer).await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// Half-close.

#[tokio::test]
async fn half_close_request_from_us_response_from_tokio_yamux() {
    let (ours, mut theirs) = mixed_pair(quiet(256 * KIB), tcfg(256 * KIB), Mode::Client).await;
    let mut s = ours.control.open_stream().unwrap();
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    let mut h = within("accept", theirs.incoming.recv()).await.unwrap();
    let mut req = Vec::new();
    within("request", h.read_to_end(&mut req)).await.unwrap();
    assert_eq!(req, b"request");
    // tokio-yamux ignores window updates after our FIN, so its answer stays
    // within one window.
    let total = 200 * KIB as u64;
    write_pattern(&mut h, 9, total, 1).await.unwrap();
    h.shutdown().await.unwrap();
    within("response", read_pattern(&mut s, 9, total, 2))
        .await
        .unwrap();
}

#[tokio::test]
async fn half_close_request_from_tokio_yamux_response_from_us() {
    let (mut ours, theirs) = mixed_pair(quiet(256 * KIB), tcfg(256 * KIB), Mode::Server).await;
    let mut control = theirs.control.clone();
    let mut h = within("open", control.open_stream()).await.unwrap();
    h.write_all(b"request").await.unwrap();
    h.shutdown().await.unwrap();
    let mut s = within("accept", ours.incoming.accept()).await.unwrap();
    let mut req = Vec::new();
    within("request", s.read_to_end(&mut req)).await.unwrap();
    assert_eq!(req, b"request");
    // Our answer after their FIN spans many windows: tokio-yamux credits
    // them as it reads.
    let total = 3 * MIB as u64;
    let writer = tokio::spawn(async move {
        write_pattern(&mut s, 10, total, 3).await.unwrap();
        s.shutdown().await.unwrap();
    });
    within("response", read_pattern(&mut h, 10, total, 4))
        .await
        .unwrap();
    within("writer", writer).await.unwrap();
}

// ---------------------------------------------------------------------------
// Resets, drops, refusals.

#[tokio::test]
async fn tokio_yamux_drop_resets_our_stream() {
    let (mut ours, theirs) = mixed_pair(quiet(256 * KIB), tcfg(256 * KIB), Mode::Server).await;
    let mut control = theirs.control.clone();
    let mut h = within("open", control.open_stream()).await.unwrap();
    h.write_all(b"x").await.unwrap();
    let mut s = within("accept", ours.incoming.accept()).await.unwrap();
    let mut x = [0u8; 1];
    s.read_exact(&mut x).await.unwrap();
    let pending = tokio::spawn(async move {
        let r = s.read(&mut [0u8; 8]).await;
        (s, r)
    });
    drop(h); // tokio-yamux sends RST for an open stream it drops
    let (mut s, r) = within("reset read", pending).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(
        s.write(b"y").await.unwrap_err().kind(),
        io::ErrorKind::ConnectionReset
    );
}

#[tokio::test]
async fn our_drop_is_eof_for_tokio_yamux() {
    let (ours, mut theirs) = mixed_pair(quiet(256 * KIB), tcfg(256 * KIB), Mode::Client).await;
    let mut s = ours.control.open_stream().unwrap();
    s.write_all(b"last").await.unwrap();
    drop(s);
    let mut h = within("accept", theirs.incoming.recv()).await.unwrap();
    let mut got = Vec::new();
    within("read to EOF", h.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"last");
}

#[tokio::test]
async fn our_dropped_incoming_resets_tokio_yamux_streams() {
    let (ours, theirs) = mixed_pair(quiet(256 * KIB), tcfg(256 * KIB), Mode::Server).await;
    drop(ours.incoming);
    let mut control = theirs.control.clone();
    for _ in 0..2 {
        let mut h = within("open", control.open_stream()).await.unwrap();
        h.write_all(b"hello?").await.unwrap();
        let err = within("reset", h.read(&mut [0u8; 4])).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
    assert!(!ours.control.is_closed());
}

#[tokio::test]
async fn tokio_yamux_refusal_with_ack_rst_resets_our_stream() {
    // tokio-yamux refuses streams beyond max_stream_count with ACK|RST.
    let theirs_cfg = tokio_yamux::Config {
        max_stream_count: 1,
        ..tcfg(256 * KIB)
    };
    let (ours, mut theirs) = mixed_pair(quiet(256 * KIB), theirs_cfg, Mode::Client).await;
    let mut s1 = ours.control.open_stream().unwrap();
    s1.write_all(b"1").await.unwrap();
    let mut h1 = within("accept", theirs.incoming.recv()).await.unwrap();
    h1.read_exact(&mut [0u8; 1]).await.unwrap();
    let mut s3 = ours.control.open_stream().unwrap();
    s3.write_all(b"3").await.unwrap();
    let err = within("refusal", s3.read(&mut [0u8; 1])).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // The accepted one is unaffected.
    h1.write_all(b"ok").await.unwrap();
    let mut got = [0u8; 2];
    within("read", s1.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"ok");
    // Once our refused stream is dropped, it is forgotten.
    drop(s3);
    assert_eq!(ours.control.num_streams(), 1);
}

// ---------------------------------------------------------------------------
// Ending sessions, keepalive.

#[tokio::test]
async fn our_close_ends_the_tokio_yamux_session() {
    let (mut ours, mut theirs) = mixed_pair(quiet(256 * KIB), tcfg(256 * KIB), Mode::Client).await;
    let mut s = ours.control.open_stream().unwrap();
    s.write_all(b"x").await.unwrap();
    let mut h = within("accept", theirs.incoming.recv()).await.unwrap();
    h.read_exact(&mut [0u8; 1]).await.unwrap();
    ours.control.close();
    assert!(ours.result().await.is_ok());
    within("tokio-yamux session to end", theirs.task)
        .await
        .unwrap();
    // Their stream ends instead of hanging (EOF or an error).
    let _ = within("tokio-yamux stream read", h.read(&mut [0u8; 1])).await;
}

#[tokio::test]
async fn tokio_yamux_close_is_goaway_for_us() {
    let (mut ours, theirs) = mixed_pair(quiet(256 * KIB), tcfg(256 * KIB), Mode::Server).await;
    let mut control = theirs.control.clone();
    let mut h = within("open", control.open_stream()).await.unwrap();
    h.write_all(b"x").await.unwrap();
    let mut s = within("accept", ours.incoming.accept()).await.unwrap();
    s.read_exact(&mut [0u8; 1]).await.unwrap();
    within("tokio-yamux close", control.close()).await;
    // GoAway, then (after tokio-yamux's wait) EOF: a clean end for us.
    within("closed()", ours.control.closed()).await;
    assert!(ours.result().await.is_ok());
    assert!(matches!(
        ours.control.open_stream().unwrap_err(),
        OpenError::SessionClosed | OpenError::RemoteGoAway
    ));
    assert!(s.read(&mut [0u8; 1]).await.is_err());
    within("tokio-yamux task", theirs.task).await.unwrap();
}

#[tokio::test]
async fn keepalive_both_ways_with_tokio_yamux() {
    // Both sides ping every 20 ms; ours gives 300 ms for a pong. 1 s of
    // quiet must not end either session, and a stream still works after.
    let ours_cfg = quiet(256 * KIB)
        .with_keepalive(Some(Duration::from_millis(20)))
        .with_keepalive_timeout(Duration::from_millis(300));
    let theirs_cfg = tokio_yamux::Config {
        enable_keepalive: true,
        keepalive_interval: Duration::from_millis(20),
        ..tcfg(256 * KIB)
    };
    let (ours, mut theirs) = mixed_pair(ours_cfg, theirs_cfg, Mode::Client).await;
    let ended = tokio::time::timeout(Duration::from_millis(1000), async {
        tokio::select! {
            _ = ours.control.closed() => "ours",
            _ = &mut theirs.task => "tokio-yamux",
        }
    })
    .await;
    assert!(ended.is_err(), "{} session ended", ended.unwrap());
    let mut s = ours.control.open_stream().unwrap();
    s.write_all(b"alive").await.unwrap();
    let mut h = within("accept", theirs.incoming.recv()).await.unwrap();
    let mut got = [0u8; 5];
    within("read", h.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"alive");
}

#[tokio::test]
async fn many_streams_open_concurrently_from_both_sides() {
    // 64 streams from each side at once, each a small exchange.
    let (mut ours, mut theirs) = mixed_pair(quiet(256 * KIB), tcfg(256 * KIB), Mode::Client).await;
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let mut s = ours.control.open_stream().unwrap();
        tasks.push(tokio::spawn(async move {
            s.write_all(pattern_slice(i, 0, 1000)).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, pattern_slice(i + 100, 0, 1000));
        }));
    }
    let mut control = theirs.control.clone();
    for i in 0..64u64 {
        let mut h = within("open", control.open_stream()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            h.write_all(pattern_slice(i + 200, 0, 500)).await.unwrap();
            let mut back = vec![0u8; 500];
            h.read_exact(&mut back).await.unwrap();
            assert_eq!(back, pattern_slice(i + 300, 0, 500));
            h.shutdown().await.unwrap();
        }));
    }
    // tokio-yamux answers ours; we answer theirs.
    let theirs_answers = tokio::spawn(async move {
        for _ in 0..64 {
            let mut h = theirs.incoming.recv().await.unwrap();
            let i = u64::from(h.id() - 1) / 2;
            tokio::spawn(async move {
                let mut req = Vec::new();
                h.read_to_end(&mut req).await.unwrap();
                assert_eq!(req, pattern_slice(i, 0, 1000));
                h.write_all(pattern_slice(i + 100, 0, 1000)).await.unwrap();
                h.shutdown().await.unwrap();
            });
        }
    });
    let ours_answers = tokio::spawn(async move {
        for _ in 0..64 {
            let mut s = ours.incoming.accept().await.unwrap();
            let i = u64::from(s.id() - 2) / 2;
            tokio::spawn(async move {
                let mut req = vec![0u8; 500];
                s.read_exact(&mut req).await.unwrap();
                assert_eq!(req, pattern_slice(i + 200, 0, 500));
                s.write_all(pattern_slice(i + 300, 0, 500)).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    within("128 exchanges", async {
        for t in tasks {
            t.await.unwrap();
        }
        theirs_answers.await.unwrap();
        ours_answers.await.unwrap();
    })
    .await;
}
