//! Accepting reverse calls whose `:authority` h2 would reject.
//!
//! Gitaly's Go server dials the backchannel with the target
//! `multiplexed/<remote addr>`, so its reverse calls carry that as
//! `:authority`; grpc-go 1.57 and later percent-encode it as
//! `multiplexed%2F<remote addr>`. Neither is a valid URI authority, and h2's
//! server resets such a stream as malformed before any application code runs.
//!
//! [`AuthorityFix`] sits between the yamux stream and h2 on the client's
//! inbound connections. It passes bytes through untouched, looking only at
//! HTTP/2 frame headers, except for header blocks (HEADERS + CONTINUATION):
//! those it decodes just far enough to find literal `:authority` values that
//! do not parse, and rewrites them to a valid value **of the same decoded
//! length** (`/` and `%` become `-`; if that is still invalid, every byte
//! becomes `x`). Keeping the decoded length keeps HPACK's dynamic table sizes
//! identical on both sides, so later indexed references stay in step (they
//! then resolve to the rewritten value). Header blocks without a bad
//! authority are forwarded byte for byte; DATA frames are never copied.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Frames we emit are at most the HTTP/2 default maximum frame size, which
/// every peer must accept.
const MAX_EMIT_FRAME: usize = 16_384;
/// Largest header block we buffer before giving up on the connection.
const MAX_HEADER_BLOCK: usize = 1 << 20;

#[derive(Clone, Copy, Debug)]
enum Scan {
    Preface(usize),
    Header,
    Payload(usize),
}

/// Wraps the server-to-client direction of an inbound HTTP/2 connection; see
/// the module docs.
///
/// ```
/// let (a, _b) = tokio::io::duplex(1024);
/// let fixed = backchannel::AuthorityFix::new(a); // read it as an HTTP/2 server would
/// # drop(fixed);
/// ```
pub struct AuthorityFix<T> {
    inner: T,
    scan: Scan,
    /// Bytes read but not yet classified (a partial frame header, a header
    /// block being collected).
    pending: BytesMut,
    /// Bytes ready to be handed to the reader.
    ready: BytesMut,
    /// Frames of the header block being collected.
    block: Vec<BytesMut>,
    block_len: usize,
}

impl<T: std::fmt::Debug> std::fmt::Debug for AuthorityFix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("inner", &self.inner)
            .field("scan", &self.scan)
            .field(
                "buffered",
                &(self.pending.len() + self.ready.len() + self.block_len),
            )
            .finish()
    }
}

impl<T> AuthorityFix<T> {
    /// Wraps the server side of an HTTP/2 connection (it starts with the
    /// client preface).
    pub fn new(inner: T) -> Self {
        AuthorityFix {
            inner,
            scan: Scan::Preface(PREFACE_LEN),
            pending: BytesMut::new(),
            ready: BytesMut::new(),
            block: Vec::new(),
            block_len: 0,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Advances the frame scanner over `data`; returns how many bytes may pass
    /// untouched. Stops before a frame header that is incomplete or starts a
    /// header block.
    fn scan(state: &mut Scan, data: &[u8]) -> usize {
        let mut i = 0;
        loop {
            match state {
                Scan::Preface(rem) | Scan::Payload(rem) => {
                    let k = (*rem).min(data.len() - i);
                    i += k;
                    *rem -= k;
                    if *rem > 0 {
                        return i;
                    }
                    *state = Scan::Header;
                }
                Scan::Header => {
                    if data.len() - i < FRAME_HEADER_LEN {
                        return i;
                    }
                    let ty = data[i + 3];
                    if ty == TYPE_HEADERS || ty == TYPE_CONTINUATION {
                        return i;
                    }
                    let len = u24(&data[i..]);
                    i += FRAME_HEADER_LEN;
                    *state = Scan::Payload(len);
                }
            }
        }
    }

    /// Moves what can be decided from `pending` into `ready`.
    fn process_pending(&mut self) -> io::Result<()> {
        loop {
            let n = Self::scan(&mut self.scan, &self.pending);
            if n > 0 {
                let b = self.pending.split_to(n);
                self.ready.extend_from_slice(&b);
                continue;
            }
            if self.pending.len() < FRAME_HEADER_LEN {
                return Ok(());
            }
            let len = u24(&self.pending);
            if self.block_len + len > MAX_HEADER_BLOCK {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "HTTP/2 header block too large",
                ));
            }
            if self.pending.len() < FRAME_HEADER_LEN + len {
                self.pending
                    .reserve(FRAME_HEADER_LEN + len - self.pending.len());
                return Ok(());
            }
            let flags = self.pending[4];
            let frame = self.pending.split_to(FRAME_HEADER_LEN + len);
            self.block_len += frame.len();
            self.block.push(frame);
            if flags & FLAG_END_HEADERS != 0 {
                let frames = std::mem::take(&mut self.block);
                self.block_len = 0;
                emit_block(frames, &mut self.ready);
            }
        }
    }
}

