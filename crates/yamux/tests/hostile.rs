//! Conformance and robustness: our session driven by a raw TCP peer that
//! writes hand-encoded frames and decodes what we send back.

mod common;

use std::{
    io,
    time::{Duration, Instant},
};

use backchannel_yamux::{
    frame::{FrameType, HeaderError, ACK, FIN, HEADER_LEN, INITIAL_WINDOW, RST, SYN},
    Mode, OpenError, ProtocolViolation, SessionError,
};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;
const W: FrameType = FrameType::WindowUpdate;
const D: FrameType = FrameType::Data;

/// The raw peer as client (opens odd streams), our session as server.
async fn server() -> (RawPeer, Side) {
    raw_pair(quiet(256 * KIB), Mode::Server).await
}

/// Opens stream `id` from the raw peer and accepts it on our side.
async fn open_from_peer(peer: &mut RawPeer, side: &mut Side, id: u32) -> backchannel_yamux::Stream {
    peer.send(W, SYN, id, 0).await;
    let s = within("accept", side.incoming.accept()).await.unwrap();
    assert_eq!(s.id(), id);
    s
}

/// Reads frames until EOF and checks the last one is a GoAway with `code`.
async fn expect_goaway_then_eof(peer: &mut RawPeer, code: u32) {
    let frames = peer.until_eof().await;
    let last = frames.last().expect("no GoAway before EOF");
    assert_eq!(
        (last.ty(), last.flags(), last.id(), last.len()),
        (FrameType::GoAway, 0, 0, code),
        "frames before EOF: {frames:?}"
    );
    assert_eq!(
        frames
            .iter()
            .filter(|f| f.ty() == FrameType::GoAway)
            .count(),
        1,
        "exactly one GoAway: {frames:?}"
    );
}

