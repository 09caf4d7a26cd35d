//! The tokio-yamux 0.3.18-0.3.20 stall, reproduced at the yamux layer with a
//! real session pair: a task that only writes (never reads its stream) stops
//! for ever once its send window is used up, because the window updates that
//! arrive later wake nobody. Our own yamux (`backchannel-yamux`, whose
//! streams are `YamuxStream`) credits windows from the connection task and
//! wakes the writer, so it must not stall; the reader here is tokio-yamux,
//! so this is an interop check as well.

use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_yamux::{Config, Session, StreamHandle};

const TOTAL: usize = 8 * 1024 * 1024;

/// A backchannel-yamux server session (the writer) and a tokio-yamux client
/// (the reader), over an in-memory pipe.
async fn our_writer_pair() -> (backchannel::YamuxStream, StreamHandle) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let cfg = backchannel_yamux::Config::default().with_keepalive(None);
    let (_control, mut incoming, conn) =
        backchannel_yamux::session(a, cfg, backchannel_yamux::Mode::Server);
    tokio::spawn(conn);
    let mut client = Session::new_client(b, Config::default());
    let mut reader = client.open_stream().unwrap();
    tokio::spawn(async move { while let Some(Ok(_)) = client.next().await {} });
    reader.write_all(b"x").await.unwrap();
    let mut writer = incoming.accept().await.unwrap();
    let mut x = [0u8; 1];
    writer.read_exact(&mut x).await.unwrap();
    (writer, reader)
}

/// Sets up a tokio-yamux session pair over an in-memory pipe; returns the
/// server-side stream (the writer) and the client-side stream (the reader).
async fn stream_pair() -> (StreamHandle, StreamHandle) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let cfg = Config {
        enable_keepalive: false,
        ..Config::default()
    };
    let mut server = Session::new_server(a, cfg);
    let mut client = Session::new_client(b, cfg);
    let mut reader = client.open_stream().unwrap();
    tokio::spawn(async move { while let Some(Ok(_)) = client.next().await {} });
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let s = server.next().await.unwrap().unwrap();
        let _ = tx.send(s);
        while let Some(Ok(_)) = server.next().await {}
    });
    reader.write_all(b"x").await.unwrap();
    (rx.await.unwrap(), reader)
}

/// Writes TOTAL bytes from a write-only task; returns whether the reader got
/// them all within `limit`.
async fn transfer<W>(writer: W, reader: StreamHandle, limit: Duration) -> bool
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    transfer_with(writer, reader, limit, false).await
}

/// Like [`transfer`]; with `vectored`, writes as h2 does: a 9-byte header
/// and a payload per `write_vectored` call.
async fn transfer_with<W>(
    writer: W,
    mut reader: StreamHandle,
    limit: Duration,
    vectored: bool,
) -> bool
where
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut writer = writer;
    let task = tokio::spawn(async move {
        let header = [9u8; 9];
        let chunk = vec![1u8; 64 * 1024 - header.len()];
        for _ in 0..TOTAL / (64 * 1024) {
            if !vectored {
                writer.write_all(&header).await.unwrap();
                writer.write_all(&chunk).await.unwrap();
                continue;
            }
            let (mut h, mut c) = (&header[..], &chunk[..]);
            while !h.is_empty() || !c.is_empty() {
                let n = writer
                    .write_vectored(&[std::io::IoSlice::new(h), std::io::IoSlice::new(c)])
                    .await
                    .unwrap();
                assert!(n > 0);
                let from_h = n.min(h.len());
                h = &h[from_h..];
                c = &c[n - from_h..];
            }
        }
        // Keep the stream (no FIN) until the reader is done: this test is
        // about stalls, and tokio-yamux's reader was seen losing the last
        // frame before a FIN that follows it closely (about 3 runs in 10 on
        // this machine; our own reader, same writer, 200 of 200 complete).
        // (The writer is owned by this task until it is aborted.)
        std::future::pending::<()>().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    let mut got = 0;
    let done = tokio::time::timeout(limit, async {
        while got < TOTAL {
            let n = reader.read(&mut buf).await.unwrap();
            assert!(n > 0, "reader hit EOF after {got} bytes");
            got += n;
            tokio::task::yield_now().await;
        }
    })
    .await
    .is_ok();
    task.abort();
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_only_task_through_yamux_stream_does_not_stall() {
    for _ in 0..5 {
        let (writer, reader) = our_writer_pair().await;
        // A bound only a stall can reach (8 MiB in memory takes milliseconds).
        assert!(
            transfer(writer, reader, Duration::from_secs(60)).await,
            "write-only task stalled"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalesced_vectored_writes_do_not_stall_either() {
    for _ in 0..5 {
        let (writer, reader) = our_writer_pair().await;
        assert!(
            transfer_with(writer, reader, Duration::from_secs(60), true).await,
            "write-only task with vectored writes stalled"
        );
    }
}

/// Documents the upstream bug that made us stop using tokio-yamux: its
/// handle stalls. Ignored by default because proving a stall means waiting
/// for a timeout; run it with `--ignored` to check an upgraded tokio-yamux.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn raw_tokio_yamux_write_only_task_stalls() {
    let (writer, reader) = stream_pair().await;
    assert!(
        !transfer(writer, reader, Duration::from_secs(5)).await,
        "raw tokio-yamux no longer stalls: upstream fixed it"
    );
}
