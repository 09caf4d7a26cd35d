//! `AuthorityFix` parses bytes the remote server sends: it must be
//! byte-transparent for well-formed HTTP/2 without bad authorities, rewrite
//! the Gitaly forms, and never panic or hang on garbage.

use backchannel::AuthorityFix;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

use backchannel_testkit::Rng;

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS block: :method POST (static 3), :path literal, :authority literal.
fn headers_block(authority: &str) -> Vec<u8> {
    let mut b = vec![0x83, 0x44, b"/svc/M".len() as u8];
    b.extend_from_slice(b"/svc/M");
    b.push(0x41);
    b.push(authority.len() as u8);
    b.extend_from_slice(authority.as_bytes());
    b
}

/// Pushes `input` through AuthorityFix in random-sized writes and reads.
async fn pipe(input: Vec<u8>, seed: u64) -> std::io::Result<Vec<u8>> {
    let (mut w, r) = tokio::io::duplex(1024);
    let writer = tokio::spawn(async move {
        let mut rng = Rng::new(seed);
        let mut rest = &input[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(700)).min(rest.len());
            if w.write_all(&rest[..n]).await.is_err() {
                return;
            }
            rest = &rest[n..];
        }
    });
    let mut fix = AuthorityFix::new(r);
    let mut out = Vec::new();
    let res = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        fix.read_to_end(&mut out),
    )
    .await
    .expect("AuthorityFix hung");
    drop(fix); // unblocks the writer if we stopped reading early
    writer.await.unwrap();
    res.map(|_| out)
}

#[tokio::test]
async fn well_formed_streams_pass_byte_for_byte() {
    for seed in 1..40u64 {
        let mut rng = Rng::new(seed);
        let mut input = PREFACE.to_vec();
        for i in 0..30 {
            let ty = [0u8, 0, 0, 4, 6, 8, 1][rng.below(7)];
            if ty == 1 {
                let block = headers_block(&format!("host-{i}.example:50051"));
                // Split some header blocks across a CONTINUATION frame.
                if rng.below(2) == 0 {
                    let (a, b) = block.split_at(block.len() / 2);
                    input.extend(frame(1, 0, 1, a));
                    input.extend(frame(9, 4, 1, b));
                } else {
                    input.extend(frame(1, 4, 1, &block));
                }
            } else {
                let len = rng.below(40_000);
                let payload: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                input.extend(frame(ty, 0, 1, &payload));
            }
        }
        let out = pipe(input.clone(), seed).await.unwrap();
        assert!(out == input, "seed {seed}: output differs from input");
    }
}

#[tokio::test]
async fn gitaly_authorities_are_rewritten_and_frames_stay_valid() {
    for (bad, want) in [
        ("multiplexed/127.0.0.1:4242", "multiplexed-127.0.0.1:4242"),
        (
            "multiplexed%2F127.0.0.1:4242",
            "multiplexed-2F127.0.0.1:4242",
        ),
    ] {
        let data = frame(0, 1, 1, b"payload");
        let padded = {
            // PADDED + PRIORITY HEADERS: pad length 3, priority 5 bytes.
            let mut p = vec![3u8, 0, 0, 0, 0, 16];
            p.extend(headers_block(bad));
            p.extend([0, 0, 0]);
            frame(1, 0x4 | 0x8 | 0x20, 3, &p)
        };
        let mut input = PREFACE.to_vec();
        input.extend(frame(1, 4, 1, &headers_block(bad)));
        input.extend(&data);
        input.extend(&padded);
        let out = pipe(input, 7).await.unwrap();
        let mut want_stream = PREFACE.to_vec();
        want_stream.extend(frame(1, 4, 1, &headers_block(want)));
        want_stream.extend(&data);
        let mut p = vec![0u8, 0, 0, 0, 16]; // priority kept, padding dropped
        p.extend(headers_block(want));
        want_stream.extend(frame(1, 0x4 | 0x20, 3, &p));
        assert_eq!(out, want_stream, "{bad}");
    }
}

#[tokio::test]
async fn garbage_never_panics_or_hangs() {
    for seed in 1..300u64 {
        let mut rng = Rng::new(seed);
        let len = rng.below(5000);
        let mut input = PREFACE.to_vec();
        input.extend((0..len).map(|_| {
            // Bias towards HEADERS/CONTINUATION type bytes and small lengths.
            match rng.below(8) {
                0 => 1,
                1 => 9,
                2 => 0x41,
                3 => 0,
                _ => rng.next_u64() as u8,
            }
        }));
        let _ = pipe(input, seed).await;
    }
}

#[tokio::test]
async fn oversized_header_block_is_an_error_not_unbounded_memory() {
    let mut input = PREFACE.to_vec();
    // CONTINUATIONs without END_HEADERS, 64 x 16 KiB + more.
    input.extend(frame(1, 0, 1, &[0u8; 16_384]));
    for _ in 0..80 {
        input.extend(frame(9, 0, 1, &[0u8; 16_384]));
    }
    let err = pipe(input, 3).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
}