fn protocol(res: Result<(), SessionError>) -> ProtocolViolation {
    match res {
        Err(SessionError::Protocol(v)) => v,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Pings and keepalive.

#[tokio::test]
async fn ping_syn_is_answered_with_ack_and_the_same_opaque() {
    let (mut peer, side) = server().await;
    for opaque in [0, 1, 0xdead_beef, u32::MAX] {
        peer.send(FrameType::Ping, SYN, 0, opaque).await;
        let f = peer.frame().await;
        assert_eq!(
            (f.ty(), f.flags(), f.id(), f.len()),
            (FrameType::Ping, ACK, 0, opaque)
        );
    }
    // Back to back, answered in order.
    let mut burst = Vec::new();
    for opaque in 100..164u32 {
        burst.extend_from_slice(
            &backchannel_yamux::frame::Header::new(FrameType::Ping, SYN, 0, opaque).encode(),
        );
    }
    peer.send_raw(&burst).await;
    for opaque in 100..164u32 {
        let f = peer.frame().await;
        assert_eq!((f.ty(), f.flags(), f.len()), (FrameType::Ping, ACK, opaque));
    }
    // A stray pong (ACK we never asked for) is ignored.
    peer.send(FrameType::Ping, ACK, 0, 12345).await;
    assert!(peer.sync().await.is_empty());
    assert!(!side.control.is_closed());
}

#[tokio::test]
async fn keepalive_pings_and_a_silent_peer_ends_the_session() {
    let cfg = quiet(256 * KIB)
        .with_keepalive(Some(Duration::from_millis(30)))
        .with_keepalive_timeout(Duration::from_millis(150));
    let (mut peer, mut side) = raw_pair(cfg, Mode::Client).await;
    // Our pings: SYN, stream 0, a fresh opaque each; answered ones are
    // followed by the next ping.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let f = peer.frame().await;
        assert_eq!(
            (f.ty(), f.flags(), f.id()),
            (FrameType::Ping, SYN, 0),
            "{f:?}"
        );
        assert!(!seen.contains(&f.len()), "opaque values repeat: {seen:?}");
        seen.push(f.len());
        peer.send(FrameType::Ping, ACK, 0, f.len()).await;
    }
    // The next ping gets a pong with the wrong opaque: it does not count.
    let f = peer.frame().await;
    assert_eq!((f.ty(), f.flags()), (FrameType::Ping, SYN));
    let unanswered_at = Instant::now();
    peer.send(FrameType::Ping, ACK, 0, f.len().wrapping_add(1000))
        .await;
    // Then silence. No second ping while one is outstanding; the session
    // ends on its own.
    let after = peer.until_eof().await;
    assert!(
        after.is_empty(),
        "frames after the unanswered ping: {after:?}"
    );
    within("closed()", side.control.closed()).await;
    let waited = unanswered_at.elapsed();
    match side.result().await {
        Err(SessionError::KeepaliveTimeout(d)) => assert_eq!(d, Duration::from_millis(150)),
        other => panic!("expected KeepaliveTimeout, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(100),
        "ended {waited:?} after the ping, before the timeout"
    );
}

#[tokio::test]
async fn peer_that_never_answers_any_ping_times_out() {
    let cfg = quiet(256 * KIB)
        .with_keepalive(Some(Duration::from_millis(20)))
        .with_keepalive_timeout(Duration::from_millis(100));
    let (mut peer, mut side) = raw_pair(cfg, Mode::Server).await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    let reader = tokio::spawn(async move { s.read(&mut [0u8; 8]).await });
    let frames = peer.until_eof().await;
    let pings = frames
        .iter()
        .filter(|f| f.ty() == FrameType::Ping && f.flags() == SYN)
        .count();
    assert_eq!(pings, 1, "{frames:?}");
    assert!(matches!(
        side.result().await,
        Err(SessionError::KeepaliveTimeout(_))
    ));
    let r = within("pending read", reader).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
}

// ---------------------------------------------------------------------------
// Broken frames.

#[tokio::test]
async fn bad_version_gets_goaway_protocol_error() {
    let (mut peer, mut side) = server().await;
    let mut h = backchannel_yamux::frame::Header::new(FrameType::Ping, SYN, 0, 1).encode();
    h[0] = 1;
    peer.send_raw(&h).await;
    expect_goaway_then_eof(&mut peer, 1).await;
    assert_eq!(
        protocol(side.result().await),
        ProtocolViolation::Header(HeaderError::Version(1))
    );
}

#[tokio::test]
async fn bad_type_gets_goaway_protocol_error_and_fails_open_streams() {
    let (mut peer, mut side) = server().await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    peer.send_data(0, 1, b"before").await;
    let mut got = [0u8; 6];
    within("data", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"before");
    let pending = tokio::spawn(async move {
        let r = s.read(&mut [0u8; 8]).await;
        (s, r)
    });
    let mut h = backchannel_yamux::frame::Header::new(FrameType::Data, 0, 1, 0).encode();
    h[1] = 4;
    peer.send_raw(&h).await;
    expect_goaway_then_eof(&mut peer, 1).await;
    assert_eq!(
        protocol(side.result().await),
        ProtocolViolation::Header(HeaderError::Type(4))
    );
    let (mut s, r) = within("pending read", pending).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
    assert_eq!(
        s.write(b"x").await.unwrap_err().kind(),
        io::ErrorKind::ConnectionAborted
    );
    assert_eq!(
        side.control.open_stream().unwrap_err(),
        OpenError::SessionClosed
    );
}

#[tokio::test]
async fn garbage_mid_session_after_valid_frames() {
    let (mut peer, mut side) = server().await;
    peer.send(FrameType::Ping, SYN, 0, 1).await;
    peer.send_raw(&[0xff; 40]).await;
    let frames = peer.until_eof().await;
    assert_eq!(frames[0].header.ty, FrameType::Ping);
    assert_eq!(frames.last().unwrap().ty(), FrameType::GoAway);
    assert_eq!(frames.last().unwrap().len(), 1);
    assert_eq!(
        protocol(side.result().await),
        ProtocolViolation::Header(HeaderError::Version(0xff))
    );
}

#[tokio::test]
async fn data_beyond_the_receive_window_gets_goaway() {
    // One frame larger than the 256 KiB window (the header is enough: the
    // session judges it before the body).
    let (mut peer, mut side) = server().await;
    peer.send(D, SYN, 1, INITIAL_WINDOW + 1).await;
    expect_goaway_then_eof(&mut peer, 1).await;
    assert_eq!(
        protocol(side.result().await),
        ProtocolViolation::WindowExceeded {
            stream: 1,
            len: INITIAL_WINDOW + 1,
            window: INITIAL_WINDOW
        }
    );
}

#[tokio::test]
async fn data_beyond_a_4m_window_in_many_frames_gets_goaway_and_keeps_delivered_data() {
    let (mut peer, mut side) = raw_pair(quiet(4 * MIB), Mode::Server).await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    let ack = peer.sync().await;
    assert_eq!(ack.len(), 1);
    assert_eq!(
        (ack[0].ty(), ack[0].flags(), ack[0].id(), ack[0].len()),
        (W, ACK, 1, 4 * MIB - INITIAL_WINDOW),
        "the ACK announces the larger window"
    );
    // The whole 4 MiB, unread: within the window.
    for i in 0..16u64 {
        peer.send_data(0, 1, pattern_slice(1, i * 256 * 1024, 256 * 1024))
            .await;
    }
    assert!(
        peer.sync().await.is_empty(),
        "no window update: nothing read"
    );
    // One byte more breaks the protocol.
    peer.send(D, 0, 1, 1).await;
    expect_goaway_then_eof(&mut peer, 1).await;
    assert_eq!(
        protocol(side.result().await),
        ProtocolViolation::WindowExceeded {
            stream: 1,
            len: 1,
            window: 0
        }
    );
    // What arrived before the end stays readable, then the read fails.
    let mut buf = vec![0u8; 4 * MIB as usize];
    within("buffered data", s.read_exact(&mut buf))
        .await
        .unwrap();
    check_pattern(1, 0, &buf);
    assert_eq!(
        s.read(&mut [0u8; 1]).await.unwrap_err().kind(),
        io::ErrorKind::ConnectionAborted
    );
}

#[tokio::test]
async fn duplicate_syn_gets_goaway() {
    let (mut peer, mut side) = server().await;
    let _s = open_from_peer(&mut peer, &mut side, 1).await;
    peer.send(W, SYN, 1, 0).await;
    expect_goaway_then_eof(&mut peer, 1).await;
    assert_eq!(
        protocol(side.result().await),
        ProtocolViolation::DuplicateStream(1)
    );
}

#[tokio::test]
async fn syn_with_our_parity_or_zero_gets_goaway() {
    for (mode, id) in [
        (Mode::Server, 2),
        (Mode::Server, 0),
        (Mode::Client, 1),
        (Mode::Client, 0),
    ] {
        let (mut peer, mut side) = raw_pair(quiet(256 * KIB), mode).await;
        peer.send(W, SYN, id, 0).await;
        expect_goaway_then_eof(&mut peer, 1).await;
        assert_eq!(
            protocol(side.result().await),
            ProtocolViolation::BadStreamId(id),
            "{mode:?} got SYN {id}"
        );
    }
}

#[tokio::test]
async fn window_update_overflow_gets_goaway() {
    let (mut peer, mut side) = server().await;
    let _s = open_from_peer(&mut peer, &mut side, 1).await;
    // Up to u32::MAX is legal (the send window starts at 256 KiB)...
    peer.send(W, 0, 1, u32::MAX - INITIAL_WINDOW).await;
    assert_eq!(peer.sync().await.len(), 1, "just the ACK");
    // ...one more is not.
    peer.send(W, 0, 1, 1).await;
    expect_goaway_then_eof(&mut peer, 1).await;
    assert_eq!(
        protocol(side.result().await),
        ProtocolViolation::WindowOverflow(1)
    );
}

#[tokio::test]
async fn truncated_frame_then_eof_fails_pending_reads() {
    let (mut peer, mut side) = server().await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    peer.send_data(0, 1, b"whole").await;
    let mut got = [0u8; 5];
    within("data", s.read_exact(&mut got)).await.unwrap();
    // The part of a body that arrived may be read; then the read fails,
    // never a clean EOF.
    let pending = tokio::spawn(async move {
        let mut got = 0;
        loop {
            match s.read(&mut [0u8; 100]).await {
                Ok(0) => return Ok(got),
                Ok(n) => got += n,
                Err(e) => {
                    assert!(got <= 50, "{got} bytes of a truncated frame");
                    return Err(e);
                }
            }
        }
    });
    // Header promises 100 bytes, 50 come, then EOF.
    let mut partial = backchannel_yamux::frame::Header::new(D, 0, 1, 100)
        .encode()
        .to_vec();
    partial.extend_from_slice(&[9u8; 50]);
    peer.send_raw(&partial).await;
    peer.io.shutdown().await.unwrap();
    assert!(matches!(
        side.result().await,
        Err(SessionError::ClosedByPeer)
    ));
    let r = within("pending read", pending).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionAborted);
}

#[tokio::test]
async fn truncated_header_then_eof_ends_the_session() {
    let (mut peer, mut side) = server().await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    // A stream the peer had finished still reads to EOF afterwards.
    let mut done = open_from_peer(&mut peer, &mut side, 3).await;
    peer.send_data(FIN, 3, b"complete").await;
    peer.send_raw(&[0, 0, 0]).await;
    peer.io.shutdown().await.unwrap();
    assert!(matches!(
        side.result().await,
        Err(SessionError::ClosedByPeer)
    ));
    assert_eq!(
        within("read", s.read(&mut [0u8; 1]))
            .await
            .unwrap_err()
            .kind(),
        io::ErrorKind::ConnectionAborted
    );
    let mut got = Vec::new();
    within("finished stream", done.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"complete");
    assert!(side.control.is_closed());
}

// ---------------------------------------------------------------------------
// Frames for streams we do not have.

#[tokio::test]
async fn data_for_streams_we_no_longer_have_is_skipped() {
    // Stream 3 is refused (backlog of 1), so we have no state for it; its
    // frames may still be in flight and must be skipped, bodies included.
    let cfg = quiet(256 * KIB).with_accept_backlog(1);
    let (mut peer, mut side) = raw_pair(cfg, Mode::Server).await;
    peer.send(W, SYN, 1, 0).await;
    peer.send(W, SYN, 3, 0).await;
    // Larger than any window and than one read of ours.
    let big = vec![0xabu8; 3 * MIB as usize];
    peer.send_data(0, 3, b"small").await;
    peer.send_data(0, 3, &big).await;
    peer.send(W, 0, 3, 5000).await;
    peer.send(W, RST, 3, 0).await;
    peer.send_data(FIN, 3, b"").await;
    // The frames after the skipped bodies are found and handled.
    peer.send_data(0, 1, b"after the junk").await;
    let frames: Vec<_> = peer
        .sync()
        .await
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id()))
        .collect();
    assert_eq!(
        frames,
        [(W, ACK, 1), (W, RST, 3)],
        "no reset per skipped frame"
    );
    let mut s = within("accept", side.incoming.accept()).await.unwrap();
    let mut got = [0u8; 14];
    within("data", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"after the junk");

    // A stream of ours, finished on both ends and forgotten: the same.
    let mut mine = side.control.open_stream().unwrap();
    mine.shutdown().await.unwrap();
    peer.send(W, ACK | FIN, 2, 0).await;
    within("EOF", mine.read(&mut [0u8; 1])).await.unwrap();
    drop(mine);
    assert_eq!(side.control.num_streams(), 1);
    peer.send_data(0, 2, &big[..300 * 1024]).await;
    peer.send(W, 0, 2, 1).await;
    let frames: Vec<_> = peer
        .sync()
        .await
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id()))
        .collect();
    assert_eq!(frames, [(W, SYN, 2), (W, FIN, 2)]);
    assert!(!side.control.is_closed());
}

