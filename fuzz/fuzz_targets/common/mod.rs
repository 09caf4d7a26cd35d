//! The harness shared by the yamux targets: our session over an in-memory
//! pipe, a peer side fed by the fuzzer, readers that count what each stream
//! delivers, and the invariants.

#![allow(dead_code)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use backchannel_yamux::{
    frame::{FrameType, Header, HEADER_LEN},
    session, Config, Control, Mode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// The session's buffer budget in the targets: small, so it is reached.
pub const BUDGET: usize = 512 * 1024;

/// Settings that reach every limit quickly: tiny backlog and stream cap,
/// short timeouts (the runtime's clock is paused, so they cost nothing).
pub fn config() -> Config {
    Config::default()
        .with_max_stream_window(256 * 1024)
        .with_accept_backlog(2)
        .with_max_streams(8)
        .with_keepalive(Some(Duration::from_secs(1)))
        .with_keepalive_timeout(Duration::from_secs(1))
        .with_write_timeout(Duration::from_secs(1))
        .with_stream_close_timeout(Duration::from_secs(2))
        .with_max_buffered(BUDGET)
}

thread_local! {
    static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
}

/// Runs `f` on a single-threaded runtime with a paused clock (timers fire
/// as soon as nothing else can run), failing if it takes more than
/// `limit` of virtual time: a hang.
pub fn run<F: std::future::Future<Output = ()>>(limit: Duration, f: F) {
    RT.with(|rt| {
        rt.block_on(async {
            if tokio::time::timeout(limit, f).await.is_err() {
                panic!("no progress within {limit:?} of virtual time: a hang");
            }
        })
    });
}

/// Bytes each stream delivered to its reader.
#[derive(Clone, Default)]
pub struct Delivered(pub Arc<Mutex<HashMap<u32, usize>>>);

impl Delivered {
    pub fn add(&self, id: u32, n: usize) {
        *self.0.lock().unwrap().entry(id).or_default() += n;
    }
    pub fn get(&self) -> HashMap<u32, usize> {
        self.0.lock().unwrap().clone()
    }
}

/// Payload bytes that data frames in `input` carry per stream, parsed the
/// way a session reads them (up to the first undecodable header).
pub fn payload_per_stream(input: &[u8]) -> HashMap<u32, usize> {
    let mut sent = HashMap::new();
    let mut rest = input;
    while let Some(head) = rest.first_chunk::<HEADER_LEN>() {
        let Ok(h) = Header::decode(head) else { break };
        rest = &rest[HEADER_LEN..];
        if h.ty == FrameType::Data {
            let n = (h.length as usize).min(rest.len());
            *sent.entry(h.stream_id).or_default() += n;
            rest = &rest[n..];
        }
    }
    sent
}

/// Checks that no stream delivered more than was sent for it.
pub fn check_delivered(delivered: &Delivered, sent: &HashMap<u32, usize>) {
    for (id, n) in delivered.get() {
        let s = sent.get(&id).copied().unwrap_or(0);
        assert!(n <= s, "stream {id} delivered {n} bytes, {s} were sent");
    }
}

/// Checks the buffer budget.
pub fn check_budget(control: &Control) {
    let b = control.buffered_bytes();
    assert!(b <= BUDGET, "{b} bytes buffered, budget {BUDGET}");
}

/// Reads everything the session writes, until EOF, so it never blocks.
pub fn drain(mut peer_read: tokio::io::ReadHalf<DuplexStream>) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = peer_read.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if out.len() < 1 << 20 {
                out.extend_from_slice(&buf[..n]);
            }
        }
        out
    })
}

/// Accepts every stream the peer opens; reads most of them to the end
/// (counting bytes and checking the budget), leaves every third unread.
pub fn accept_all(
    mut incoming: backchannel_yamux::Incoming,
    control: Control,
    delivered: Delivered,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut readers = Vec::new();
        while let Some(mut s) = incoming.accept().await {
            if s.id() % 3 == 0 {
                held.push(s);
                continue;
            }
            let delivered = delivered.clone();
            let control = control.clone();
            readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    delivered.add(s.id(), n);
                    check_budget(&control);
                }
            }));
        }
        for r in readers {
            r.await.unwrap();
        }
        drop(held);
    })
}

/// Feeds `input` to a session in `mode` as the peer, then EOF; checks the
/// invariants.
pub fn raw_bytes(input: &[u8], mode: Mode) {
    let sent = payload_per_stream(input);
    run(Duration::from_secs(600), async {
        let (ours, peer) = tokio::io::duplex(64 * 1024);
        let (control, incoming, conn) = session(ours, config(), mode);
        let conn = tokio::spawn(conn);
        let (peer_read, mut peer_write) = tokio::io::split(peer);
        let drained = drain(peer_read);
        let delivered = Delivered::default();
        let acceptor = accept_all(incoming, control.clone(), delivered.clone());
        // A stream of our own, written while the input arrives.
        let mut mine = control.open_stream().ok();
        for chunk in input.chunks(700) {
            if peer_write.write_all(chunk).await.is_err() {
                break;
            }
            if let Some(s) = mine.as_mut() {
                let _ = s.write(chunk).await;
            }
            check_budget(&control);
            tokio::task::yield_now().await;
        }
        drop(mine);
        let _ = peer_write.shutdown().await;
        let _ = conn.await.expect("the connection task panicked");
        check_budget(&control);
        drop(control);
        acceptor.await.expect("a reader panicked");
        drop(peer_write);
        drained.await.unwrap();
        check_delivered(&delivered, &sent);
    });
}
