//! Valid frame sequences from a peer that respects the protocol (it never
//! overruns a window it was given), interleaved with application calls:
//! opening, accepting (or not: a full backlog), reading (or not: windows
//! exhausted, the buffer budget), writing, half-closing, dropping, and time
//! passing (close timeouts, keepalive). The invariants: no panic, no hang,
//! no stream delivers more than was sent on it, the budget holds.
#![no_main]

mod common;

use std::{
    collections::HashMap,
    future::poll_fn,
    pin::Pin,
    sync::{Arc, Mutex},
    task::Poll,
    time::Duration,
};

use arbitrary::Arbitrary;
use backchannel_yamux::{
    frame::{FrameType, GoAwayCode, Header, StreamId, ACK, FIN, HEADER_LEN, RST, SYN},
    session, Mode, Stream,
};
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

const INITIAL: u64 = 256 * 1024;

#[derive(Arbitrary, Debug)]
enum Op {
    /// The peer opens its stream in slot `s`.
    Open { s: u8 },
    /// The peer sends data on slot `s` (its own stream or ours): `len`
    /// bytes, or all the window it has left.
    Data { s: u8, ours: bool, len: u16, exhaust: bool, fin: bool },
    /// The peer credits our send window.
    Window { s: u8, ours: bool, delta: u16 },
    Fin { s: u8, ours: bool },
    Rst { s: u8, ours: bool },
    Ping { opaque: u32 },
    GoAway { code: u8 },
    /// The application opens a stream.
    AppOpen,
    /// The application accepts one waiting stream, if any.
    AppAccept,
    AppWrite { s: u8, ours: bool, len: u16 },
    AppRead { s: u8, ours: bool },
    AppShutdown { s: u8, ours: bool },
    AppDrop { s: u8, ours: bool },
    /// Virtual time passes.
    Sleep { ms: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    server: bool,
    ops: Vec<Op>,
}

/// What the peer learns from our output.
#[derive(Default)]
struct Seen {
    /// Window credit we granted, per stream, beyond the initial window.
    credit: HashMap<u32, u64>,
    /// Pings we sent, not yet answered.
    pings: Vec<u32>,
}

fn parse_output(mut peer_read: tokio::io::ReadHalf<tokio::io::DuplexStream>, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut head = [0u8; HEADER_LEN];
        loop {
            if peer_read.read_exact(&mut head).await.is_err() {
                return;
            }
            let h = Header::decode(&head).expect("our session sent a bad header");
            match h.ty {
                FrameType::Data => {
                    let mut body = vec![0u8; h.length as usize];
                    if peer_read.read_exact(&mut body).await.is_err() {
                        return;
                    }
                }
                FrameType::WindowUpdate => {
                    *seen.lock().unwrap().credit.entry(h.stream_id).or_default() += u64::from(h.length);
                }
                FrameType::Ping if h.flags & SYN != 0 => seen.lock().unwrap().pings.push(h.length),
                _ => {}
            }
        }
    })
}

