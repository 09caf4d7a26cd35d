//! The start of the client's HTTP/2 connection on stream 1: the 24-byte
//! connection preface and the SETTINGS frame that must follow it (RFC 9113
//! §3.4). A session becomes a peer only once both have arrived.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The HTTP/2 client connection preface.
pub(crate) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest SETTINGS payload accepted before the connection is a peer (the
/// default HTTP/2 maximum frame size; real clients send well under 100 bytes).
const MAX_SETTINGS_LEN: usize = 16_384;

/// Why stream 1 did not start like an HTTP/2 connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PrefaceError {
    /// Reading the stream failed or it ended early.
    #[error("reading the HTTP/2 preface: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not an HTTP/2 client preface followed by SETTINGS.
    #[error("stream 1 is not an HTTP/2 connection: {0}")]
    Invalid(&'static str),
}

/// Reads the preface and the first frame, which must be a SETTINGS frame
/// (not an ACK) on stream 0. Returns every byte read, to be replayed to the
/// HTTP/2 server.
pub(crate) async fn read_h2_start<R: AsyncRead + Unpin>(r: &mut R) -> Result<Bytes, PrefaceError> {
    let mut buf = vec![0u8; PREFACE.len() + 9];
    r.read_exact(&mut buf).await?;
    if &buf[..PREFACE.len()] != PREFACE {
        return Err(PrefaceError::Invalid("wrong connection preface"));
    }
    let h = &buf[PREFACE.len()..];
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let (kind, flags) = (h[3], h[4]);
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    if kind != 0x4 || flags & 0x1 != 0 || stream != 0 {
        return Err(PrefaceError::Invalid("the first frame is not SETTINGS"));
    }
    if len % 6 != 0 || len > MAX_SETTINGS_LEN {
        return Err(PrefaceError::Invalid("bad SETTINGS length"));
    }
    let start = buf.len();
    buf.resize(start + len, 0);
    r.read_exact(&mut buf[start..]).await?;
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_preface_and_settings_and_returns_every_byte() {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        input.extend_from_slice(b"rest");
        let mut r = &input[..];
        let got = read_h2_start(&mut r).await.unwrap();
        assert_eq!(&got[..], &input[..input.len() - 4]);
        assert_eq!(r, b"rest");
    }

    #[tokio::test]
    async fn rejects_other_bytes() {
        let mut r = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789"[..];
        assert!(matches!(
            read_h2_start(&mut r).await,
            Err(PrefaceError::Invalid(_))
        ));
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&[0, 0, 0, 6, 0, 0, 0, 0, 0]); // PING first
        assert!(matches!(
            read_h2_start(&mut &input[..]).await,
            Err(PrefaceError::Invalid(_))
        ));
        let mut r = &PREFACE[..10];
        assert!(matches!(
            read_h2_start(&mut r).await,
            Err(PrefaceError::Io(_))
        ));
    }
}
