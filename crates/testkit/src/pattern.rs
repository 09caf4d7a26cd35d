//! The byte patterns bulk transfers check: one shared stream (period 251,
//! zero-copy slices) and a pseudo-random one per seed; and the benchmark
//! service that sends and verifies the first.

use std::pin::Pin;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::pb::bench::{self, bench_server::Bench};

/// Length of the repeating per-stream pattern (prime, so chunk sizes never
/// align with it).
const STREAM_PERIOD: usize = 65_521;
/// Longest slice [`stream_slice`] hands out.
pub const STREAM_MAX_SLICE: usize = 1024 * 1024;

fn stream_table() -> &'static [u8] {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut rng = crate::Rng::new(0x9e37_79b9_7f4a_7c15);
        let base: Vec<u8> = (0..STREAM_PERIOD).map(|_| rng.next_u64() as u8).collect();
        (0..STREAM_PERIOD + STREAM_MAX_SLICE)
            .map(|i| base[i % STREAM_PERIOD])
            .collect()
    })
}

/// The `len` bytes (at most [`STREAM_MAX_SLICE`]) at `offset` of stream
/// `seed`'s data: pseudo-random bytes that differ per seed, so bytes
/// delivered to the wrong stream or at the wrong offset are caught.
pub fn stream_slice(seed: u64, offset: u64, len: usize) -> &'static [u8] {
    assert!(
        len <= STREAM_MAX_SLICE,
        "stream_slice: at most 1 MiB at a time"
    );
    let start = ((offset + seed * 7_919) % STREAM_PERIOD as u64) as usize;
    &stream_table()[start..start + len]
}

/// Checks that `got` is stream `seed`'s data at `offset`; panics naming the
/// first wrong byte.
pub fn check_stream(seed: u64, offset: u64, got: &[u8]) {
    for (i, chunk) in got.chunks(STREAM_MAX_SLICE).enumerate() {
        let off = offset + (i * STREAM_MAX_SLICE) as u64;
        let want = stream_slice(seed, off, chunk.len());
        if let Some(bad) = chunk.iter().zip(want).position(|(a, b)| a != b) {
            panic!(
                "stream data {seed}: wrong byte at offset {}",
                off + bad as u64
            );
        }
    }
}

/// Writes `total` bytes of stream `seed` to `w`, in chunks of up to
/// 256 KiB (no shutdown).
pub async fn write_stream<W>(w: &mut W, seed: u64, total: u64)
where
    W: tokio::io::AsyncWrite + Unpin + ?Sized,
{
    use tokio::io::AsyncWriteExt;
    let mut off = 0;
    while off < total {
        let n = (total - off).min(256 * 1024) as usize;
        w.write_all(stream_slice(seed, off, n))
            .await
            .expect("writing the stream");
        off += n as u64;
    }
}

/// Reads `r` to EOF, checking every byte against stream `seed` (panics at
/// the first wrong one); returns the count, or the read error.
pub async fn read_stream<R>(r: &mut R, seed: u64) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin + ?Sized,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 256 * 1024];
    let mut off = 0;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(off);
        }
        check_stream(seed, off, &buf[..n]);
        off += n as u64;
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Byte `i` of every benchmark stream: lets both ends check the data.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

const PATTERN_PERIOD: usize = 251;
/// Longest run of pattern bytes that is a zero-copy slice of the table.
pub const PATTERN_MAX_SLICE: usize = 4 * 1024 * 1024;

/// Pattern bytes from offset 0, long enough that any run of up to
/// [`PATTERN_MAX_SLICE`] bytes starting at `offset % 251` is one slice.
fn pattern_table() -> &'static bytes::Bytes {
    static TABLE: std::sync::OnceLock<bytes::Bytes> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..(PATTERN_MAX_SLICE + PATTERN_PERIOD) as u64)
            .map(pattern_byte)
            .collect::<Vec<_>>()
            .into()
    })
}

