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

/// A stream ID. Clients open odd IDs, servers even ones; 0 is the session
/// itself (Ping and GoAway frames).
///
/// ```
/// use backchannel_yamux::frame::StreamId;
/// let id = StreamId::new(3);
/// assert!(id.is_client_initiated() && !id.is_server_initiated());
/// assert!(StreamId::new(4).is_server_initiated());
/// assert!(StreamId::SESSION.is_session());
/// assert_eq!(id.get(), 3);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(u32);

impl StreamId {
    /// The session's own ID (0).
    pub const SESSION: StreamId = StreamId(0);

    /// The ID `id`.
    pub const fn new(id: u32) -> Self {
        StreamId(id)
    }

    /// The ID as a number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Whether this is 0, the session's ID.
    pub const fn is_session(self) -> bool {
        self.0 == 0
    }

    /// Whether a client opened it (odd).
    pub const fn is_client_initiated(self) -> bool {
        self.0 & 1 == 1
    }

    /// Whether a server opened it (even, not 0).
    pub const fn is_server_initiated(self) -> bool {
        self.0 != 0 && self.0 & 1 == 0
    }
}

impl From<u32> for StreamId {
    fn from(id: u32) -> Self {
        StreamId(id)
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Named constructors for the frames a session sends.
///
/// ```
/// use backchannel_yamux::frame::{Header, FrameType, GoAwayCode, StreamId, SYN, RST};
/// assert_eq!(Header::syn(StreamId::new(1), 0), Header::new(FrameType::WindowUpdate, SYN, 1, 0));
/// assert_eq!(Header::rst(StreamId::new(2)).flags, RST);
/// assert_eq!(Header::go_away(GoAwayCode::ProtocolError).length, 1);
/// ```
impl Header {
    /// The stream this frame belongs to.
    pub const fn id(&self) -> StreamId {
        StreamId(self.stream_id)
    }

    /// A data frame header for `len` payload bytes.
    pub const fn data(id: StreamId, len: u32) -> Self {
        Header::new(FrameType::Data, 0, id.0, len)
    }

    /// A window update crediting `delta` bytes.
    pub const fn window_update(id: StreamId, delta: u32) -> Self {
        Header::new(FrameType::WindowUpdate, 0, id.0, delta)
    }

    /// Opens a stream, announcing `delta` bytes of window beyond the initial.
    pub const fn syn(id: StreamId, delta: u32) -> Self {
        Header::new(FrameType::WindowUpdate, SYN, id.0, delta)
    }

    /// Accepts a stream, announcing `delta` bytes of window beyond the initial.
    pub const fn ack(id: StreamId, delta: u32) -> Self {
        Header::new(FrameType::WindowUpdate, ACK, id.0, delta)
    }

    /// Closes the sender's half of a stream.
    pub const fn fin(id: StreamId) -> Self {
        Header::new(FrameType::WindowUpdate, FIN, id.0, 0)
    }

    /// Resets a stream.
    pub const fn rst(id: StreamId) -> Self {
        Header::new(FrameType::WindowUpdate, RST, id.0, 0)
    }

    /// A ping asking for an answer with `opaque`.
    pub const fn ping(opaque: u32) -> Self {
        Header::new(FrameType::Ping, SYN, 0, opaque)
    }

    /// The answer to a ping with `opaque`.
    pub const fn pong(opaque: u32) -> Self {
        Header::new(FrameType::Ping, ACK, 0, opaque)
    }

    /// The session is ending, for the reason `code`.
    pub const fn go_away(code: GoAwayCode) -> Self {
        Header::new(FrameType::GoAway, 0, 0, code as u32)
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
