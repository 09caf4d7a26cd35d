//! A raw peer replaying the frame sequences a current hashicorp/yamux
//! produces (`session.go`, `stream.go`), checked against what hashicorp's
//! own stream does in each case:
//!
//! * SYN and ACK carry the window delta when its `MaxStreamWindowSize` is
//!   above 256 KiB;
//! * `StreamCloseTimeout`: FIN, then minutes later RST when our half stays
//!   open;
//! * a full accept backlog answers a SYN with RST;
//! * `Session.Close()` sends no GoAway: the connection just ends.

mod common;

use std::io;

use backchannel_yamux::{
    frame::{FrameType, ACK, FIN, INITIAL_WINDOW, RST, SYN},
    EndReason, Mode, StreamError,
};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const W: FrameType = FrameType::WindowUpdate;
const D: FrameType = FrameType::Data;
const MIB: u32 = 1024 * 1024;

fn stream_error(e: &io::Error) -> StreamError {
    *StreamError::of(e).unwrap_or_else(|| panic!("not a StreamError: {e:?}"))
}

/// Reads data frames for `id` until `total` payload bytes arrived; fails on
/// anything but data for `id`.
async fn read_data(peer: &mut RawPeer, id: u32, total: usize) {
    let mut got = 0;
    while got < total {
        let f = peer.frame().await;
        assert_eq!((f.ty(), f.id()), (D, id), "{:?}", f.header);
        got += f.body.len();
    }
    assert_eq!(got, total);
}

#[tokio::test]
async fn syn_with_a_window_delta_lets_us_send_the_whole_window() {
    // Gitaly's server: MaxStreamWindowSize 16 MiB, so its SYN carries
    // 16 MiB - 256 KiB. hashicorp's stream then sends up to 16 MiB before
    // it needs a window update; so must we.
    let (mut peer, mut side) = raw_pair(quiet(256 * 1024), Mode::Client).await;
    peer.send(W, SYN, 2, 16 * MIB - INITIAL_WINDOW).await;
    let mut s = within("accept", side.incoming.accept()).await.unwrap();
    let ack = peer.frame().await;
    assert_eq!((ack.ty(), ack.flags(), ack.id()), (W, ACK, 2));
    let total = 16 * MIB as usize;
    let writer = tokio::spawn(async move {
        let data = vec![5u8; total];
        s.write_all(&data).await.unwrap();
        s
    });
    read_data(&mut peer, 2, total).await;
    let _s = within("writer", writer).await.unwrap();
}

#[tokio::test]
async fn ack_with_a_window_delta_lets_us_send_the_whole_window() {
    let (mut peer, side) = raw_pair(quiet(256 * 1024), Mode::Client).await;
    let mut s = side.control.open_stream().unwrap();
    let syn = peer.frame().await;
    assert_eq!((syn.flags(), syn.id()), (SYN, 1));
    peer.send(W, ACK, 1, 16 * MIB - INITIAL_WINDOW).await;
    peer.sync().await;
    let total = 16 * MIB as usize;
    let writer = tokio::spawn(async move {
        s.write_all(&vec![6u8; total]).await.unwrap();
        s
    });
    read_data(&mut peer, 1, total).await;
    let _s = within("writer", writer).await.unwrap();
}

#[tokio::test]
async fn fin_then_rst_after_the_close_timeout() {
    // The peer answers a request and closes its half (FIN); our half stays
    // open; its StreamCloseTimeout then resets the stream.
    for read_before_rst in [true, false] {
        let (mut peer, side) = raw_pair(quiet(256 * 1024), Mode::Client).await;
        let mut s = side.control.open_stream().unwrap();
        s.write_all(b"request").await.unwrap();
        let _syn = peer.frame().await;
        let req = peer.frame().await;
        assert_eq!(req.body, b"request");
        peer.send(W, ACK, 1, 0).await;
        peer.send_data(0, 1, b"response").await;
        peer.send(W, FIN, 1, 0).await;
        peer.sync().await;
        if read_before_rst {
            // Everything arrived before the RST: hashicorp's reader gets
            // it all and EOF, and so does ours.
            let mut got = Vec::new();
            within("read", s.read_to_end(&mut got)).await.unwrap();
            assert_eq!(got, b"response");
        }
        peer.send(W, RST, 1, 0).await;
        peer.sync().await;
        if !read_before_rst {
            // hashicorp: a read in the reset state is ErrConnectionReset,
            // even with data buffered. Ours too: never a clean EOF.
            let e = s.read(&mut [0u8; 16]).await.unwrap_err();
            assert_eq!(stream_error(&e), StreamError::ResetByPeer);
        }
        let e = s.write(b"more").await.unwrap_err();
        assert_eq!(stream_error(&e), StreamError::ResetByPeer);
        drop(s);
        assert_eq!(side.control.num_streams(), 0);
        // Nothing goes out for a reset stream.
        assert!(peer.sync().await.is_empty());
    }
}

#[tokio::test]
async fn rst_on_a_full_backlog_fails_our_stream_and_frees_it() {
    // Gitaly's server has an accept backlog of 1: a second stream is
    // answered with RST (no ACK).
    let (mut peer, side) = raw_pair(quiet(256 * 1024), Mode::Client).await;
    let mut s = side.control.open_stream().unwrap();
    s.write_all(b"hello").await.unwrap();
    let _syn = peer.frame().await;
    let _data = peer.frame().await;
    peer.send(W, RST, 1, 0).await;
    peer.sync().await;
    let e = s.read(&mut [0u8; 4]).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(stream_error(&e), StreamError::ResetByPeer);
    let e = s.write(b"again").await.unwrap_err();
    assert_eq!(stream_error(&e), StreamError::ResetByPeer);
    drop(s);
    assert_eq!(side.control.num_streams(), 0);
    // The session is fine: the next stream opens.
    let mut s3 = side.control.open_stream().unwrap();
    s3.write_all(b"x").await.unwrap();
    let syn = peer.frame().await;
    assert_eq!((syn.flags(), syn.id()), (SYN, 3));
    assert!(!side.control.is_closed());
}

#[tokio::test]
async fn close_without_goaway_is_a_normal_end() {
    // hashicorp's Session.Close() closes the connection without GoAway.
    // Data that arrived stays readable; then the read fails with the cause
    // (hashicorp's own stream reports EOF here, which cannot be told from a
    // complete stream: ours says the session ended because the peer
    // closed the connection).
    let (mut peer, mut side) = raw_pair(quiet(256 * 1024), Mode::Server).await;
    peer.send_data(SYN, 1, b"partial").await;
    let mut s = within("accept", side.incoming.accept()).await.unwrap();
    peer.sync().await;
    drop(peer);
    let end = side.result().await.unwrap_err();
    assert!(end.is_normal_end(), "{end:?}");
    let mut got = [0u8; 7];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"partial");
    let e = s.read(&mut [0u8; 4]).await.unwrap_err();
    assert_eq!(
        stream_error(&e),
        StreamError::SessionEnded(EndReason::ClosedByPeer)
    );
}
