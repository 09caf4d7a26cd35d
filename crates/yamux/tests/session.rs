//! Two of our sessions over loopback TCP: transfers, half-close, stream IDs,
//! limits, and how sessions and streams end.

mod common;

use std::{io, time::Duration};

use backchannel_yamux::{Mode, OpenError, SessionError};
use common::*;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;

/// `streams` streams opened by the client; on each, both sides write
/// `per_direction` bytes (random chunk sizes, some vectored) from a
/// write-only task while a read-only task reads and checks the other
/// direction; then each writer shuts down and each reader sees EOF exactly
/// after the last byte.
async fn bulk(window: u32, streams: usize, per_direction: u64) {
    let (mut client, mut server) = our_pair(quiet(window), quiet(window)).await;
    let mut tasks = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..streams {
        let s = client.control.open_stream().unwrap();
        ids.push(s.id());
        tasks.extend(spawn_both_ways(s, per_direction, true));
    }
    for &id in &ids {
        let s = within("accept", server.incoming.accept()).await.unwrap();
        assert_eq!(s.id(), id, "streams are accepted in the order opened");
        tasks.extend(spawn_both_ways(s, per_direction, false));
    }
    // Generous for debug builds; a stall is caught by it rather than hanging.
    within_for(Duration::from_secs(60), "bulk transfer", async {
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    })
    .await;
    // Every handle is gone and both halves closed: nothing is left behind.
    assert_eq!(client.control.num_streams(), 0);
    assert_eq!(server.control.num_streams(), 0);
    client.control.close();
    assert!(client.result().await.is_ok());
    assert!(server.result().await.is_ok());
}

