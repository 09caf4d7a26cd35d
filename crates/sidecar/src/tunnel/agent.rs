//! `backchannel agent --expose-tcp NAME=HOST:PORT`: tunnel service `NAME`
//! connects to `HOST:PORT` for each tunnel the hub opens, and relays.

use std::time::Duration;

use backchannel::{IncomingTunnel, RefusalKind, Tunnels};
use tokio::net::TcpStream;
use tracing::{debug, Instrument};

/// How long connecting to the exposed TCP service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Parses `NAME=HOST:PORT`.
///
/// ```
/// use backchannel_sidecar::tunnel::agent::parse_expose_tcp;
/// assert_eq!(parse_expose_tcp("ssh=127.0.0.1:22").unwrap(), ("ssh".into(), "127.0.0.1:22".into()));
/// assert!(parse_expose_tcp("ssh").is_err());
/// assert!(parse_expose_tcp("bad name=127.0.0.1:22").is_err());
/// assert!(parse_expose_tcp("ssh=nowhere").is_err());
/// ```
pub fn parse_expose_tcp(s: &str) -> Result<(String, String), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=HOST:PORT"))?;
    let ok_name = !name.is_empty()
        && name.len() <= backchannel::tunnel::MAX_SERVICE_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@/".contains(&b));
    if !ok_name {
        return Err(format!(
            "tunnel service name '{name}': ASCII letters, digits and ._-:@/, at most 128 bytes"
        ));
    }
    crate::hub::flags::host_port(addr).map_err(|e| format!("'{addr}': {e}"))?;
    Ok((name.to_string(), addr.to_string()))
}

/// The tunnel services for `exposed` (`(NAME, HOST:PORT)` pairs).
pub fn tunnels(exposed: &[(String, String)]) -> Tunnels {
    let mut t = Tunnels::new();
    for (name, addr) in exposed {
        let addr = addr.clone();
        t = t.handle(name.clone(), move |incoming| {
            let addr = addr.clone();
            let span = tracing::info_span!("tunnel", service = incoming.service(), to = %addr,
                caller = incoming.request().metadata("caller").unwrap_or(""));
            serve(incoming, addr).instrument(span)
        });
    }
    t
}

async fn serve(incoming: IncomingTunnel, addr: String) {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let reason = format!("the agent cannot connect to {addr}: {e}");
            debug!(%reason, "tunnel refused");
            let _ = incoming.refuse(RefusalKind::Unavailable, &reason).await;
            return;
        }
        Err(_) => {
            let reason =
                format!("the agent cannot connect to {addr}: no answer within {CONNECT_TIMEOUT:?}");
            let _ = incoming.refuse(RefusalKind::Unavailable, &reason).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let Ok(tunnel) = incoming.accept().await else {
        return;
    };
    let reset = tunnel.reset_handle();
    let (mut tr, mut tw) = tokio::io::split(tunnel);
    let (mut sr, mut sw) = tcp.into_split();
    let up = super::pump(&mut tr, &mut sw, &[]);
    let down = super::pump(&mut sr, &mut tw, &[]);
    let r = tokio::try_join!(up, down);
    match r {
        Ok((a, b)) => debug!(to_service = a, from_service = b, "tunnel ended"),
        Err(e) => {
            debug!(error = %e, "tunnel failed");
            // Reset the tunnel: the caller must not take a failed service
            // connection for a clean end.
            reset.reset();
            // Reset the service's connection: it must not take a failed
            // tunnel for a clean end.
            if let Ok(tcp) = sr.reunite(sw) {
                // A zero linger does not block on drop: it sends RST at once.
                #[allow(deprecated)]
                let _ = tcp.set_linger(Some(Duration::ZERO));
            }
        }
    }
}