fn u24(b: &[u8]) -> usize {
    (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2])
}

/// Emits a complete header block, rewritten if it carries a bad authority.
fn emit_block(frames: Vec<BytesMut>, out: &mut BytesMut) {
    if let Some(rewritten) = rewrite_block(&frames) {
        out.extend_from_slice(&rewritten);
    } else {
        for f in frames {
            out.extend_from_slice(&f);
        }
    }
}

/// Returns new frames for the block when an authority had to be rewritten.
fn rewrite_block(frames: &[BytesMut]) -> Option<Vec<u8>> {
    let first = frames.first()?;
    if first[3] != TYPE_HEADERS {
        return None;
    }
    let flags = first[4];
    let stream_id = &first[5..9];
    let mut payload = &first[FRAME_HEADER_LEN..];
    if flags & FLAG_PADDED != 0 {
        let pad = usize::from(*payload.first()?);
        payload = payload.get(1..payload.len().checked_sub(pad)?)?;
    }
    let mut priority: &[u8] = &[];
    if flags & FLAG_PRIORITY != 0 {
        priority = payload.get(..5)?;
        payload = &payload[5..];
    }
    let mut fragment = payload.to_vec();
    for f in &frames[1..] {
        fragment.extend_from_slice(&f[FRAME_HEADER_LEN..]);
    }
    let block = hpack::rewrite_authority(&fragment)?;

    let mut out = Vec::with_capacity(
        block.len() + priority.len() + FRAME_HEADER_LEN * (1 + block.len() / MAX_EMIT_FRAME),
    );
    let mut rest: &[u8] = &block;
    let mut first_frame = true;
    loop {
        let room = if first_frame {
            MAX_EMIT_FRAME - priority.len()
        } else {
            MAX_EMIT_FRAME
        };
        let (chunk, tail) = rest.split_at(rest.len().min(room));
        rest = tail;
        let last = rest.is_empty();
        let (ty, mut fl) = if first_frame {
            (TYPE_HEADERS, flags & !(FLAG_PADDED | FLAG_END_HEADERS))
        } else {
            (TYPE_CONTINUATION, 0)
        };
        if last {
            fl |= FLAG_END_HEADERS;
        }
        let len = chunk.len() + if first_frame { priority.len() } else { 0 };
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, fl]);
        out.extend_from_slice(stream_id);
        if first_frame {
            out.extend_from_slice(priority);
        }
        out.extend_from_slice(chunk);
        first_frame = false;
        if last {
            return Some(out);
        }
    }
}

/// The minimum of HPACK (RFC 7541) needed to find and rewrite `:authority`.
pub(crate) mod hpack {
    /// Static table index of `:authority`.
    const AUTHORITY_INDEX: u64 = 1;

    fn read_int(buf: &[u8], pos: &mut usize, prefix_bits: u8) -> Option<u64> {
        let mask = (1u16 << prefix_bits) as u8 - 1;
        let mut v = u64::from(*buf.get(*pos)? & mask);
        *pos += 1;
        if v < u64::from(mask) {
            return Some(v);
        }
        let mut shift = 0u32;
        loop {
            let b = *buf.get(*pos)?;
            *pos += 1;
            v = v.checked_add(u64::from(b & 0x7f).checked_shl(shift)?)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
            shift += 7;
            if shift > 56 {
                return None;
            }
        }
    }