#[tokio::test]
async fn frames_for_never_opened_streams_get_goaway() {
    // Theirs (odd, above any SYN we saw) and ours (even, never opened).
    for (ty, id) in [(D, 99), (W, 10)] {
        let (mut peer, mut side) = server().await;
        let _s = open_from_peer(&mut peer, &mut side, 1).await;
        if ty == D {
            peer.send_data(0, id, b"who?").await;
        } else {
            peer.send(W, 0, id, 100).await;
        }
        expect_goaway_then_eof(&mut peer, 1).await;
        assert_eq!(
            protocol(side.result().await),
            ProtocolViolation::NeverOpened(id)
        );
    }
}

// ---------------------------------------------------------------------------
// Opening streams: IDs, ACKs, windows, refusals.

#[tokio::test]
async fn our_syn_carries_the_window_delta_and_ids_follow_the_mode() {
    for (mode, first) in [(Mode::Client, 1), (Mode::Server, 2)] {
        for (window, delta) in [(256 * KIB, 0), (4 * MIB, 4 * MIB - 256 * KIB)] {
            let (mut peer, side) = raw_pair(quiet(window), mode).await;
            let a = side.control.open_stream().unwrap();
            let b = side.control.open_stream().unwrap();
            assert_eq!((a.id(), b.id()), (first, first + 2));
            for id in [first, first + 2] {
                let f = peer.frame().await;
                assert_eq!(
                    (f.ty(), f.flags(), f.id(), f.len()),
                    (W, SYN, id, delta),
                    "{mode:?}, window {window}"
                );
            }
        }
    }
}

