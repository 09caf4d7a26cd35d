//! The `:authority` rewriter: arbitrary HPACK header blocks, checked
//! against an independent HPACK decoder (fluke-hpack). For every block the
//! reference decodes, the rewritten block decodes too, to the same header
//! list, except that each `:authority` that is not a valid URI authority
//! becomes a valid one of the same length (an empty one stays empty: no
//! valid authority is empty). The block also goes through
//! `AuthorityFix` as HEADERS + CONTINUATION frames, whose output must carry
//! exactly the rewritten block.
#![no_main]

use std::{
    pin::Pin,
    task::{Context, Poll, Waker},
};

use tokio::io::{AsyncRead, ReadBuf};

fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

fn decode(block: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    // The reference panics on some malformed integers: only well-formed
    // blocks go to it.
    if !well_formed(block).0 {
        return None;
    }
    fluke_hpack::Decoder::new().decode(block).ok()
}

/// Whether every representation in `b` has well-formed integers and
/// strings of the announced length (RFC 7541, section 6); and whether a
/// literal names its header by a dynamic-table index.
fn well_formed(b: &[u8]) -> (bool, bool) {
    fn int(b: &[u8], pos: &mut usize, prefix: u8) -> Option<u64> {
        let mask = (1u16 << prefix) as u8 - 1;
        let mut v = u64::from(*b.get(*pos)? & mask);
        *pos += 1;
        if v < u64::from(mask) {
            return Some(v);
        }
        let mut shift = 0;
        loop {
            let byte = *b.get(*pos)?;
            *pos += 1;
            v += u64::from(byte & 0x7f) << shift;
            shift += 7;
            if shift > 28 {
                return None;
            }
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
    }
    fn string(b: &[u8], pos: &mut usize) -> Option<()> {
        let len = int(b, pos, 7)? as usize;
        *pos = pos.checked_add(len).filter(|&e| e <= b.len())?;
        Some(())
    }
    let mut pos = 0;
    let mut dynamic_name = false;
    while pos < b.len() {
        let first = b[pos];
        let ok = if first & 0x80 != 0 {
            int(b, &mut pos, 7).map(|_| ())
        } else if first & 0xe0 == 0x20 {
            int(b, &mut pos, 5).map(|_| ())
        } else {
            let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
            int(b, &mut pos, prefix).and_then(|idx| {
                dynamic_name |= idx > 61;
                if idx == 0 {
                    string(b, &mut pos)?;
                }
                string(b, &mut pos)
            })
        };
        if ok.is_none() {
            return (false, dynamic_name);
        }
    }
    (true, dynamic_name)
}

/// The block as an HTTP/2 client would send it: preface, then HEADERS and
/// CONTINUATION frames split at `split`.
fn frames(block: &[u8], split: usize) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let split = split.min(block.len());
    let parts: Vec<&[u8]> = if split == 0 || split == block.len() {
        vec![block]
    } else {
        vec![&block[..split], &block[split..]]
    };
    for (i, part) in parts.iter().enumerate() {
        let ty = if i == 0 { 0x1 } else { 0x9 };
        let flags = if i + 1 == parts.len() { 0x4 } else { 0 };
        let len = part.len() as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(ty);
        out.push(flags);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Reads everything through `AuthorityFix` (the source is always ready).
fn through_fix(input: &[u8]) -> Option<Vec<u8>> {
    let mut fix = backchannel::AuthorityFix::new(input);
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..100_000 {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut fix).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return Some(out),
            Poll::Ready(Ok(())) => out.extend_from_slice(rb.filled()),
            Poll::Ready(Err(_)) => return None,
            Poll::Pending => panic!("AuthorityFix over a ready source returned Pending"),
        }
    }
    panic!("AuthorityFix did not finish");
}

/// The header block carried by the frames after the preface.
fn block_of(stream: &[u8]) -> Vec<u8> {
    let mut rest = &stream[24..];
    let mut block = Vec::new();
    while rest.len() >= 9 {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        assert!(rest[3] == 0x1 || rest[3] == 0x9, "unexpected frame type {}", rest[3]);
        block.extend_from_slice(&rest[9..9 + len]);
        rest = &rest[9 + len..];
    }
    assert!(rest.is_empty());
    block
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, block)) = data.split_first() else {
        return;
    };
    let fixed = backchannel::rewrite_header_block(block);
    let sent = fixed.as_deref().unwrap_or(block);
    if block.len() < 16_000 {
        if let Some(out) = through_fix(&frames(block, usize::from(split) * 8)) {
            assert_eq!(block_of(&out), sent, "AuthorityFix output differs from the rewrite");
        }
    }
    let Some(orig) = decode(block) else {
        return;
    };
    let dynamic_name = well_formed(block).1;
    let new = decode(sent).expect("the reference decodes the original but not the rewrite");
    assert_eq!(orig.len(), new.len());
    for ((n0, v0), (n1, v1)) in orig.iter().zip(&new) {
        assert_eq!(n0, n1);
        if n0 == b":authority" && !valid_authority(v0) && dynamic_name {
            // Known limit: the rewriter looks for `:authority` by its static
            // index or a literal name, not by a dynamic-table name
            // reference (no encoder in use names it that way); h2 then
            // rejects the stream.
            continue;
        }
        if n0 == b":authority" && !valid_authority(v0) {
            assert_eq!(v0.len(), v1.len(), "rewritten authority changed length");
            // An empty authority has no valid value of the same length: it
            // stays empty (and h2 judges it).
            assert!(v1.is_empty() || valid_authority(v1), "rewritten authority {v1:?} is invalid");
        } else {
            assert_eq!(v0, v1, "header {n0:?} changed");
        }
    }
});
