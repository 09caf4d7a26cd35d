//! The yamux frame header (hashicorp's spec, `spec.md`): 12 bytes, big
//! endian.
//!
//! | bytes | field |
//! |---|---|
//! | 0 | version (0) |
//! | 1 | type: 0 Data, 1 WindowUpdate, 2 Ping, 3 GoAway |
//! | 2..4 | flags: SYN 1, ACK 2, FIN 4, RST 8 |
//! | 4..8 | stream ID (0 for Ping and GoAway) |
//! | 8..12 | length: payload size (Data), window delta (WindowUpdate), opaque value (Ping), error code (GoAway) |

use bytes::{BufMut, BytesMut};

/// Size of a frame header.
pub const HEADER_LEN: usize = 12;
/// The only protocol version.
pub const VERSION: u8 = 0;
/// Every stream starts with this receive window, in both directions.
pub const INITIAL_WINDOW: u32 = 256 * 1024;

/// SYN: opens a stream (or asks for a pong).
pub const SYN: u16 = 0x1;
/// ACK: acknowledges a stream open (or answers a ping).
pub const ACK: u16 = 0x2;
/// FIN: the sender's half of the stream is closed.
pub const FIN: u16 = 0x4;
/// RST: the stream is reset.
pub const RST: u16 = 0x8;

/// Frame types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Stream data; the length is the payload size.
    Data = 0,
    /// Adds `length` bytes to the stream's send window.
    WindowUpdate = 1,
    /// Keepalive / round-trip probe; `length` is an opaque value echoed back.
    Ping = 2,
    /// The session is ending; `length` is a [`GoAwayCode`].
    GoAway = 3,
}

/// GoAway error codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum GoAwayCode {
    /// Normal termination.
    Normal = 0,
    /// The peer broke the protocol.
    ProtocolError = 1,
    /// An internal error.
    InternalError = 2,
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub ty: FrameType,
    /// Flags (`SYN`, `ACK`, `FIN`, `RST`).
    pub flags: u16,
    /// Stream ID; 0 for session frames.
    pub stream_id: u32,
    /// Type-dependent length field.
    pub length: u32,
}

/// A header that breaks the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The version byte is not 0.
    #[error("unsupported yamux version {0}")]
    Version(u8),
    /// The type byte is not 0..=3.
    #[error("unknown yamux frame type {0}")]
    Type(u8),
}

impl Header {
    /// A header.
    pub const fn new(ty: FrameType, flags: u16, stream_id: u32, length: u32) -> Self {
        Header {
            ty,
            flags,
            stream_id,
            length,
        }
    }

    /// Encodes the header.
    ///
    /// ```
    /// use backchannel_yamux::frame::{Header, FrameType, SYN};
    /// let b = Header::new(FrameType::WindowUpdate, SYN, 1, 0).encode();
    /// assert_eq!(b, [0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]);
    /// ```
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = VERSION;
        b[1] = self.ty as u8;
        b[2..4].copy_from_slice(&self.flags.to_be_bytes());
        b[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        b[8..12].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Appends the encoded header to `buf`.
    pub fn put(&self, buf: &mut BytesMut) {
        buf.put_slice(&self.encode());
    }

    /// Decodes a header.
    ///
    /// ```
    /// use backchannel_yamux::frame::{Header, FrameType};
    /// let h = Header::decode(&[0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7]).unwrap();
    /// assert_eq!(h, Header::new(FrameType::Ping, 1, 0, 7));
    /// assert!(Header::decode(&[1; 12]).is_err());
    /// ```
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, HeaderError> {
        if b[0] != VERSION {
            return Err(HeaderError::Version(b[0]));
        }
        let ty = match b[1] {
            0 => FrameType::Data,
            1 => FrameType::WindowUpdate,
            2 => FrameType::Ping,
            3 => FrameType::GoAway,
            t => return Err(HeaderError::Type(t)),
        };
        Ok(Header {
            ty,
            flags: u16::from_be_bytes([b[2], b[3]]),
            stream_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            length: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_type_and_flag() {
        for ty in [
            FrameType::Data,
            FrameType::WindowUpdate,
            FrameType::Ping,
            FrameType::GoAway,
        ] {
            for flags in 0..16u16 {
                let h = Header::new(ty, flags, 0xdead_beef, 0x0102_0304);
                assert_eq!(Header::decode(&h.encode()), Ok(h));
            }
        }
    }

    #[test]
    fn rejects_bad_version_and_type() {
        let mut b = Header::new(FrameType::Data, 0, 1, 1).encode();
        b[0] = 1;
        assert_eq!(Header::decode(&b), Err(HeaderError::Version(1)));
        b[0] = 0;
        b[1] = 4;
        assert_eq!(Header::decode(&b), Err(HeaderError::Type(4)));
    }
}