#[tokio::test]
async fn peer_opened_streams_are_acked_with_the_window_delta() {
    for (window, delta) in [(256 * KIB, 0), (4 * MIB, 4 * MIB - 256 * KIB)] {
        let (mut peer, mut side) = raw_pair(quiet(window), Mode::Server).await;
        // SYN on a window update, and SYN on a data frame (both are legal).
        peer.send(W, SYN, 1, 0).await;
        peer.send_data(SYN, 3, b"hello").await;
        let frames = peer.sync().await;
        let acks: Vec<_> = frames
            .iter()
            .map(|f| (f.ty(), f.flags(), f.id(), f.len()))
            .collect();
        assert_eq!(acks, [(W, ACK, 1, delta), (W, ACK, 3, delta)]);
        let _s1 = within("accept", side.incoming.accept()).await.unwrap();
        let mut s3 = within("accept", side.incoming.accept()).await.unwrap();
        let mut got = [0u8; 5];
        s3.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}

#[tokio::test]
async fn our_sends_respect_the_peer_window() {
    let (mut peer, side) = raw_pair(quiet(256 * KIB), Mode::Client).await;
    let mut s = side.control.open_stream().unwrap();
    let total = MIB as u64;
    let writer = tokio::spawn(async move {
        write_pattern(&mut s, 4, total, 21).await.unwrap();
        s.shutdown().await.unwrap();
        s
    });
    let syn = peer.frame().await;
    assert_eq!((syn.ty(), syn.flags(), syn.id()), (W, SYN, 1));
    let mut data = Vec::new();
    let read_data = |frames: Vec<Frame>, data: &mut Vec<u8>| {
        for f in frames {
            assert_eq!((f.ty(), f.id(), f.flags()), (D, 1, 0), "{f:?}");
            data.extend_from_slice(&f.body);
        }
    };
    // The initial window, and not a byte more.
    while data.len() < INITIAL_WINDOW as usize {
        read_data(vec![peer.frame().await], &mut data);
    }
    read_data(peer.sync().await, &mut data);
    assert_eq!(data.len(), INITIAL_WINDOW as usize);
    // A small credit: exactly that much more.
    peer.send(W, ACK, 1, 1000).await;
    while data.len() < INITIAL_WINDOW as usize + 1000 {
        read_data(vec![peer.frame().await], &mut data);
    }
    read_data(peer.sync().await, &mut data);
    assert_eq!(data.len(), INITIAL_WINDOW as usize + 1000);
    // Plenty: the rest, then FIN.
    peer.send(W, 0, 1, 4 * MIB).await;
    loop {
        let f = peer.frame().await;
        if f.ty() == W {
            assert_eq!((f.flags(), f.id(), f.len()), (FIN, 1, 0));
            break;
        }
        read_data(vec![f], &mut data);
    }
    assert_eq!(data.len() as u64, total);
    check_pattern(4, 0, &data);
    within("writer", writer).await.unwrap();
}

#[tokio::test]
async fn vectored_write_is_one_frame_and_frames_are_capped() {
    let (mut peer, side) = raw_pair(quiet(256 * KIB), Mode::Client).await;
    let mut s = side.control.open_stream().unwrap();
    let syn = peer.frame().await;
    assert_eq!((syn.flags(), syn.id()), (SYN, 1));
    // An empty write is a no-op, not an empty frame.
    assert_eq!(s.write(b"").await.unwrap(), 0);
    let (a, b, c) = (vec![1u8; 100], vec![2u8; 200], vec![3u8; 300]);
    let n = s
        .write_vectored(&[
            io::IoSlice::new(&a),
            io::IoSlice::new(&b),
            io::IoSlice::new(&c),
        ])
        .await
        .unwrap();
    assert_eq!(n, 600);
    let f = peer.frame().await;
    assert_eq!((f.ty(), f.flags(), f.id(), f.len()), (D, 0, 1, 600));
    assert_eq!(f.body, [a, b, c].concat());
    assert!(peer.sync().await.is_empty());
    // With window to spare, a large write still goes out in frames of at
    // most 256 KiB, in order.
    peer.send(W, ACK, 1, 4 * MIB).await;
    let total = 1_000_000usize;
    s.write_all(pattern_slice(11, 0, total)).await.unwrap();
    let mut data = Vec::new();
    while data.len() < total {
        let f = peer.frame().await;
        assert_eq!((f.ty(), f.id()), (D, 1));
        assert!(
            f.len() > 0 && f.len() <= 256 * KIB,
            "frame of {} bytes",
            f.len()
        );
        data.extend_from_slice(&f.body);
    }
    assert_eq!(data.len(), total);
    check_pattern(11, 0, &data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_stream_frame_order_holds_under_concurrent_writers() {
    // 64 tasks on 4 threads each open a stream, write three chunks and shut
    // down, all at once. On the wire, every stream must read SYN, its data
    // in order, then FIN.
    let (mut peer, side) = raw_pair(quiet(256 * KIB), Mode::Client).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let control = side.control.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = control.open_stream().unwrap();
            let seed = u64::from(s.id());
            let mut rng = Rng::new(seed);
            let mut off = 0u64;
            for _ in 0..3 {
                let n = rng.range(1, 20_000);
                s.write_all(pattern_slice(seed, off, n)).await.unwrap();
                off += n as u64;
            }
            s.shutdown().await.unwrap();
            (s, off)
        }));
    }
    let mut state: std::collections::HashMap<u32, (bool, Vec<u8>, bool)> = Default::default();
    let mut fins = 0;
    while fins < 64 {
        let f = peer.frame().await;
        let e = state.entry(f.id()).or_default();
        match (f.ty(), f.flags()) {
            (W, SYN) => {
                assert!(
                    !e.0 && e.1.is_empty() && !e.2,
                    "SYN after other frames: {f:?}"
                );
                assert_eq!(f.len(), 0);
                e.0 = true;
            }
            (D, 0) => {
                assert!(e.0, "data before SYN on stream {}", f.id());
                assert!(!e.2, "data after FIN on stream {}", f.id());
                e.1.extend_from_slice(&f.body);
            }
            (W, FIN) => {
                assert!(e.0 && !e.2, "FIN out of place on stream {}", f.id());
                e.2 = true;
                fins += 1;
            }
            _ => panic!("unexpected {f:?}"),
        }
    }
    let mut lens = std::collections::HashMap::new();
    for t in tasks {
        let (s, len) = within("writer", t).await.unwrap();
        lens.insert(s.id(), len);
    }
    assert_eq!(state.len(), 64);
    for (id, (_, data, _)) in state {
        assert_eq!(data.len() as u64, lens[&id], "stream {id}");
        check_pattern(u64::from(id), 0, &data);
    }
}

