//! Random frames from a raw peer: whatever arrives, our session answers,
//! ends with an error, or ends cleanly; it never panics or hangs, and its
//! streams never yield more bytes than the peer's data frames carried. 300 seeds, each a fresh
//! session over loopback TCP.

mod common;

use std::time::Duration;

use backchannel_yamux::{
    frame::{FrameType, Header, ACK, FIN, RST, SYN},
    Mode,
};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A random, mostly well-formed stream of frames: valid headers with random
/// types, flags, small stream IDs and lengths (sometimes huge), payloads of
/// the announced size (sometimes cut short), and now and then raw garbage.
/// Returns the bytes and how many payload bytes data frames carry.
fn random_frames(rng: &mut Rng) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut payload = 0;
    for _ in 0..rng.range(1, 40) {
        if rng.range(0, 30) == 0 {
            let n = rng.range(1, 24);
            out.extend((0..n).map(|_| rng.next_u64() as u8));
            continue;
        }
        let ty = match rng.range(0, 9) {
            0..=3 => FrameType::Data,
            4..=6 => FrameType::WindowUpdate,
            7 => FrameType::Ping,
            _ => FrameType::GoAway,
        };
        let flags = [0, SYN, ACK, FIN, RST, SYN | FIN, ACK | RST][rng.range(0, 6)];
        let id = rng.range(0, 9) as u32;
        let length = match rng.range(0, 20) {
            // GoAway codes: mostly the three defined ones (0 ends cleanly,
            // 1 and 2 are fatal), sometimes anything.
            _ if ty == FrameType::GoAway && rng.range(0, 3) != 0 => rng.range(0, 2) as u32,
            0 => u32::MAX - rng.range(0, 3) as u32,
            1 => rng.range(200_000, 600_000) as u32,
            _ => rng.range(0, 2_000) as u32,
        };
        out.extend_from_slice(&Header::new(ty, flags, id, length).encode());
        if ty == FrameType::Data {
            let body = (length as usize).min(rng.range(0, 4_000));
            out.extend((0..body).map(|i| i as u8));
            payload += body;
        }
    }
    (out, payload)
}

/// The data-frame body bytes in `bytes` as a receiver parses them (a body
/// runs for its header's length, whatever the bytes are; a truncated one
/// counts what is there), up to the first header that does not decode: at
/// least what a session that stops at the first protocol error delivers.
fn parsed_payload(bytes: &[u8]) -> usize {
    let (mut pos, mut total) = (0, 0);
    while let Some(head) = bytes.get(pos..pos + 12) {
        let Ok(h) = Header::decode(head.try_into().unwrap()) else {
            break;
        };
        pos += 12;
        if h.ty == FrameType::Data {
            let n = (h.length as usize).min(bytes.len() - pos);
            total += n;
            pos += n;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_never_panic_or_hang() {
    let mut ended_with_error = 0;
    let mut delivered = 0;
    for seed in 1..=300u64 {
        let mut rng = Rng::new(seed);
        let (mut raw, ours) = tcp_pair().await;
        let mode = if seed % 2 == 0 {
            Mode::Server
        } else {
            Mode::Client
        };
        let Side {
            control,
            mut incoming,
            mut conn,
        } = start(ours, quiet(256 * 1024), mode);
        // Accept whatever the peer opens and read it to the end; together
        // the readers can never see more bytes than data frames carried.
        let readers = tokio::spawn(async move {
            let mut tasks = Vec::new();
            while let Some(mut s) = incoming.accept().await {
                tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = 0;
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        got += n;
                    }
                    got
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.expect("a reader panicked");
            }
            total
        });
        let (bytes, _) = random_frames(&mut rng);
        let payload = parsed_payload(&bytes);
        // The session may close on us mid-write: that is fine.
        let _ = raw.write_all(&bytes).await;
        let _ = raw.shutdown().await;
        // Drain what it sends back until it closes, so it never blocks on us.
        let drain = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = raw.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
        let r = within_for(
            Duration::from_secs(10),
            "the session to end after the peer's EOF",
            &mut conn,
        )
        .await
        .unwrap_or_else(|e| panic!("seed {seed}: the connection task panicked: {e}"));
        if r.is_err() {
            ended_with_error += 1;
        }
        drop(control);
        let read = within("readers finish", readers)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(read <= payload, "seed {seed}: read {read} > sent {payload}");
        if read > 0 {
            delivered += 1;
        }
        within("drain", drain).await.unwrap();
    }
    // Most random inputs break the protocol; a few end cleanly (GoAway then
    // EOF). Both must happen, or the generator is not doing its job.
    assert!(ended_with_error > 100, "{ended_with_error}");
    assert!(ended_with_error < 300, "{ended_with_error}");
    assert!(delivered > 10, "only {delivered} seeds delivered any data");
}