    fn write_int(out: &mut Vec<u8>, flags: u8, prefix_bits: u8, mut v: u64) {
        let mask = (1u16 << prefix_bits) as u8 - 1;
        if v < u64::from(mask) {
            out.push(flags | v as u8);
            return;
        }
        out.push(flags | mask);
        v -= u64::from(mask);
        while v >= 128 {
            out.push((v as u8 & 0x7f) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A string literal: `(huffman, start, end)` of its bytes in the block.
    fn read_string(buf: &[u8], pos: &mut usize) -> Option<(bool, usize, usize)> {
        let huffman = *buf.get(*pos)? & 0x80 != 0;
        let len = usize::try_from(read_int(buf, pos, 7)?).ok()?;
        let start = *pos;
        let end = start.checked_add(len)?;
        if end > buf.len() {
            return None;
        }
        *pos = end;
        Some((huffman, start, end))
    }

    fn decode(buf: &[u8], (huffman, start, end): (bool, usize, usize)) -> Option<Vec<u8>> {
        let raw = &buf[start..end];
        if !huffman {
            return Some(raw.to_vec());
        }
        let mut out = Vec::with_capacity(raw.len() * 8 / 5 + 1);
        httlib_huffman::decode(raw, &mut out, httlib_huffman::DecoderSpeed::FourBits).ok()?;
        Some(out)
    }

    fn valid_authority(v: &[u8]) -> bool {
        http::uri::Authority::try_from(v).is_ok()
    }

    /// A valid authority of the same length: `/` and `%` become `-`, or, if
    /// that is not enough, every byte becomes `x`.
    pub(crate) fn sanitize(v: &[u8]) -> Vec<u8> {
        let mut s: Vec<u8> = v
            .iter()
            .map(|&b| if b == b'/' || b == b'%' { b'-' } else { b })
            .collect();
        if !valid_authority(&s) {
            s = vec![b'x'; v.len()];
        }
        s
    }

    /// Rewrites invalid literal `:authority` values in a header block.
    /// Returns `None` when nothing needs changing (or the block does not
    /// parse; h2 will then judge it itself).
    pub(crate) fn rewrite_authority(block: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0; // block[..copied] is already in `out`
        let mut pos = 0;
        while pos < block.len() {
            let b = block[pos];
            let name_index = if b & 0x80 != 0 {
                read_int(block, &mut pos, 7)?;
                continue;
            } else if b & 0xc0 == 0x40 {
                read_int(block, &mut pos, 6)?
            } else if b & 0xe0 == 0x20 {
                read_int(block, &mut pos, 5)?;
                continue;
            } else {
                read_int(block, &mut pos, 4)?
            };
            let is_authority = if name_index == 0 {
                let name = read_string(block, &mut pos)?;
                decode(block, name)? == b":authority"
            } else {
                name_index == AUTHORITY_INDEX
            };
            let value_at = pos;
            let value = read_string(block, &mut pos)?;
            if !is_authority {
                continue;
            }
            let decoded = decode(block, value)?;
            if valid_authority(&decoded) {
                continue;
            }
            let fixed = sanitize(&decoded);
            let o = out.get_or_insert_with(|| Vec::with_capacity(block.len() + 16));
            o.extend_from_slice(&block[copied..value_at]);
            write_int(o, 0x00, 7, fixed.len() as u64);
            o.extend_from_slice(&fixed);
            copied = pos;
        }
        let mut o = out?;
        o.extend_from_slice(&block[copied..]);
        Some(o)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn huff(s: &str) -> Vec<u8> {
            let mut v = Vec::new();
            httlib_huffman::encode(s.as_bytes(), &mut v).unwrap();
            v
        }

        fn literal_indexed_name(index: u8, value: &[u8], huffman: bool) -> Vec<u8> {
            let mut b = vec![0x40 | index];
            write_int(
                &mut b,
                if huffman { 0x80 } else { 0 },
                7,
                value.len() as u64,
            );
            b.extend_from_slice(value);
            b
        }

        fn authority_of(block: &[u8]) -> Vec<u8> {
            let mut pos = 1;
            let v = read_string(block, &mut pos).unwrap();
            decode(block, v).unwrap()
        }

        #[test]
        fn rewrites_slash_and_percent_forms_raw_and_huffman() {
            for (input, want) in [
                ("multiplexed/127.0.0.1:4242", "multiplexed-127.0.0.1:4242"),
                (
                    "multiplexed%2F127.0.0.1:4242",
                    "multiplexed-2F127.0.0.1:4242",
                ),
                ("multiplexed/[::1]:4242", "multiplexed-[::1]:4242"),
                ("multiplexed/a b", "xxxxxxxxxxxxxxx"),
            ] {
                for huffman in [false, true] {
                    let value = if huffman {
                        huff(input)
                    } else {
                        input.as_bytes().to_vec()
                    };
                    let mut block = literal_indexed_name(1, &value, huffman);
                    block.extend_from_slice(&[0x82, 0x86]); // :method GET, :scheme http
                    let out = rewrite_authority(&block).expect("rewritten");
                    assert_eq!(
                        authority_of(&out),
                        want.as_bytes(),
                        "{input} huffman={huffman}"
                    );
                    assert_eq!(want.len(), input.len(), "decoded length must not change");
                    assert!(out.ends_with(&[0x82, 0x86]));
                }
            }
        }

        #[test]
        fn leaves_valid_authority_and_other_headers_alone() {
            let mut block = literal_indexed_name(1, b"localhost:50051", false);
            block.extend(literal_indexed_name(4, b"/a/b", false)); // :path with slashes
            assert!(rewrite_authority(&block).is_none());
        }

        #[test]
        fn literal_name_authority_is_found() {
            let mut block = vec![0x00];
            write_int(&mut block, 0, 7, 10);
            block.extend_from_slice(b":authority");
            write_int(&mut block, 0, 7, 13);
            block.extend_from_slice(b"multiplexed/x");
            let out = rewrite_authority(&block).unwrap();
            assert!(out.ends_with(b"multiplexed-x"));
        }

        #[test]
        fn truncated_blocks_are_left_to_h2() {
            let block = literal_indexed_name(1, b"multiplexed/127.0.0.1:1", false);
            for cut in 0..block.len() {
                let _ = rewrite_authority(&block[..cut]);
            }
            assert!(rewrite_authority(&[0x41, 0x7f]).is_none());
            assert!(rewrite_authority(&[
                0x41, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ])
            .is_none());
        }

        #[test]
        fn long_integers_round_trip() {
            for v in [0u64, 1, 126, 127, 128, 300, 16_384, 1 << 30] {
                let mut b = Vec::new();
                write_int(&mut b, 0, 7, v);
                let mut pos = 0;
                assert_eq!(read_int(&b, &mut pos, 7), Some(v));
                assert_eq!(pos, b.len());
            }
        }
    }
}

/// The header-block rewriter on its own, for the fuzz targets: the block
/// with invalid literal `:authority` values rewritten, or `None` if nothing
/// changes. Not a stable API.
#[doc(hidden)]
pub fn rewrite_header_block(block: &[u8]) -> Option<Vec<u8>> {
    hpack::rewrite_authority(block)
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(buf.remaining());
                buf.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if !this.pending.is_empty() || !this.block.is_empty() {
                // Slow path: completing a frame header or a header block.
                this.process_pending()?;
                if !this.ready.is_empty() {
                    continue;
                }
                let mut tmp = [0u8; 8192];
                let mut rb = ReadBuf::new(&mut tmp);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                if rb.filled().is_empty() {
                    // EOF inside a frame: hand over what we have; h2 reports it.
                    this.ready.extend_from_slice(&this.pending);
                    this.pending.clear();
                    for f in this.block.drain(..) {
                        this.ready.extend_from_slice(&f);
                    }
                    if this.ready.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                this.pending.extend_from_slice(rb.filled());
                continue;
            }
            // Fast path: read straight into the caller's buffer, then cut it
            // where a header block (or an incomplete frame header) starts.
            let start = buf.filled().len();
            ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
            let filled = buf.filled();
            if filled.len() == start {
                return Poll::Ready(Ok(()));
            }
            let pass = Self::scan(&mut this.scan, &filled[start..]);
            if start + pass < filled.len() {
                this.pending.extend_from_slice(&filled[start + pass..]);
                buf.set_filled(start + pass);
                if pass == 0 {
                    continue;
                }
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