/// `n` pattern bytes starting at stream offset `offset`: a zero-copy slice of
/// a shared table when `n` <= [`PATTERN_MAX_SLICE`].
pub fn pattern(offset: u64, n: usize) -> bytes::Bytes {
    if n <= PATTERN_MAX_SLICE {
        let start = (offset % PATTERN_PERIOD as u64) as usize;
        pattern_table().slice(start..start + n)
    } else {
        let mut v = vec![0u8; n];
        fill_pattern(&mut v, offset);
        v.into()
    }
}

/// Calls `f` with consecutive (destination range, pattern slice) pairs.
fn for_pattern_chunks(
    len: usize,
    offset: u64,
    mut f: impl FnMut(std::ops::Range<usize>, &[u8]) -> bool,
) -> bool {
    let table = pattern_table();
    let mut done = 0;
    while done < len {
        let start = ((offset + done as u64) % PATTERN_PERIOD as u64) as usize;
        let n = (len - done).min(PATTERN_MAX_SLICE);
        if !f(done..done + n, &table[start..start + n]) {
            return false;
        }
        done += n;
    }
    true
}

/// Fills `buf` with the pattern starting at stream offset `offset`.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    for_pattern_chunks(buf.len(), offset, |r, p| {
        buf[r].copy_from_slice(p);
        true
    });
}

/// Whether `buf` holds the pattern starting at `offset` (memcmp against the
/// table).
pub fn check_pattern(buf: &[u8], offset: u64) -> bool {
    for_pattern_chunks(buf.len(), offset, |r, p| buf[r] == *p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_helpers_agree_with_the_definition() {
        for (len, offset) in [
            (0usize, 0u64),
            (1, 250),
            (300, 7),
            (200_000, 123_456_789),
            (5 << 20, 3),
        ] {
            let mut buf = vec![0u8; len];
            fill_pattern(&mut buf, offset);
            assert!(buf
                .iter()
                .enumerate()
                .all(|(k, &b)| b == pattern_byte(offset + k as u64)));
            assert!(check_pattern(&buf, offset));
            assert_eq!(pattern(offset, len), buf);
            if len > 0 {
                buf[len / 2] ^= 1;
                assert!(!check_pattern(&buf, offset));
            }
        }
    }
}

/// The benchmark service. `Upload` checks the byte pattern (INVALID_ARGUMENT
/// on mismatch); `Download` produces it as zero-copy slices of a shared
/// table, so the service costs little CPU next to the transport measured.
#[derive(Clone, Debug, Default)]
pub struct BenchService;

#[tonic::async_trait]
impl Bench for BenchService {
    async fn echo(
        &self,
        request: Request<bench::Payload>,
    ) -> Result<Response<bench::Payload>, Status> {
        Ok(Response::new(request.into_inner()))
    }

    async fn upload(
        &self,
        request: Request<Streaming<bench::Payload>>,
    ) -> Result<Response<bench::Summary>, Status> {
        let mut stream = request.into_inner();
        let (mut bytes, mut messages) = (0u64, 0u64);
        while let Some(p) = stream.message().await? {
            if !check_pattern(&p.data, bytes) {
                return Err(Status::invalid_argument(format!(
                    "data mismatch in message {messages}"
                )));
            }
            bytes += p.data.len() as u64;
            messages += 1;
        }
        Ok(Response::new(bench::Summary { bytes, messages }))
    }

    type DownloadStream = BoxStream<bench::Payload>;

    async fn download(
        &self,
        request: Request<bench::DownloadRequest>,
    ) -> Result<Response<Self::DownloadStream>, Status> {
        let r = request.into_inner();
        if r.chunk_size == 0 {
            return Err(Status::invalid_argument("chunk_size must be > 0"));
        }
        let chunk = u64::from(r.chunk_size);
        let total = r.bytes;
        let s = futures::stream::unfold(0u64, move |off| async move {
            if off >= total {
                return None;
            }
            let n = chunk.min(total - off) as usize;
            Some((
                Ok(bench::Payload {
                    data: pattern(off, n),
                }),
                off + n as u64,
            ))
        });
        Ok(Response::new(Box::pin(s)))
    }
}
