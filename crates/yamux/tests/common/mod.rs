//! Helpers shared by the integration tests: loopback TCP pairs, sessions,
//! deterministic test data, and a raw yamux peer that writes hand-encoded
//! frames and decodes ours.

#![allow(dead_code)]

use std::{
    future::Future,
    io::{self, IoSlice},
    time::Duration,
};

use backchannel_yamux::{
    frame::{FrameType, Header, HEADER_LEN, SYN},
    session, Config, Control, Incoming, Mode, SessionError,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

/// Bound of every wait that should finish at once: long enough not to
/// trip on a loaded machine, short enough that a hang fails the test.
pub const T: Duration = Duration::from_secs(10);

/// Awaits `f`, failing the test with `what` if it takes longer than [`T`].
pub async fn within<F: Future>(what: &str, f: F) -> F::Output {
    within_for(T, what, f).await
}

/// Awaits `f`, failing the test with `what` if it takes longer than `limit`.
pub async fn within_for<F: Future>(limit: Duration, what: &str, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// A connected loopback TCP pair: (dialer, accepted).
pub async fn tcp_pair() -> (TcpStream, TcpStream) {
    backchannel_testkit::tcp_pair()
        .await
        .expect("loopback TCP pair")
}

/// Settings for tests: no keepalive and no RTT probe (so no pings show up
/// unasked).
pub fn quiet(window: u32) -> Config {
    Config::default()
        .with_max_stream_window(window)
        .with_keepalive(None)
        .with_rtt_probe(false)
}

/// One side of a session under test.
pub struct Side {
    pub control: Control,
    pub incoming: Incoming,
    pub conn: JoinHandle<Result<(), SessionError>>,
}

impl Side {
    /// Waits (bounded) for the connection future's result.
    pub async fn result(&mut self) -> Result<(), SessionError> {
        within("the session to end", &mut self.conn)
            .await
            .expect("the connection task panicked")
    }
}

/// Starts our session over `io` with its connection future spawned.
pub fn start<I>(io: I, cfg: Config, mode: Mode) -> Side
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (control, incoming, conn) = session(io, cfg, mode);
    Side {
        control,
        incoming,
        conn: tokio::spawn(conn),
    }
}

/// Two of our sessions over loopback TCP: (client, server).
pub async fn our_pair(client: Config, server: Config) -> (Side, Side) {
    let (a, b) = tcp_pair().await;
    (
        start(a, client, Mode::Client),
        start(b, server, Mode::Server),
    )
}

// Test data: a pseudo-random byte sequence per seed, checkable by slices.
pub use backchannel_testkit::pattern::{
    check_stream as check_pattern, stream_slice as pattern_slice,
};

pub use backchannel_testkit::Rng;

/// Writes `total` bytes of stream `seed`'s data in random chunk sizes
/// (1 B .. 300 KiB), a third of them as vectored writes of up to three
/// slices. Does not shut down.
pub async fn write_pattern<W: AsyncWrite + Unpin>(
    w: &mut W,
    seed: u64,
    total: u64,
    rng_seed: u64,
) -> io::Result<()> {
    let mut rng = Rng::new(rng_seed);
    let mut off = 0u64;
    while off < total {
        let want = rng.range(1, 300 * 1024).min((total - off) as usize);
        let data = pattern_slice(seed, off, want);
        if rng.next_u64().is_multiple_of(3) && want >= 3 {
            let a = rng.range(1, want - 2);
            let b = rng.range(a + 1, want - 1);
            let n = w
                .write_vectored(&[
                    IoSlice::new(&data[..a]),
                    IoSlice::new(&data[a..b]),
                    IoSlice::new(&data[b..]),
                ])
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            off += n as u64;
        } else {
            w.write_all(data).await?;
            off += want as u64;
        }
    }
    Ok(())
}

/// Reads stream `seed`'s data with random read sizes until EOF; checks
/// every byte and that exactly `total` arrived.
pub async fn read_pattern<R: AsyncRead + Unpin>(
    r: &mut R,
    seed: u64,
    total: u64,
    rng_seed: u64,
) -> io::Result<()> {
    let mut rng = Rng::new(rng_seed);
    let mut buf = vec![0u8; 512 * 1024];
    let mut off = 0u64;
    loop {
        let want = rng.range(1, buf.len());
        let n = r.read(&mut buf[..want]).await?;
        if n == 0 {
            break;
        }
        assert!(
            off + n as u64 <= total,
            "stream data {seed}: more than {total} bytes"
        );
        check_pattern(seed, off, &buf[..n]);
        off += n as u64;
    }
    assert_eq!(off, total, "stream data {seed}: EOF before all data");
    Ok(())
}

// ---------------------------------------------------------------------------
// The raw peer.

/// A decoded frame from our session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Vec<u8>,
}