/// Splits `s` into a write-only task and a read-only task. Data seeds: the
/// client writes seed `2*id`, the server `2*id+1`.
fn spawn_both_ways(
    s: backchannel_yamux::Stream,
    n: u64,
    is_client: bool,
) -> [tokio::task::JoinHandle<io::Result<()>>; 2] {
    let id = u64::from(s.id());
    let (out_seed, in_seed) = if is_client {
        (2 * id, 2 * id + 1)
    } else {
        (2 * id + 1, 2 * id)
    };
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        write_pattern(&mut w, out_seed, n, out_seed * 31 + 1).await?;
        w.shutdown().await
    });
    let reader =
        tokio::spawn(async move { read_pattern(&mut r, in_seed, n, in_seed * 17 + 5).await });
    [writer, reader]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_over_4_streams_both_ways_256k_window() {
    // 4 streams x 8 MiB x 2 directions = 64 MiB.
    bulk(256 * KIB, 4, 8 * MIB as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_over_4_streams_both_ways_4m_window() {
    bulk(4 * MIB, 4, 8 * MIB as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_one_stream_one_direction() {
    // The largest single transfer: 64 MiB one way, write-only task on one
    // side, read-only task on the other, no traffic back but window updates.
    let (client, mut server) = our_pair(quiet(4 * MIB), quiet(4 * MIB)).await;
    let mut w = client.control.open_stream().unwrap();
    let total = 64 * MIB as u64;
    let writer = tokio::spawn(async move {
        write_pattern(&mut w, 1, total, 99).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut r = within("accept", server.incoming.accept()).await.unwrap();
    within_for(Duration::from_secs(60), "64 MiB one way", async {
        read_pattern(&mut r, 1, total, 3).await.unwrap();
    })
    .await;
    drop(within("writer", writer).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_only_task_does_not_stall_256k_window() {
    // The task that writes never reads its stream: window updates must be
    // credited by the connection and wake it. 16 MiB = 64 windows.
    for mode in [Mode::Client, Mode::Server] {
        let (client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
        let (writer_side, mut reader_stream) = match mode {
            Mode::Client => {
                let mut w = client.control.open_stream().unwrap();
                // The accepted end exists once the first byte arrived.
                w.write_all(b"!").await.unwrap();
                let mut r = within("accept", server.incoming.accept()).await.unwrap();
                let mut b = [0u8; 1];
                r.read_exact(&mut b).await.unwrap();
                (w, r)
            }
            Mode::Server => {
                let mut r = client.control.open_stream().unwrap();
                r.write_all(b"!").await.unwrap();
                let mut w = within("accept", server.incoming.accept()).await.unwrap();
                let mut b = [0u8; 1];
                w.read_exact(&mut b).await.unwrap();
                (w, r)
            }
        };
        let total = 16 * MIB as u64;
        let writer = tokio::spawn(async move {
            let mut w = writer_side;
            write_pattern(&mut w, 5, total, 11).await.unwrap();
            w.shutdown().await.unwrap();
            w
        });
        within_for(Duration::from_secs(30), "write-only task stalled", async {
            read_pattern(&mut reader_stream, 5, total, 12)
                .await
                .unwrap();
        })
        .await;
        within("writer task", writer).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_small_writes_and_reads_interleave_on_many_streams() {
    // 32 streams, each a request/response ping-pong of 200 small messages.
    let (client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    let echo = tokio::spawn(async move {
        let mut tasks = Vec::new();
        while let Some(mut s) = server.incoming.next().await {
            tasks.push(tokio::spawn(async move {
                let mut buf = [0u8; 64];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        s.shutdown().await.unwrap();
                        break;
                    }
                    s.write_all(&buf[..n]).await.unwrap();
                }
            }));
            if tasks.len() == 32 {
                break;
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        server
    });
    let mut clients = Vec::new();
    for i in 0..32u64 {
        let mut s = client.control.open_stream().unwrap();
        clients.push(tokio::spawn(async move {
            let mut rng = Rng::new(i + 1);
            for k in 0..200u64 {
                let len = rng.range(1, 64);
                let msg = pattern_slice(i, k * 64, len);
                s.write_all(msg).await.unwrap();
                let mut back = vec![0u8; len];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(back, msg);
            }
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }));
    }
    within("ping-pong on 32 streams", async {
        for c in clients {
            c.await.unwrap();
        }
    })
    .await;
    within("echo server", echo).await.unwrap();
}

// ---------------------------------------------------------------------------
// Half-close.

#[tokio::test]
async fn after_peer_fin_we_still_write_and_peer_reads_it_all() {
    let (client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    let mut a = client.control.open_stream().unwrap();
    a.write_all(b"request").await.unwrap();
    a.shutdown().await.unwrap();
    // Shutdown is idempotent.
    a.shutdown().await.unwrap();
    // Writing after our own shutdown is an error, not a silent drop.
    let err = a.write(b"late").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);

    let mut b = within("accept", server.incoming.accept()).await.unwrap();
    let mut req = Vec::new();
    within("request to EOF", b.read_to_end(&mut req))
        .await
        .unwrap();
    assert_eq!(req, b"request");
    // EOF is sticky.
    assert_eq!(b.read(&mut [0u8; 8]).await.unwrap(), 0);

    // The server answers after the client's FIN: 3 MiB, 12 windows, so the
    // half-closed client must keep crediting the window as it reads.
    let total = 3 * MIB as u64;
    let writer = tokio::spawn(async move {
        write_pattern(&mut b, 42, total, 1).await.unwrap();
        b.shutdown().await.unwrap();
        b
    });
    within("response after FIN", read_pattern(&mut a, 42, total, 2))
        .await
        .unwrap();
    assert_eq!(a.read(&mut [0u8; 8]).await.unwrap(), 0);
    within("writer", writer).await.unwrap();
}

#[tokio::test]
async fn eof_only_after_all_buffered_data() {
    // The whole response and its FIN arrive before the client reads a byte
    // (4 MiB window, 2 MiB of data): reads still return every byte first.
    let (mut client, mut server) = our_pair(quiet(4 * MIB), quiet(4 * MIB)).await;
    let mut a = client.control.open_stream().unwrap();
    a.write_all(b"go").await.unwrap();
    let mut b = within("accept", server.incoming.accept()).await.unwrap();
    let mut go = [0u8; 2];
    b.read_exact(&mut go).await.unwrap();
    let total = 2 * MIB as u64;
    within(
        "write within the window",
        write_pattern(&mut b, 8, total, 4),
    )
    .await
    .unwrap();
    b.shutdown().await.unwrap();
    // A marker on a second stream: frames are handled in order, so once it
    // is read, stream 1's data and FIN were delivered.
    let mut marker = server.control.open_stream().unwrap();
    marker.write_all(b"m").await.unwrap();
    let mut m = within("accept marker", client.incoming.accept())
        .await
        .unwrap();
    let mut mb = [0u8; 1];
    within("marker", m.read_exact(&mut mb)).await.unwrap();
    within("buffered data then EOF", read_pattern(&mut a, 8, total, 6))
        .await
        .unwrap();
    // Our own half is still open: the server reads what we send now.
    a.write_all(b"still open").await.unwrap();
    a.shutdown().await.unwrap();
    let mut tail = Vec::new();
    within("tail", b.read_to_end(&mut tail)).await.unwrap();
    assert_eq!(tail, b"still open");
}

#[tokio::test]
async fn shutdown_then_keep_reading() {
    let (mut client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    let mut a = client.control.open_stream().unwrap();
    a.shutdown().await.unwrap();
    let mut b = within("accept", server.incoming.accept()).await.unwrap();
    assert_eq!(
        within("EOF", b.read(&mut [0u8; 4])).await.unwrap(),
        0,
        "a stream opened and shut down at once reads as empty"
    );
    let total = MIB as u64;
    let writer = tokio::spawn(async move {
        write_pattern(&mut b, 3, total, 9).await.unwrap();
        b.shutdown().await.unwrap();
    });
    within("read after shutdown", read_pattern(&mut a, 3, total, 10))
        .await
        .unwrap();
    within("writer", writer).await.unwrap();
    // Both halves closed and the handles dropped: nothing is tracked.
    drop(a);
    let mut sync = server.control.open_stream().unwrap();
    sync.write_all(b"s").await.unwrap();
    let mut s = within("accept", client.incoming.accept()).await.unwrap();
    s.read_exact(&mut [0u8; 1]).await.unwrap();
    assert_eq!(client.control.num_streams(), 1, "only the sync stream");
}

// ---------------------------------------------------------------------------
// Stream IDs and limits.

#[tokio::test]
async fn stream_ids_client_odd_server_even() {
    let (mut client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    let mut from_client = Vec::new();
    let mut from_server = Vec::new();
    for _ in 0..3 {
        from_client.push(client.control.open_stream().unwrap());
        from_server.push(server.control.open_stream().unwrap());
    }
    let ids = |v: &[backchannel_yamux::Stream]| v.iter().map(|s| s.id()).collect::<Vec<_>>();
    assert_eq!(ids(&from_client), [1, 3, 5]);
    assert_eq!(ids(&from_server), [2, 4, 6]);
    let mut accepted_by_server = Vec::new();
    let mut accepted_by_client = Vec::new();
    for _ in 0..3 {
        accepted_by_server.push(within("accept", server.incoming.accept()).await.unwrap());
        accepted_by_client.push(within("accept", client.incoming.accept()).await.unwrap());
    }
    assert_eq!(ids(&accepted_by_server), [1, 3, 5]);
    assert_eq!(ids(&accepted_by_client), [2, 4, 6]);
    assert_eq!(client.control.num_streams(), 6);
    assert_eq!(server.control.num_streams(), 6);
    // Each pair is connected to its peer: a byte each way.
    for (mut a, mut b) in from_client.into_iter().zip(accepted_by_server) {
        a.write_all(&[a.id() as u8]).await.unwrap();
        let mut x = [0u8; 1];
        within("byte", b.read_exact(&mut x)).await.unwrap();
        assert_eq!(u32::from(x[0]), b.id());
    }
}

#[tokio::test]
async fn max_streams_enforced_on_open_and_freed_after_close() {
    let cfg = quiet(256 * KIB).with_max_streams(2);
    let (client, mut server) = our_pair(cfg, quiet(256 * KIB)).await;
    let s1 = client.control.open_stream().unwrap();
    let mut s3 = client.control.open_stream().unwrap();
    assert_eq!(
        client.control.open_stream().unwrap_err(),
        OpenError::TooManyStreams(2)
    );
    // Dropping sends FIN, but the peer's half is open: still counted.
    drop(s1);
    assert_eq!(
        client.control.open_stream().unwrap_err(),
        OpenError::TooManyStreams(2)
    );
    assert_eq!(client.control.num_streams(), 2);
    let mut a1 = within("accept", server.incoming.accept()).await.unwrap();
    let mut a3 = within("accept", server.incoming.accept()).await.unwrap();
    assert_eq!((a1.id(), a3.id()), (1, 3));
    assert_eq!(within("EOF", a1.read(&mut [0u8; 1])).await.unwrap(), 0);
    drop(a1); // FIN back: stream 1 is finished on both ends.
    a3.write_all(b"x").await.unwrap();
    within("marker", s3.read_exact(&mut [0u8; 1]))
        .await
        .unwrap();
    assert_eq!(client.control.num_streams(), 1);
    let s5 = client.control.open_stream().unwrap();
    assert_eq!(s5.id(), 5);
}

#[tokio::test]
async fn accept_backlog_full_resets_the_extra_stream() {
    let server_cfg = quiet(256 * KIB).with_accept_backlog(1);
    let (client, mut server) = our_pair(quiet(256 * KIB), server_cfg).await;
    let mut s1 = client.control.open_stream().unwrap();
    let mut s3 = client.control.open_stream().unwrap();
    s1.write_all(b"one").await.unwrap();
    // Nobody accepts yet: stream 3 does not fit the backlog and is reset.
    let err = within("reset of the extra stream", s3.read(&mut [0u8; 4]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let err = s3.write(b"x").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // The queued one is intact.
    let mut a1 = within("accept", server.incoming.accept()).await.unwrap();
    assert_eq!(a1.id(), 1);
    let mut got = [0u8; 3];
    a1.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"one");
    // With the backlog drained, new streams are accepted again.
    let mut s5 = client.control.open_stream().unwrap();
    s5.write_all(b"five").await.unwrap();
    let mut a5 = within("accept", server.incoming.accept()).await.unwrap();
    assert_eq!(a5.id(), 5);
    let mut got = [0u8; 4];
    a5.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"five");
}

#[tokio::test]
async fn dropped_incoming_resets_every_new_stream() {
    let (client, server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    drop(server.incoming);
    for _ in 0..3 {
        let mut s = client.control.open_stream().unwrap();
        s.write_all(b"anyone?").await.unwrap();
        let err = within("reset", s.read(&mut [0u8; 4])).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
    // The session itself is fine: the server can still open streams.
    let mut s = server.control.open_stream().unwrap();
    s.write_all(b"hi").await.unwrap();
    let mut incoming = client.incoming;
    let mut a = within("accept", incoming.accept()).await.unwrap();
    let mut got = [0u8; 2];
    a.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hi");
    assert!(!client.control.is_closed());
}

// ---------------------------------------------------------------------------
// Dropping streams.

#[tokio::test]
async fn dropped_stream_sends_fin_and_resets_later_data() {
    let (mut client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    let mut a = client.control.open_stream().unwrap();
    a.write_all(b"bye").await.unwrap();
    drop(a);
    let mut b = within("accept", server.incoming.accept()).await.unwrap();
    let mut got = Vec::new();
    within("data then EOF", b.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"bye");
    // The server keeps writing to a stream nobody will read: the client
    // resets it, so the writer learns instead of filling the window.
    let err = within("write into a dropped stream fails", async {
        loop {
            if let Err(e) = b.write_all(&[7u8; 1000]).await {
                return e;
            }
        }
    })
    .await;
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // Reset streams are forgotten by the client.
    let mut sync = server.control.open_stream().unwrap();
    sync.write_all(b"s").await.unwrap();
    let mut s = within("accept", client.incoming.accept()).await.unwrap();
    s.read_exact(&mut [0u8; 1]).await.unwrap();
    assert_eq!(client.control.num_streams(), 1);
}

// ---------------------------------------------------------------------------
// Ending sessions.

#[tokio::test]
async fn close_ends_both_sessions_cleanly() {
    let (mut client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    let mut a = client.control.open_stream().unwrap();
    a.write_all(b"x").await.unwrap();
    let mut b = within("accept", server.incoming.accept()).await.unwrap();
    b.read_exact(&mut [0u8; 1]).await.unwrap();

    let control = client.control.clone();
    control.close();
    control.close(); // idempotent
                     // Writes after close() fail rather than vanish.
    let err = a.write(b"late").await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    assert_eq!(
        control.open_stream().unwrap_err(),
        OpenError::SessionClosed,
        "no new streams once close was called"
    );
    within("client closed()", control.closed()).await;
    assert!(control.is_closed());
    assert!(client.result().await.is_ok(), "our close is a clean end");

    // The server saw GoAway then EOF: a clean end too, and its stream fails
    // instead of waiting for ever.
    within("server closed()", server.control.closed()).await;
    let err = within("read after the session ended", b.read(&mut [0u8; 1]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    assert!(b.write(b"y").await.is_err());
    assert!(within("accept after end", server.incoming.accept())
        .await
        .is_none());
    assert!(server.control.open_stream().is_err());
    let server_result = server.conn.await.unwrap();
    assert!(
        server_result.is_ok(),
        "GoAway then EOF is a clean end: {server_result:?}"
    );
}

#[tokio::test]
async fn dropping_the_connection_fails_pending_reads_and_writes() {
    let (client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    let mut reader = client.control.open_stream().unwrap();
    let mut writer = client.control.open_stream().unwrap();
    writer.write_all(b"w").await.unwrap();
    // Keep the server's ends (never read): the writer fills its window.
    let _r = within("accept", server.incoming.accept()).await.unwrap();
    let _w = within("accept", server.incoming.accept()).await.unwrap();
    let pending_read = tokio::spawn(async move { reader.read(&mut [0u8; 16]).await });
    let pending_write = tokio::spawn(async move {
        loop {
            // 256 KiB window: the second MiB never fits.
            if let Err(e) = writer.write_all(&vec![1u8; MIB as usize]).await {
                return e;
            }
        }
    });
    // Let both reach their wait before the connection goes away.
    tokio::task::yield_now().await;
    client.conn.abort();
    let r = within("pending read", pending_read).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    let e = within("pending write", pending_write).await.unwrap();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    within("closed()", client.control.closed()).await;
    assert_eq!(
        client.control.open_stream().unwrap_err(),
        OpenError::SessionClosed
    );
    let mut incoming = client.incoming;
    assert!(within("accept", incoming.accept()).await.is_none());
    // The server sees the transport go away without a GoAway.
    let res = server.result().await;
    assert!(
        matches!(
            res,
            Err(SessionError::ClosedByPeer) | Err(SessionError::Io(_))
        ),
        "{res:?}"
    );
}

#[tokio::test]
async fn keepalive_pings_between_our_sessions_keep_it_alive() {
    // Pings every 10 ms, 300 ms to answer: over 1 s an unanswered ping
    // would end the session (with room for a loaded machine).
    let cfg = quiet(256 * KIB)
        .with_keepalive(Some(Duration::from_millis(10)))
        .with_keepalive_timeout(Duration::from_millis(300));
    let (client, server) = our_pair(cfg.clone(), cfg).await;
    let ended = tokio::time::timeout(Duration::from_millis(1000), async {
        tokio::select! {
            _ = client.control.closed() => "client",
            _ = server.control.closed() => "server",
        }
    })
    .await;
    assert!(ended.is_err(), "{} session ended", ended.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_closes_the_session() {
    let (client, mut server) = our_pair(quiet(256 * KIB), quiet(256 * KIB)).await;
    let Side {
        control,
        incoming,
        mut conn,
    } = client;
    let mut a = control.open_stream().unwrap();
    a.write_all(b"x").await.unwrap();
    let mut b = within("accept", server.incoming.accept()).await.unwrap();
    b.read_exact(&mut [0u8; 1]).await.unwrap();

    // A stream still open keeps the session alive...
    drop(control);
    drop(incoming);
    b.write_all(b"y").await.unwrap();
    a.read_exact(&mut [0u8; 1]).await.unwrap();
    assert!(!server.control.is_closed());

    // ...and when the last handle goes, the session ends cleanly (GoAway,
    // then EOF), and the peer sees it.
    drop(a);
    let r = within("client session ends", &mut conn).await.unwrap();
    assert!(r.is_ok(), "{r:?}");
    within("server sees the end", server.control.closed()).await;
    assert!(server.result().await.is_ok(), "GoAway came first");
}