#[tokio::test]
async fn reading_credits_the_window_back() {
    let (mut peer, mut side) = server().await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    let ack = peer.sync().await;
    assert_eq!(
        ack.iter()
            .map(|f| (f.ty(), f.flags(), f.id(), f.len()))
            .collect::<Vec<_>>(),
        [(W, ACK, 1, 0)]
    );
    // What the peer may send in all: the initial window, then credits.
    let mut allowed = u64::from(INITIAL_WINDOW);
    let mut sent = 0u64;
    // Three rounds, each sending all the window allows (a peer that sent
    // more would break the protocol), then reading it.
    for round in 0..3u64 {
        let base = sent;
        while sent < allowed {
            let n = (allowed - sent).min(64 * 1024);
            peer.send_data(0, 1, pattern_slice(7, sent, n as usize))
                .await;
            sent += n;
        }
        let mut buf = vec![0u8; (sent - base) as usize];
        within("a window of data", s.read_exact(&mut buf))
            .await
            .unwrap();
        check_pattern(7, base, &buf);
        for f in peer.sync().await {
            assert_eq!((f.ty(), f.flags(), f.id()), (W, 0, 1), "{f:?}");
            assert!(
                f.len() >= INITIAL_WINDOW / 2,
                "updates of at least half a window"
            );
            allowed += u64::from(f.len());
        }
        // Everything read is credited but less than half a window (that
        // goes with the next update): the peer always has at least half a
        // window to send.
        let credited = allowed - u64::from(INITIAL_WINDOW);
        assert!(
            credited <= sent && sent - credited < u64::from(INITIAL_WINDOW / 2),
            "round {round}: {credited} of {sent} credited"
        );
    }
}