impl Frame {
    pub fn ty(&self) -> FrameType {
        self.header.ty
    }
    pub fn flags(&self) -> u16 {
        self.header.flags
    }
    pub fn id(&self) -> u32 {
        self.header.stream_id
    }
    pub fn len(&self) -> u32 {
        self.header.length
    }
}

/// A yamux peer by hand: writes encoded frames, reads and decodes ours.
pub struct RawPeer {
    pub io: TcpStream,
    next_ping: u32,
}

impl RawPeer {
    pub fn new(io: TcpStream) -> Self {
        RawPeer {
            io,
            next_ping: 0x7000_0000,
        }
    }

    pub async fn send(&mut self, ty: FrameType, flags: u16, id: u32, length: u32) {
        self.io
            .write_all(&Header::new(ty, flags, id, length).encode())
            .await
            .unwrap();
    }

    pub async fn send_data(&mut self, flags: u16, id: u32, body: &[u8]) {
        let mut b = Header::new(FrameType::Data, flags, id, body.len() as u32)
            .encode()
            .to_vec();
        b.extend_from_slice(body);
        self.io.write_all(&b).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
    }

    /// The next frame, or `None` at EOF (a clean EOF between frames; EOF
    /// inside a frame fails the test). Bounded by [`T`].
    pub async fn next_frame(&mut self) -> Option<Frame> {
        within("a frame from our session", async {
            let mut head = [0u8; HEADER_LEN];
            let mut got = 0;
            while got < HEADER_LEN {
                match self.io.read(&mut head[got..]).await {
                    Ok(0) if got == 0 => return None,
                    Ok(0) => panic!("EOF inside a frame header"),
                    Ok(n) => got += n,
                    // Our session may have closed with unread input: RST.
                    Err(e) if got == 0 && e.kind() == io::ErrorKind::ConnectionReset => {
                        return None
                    }
                    Err(e) => panic!("raw peer read: {e}"),
                }
            }
            let header = Header::decode(&head).expect("our session sent a bad header");
            let mut body = Vec::new();
            if header.ty == FrameType::Data {
                body = vec![0; header.length as usize];
                self.io.read_exact(&mut body).await.unwrap();
            }
            Some(Frame { header, body })
        })
        .await
    }

    /// The next frame; EOF fails the test.
    pub async fn frame(&mut self) -> Frame {
        self.next_frame().await.expect("EOF instead of a frame")
    }

    /// Reads frames until EOF; returns them.
    pub async fn until_eof(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.next_frame().await {
            frames.push(f);
        }
        frames
    }

    /// A round trip: sends a ping and returns every frame that arrives
    /// before its answer. Our session handles frames in order, so after this
    /// everything sent before was processed, and everything it queued while
    /// doing so has been read.
    pub async fn sync(&mut self) -> Vec<Frame> {
        self.next_ping += 1;
        let opaque = self.next_ping;
        self.send(FrameType::Ping, SYN, 0, opaque).await;
        let mut before = Vec::new();
        loop {
            let f = self.frame().await;
            if f.ty() == FrameType::Ping && f.len() == opaque {
                assert_eq!(
                    f.flags(),
                    backchannel_yamux::frame::ACK,
                    "ping answer flags"
                );
                assert_eq!(f.id(), 0, "ping answer stream id");
                return before;
            }
            before.push(f);
        }
    }
}

/// Our session over loopback TCP with a raw peer at the other end.
pub async fn raw_pair(cfg: Config, mode: Mode) -> (RawPeer, Side) {
    let (a, b) = tcp_pair().await;
    (RawPeer::new(a), start(b, cfg, mode))
}