fn poll_once<F: std::future::Future>(f: F) -> impl std::future::Future<Output = Option<F::Output>> {
    let mut f = Box::pin(f);
    poll_fn(move |cx| match f.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
}

libfuzzer_sys::fuzz_target!(|input: Input| {
    let mode = if input.server { Mode::Server } else { Mode::Client };
    // IDs the peer opens, and ours.
    let theirs = |s: u8| -> u32 {
        let k = u32::from(s % 8);
        match mode {
            Mode::Server => 2 * k + 1,
            Mode::Client => 2 * k + 2,
        }
    };
    let ours = |s: u8| -> u32 {
        let k = u32::from(s % 8);
        match mode {
            Mode::Server => 2 * k + 2,
            Mode::Client => 2 * k + 1,
        }
    };
    run(Duration::from_secs(3600), async {
        let (a, peer) = tokio::io::duplex(64 * 1024);
        let (control, mut incoming, conn) = session(a, config(), mode);
        let conn = tokio::spawn(conn);
        let (peer_read, mut peer_write) = tokio::io::split(peer);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let parser = parse_output(peer_read, seen.clone());
        let mut streams: HashMap<u32, Stream> = HashMap::new();
        // Per stream: what the peer sent (data bytes), whether it may still.
        let mut sent: HashMap<u32, u64> = HashMap::new();
        let mut opened: HashMap<u32, bool> = HashMap::new();
        let mut delivered: HashMap<u32, u64> = HashMap::new();
        let mut dead = false;
        let mut buf = vec![0u8; 70 * 1024];
        let pick = |s: u8, o: bool| if o { ours(s) } else { theirs(s) };
        for op in input.ops.iter().take(200) {
            let mut frame = Vec::new();
            match *op {
                Op::Open { s } => {
                    let id = theirs(s);
                    if !opened.contains_key(&id) {
                        opened.insert(id, true);
                        frame.extend_from_slice(&Header::syn(StreamId::new(id), 0).encode());
                    }
                }
                Op::Data { s, ours: o, len, exhaust, fin } => {
                    let id = pick(s, o);
                    let open = if o { streams.contains_key(&id) || sent.contains_key(&id) } else { opened.get(&id) == Some(&true) };
                    if open {
                        let credit = seen.lock().unwrap().credit.get(&id).copied().unwrap_or(0);
                        let used = sent.get(&id).copied().unwrap_or(0);
                        let left = (INITIAL + credit).saturating_sub(used);
                        let n = if exhaust { left.min(300 * 1024) } else { u64::from(len).min(left) };
                        *sent.entry(id).or_default() += n;
                        let flags = if fin { FIN } else { 0 };
                        frame.extend_from_slice(&Header::new(FrameType::Data, flags, id, n as u32).encode());
                        frame.resize(frame.len() + n as usize, id as u8);
                        if fin && !o {
                            opened.insert(id, false);
                        }
                    }
                }
                Op::Window { s, ours: o, delta } => {
                    let id = pick(s, o);
                    frame.extend_from_slice(&Header::window_update(StreamId::new(id), u32::from(delta)).encode());
                }
                Op::Fin { s, ours: o } => {
                    let id = pick(s, o);
                    if !o && opened.get(&id) == Some(&true) {
                        opened.insert(id, false);
                    }
                    if o || opened.contains_key(&id) {
                        frame.extend_from_slice(&Header::fin(StreamId::new(id)).encode());
                    }
                }
                Op::Rst { s, ours: o } => {
                    let id = pick(s, o);
                    if o || opened.contains_key(&id) {
                        opened.insert(id, false);
                        frame.extend_from_slice(&Header::rst(StreamId::new(id)).encode());
                    }
                }
                Op::Ping { opaque } => frame.extend_from_slice(&Header::ping(opaque).encode()),
                Op::GoAway { code } => {
                    let code = match code % 3 {
                        0 => GoAwayCode::Normal,
                        1 => GoAwayCode::ProtocolError,
                        _ => GoAwayCode::InternalError,
                    };
                    frame.extend_from_slice(&Header::go_away(code).encode());
                }
                Op::AppOpen => {
                    if let Ok(s) = control.open_stream() {
                        streams.insert(s.id(), s);
                    }
                }
                Op::AppAccept => {
                    if let Some(Some(s)) = poll_once(incoming.accept()).await {
                        streams.insert(s.id(), s);
                    }
                }
                Op::AppWrite { s, ours: o, len } => {
                    if let Some(st) = streams.get_mut(&pick(s, o)) {
                        let n = usize::from(len).min(buf.len());
                        let _ = poll_once(st.write(&buf[..n])).await;
                    }
                }
                Op::AppRead { s, ours: o } => {
                    let id = pick(s, o);
                    if let Some(st) = streams.get_mut(&id) {
                        let mut rb = ReadBuf::new(&mut buf);
                        let r = poll_fn(|cx| Poll::Ready(Pin::new(&mut *st).poll_read(cx, &mut rb))).await;
                        if let Poll::Ready(Ok(())) = r {
                            *delivered.entry(id).or_default() += rb.filled().len() as u64;
                        }
                    }
                }
                Op::AppShutdown { s, ours: o } => {
                    if let Some(st) = streams.get_mut(&pick(s, o)) {
                        let _ = poll_fn(|cx| Poll::Ready(Pin::new(&mut *st).poll_shutdown(cx))).await;
                    }
                }
                Op::AppDrop { s, ours: o } => {
                    streams.remove(&pick(s, o));
                }
                Op::Sleep { ms } => tokio::time::sleep(Duration::from_millis(u64::from(ms % 3000))).await,
            }
            // Answer our pings, as a live peer does.
            for p in std::mem::take(&mut seen.lock().unwrap().pings) {
                frame.extend_from_slice(&Header::pong(p).encode());
            }
            if !dead && !frame.is_empty() && peer_write.write_all(&frame).await.is_err() {
                dead = true;
            }
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            check_budget(&control);
            for (id, n) in &delivered {
                let s = sent.get(id).copied().unwrap_or(0);
                assert!(*n <= s, "stream {id} delivered {n} bytes, {s} were sent");
            }
        }
        let _ = (ACK, RST);
        drop(streams);
        let _ = peer_write.shutdown().await;
        let _ = conn.await.expect("the connection task panicked");
        check_budget(&control);
        drop(control);
        drop(incoming);
        drop(peer_write);
        parser.await.unwrap();
    });
});