#[tokio::test]
async fn full_backlog_resets_the_new_stream() {
    let cfg = quiet(256 * KIB).with_accept_backlog(1);
    let (mut peer, mut side) = raw_pair(cfg, Mode::Server).await;
    peer.send(W, SYN, 1, 0).await;
    peer.send(W, SYN, 3, 0).await;
    // Data already in flight for the refused stream is skipped.
    peer.send_data(0, 3, b"for nobody").await;
    let frames: Vec<_> = peer
        .sync()
        .await
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id()))
        .collect();
    assert_eq!(frames, [(W, ACK, 1), (W, RST, 3)]);
    let s1 = within("accept", side.incoming.accept()).await.unwrap();
    assert_eq!(s1.id(), 1);
    assert_eq!(side.control.num_streams(), 1);
    // Room again.
    peer.send(W, SYN, 5, 0).await;
    let frames = peer.sync().await;
    assert_eq!((frames[0].flags(), frames[0].id()), (ACK, 5));
}

#[tokio::test]
async fn dropped_incoming_resets_new_streams() {
    let (mut peer, side) = server().await;
    let Side {
        control, incoming, ..
    } = side;
    drop(incoming);
    peer.send(W, SYN, 1, 0).await;
    peer.send_data(SYN, 3, b"data").await;
    let frames: Vec<_> = peer
        .sync()
        .await
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id()))
        .collect();
    assert_eq!(frames, [(W, RST, 1), (W, RST, 3)]);
    assert_eq!(control.num_streams(), 0);
    // Streams we open still work.
    let mut s = control.open_stream().unwrap();
    s.write_all(b"out").await.unwrap();
    let syn = peer.frame().await;
    assert_eq!((syn.flags(), syn.id()), (SYN, 2));
    let data = peer.frame().await;
    assert_eq!((data.ty(), data.body.as_slice()), (D, &b"out"[..]));
}

