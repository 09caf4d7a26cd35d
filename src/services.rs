//! Example services: `Echo` (served by both roles, answers with its name),
//! `Callback` (server: calls the caller back through its backchannel) and
//! `Bench` (byte-pattern checked throughput service).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::pb::{
    bench::{self, bench_server::Bench},
    testing::{
        callback_server::Callback, echo_client::EchoClient, echo_server::Echo, CallMeBackRequest,
        CallMeBackResponse, EchoRequest, EchoResponse,
    },
};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Answers every call with its own `name`, so callers can tell who answered.
#[derive(Clone, Debug)]
pub struct EchoService {
    /// Put into every response's `server` field.
    pub name: String,
}

impl EchoService {
    /// An Echo service answering as `name`.
    pub fn new(name: impl Into<String>) -> Self {
        EchoService { name: name.into() }
    }

    fn reply(&self, message: String) -> EchoResponse {
        EchoResponse {
            message,
            server: self.name.clone(),
        }
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(self.reply(request.into_inner().message)))
    }

    type ServerStreamStream = BoxStream<EchoResponse>;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let r = request.into_inner();
        let this = self.clone();
        let s = futures::stream::iter(0..r.count)
            .map(move |i| Ok(this.reply(format!("{}-{i}", r.message))));
        Ok(Response::new(Box::pin(s)))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoResponse>, Status> {
        let mut stream = request.into_inner();
        let mut all = String::new();
        while let Some(m) = stream.message().await? {
            all.push_str(&m.message);
        }
        Ok(Response::new(self.reply(all)))
    }

    type BidiStream = BoxStream<EchoResponse>;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let this = self.clone();
        let s = request
            .into_inner()
            .map(move |m| m.map(|m| this.reply(m.message)));
        Ok(Response::new(Box::pin(s)))
    }
}

/// The server's Callback service: calls the calling peer back through the
/// registry.
#[derive(Clone)]
pub struct CallbackService {
    /// Where the peers' backchannels are.
    pub registry: backchannel::Registry,
}

#[tonic::async_trait]
impl Callback for CallbackService {
    async fn call_me_back(
        &self,
        request: Request<CallMeBackRequest>,
    ) -> Result<Response<CallMeBackResponse>, Status> {
        let peer_id = backchannel::RequestExt::peer_id(&request)?;
        let channel = self.registry.backchannel(peer_id)?;
        let r = request.into_inner();
        let reply = EchoClient::new(channel)
            .unary(EchoRequest {
                message: r.message,
                count: 0,
            })
            .await?
            .into_inner();
        Ok(Response::new(CallMeBackResponse {
            peer_id: peer_id.get(),
            reply: Some(reply),
        }))
    }

    type StreamMeBackStream = BoxStream<EchoResponse>;

    async fn stream_me_back(
        &self,
        request: Request<CallMeBackRequest>,
    ) -> Result<Response<Self::StreamMeBackStream>, Status> {
        let channel = self.registry.backchannel_for(&request)?;
        let r = request.into_inner();
        let stream = EchoClient::new(channel)
            .server_stream(EchoRequest {
                message: r.message,
                count: r.count,
            })
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }
}

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
