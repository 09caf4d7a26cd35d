//! Failure paths: transports whose flush is momentarily Pending, TLS under
//! back-pressure, resets after FIN, peers that never close their half,
//! transports whose shutdown never completes, data racing a drop, the
//! session's buffer budget, invalid settings, exact keepalive timeouts and
//! GoAway error codes.

mod common;

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use backchannel_yamux::{
    frame::{FrameType, Header, ACK, FIN, RST, SYN},
    Config, ConfigError, EndReason, Mode, ResetReason, SessionError, StreamError,
};
use common::*;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};

const KIB: u32 = 1024;
const W: FrameType = FrameType::WindowUpdate;

/// Opens stream `id` from the raw peer and accepts it on our side.
async fn open_from_peer(peer: &mut RawPeer, side: &mut Side, id: u32) -> backchannel_yamux::Stream {
    peer.send(W, SYN, id, 0).await;
    let s = within("accept", side.incoming.accept()).await.unwrap();
    assert_eq!(s.id(), id);
    s
}

fn stream_error(e: &io::Error) -> StreamError {
    *StreamError::of(e).unwrap_or_else(|| panic!("not a StreamError: {e:?}"))
}

// ---------------------------------------------------------------------------
// Transports around a real TCP socket.

/// A TCP socket whose `poll_flush` is Pending two calls out of three (and
/// asks to be polled again at once), as TLS is whenever the socket is full.
struct FlakyFlush {
    io: TcpStream,
    flushes: u64,
}

