//! Telling a TLS mismatch apart from other connect failures: a plaintext
//! agent talking to a TLS hub only sees its session die, because the hub's
//! answer (a TLS alert) is not yamux. On such a failure the agent probes the
//! hub once with the magic and looks at the first bytes of the answer.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::addr::Target;

/// Whether the hub at `hub` answers
/// a plaintext backchannel hello with a TLS record (content type 20-23,
/// version 3.x), within `timeout`.
pub async fn hub_speaks_tls(hub: &Target, timeout: Duration) -> bool {
    let probe = async {
        let mut hello = backchannel::MAGIC.to_vec();
        // A yamux SYN for stream 1, as a client sends.
        hello.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]);
        let mut buf = [0u8; 3];
        match hub {
            Target::Unix(path) => {
                let mut s = tokio::net::UnixStream::connect(path).await?;
                s.write_all(&hello).await?;
                s.read_exact(&mut buf).await?;
            }
            Target::Tcp { .. } => {
                let mut s = tokio::net::TcpStream::connect(hub.to_string()).await?;
                s.write_all(&hello).await?;
                s.read_exact(&mut buf).await?;
            }
        }
        Ok::<_, std::io::Error>(buf)
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(b)) => (20..=23).contains(&b[0]) && b[1] == 3,
        _ => false,
    }
}