#[tokio::test]
async fn max_streams_refuses_peer_streams_and_our_opens() {
    let cfg = quiet(256 * KIB).with_max_streams(2);
    let (mut peer, mut side) = raw_pair(cfg, Mode::Server).await;
    let mine = side.control.open_stream().unwrap();
    assert_eq!(mine.id(), 2);
    peer.send(W, SYN, 1, 0).await;
    peer.send(W, SYN, 3, 0).await;
    let frames: Vec<_> = peer
        .sync()
        .await
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id()))
        .collect();
    assert_eq!(frames, [(W, SYN, 2), (W, ACK, 1), (W, RST, 3)]);
    let _s1 = within("accept", side.incoming.accept()).await.unwrap();
    assert_eq!(
        side.control.open_stream().unwrap_err(),
        OpenError::TooManyStreams(2)
    );
    // The peer resets our stream: a slot frees up.
    peer.send(W, RST, 2, 0).await;
    peer.sync().await;
    drop(mine);
    assert_eq!(side.control.num_streams(), 1);
    assert_eq!(side.control.open_stream().unwrap().id(), 4);
}

// ---------------------------------------------------------------------------
// Closing and resetting streams.

#[tokio::test]
async fn dropping_a_stream_sends_fin_and_later_data_gets_rst() {
    let (mut peer, mut side) = server().await;
    let s = open_from_peer(&mut peer, &mut side, 1).await;
    let ack = peer.frame().await;
    assert_eq!((ack.flags(), ack.id()), (ACK, 1));
    drop(s);
    let fin = peer.frame().await;
    assert_eq!((fin.ty(), fin.flags(), fin.id(), fin.len()), (W, FIN, 1, 0));
    // Still tracked: the peer's half is open.
    assert_eq!(side.control.num_streams(), 1);
    peer.send_data(0, 1, b"anyone there?").await;
    let frames: Vec<_> = peer
        .sync()
        .await
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id()))
        .collect();
    assert_eq!(frames, [(W, RST, 1)]);
    assert_eq!(side.control.num_streams(), 0);
    // More data for it is skipped quietly.
    peer.send_data(0, 1, b"still?").await;
    assert!(peer.sync().await.is_empty());
    assert!(!side.control.is_closed());
}

#[tokio::test]
async fn dropping_a_stream_after_peer_fin_forgets_it() {
    let (mut peer, mut side) = server().await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    peer.send_data(FIN, 1, b"last words").await;
    let mut got = Vec::new();
    within("read to EOF", s.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"last words");
    assert_eq!(side.control.num_streams(), 1);
    drop(s);
    assert_eq!(side.control.num_streams(), 0);
    let frames: Vec<_> = peer
        .sync()
        .await
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id()))
        .collect();
    assert_eq!(frames, [(W, ACK, 1), (W, FIN, 1)]);
}

#[tokio::test]
async fn peer_rst_fails_our_reads_and_writes() {
    let (mut peer, mut side) = server().await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    let mut w = open_from_peer(&mut peer, &mut side, 3).await;
    // A pending read, and a writer blocked on a closed window.
    let reader = tokio::spawn(async move {
        let r = s.read(&mut [0u8; 8]).await;
        (s, r)
    });
    let writer = tokio::spawn(async move {
        let r = w.write_all(&vec![0u8; MIB as usize]).await;
        (w, r)
    });
    // Wait until the writer has used up its window.
    let mut seen = 0;
    while seen < INITIAL_WINDOW {
        let f = peer.frame().await;
        if f.ty() == D {
            seen += f.len();
        }
    }
    peer.send(W, RST, 1, 0).await;
    peer.send(W, RST, 3, 0).await;
    let (mut s, r) = within("reset read", reader).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    let (_w, r) = within("reset write", writer).await.unwrap();
    assert_eq!(r.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(
        s.write(b"x").await.unwrap_err().kind(),
        io::ErrorKind::ConnectionReset
    );
    assert_eq!(
        s.read(&mut [0u8; 1]).await.unwrap_err().kind(),
        io::ErrorKind::ConnectionReset
    );
    // Shutdown of a reset stream is a no-op, and sends nothing.
    s.shutdown().await.unwrap();
    drop(s);
    assert!(peer.sync().await.is_empty());
    assert!(!side.control.is_closed());
}

#[tokio::test]
async fn fin_on_a_data_frame_is_eof_after_the_data() {
    let (mut peer, mut side) = server().await;
    peer.send_data(SYN | FIN, 1, b"all at once").await;
    let mut s = within("accept", side.incoming.accept()).await.unwrap();
    let mut got = Vec::new();
    within("read", s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"all at once");
    // Our half is open: we can answer.
    s.write_all(b"reply").await.unwrap();
    s.shutdown().await.unwrap();
    let frames: Vec<_> = peer.sync().await;
    let summary: Vec<_> = frames
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id(), f.body.clone()))
        .collect();
    assert_eq!(
        summary,
        [
            (W, ACK, 1, vec![]),
            (D, 0, 1, b"reply".to_vec()),
            (W, FIN, 1, vec![])
        ]
    );
}

