//! What a stranger sends on the raw lane: a tunnel request (after the
//! magic the hub sniffed), an opener's view of the answer, and the framed
//! bytes of an accepted tunnel between caller and hub. None may panic or
//! hang; an accepted request satisfies the documented limits; the frame
//! reader yields exactly the data of the frames, ends cleanly only at the
//! end frame, and every other ending is an error.
#![no_main]

use std::time::Duration;

use arbitrary::Arbitrary;
use backchannel::{tunnel, IncomingTunnel, TunnelError, TunnelRequest};
use backchannel_sidecar::tunnel::frames::{FrameReader, MAX_FRAME};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

#[derive(Arbitrary, Debug)]
struct Input {
    request: Vec<u8>,
    answer: Vec<u8>,
    frames: Vec<u8>,
}

/// How a framed byte stream ends, decoded independently of the reader.
#[derive(Debug, PartialEq)]
enum End {
    Fin,
    Failed,
}

fn reference_frames(mut rest: &[u8]) -> (Vec<u8>, End) {
    let mut data = Vec::new();
    loop {
        if rest.len() < 4 {
            return (data, End::Failed);
        }
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        rest = &rest[4..];
        match n {
            0 => return (data, End::Fin),
            u32::MAX => return (data, End::Failed),
            n if n as usize > MAX_FRAME => return (data, End::Failed),
            n => {
                let take = (n as usize).min(rest.len());
                data.extend_from_slice(&rest[..take]);
                if take < n as usize {
                    return (data, End::Failed);
                }
                rest = &rest[take..];
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        // The hub reading a request: bounded, never a panic.
        let io = tokio::io::join(&input.request[..], tokio::io::sink());
        if let Ok(t) = IncomingTunnel::read_request(io, "fuzz", Duration::from_secs(1)).await {
            let s = t.service();
            assert!(!s.is_empty() && s.len() <= tunnel::MAX_SERVICE_LEN, "{s:?}");
            assert!(input.request.len() >= 2 + 1 + s.len());
            for (k, _) in t.request().metadata_entries() {
                assert!(!k.is_empty() && k.len() <= 64, "{k:?}");
            }
        }

        // An opener reading the answer: accepted only on a complete "0" answer.
        let io = tokio::io::join(&input.answer[..], tokio::io::sink());
        let r = tunnel::connect(io, TunnelRequest::new("svc"), "fuzz").await;
        match r {
            Ok(_) => {
                assert_eq!(input.answer[0], 0);
                let len = u16::from_be_bytes([input.answer[1], input.answer[2]]) as usize;
                assert!(input.answer.len() >= 3 + len.min(tunnel::MAX_REASON));
            }
            Err(TunnelError::Refused { .. }) => assert_ne!(input.answer[0], 0),
            Err(_) => {}
        }

        // The framed lane: exactly the frames' data, a clean end only at
        // the end frame.
        let mut reader = FrameReader::new(&input.frames[..]);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        let end = loop {
            match reader.read(&mut buf).await {
                Ok(0) => break End::Fin,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => break End::Failed,
            }
        };
        let (want, want_end) = reference_frames(&input.frames);
        assert_eq!(end, want_end);
        assert_eq!(got, want);
    });
});