impl AsyncRead for FlakyFlush {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for FlakyFlush {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flushes += 1;
        if !self.flushes.is_multiple_of(3) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A TCP socket whose `poll_shutdown` never completes, as a TLS
/// close_notify that cannot be written.
struct StuckShutdown(TcpStream);

impl AsyncRead for StuckShutdown {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for StuckShutdown {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

// ---------------------------------------------------------------------------
// The write deadline measures one continuous stall.

#[tokio::test]
async fn write_deadline_is_not_left_over_from_an_earlier_pending_flush() {
    let (a, b) = tcp_pair().await;
    let timeout = Duration::from_millis(100);
    let client = start(
        FlakyFlush { io: a, flushes: 0 },
        quiet(256 * KIB).with_write_timeout(timeout),
        Mode::Client,
    );
    let mut server = start(b, quiet(256 * KIB), Mode::Server);
    let mut s = client.control.open_stream().unwrap();
    s.write_all(b"first").await.unwrap();
    let mut peer = within("accept", server.incoming.accept()).await.unwrap();
    let mut got = [0u8; 5];
    within("first read", peer.read_exact(&mut got))
        .await
        .unwrap();
    for round in 0..4u8 {
        // Idle for longer than the write timeout: no write is stalled.
        tokio::time::sleep(3 * timeout).await;
        s.write_all(&[round; 5]).await.unwrap();
        within("read", peer.read_exact(&mut got)).await.unwrap();
        assert_eq!(got, [round; 5]);
        assert!(!client.control.is_closed(), "round {round}: session ended");
    }
}

fn tls_configs() -> (
    Arc<tokio_rustls::rustls::ServerConfig>,
    Arc<tokio_rustls::rustls::ClientConfig>,
) {
    use tokio_rustls::rustls;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

/// A loopback TCP pair with small (`size`-byte) socket buffers, so that
/// back-pressure shows up quickly: (dialer, accepted).
async fn small_buffer_pair(size: u32) -> (TcpStream, TcpStream) {
    let socket = || {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.set_recv_buffer_size(size).unwrap();
        s.set_send_buffer_size(size).unwrap();
        s
    };
    let l = socket();
    l.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = l.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let (dialed, accepted) = tokio::join!(socket().connect(addr), listener.accept());
    (dialed.unwrap(), accepted.unwrap().0)
}

/// A TLS connection over loopback TCP with small socket buffers: (client
/// side, server side).
async fn tls_pair() -> (
    tokio_rustls::client::TlsStream<TcpStream>,
    tokio_rustls::server::TlsStream<TcpStream>,
) {
    let (server_cfg, client_cfg) = tls_configs();
    let (a, b) = small_buffer_pair(16 * 1024).await;
    let connector = tokio_rustls::TlsConnector::from(client_cfg);
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let (c, s) = tokio::join!(connector.connect(name, a), acceptor.accept(b));
    (c.unwrap(), s.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_back_pressure_with_short_pauses_keeps_the_session() {
    // The reader pauses often, each pause far shorter than the write
    // timeout: TLS flushes go Pending and complete again and again, and
    // direct stream writes run between them. No single stall reaches the
    // timeout, so the session must live.
    let timeout = Duration::from_millis(150);
    let (c, s) = tls_pair().await;
    let client = start(
        c,
        quiet(256 * KIB).with_write_timeout(timeout),
        Mode::Client,
    );
    let mut server = start(s, quiet(256 * KIB), Mode::Server);
    // Bursts of 2 MiB with idle gaps longer than the write timeout.
    const BURST: u64 = 2 * 1024 * 1024;
    const TOTAL: u64 = 8 * BURST;
    let mut w = client.control.open_stream().unwrap();
    let writer = tokio::spawn(async move {
        let mut off = 0;
        while off < TOTAL {
            let mut at = 0;
            while at < BURST {
                let n = (64 * 1024).min(BURST - at) as usize;
                w.write_all(pattern_slice(7, off + at, n)).await?;
                at += n as u64;
            }
            off += BURST;
            tokio::time::sleep(3 * timeout).await;
        }
        w.shutdown().await?;
        Ok::<_, io::Error>(w)
    });
    let mut r = within("accept", server.incoming.accept()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    let mut since_pause = 0usize;
    loop {
        let n = within("read", r.read(&mut buf)).await.unwrap();
        if n == 0 {
            break;
        }
        check_pattern(7, off, &buf[..n]);
        off += n as u64;
        since_pause += n;
        if since_pause >= 512 * 1024 {
            since_pause = 0;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    assert_eq!(off, TOTAL);
    within("writer", writer).await.unwrap().unwrap();
    assert!(!client.control.is_closed());
}

// ---------------------------------------------------------------------------
// A reset is never a clean EOF.

#[tokio::test]
async fn rst_after_fin_is_an_error_not_eof() {
    for one_frame in [false, true] {
        let (mut peer, mut side) = raw_pair(quiet(256 * KIB), Mode::Server).await;
        let mut s = open_from_peer(&mut peer, &mut side, 1).await;
        if one_frame {
            peer.send_data(FIN | RST, 1, b"truncated").await;
        } else {
            peer.send_data(FIN, 1, b"truncated").await;
            peer.send(W, RST, 1, 0).await;
        }
        peer.sync().await;
        let mut got = Vec::new();
        let err = within("read", s.read_to_end(&mut got))
            .await
            .expect_err("a reset stream read as a clean EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(stream_error(&err), StreamError::ResetByPeer);
    }
}

// ---------------------------------------------------------------------------
// A dropped stream whose peer never closes its half is reset and freed.

#[tokio::test]
async fn dropped_stream_is_reset_after_the_close_timeout() {
    let cfg = quiet(256 * KIB)
        .with_max_streams(1)
        .with_stream_close_timeout(Duration::from_millis(200));
    let (mut peer, mut side) = raw_pair(cfg, Mode::Server).await;
    let s = open_from_peer(&mut peer, &mut side, 1).await;
    let ack = peer.frame().await;
    assert_eq!((ack.flags(), ack.id()), (ACK, 1));
    let dropped = Instant::now();
    drop(s);
    let fin = peer.frame().await;
    assert_eq!((fin.ty(), fin.flags(), fin.id()), (W, FIN, 1));
    assert_eq!(side.control.num_streams(), 1);
    // The peer keeps its half open: after the timeout, RST.
    let rst = within_for(
        Duration::from_secs(3),
        "RST after the close timeout",
        peer.frame(),
    )
    .await;
    assert_eq!((rst.ty(), rst.flags(), rst.id()), (W, RST, 1));
    assert!(dropped.elapsed() >= Duration::from_millis(200));
    peer.sync().await;
    assert_eq!(side.control.num_streams(), 0);
    // The slot is free again.
    peer.send(W, SYN, 3, 0).await;
    let frames = peer.sync().await;
    assert_eq!((frames[0].flags(), frames[0].id()), (ACK, 3), "{frames:?}");
}

// ---------------------------------------------------------------------------
// Closing is bounded.

#[tokio::test]
async fn close_with_a_stuck_transport_shutdown_still_ends() {
    let (a, b) = tcp_pair().await;
    let mut peer = RawPeer::new(a);
    let side = start(
        StuckShutdown(b),
        quiet(256 * KIB).with_write_timeout(Duration::from_millis(200)),
        Mode::Client,
    );
    let mut s = side.control.open_stream().unwrap();
    s.write_all(b"x").await.unwrap();
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        s.read(&mut buf).await
    });
    side.control.close();
    within_for(Duration::from_secs(3), "closed()", side.control.closed()).await;
    let r = within("blocked read", reader).await.unwrap();
    assert!(r.is_err(), "{r:?}");
    let frames = peer.until_eof().await;
    assert_eq!(frames.last().map(|f| f.ty()), Some(FrameType::GoAway));
}

// ---------------------------------------------------------------------------
// Data arriving for a stream dropped while its frame was on the wire.

#[tokio::test]
async fn data_for_a_stream_dropped_mid_frame_is_dropped_and_reset() {
    let (mut peer, mut side) = raw_pair(quiet(256 * KIB), Mode::Server).await;
    let mut s = open_from_peer(&mut peer, &mut side, 1).await;
    peer.sync().await;
    // A small frame, then the header and first half of a larger one, in
    // one write: our session reads them together.
    let big = vec![7u8; 64 * 1024];
    let mut bytes = Header::new(FrameType::Data, 0, 1, 3).encode().to_vec();
    bytes.extend_from_slice(b"abc");
    bytes.extend_from_slice(&Header::new(FrameType::Data, 0, 1, big.len() as u32).encode());
    bytes.extend_from_slice(&big[..1000]);
    peer.send_raw(&bytes).await;
    let mut got = [0u8; 3];
    within("read", s.read_exact(&mut got)).await.unwrap();
    drop(s);
    peer.send_raw(&big[1000..]).await;
    let frames: Vec<_> = peer
        .sync()
        .await
        .iter()
        .map(|f| (f.ty(), f.flags(), f.id()))
        .collect();
    assert_eq!(frames, [(W, FIN, 1), (W, RST, 1)]);
    assert_eq!(side.control.num_streams(), 0);
    assert_eq!(side.control.buffered_bytes(), 0);
}

// ---------------------------------------------------------------------------
// The session's buffer budget.

#[tokio::test]
async fn buffered_bytes_stay_within_the_budget() {
    let budget = 1024 * 1024;
    let cfg = quiet(256 * KIB)
        .with_max_buffered(budget)
        .with_accept_backlog(16);
    let (mut peer, mut side) = raw_pair(cfg, Mode::Server).await;
    // Eight streams, four accepted and four waiting in the backlog, each
    // filled to its window by frames of every size: twice the budget.
    let mut accepted = Vec::new();
    for i in 0..8u32 {
        let id = 2 * i + 1;
        peer.send(W, SYN, id, 0).await;
        if i < 4 {
            accepted.push(within("accept", side.incoming.accept()).await.unwrap());
        }
    }
    let mut sizes = [100usize, 16 * 1024, 40 * 1024, 1].iter().cycle();
    for i in 0..8u32 {
        let id = 2 * i + 1;
        let mut left = 256 * 1024usize;
        while left > 0 {
            let n = (*sizes.next().unwrap()).min(left);
            peer.send_data(0, id, &vec![i as u8; n]).await;
            left -= n;
            assert!(side.control.buffered_bytes() <= budget);
        }
    }
    let frames = peer.sync().await;
    assert!(side.control.buffered_bytes() <= budget);
    assert!(side.control.buffered_bytes() >= budget / 2);
    let resets = frames.iter().filter(|f| f.flags() == RST).count();
    assert!(resets >= 4, "{frames:?}");
    assert!(!side.control.is_closed());
    // Every accepted stream either delivers all it was sent or says why it
    // was reset.
    for mut s in accepted {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0;
        while got < 256 * 1024 {
            match within("read", s.read(&mut buf)).await {
                Ok(0) => panic!("EOF on an open stream"),
                Ok(n) => got += n,
                Err(e) => {
                    assert_eq!(
                        stream_error(&e),
                        StreamError::ResetLocally(ResetReason::BufferBudget)
                    );
                    break;
                }
            }
        }
        assert!(side.control.buffered_bytes() <= budget);
    }
}

#[tokio::test]
async fn a_full_budget_resets_the_unread_stream_not_the_one_being_read() {
    let budget = 2 * 1024 * 1024;
    let window = 1024 * 1024;
    let cfg = quiet(window)
        .with_max_buffered(budget)
        .with_accept_backlog(16);
    let (mut peer, mut side) = raw_pair(cfg, Mode::Server).await;
    // Stream 1 is read as it arrives; streams 3, 5 and 7 never are.
    peer.send(W, SYN, 1, 0).await;
    let mut read = within("accept", side.incoming.accept()).await.unwrap();
    let mut unread = Vec::new();
    for id in [3u32, 5, 7] {
        peer.send(W, SYN, id, 0).await;
        unread.push(within("accept", side.incoming.accept()).await.unwrap());
    }
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) => return Ok(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return Err(stream_error(&e)),
            }
        }
    });
    // The unread streams fill the budget (three windows for a budget of
    // two), then the read stream's data arrives, a window's worth.
    for id in [3u32, 5, 7] {
        for _ in 0..16 {
            peer.send_data(0, id, &vec![id as u8; 64 * 1024]).await;
        }
    }
    let mut sent = Vec::new();
    for i in 0..16u8 {
        let chunk = vec![i; 64 * 1024];
        peer.send_data(0, 1, &chunk).await;
        sent.extend_from_slice(&chunk);
    }
    for id in [1u32, 3, 5, 7] {
        peer.send(W, FIN, id, 0).await;
    }
    let got = within("read stream", reader).await.unwrap();
    assert_eq!(got.as_deref().map(<[u8]>::len), Ok(sent.len()));
    assert!(got.unwrap() == sent, "the read stream's bytes differ");
    assert!(side.control.buffered_bytes() <= budget);
    assert!(!side.control.is_closed());
    // The unread streams paid: at least one was reset for the budget.
    let mut reset = 0;
    for mut s in unread {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match within("read", s.read(&mut buf)).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(
                        stream_error(&e),
                        StreamError::ResetLocally(ResetReason::BufferBudget)
                    );
                    reset += 1;
                    break;
                }
            }
        }
    }
    assert!(reset >= 1, "no unread stream was reset");
}

// ---------------------------------------------------------------------------
// Settings.

#[tokio::test]
async fn invalid_settings_are_a_typed_error_not_a_panic() {
    for (cfg, want) in [
        (
            quiet(256 * KIB).with_keepalive(Some(Duration::ZERO)),
            ConfigError::Zero("keepalive"),
        ),
        (
            quiet(256 * KIB).with_keepalive(Some(Duration::MAX)),
            ConfigError::TooLong {
                name: "keepalive",
                value: Duration::MAX,
                max: Config::MAX_DURATION,
            },
        ),
        (
            quiet(256 * KIB).with_write_timeout(Duration::MAX),
            ConfigError::TooLong {
                name: "write_timeout",
                value: Duration::MAX,
                max: Config::MAX_DURATION,
            },
        ),
        (
            quiet(4 * 1024 * KIB).with_max_buffered(1024),
            ConfigError::BudgetBelowWindow {
                budget: 1024,
                window: 4 * 1024 * KIB,
            },
        ),
    ] {
        assert_eq!(cfg.validate(), Err(want.clone()));
        let (a, _b) = tcp_pair().await;
        let mut side = start(a, cfg, Mode::Client);
        match side.result().await {
            Err(SessionError::Config(e)) => assert_eq!(e, want),
            other => panic!("expected a config error, got {other:?}"),
        }
        assert!(side.control.open_stream().is_err());
    }
}

#[tokio::test]
async fn keepalive_timeout_fires_on_time_not_at_the_next_tick() {
    let cfg = quiet(256 * KIB)
        .with_keepalive(Some(Duration::from_secs(2)))
        .with_keepalive_timeout(Duration::from_millis(100));
    let (mut peer, mut side) = raw_pair(cfg, Mode::Client).await;
    let ping = within("a ping", peer.frame()).await;
    assert_eq!((ping.ty(), ping.flags()), (FrameType::Ping, SYN));
    let sent = Instant::now();
    assert!(peer.until_eof().await.is_empty());
    let waited = sent.elapsed();
    assert!(matches!(
        side.result().await,
        Err(SessionError::KeepaliveTimeout(_))
    ));
    assert!(
        waited < Duration::from_millis(1000),
        "ended {waited:?} after the ping (timeout 100 ms, interval 2 s)"
    );
}

// ---------------------------------------------------------------------------
// GoAway codes.

#[tokio::test]
async fn goaway_with_an_error_code_ends_the_session() {
    for code in [1u32, 2] {
        let (mut peer, mut side) = raw_pair(quiet(256 * KIB), Mode::Server).await;
        let mut s = open_from_peer(&mut peer, &mut side, 1).await;
        peer.send(FrameType::GoAway, 0, 0, code).await;
        within_for(Duration::from_secs(3), "closed()", side.control.closed()).await;
        match side.result().await {
            Err(SessionError::GoAwayError(c)) => assert_eq!(c, code),
            other => panic!("expected GoAwayError({code}), got {other:?}"),
        }
        let e = s.read(&mut [0u8; 4]).await.unwrap_err();
        assert_eq!(
            stream_error(&e),
            StreamError::SessionEnded(EndReason::GoAwayError(code))
        );
    }
}

#[tokio::test]
async fn peer_close_without_goaway_is_a_normal_end() {
    let (peer, mut side) = raw_pair(quiet(256 * KIB), Mode::Server).await;
    drop(peer);
    let e = side.result().await.unwrap_err();
    assert!(e.is_normal_end(), "{e:?}");
}