// ---------------------------------------------------------------------------
// Ending the session.

#[tokio::test]
async fn close_sends_goaway_normal_after_queued_data_then_eof() {
    let (mut peer, mut side) = server().await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    let payload = pattern_slice(3, 0, 100_000);
    s.write_all(payload).await.unwrap();
    side.control.close();
    assert_eq!(
        side.control.open_stream().unwrap_err(),
        OpenError::SessionClosed
    );
    let frames = peer.until_eof().await;
    let mut data = Vec::new();
    for f in &frames[..frames.len() - 1] {
        match f.ty() {
            D => data.extend_from_slice(&f.body),
            W => assert_eq!((f.flags(), f.id()), (ACK, 1)),
            _ => panic!("unexpected {f:?}"),
        }
    }
    assert_eq!(data, payload, "queued data goes out before the GoAway");
    let last = frames.last().unwrap();
    assert_eq!(
        (last.ty(), last.flags(), last.id(), last.len()),
        (FrameType::GoAway, 0, 0, 0)
    );
    within("closed()", side.control.closed()).await;
    assert!(side.control.is_closed());
    assert!(side.result().await.is_ok());
}

#[tokio::test]
async fn peer_goaway_refuses_our_opens_but_keeps_streams() {
    let (mut peer, mut side) = server().await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    peer.send(FrameType::GoAway, 0, 0, 0).await;
    peer.sync().await;
    assert_eq!(
        side.control.open_stream().unwrap_err(),
        OpenError::RemoteGoAway
    );
    assert!(!side.control.is_closed());
    // Existing streams go on in both directions.
    peer.send_data(0, 1, b"ping").await;
    let mut got = [0u8; 4];
    within("read", s.read_exact(&mut got)).await.unwrap();
    s.write_all(b"pong").await.unwrap();
    let f = peer.frame().await;
    assert_eq!((f.ty(), f.body.as_slice()), (D, &b"pong"[..]));
    // The peer then hangs up: after its GoAway that is a clean end.
    drop(peer);
    assert!(side.result().await.is_ok());
}

#[tokio::test]
async fn peer_goaway_with_error_code_ends_the_session() {
    // As hashicorp/yamux: GoAway with an error code is fatal.
    let (mut peer, mut side) = server().await;
    peer.send(FrameType::GoAway, 0, 0, 2).await;
    assert!(peer.until_eof().await.is_empty());
    within("closed()", side.control.closed()).await;
    assert!(matches!(
        side.result().await,
        Err(SessionError::GoAwayError(2))
    ));
    assert_eq!(
        side.control.open_stream().unwrap_err(),
        OpenError::SessionClosed
    );
}

#[tokio::test]
async fn peer_eof_without_goaway_is_closed_by_peer() {
    let (peer, mut side) = server().await;
    drop(peer);
    assert!(matches!(
        side.result().await,
        Err(SessionError::ClosedByPeer)
    ));
}

#[tokio::test]
async fn header_split_across_writes_is_reassembled() {
    // Frames dribbled one byte per write still parse.
    let (mut peer, mut side) = server().await;
    let mut bytes = backchannel_yamux::frame::Header::new(W, SYN, 1, 0)
        .encode()
        .to_vec();
    bytes.extend_from_slice(&backchannel_yamux::frame::Header::new(D, 0, 1, 3).encode());
    bytes.extend_from_slice(b"abc");
    for b in &bytes {
        peer.send_raw(std::slice::from_ref(b)).await;
        peer.io.flush().await.unwrap();
    }
    let mut s = within("accept", side.incoming.accept()).await.unwrap();
    let mut got = [0u8; 3];
    within("read", s.read_exact(&mut got)).await.unwrap();
    assert_eq!(&got, b"abc");
    assert_eq!(bytes.len(), 2 * HEADER_LEN + 3);
}
