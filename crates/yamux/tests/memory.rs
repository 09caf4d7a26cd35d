//! Memory bounds under hostile peers, measured with a counting global
//! allocator. The tests in this binary take a lock so that only one runs at
//! a time (the allocator counts the whole process).

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use backchannel_yamux::{
    frame::{FrameType, Header, SYN},
    Mode, SessionError,
};
use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size > layout.size() {
                let now = CURRENT.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Serializes the tests of this binary.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn current() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Starts a peak measurement from now; returns the baseline.
fn reset_peak() -> usize {
    let now = current();
    PEAK.store(now, Ordering::Relaxed);
    now
}

const MIB: usize = 1024 * 1024;

/// Read buffers a session that read in bulk keeps for reuse until it has
/// been idle for a while: the one being filled and free spares up to two
/// read buffers (the 256 KiB window of these tests), 256 KiB each, plus
/// spares freed since the connection task last ran.
const RETAINED: usize = 5 * 256 * 1024;

/// A loopback TCP pair whose sockets have `size`-byte send and receive
/// buffers: (peer, ours).
async fn small_buffer_pair(size: u32) -> (TcpStream, TcpStream) {
    let socket = || {
        let s = TcpSocket::new_v4().unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_flood_from_a_peer_that_never_reads_is_bounded() {
    let _one = ONE_AT_A_TIME.lock().await;
    let write_timeout = Duration::from_millis(1500);
    let cfg = quiet(256 * 1024).with_write_timeout(write_timeout);
    // Fixed, small socket buffers (no autotuning): what the kernel can hold
    // is small and known, so the bytes the flooder gets out are a measure
    // of what the session read.
    let (peer, ours) = small_buffer_pair(128 * 1024).await;
    let mut side = start(ours, cfg, Mode::Server);
    let peer = RawPeer::new(peer);
    // 1 MiB of pings, written over and over; the peer never reads.
    let mut flood = Vec::with_capacity(MIB);
    for i in 0..(MIB / 12) as u32 {
        flood.extend_from_slice(&Header::new(FrameType::Ping, SYN, 0, i).encode());
    }
    let (mut rd, mut wr) = peer.io.into_split();
    let base = reset_peak();
    let flooder = tokio::spawn(async move {
        let mut written = 0usize;
        while wr.write_all(&flood).await.is_ok() {
            written += flood.len();
        }
        written
    });
    // Our answers back up, the session stops reading, and its writes make
    // no progress: the write timeout ends it.
    let res = within("the session to give up", side.result()).await;
    assert!(
        matches!(res, Err(SessionError::WriteTimeout(d)) if d == write_timeout),
        "{res:?}"
    );
    let grew = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let written = within("the flooder to stop", flooder).await.unwrap();
    // Without back-pressure the session answers everything it can read:
    // hundreds of MiB of pongs in memory within the write timeout.
    assert!(
        grew < 16 * MIB,
        "heap grew by {} KiB during the flood",
        grew / 1024
    );
    // The flooder was stopped by TCP back-pressure: it got no further than
    // the socket buffers plus what the session buffers.
    assert!(
        written < 16 * MIB,
        "the peer wrote {} MiB: the session kept reading",
        written / MIB
    );
    // The pongs we did send are well-formed.
    let mut head = [0u8; 12];
    rd.read_exact(&mut head).await.unwrap();
    assert_eq!(
        Header::decode(&head).unwrap(),
        Header::new(FrameType::Ping, backchannel_yamux::frame::ACK, 0, 0)
    );
}

/// Stream 1 is never read; stream 3 is read and discarded at once. Each of
/// `rounds` frames of `small` bytes for stream 1 is followed by a 60 KiB
/// frame for stream 3, so they share the connection's read buffers.
/// Returns (heap held while stream 1's data sits unread, bytes it holds,
/// heap held after stream 1 is dropped).
async fn pinned_by_unread_frames(small: usize, rounds: usize) -> (usize, usize, usize) {
    let (mut peer, mut side) = raw_pair(quiet(256 * 1024), Mode::Server).await;
    peer.send(FrameType::WindowUpdate, SYN, 1, 0).await;
    peer.send(FrameType::WindowUpdate, SYN, 3, 0).await;
    let idle = within("accept", side.incoming.accept()).await.unwrap();
    let mut busy = within("accept", side.incoming.accept()).await.unwrap();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            let n = busy.read(&mut buf).await.unwrap();
            if n == 0 {
                return total;
            }
            total += n;
        }
    });
    let big = vec![5u8; 60 * 1024];
    let small_frame = {
        let mut f = Header::new(FrameType::Data, 0, 1, small as u32)
            .encode()
            .to_vec();
        f.extend(std::iter::repeat_n(b'x', small));
        f
    };
    peer.sync().await;
    let base = current();
    // The peer keeps to stream 3's window: it sends a big frame only when
    // our window updates have credited it.
    let credit = tokio::sync::Semaphore::new(256 * 1024);
    let (mut rd, mut wr) = peer.io.split();
    let read_credits = async {
        let mut head = [0u8; 12];
        loop {
            rd.read_exact(&mut head).await.unwrap();
            let h = Header::decode(&head).unwrap();
            assert_ne!(h.ty, FrameType::Data, "we write nothing: {h:?}");
            if h.ty == FrameType::WindowUpdate && h.stream_id == 3 {
                credit.add_permits(h.length as usize);
            }
            // The answer to our ping after the last frame marks the end.
            if h.ty == FrameType::Ping {
                break;
            }
        }
    };
    let send = async {
        for _ in 0..rounds {
            credit
                .acquire_many(big.len() as u32)
                .await
                .unwrap()
                .forget();
            let mut frames = small_frame.clone();
            frames
                .extend_from_slice(&Header::new(FrameType::Data, 0, 3, big.len() as u32).encode());
            frames.extend_from_slice(&big);
            wr.write_all(&frames).await.unwrap();
        }
        wr.write_all(&Header::new(FrameType::Data, backchannel_yamux::frame::FIN, 3, 0).encode())
            .await
            .unwrap();
        wr.write_all(&Header::new(FrameType::Ping, SYN, 0, 1).encode())
            .await
            .unwrap();
    };
    within("the transfer", async { tokio::join!(read_credits, send) }).await;
    let drained = within("stream 3 drained", drain).await.unwrap();
    assert_eq!(drained, rounds * big.len());
    let held = current().saturating_sub(base);
    drop(idle);
    let after = current().saturating_sub(base);
    (held, small * rounds, after)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_unread_frames_do_not_pin_large_read_buffers() {
    let _one = ONE_AT_A_TIME.lock().await;
    // All within stream 1's 256 KiB window. Sliced out of the read buffer,
    // each of these frames would keep a whole read chunk (16..256 KiB)
    // alive: 1000 one-byte frames held ~44 MiB before small frames were
    // copied. Copied, they cost about what they hold.
    for (small, rounds) in [(1, 1000), (1000, 250), (8000, 30)] {
        let (held, unread, after) = pinned_by_unread_frames(small, rounds).await;
        assert!(
            held <= 3 * unread + 512 * 1024,
            "{rounds} unread frames of {small} B ({unread} B) hold {} KiB of heap",
            held / 1024
        );
        // What stays: read buffers a bulk reader keeps for reuse until it
        // goes idle (one being filled, spares up to two read buffers for
        // this window), and copy buffers.
        assert!(
            after < 256 * 1024 + RETAINED,
            "{} KiB still held after the stream was dropped",
            after / 1024
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_unread_frames_pin_a_bounded_multiple_of_the_window() {
    let _one = ONE_AT_A_TIME.lock().await;
    // Frames of 16 KiB and more stay slices of the read buffer: each pins
    // at most one read chunk (up to 256 KiB) plus itself, ~17 times a
    // 16 KiB frame. Measured ~10x; the bound catches anything unbounded.
    for (size, rounds) in [(16 * 1024, 15), (64 * 1024, 3)] {
        let (held, unread, after) = pinned_by_unread_frames(size, rounds).await;
        assert!(
            held <= 20 * unread + 512 * 1024,
            "{rounds} unread frames of {size} B ({unread} B) hold {} KiB of heap",
            held / 1024
        );
        // What stays: read buffers a bulk reader keeps for reuse until it
        // goes idle (one being filled, spares up to two read buffers for
        // this window), and copy buffers.
        assert!(
            after < 256 * 1024 + RETAINED,
            "{} KiB still held after the stream was dropped",
            after / 1024
        );
    }
}
