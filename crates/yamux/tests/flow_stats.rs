//! Session flow statistics: the round-trip time measured from pings, the
//! windows in force, and receive windows that grow while they limit a
//! stream. The sessions run over loopback TCP through a relay that delays
//! every byte by a fixed time, so the round trip is known.

mod common;

use std::time::Duration;

use backchannel_yamux::{Config, Mode, Stats};
use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::Instant,
};

const DELAY: Duration = Duration::from_millis(20);

/// Copies `from` to `to`, each chunk `DELAY` after it was read (the
/// throughput is not limited, only the latency).
fn delayed_copy(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .send((Instant::now() + DELAY, buf[..n].to_vec()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
}

/// A TCP pair whose bytes take `DELAY` each way (a round trip of twice
/// that).
async fn delayed_pair() -> (TcpStream, TcpStream) {
    let (a, relay_a) = tcp_pair().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (relay_b, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (relay_b, (b, _)) = (relay_b.unwrap(), b.unwrap());
    let (ar, aw) = relay_a.into_split();
    let (br, bw) = relay_b.into_split();
    delayed_copy(ar, bw);
    delayed_copy(br, aw);
    (a, b)
}

/// Polls `stats` until `done` holds (bounded by the test deadline).
async fn until(what: &str, side: &Side, done: impl Fn(&Stats) -> bool) -> Stats {
    within(what, async {
        loop {
            let s = side.control.stats();
            if done(&s) {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

#[tokio::test]
async fn the_rtt_probe_measures_the_round_trip_at_once() {
    let (a, b) = delayed_pair().await;
    // No keepalive: only the probe pings.
    let cfg = Config::default().with_keepalive(None);
    let client = start(a, cfg.clone(), Mode::Client);
    let server = start(b, cfg.clone().with_rtt_probe(false), Mode::Server);
    let s = until("the client's RTT", &client, |s| s.rtt.is_some()).await;
    let rtt = s.rtt.unwrap();
    assert!(rtt >= 2 * DELAY, "rtt {rtt:?} below the relay's round trip");
    assert!(rtt < 2 * DELAY + Duration::from_secs(2), "rtt {rtt:?}");
    // The server sent no probe: it knows nothing.
    assert_eq!(server.control.stats().rtt, None);
    // No stream, no window from the peer: no ceiling yet.
    assert_eq!(s.send_ceiling(), None);
    assert_eq!(
        s.recv_ceiling(),
        Some(u64::from(s.recv_window) * 1_000_000_000 / rtt.as_nanos() as u64)
    );
}

#[tokio::test]
async fn windows_bytes_in_flight_and_totals_are_reported() {
    let (a, b) = tcp_pair().await;
    let window = 1024 * 1024;
    let cfg = quiet(window);
    let client = start(a, cfg.clone(), Mode::Client);
    let mut server = start(b, cfg, Mode::Server);
    let mut out = client.control.open_stream().unwrap();
    out.write_all(&[7u8; 1000]).await.unwrap();
    let mut inc = within("accept", server.incoming.accept()).await.unwrap();
    let s = until("the peer's window", &client, |s| s.send_window == window).await;
    assert_eq!(s.streams, 1);
    assert_eq!(s.data_sent, 1000);
    // Not read yet: the peer has not credited anything back.
    assert_eq!(s.in_flight, 1000);
    // Fill the rest of the window: the next write waits (a stall).
    out.write_all(&vec![1u8; window as usize - 1000])
        .await
        .unwrap();
    let stalled = tokio::time::timeout(Duration::from_millis(50), out.write_all(&[2u8; 10])).await;
    assert!(stalled.is_err(), "a write past the window completed");
    let s = client.control.stats();
    assert_eq!(s.in_flight, u64::from(window));
    assert!(s.window_stalls >= 1);
    let r = until("the server's count", &server, |s| {
        s.data_received == u64::from(window)
    })
    .await;
    // Charged: the data, and the read buffers its slices keep alive.
    assert!(
        r.buffered >= window as usize && r.buffered <= 2 * window as usize,
        "{r:?}"
    );
    // Reading credits the window back.
    let mut buf = vec![0u8; window as usize];
    inc.read_exact(&mut buf).await.unwrap();
    let s = until("the credit", &client, |s| s.in_flight < u64::from(window)).await;
    assert!(s.in_flight <= u64::from(window) / 2 + 10, "{s:?}");
}

/// Moves `total` bytes from the client to the server over `pair` and
/// returns both sides' stats afterwards.
async fn transfer(a: TcpStream, b: TcpStream, cfg: Config, total: u64) -> (Stats, Stats) {
    let client = start(a, cfg.clone(), Mode::Client);
    let mut server = start(b, cfg, Mode::Server);
    // Wait for the RTT on the server (the receiver tunes its windows).
    until("the server's RTT", &server, |s| s.rtt.is_some()).await;
    let mut out = client.control.open_stream().unwrap();
    let writer = tokio::spawn(async move {
        write_pattern(&mut out, 9, total, 1).await.unwrap();
        out.shutdown().await.unwrap();
        out
    });
    let mut inc = within("accept", server.incoming.accept()).await.unwrap();
    within_for(
        Duration::from_secs(60),
        "the transfer",
        read_pattern(&mut inc, 9, total, 2),
    )
    .await
    .unwrap();
    let server_stats = server.control.stats();
    let _out = writer.await.unwrap();
    (client.control.stats(), server_stats)
}

#[tokio::test]
async fn a_window_limited_stream_grows_its_window_within_the_bounds() {
    let (a, b) = delayed_pair().await;
    let max = 4 * 1024 * 1024;
    let cfg = Config::default()
        .with_keepalive(None)
        .with_max_auto_window(max)
        .with_max_buffered(32 * 1024 * 1024);
    let (client, server) = transfer(a, b, cfg, 24 * 1024 * 1024).await;
    assert!(server.windows_grown >= 1, "{server:?}");
    assert!(server.recv_window > 256 * 1024, "{server:?}");
    assert!(server.recv_window <= max, "{server:?}");
    // The sender saw the larger window.
    assert!(client.send_window > 256 * 1024, "{client:?}");
    assert!(client.window_stalls >= 1, "{client:?}");
}

#[tokio::test]
async fn without_auto_tuning_the_window_stays() {
    let (a, b) = delayed_pair().await;
    let cfg = Config::default().with_keepalive(None);
    let (client, server) = transfer(a, b, cfg, 4 * 1024 * 1024).await;
    assert_eq!(server.windows_grown, 0);
    assert_eq!(server.recv_window, 256 * 1024);
    assert_eq!(client.send_window, 256 * 1024);
}

#[tokio::test]
async fn window_growth_stays_within_a_quarter_of_the_budget() {
    let (a, b) = delayed_pair().await;
    // A quarter of the budget is 512 KiB: one stream may grow from 256 KiB
    // by at most that, whatever the largest window says.
    let cfg = Config::default()
        .with_keepalive(None)
        .with_max_auto_window(16 * 1024 * 1024)
        .with_max_buffered(2 * 1024 * 1024);
    let (_client, server) = transfer(a, b, cfg, 24 * 1024 * 1024).await;
    assert!(server.windows_grown >= 1, "{server:?}");
    assert!(server.recv_window <= 256 * 1024 + 512 * 1024, "{server:?}");
}
