//! The agent's bearer token (`--token-file`): read from a file, sent as
//! `authorization: Bearer <token>` on Announce, never in plaintext across a
//! network.

use crate::addr::Target;
use std::{net::IpAddr, path::Path};

use anyhow::Context as _;
use tonic::metadata::{Ascii, MetadataValue};

/// Reads the token: the file's content without surrounding whitespace.
pub(crate) fn read(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--token-file: reading {}", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        anyhow::bail!("--token-file: {} is empty", path.display());
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!(
            "--token-file: the token in {} must be printable ASCII without spaces",
            path.display()
        );
    }
    Ok(t.to_string())
}

/// The `authorization` metadata value for `token`.
pub(crate) fn header_value(token: &str) -> anyhow::Result<MetadataValue<Ascii>> {
    let mut v: MetadataValue<Ascii> = format!("Bearer {token}")
        .parse()
        .context("--token-file: the token is not a valid metadata value")?;
    v.set_sensitive(true);
    Ok(v)
}

/// Refuses to send a token in plaintext to a hub that is not on loopback or
/// a Unix socket.
pub(crate) fn check_transport(hub: &Target, tls: bool) -> anyhow::Result<()> {
    let Some(host) = hub.host().filter(|_| !tls) else {
        return Ok(()); // TLS, or a Unix socket
    };
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        anyhow::bail!(
            "--token-file needs TLS (--tls-ca) to a hub that is not on loopback or a Unix socket: \
             a token sent in plaintext could be sniffed and replayed"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    fn check_transport(hub: &str, tls: bool) -> anyhow::Result<()> {
        super::check_transport(&hub.parse().unwrap(), tls)
    }

    #[test]
    fn tokens_stay_off_plaintext_networks() {
        assert!(check_transport("10.0.0.1:7443", false).is_err());
        assert!(check_transport("hub.example.org:7443", false).is_err());
        assert!(check_transport("hub.example.org:7443", true).is_ok());
        assert!(check_transport("127.0.0.1:7443", false).is_ok());
        assert!(check_transport("[::1]:7443", false).is_ok());
        assert!(check_transport("localhost:7443", false).is_ok());
        assert!(check_transport("unix:/run/hub.sock", false).is_ok());
    }
}
