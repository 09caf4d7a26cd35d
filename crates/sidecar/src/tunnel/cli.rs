//! `backchannel tunnel`: the caller's side, like `ssh -W`.
//!
//! ```text
//! backchannel tunnel --hub hub.example.org:7443 --tls-ca ca.pem --token-file tok \
//!     --peer box --service ssh --stdio
//! ssh -o ProxyCommand='backchannel tunnel --hub … --peer box --service ssh --stdio' box
//! backchannel tunnel --hub … --peer db1 --service postgres --listen 127.0.0.1:5432
//! ```

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use backchannel::TunnelRequest;
use listenmux::BoxIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::frames::{FrameReader, FrameWriter};
use crate::addr::Target;

/// Command-line flags of `backchannel tunnel`.
#[derive(clap::Args, Debug, Clone)]
#[command(group = clap::ArgGroup::new("mode").required(true).args(["listen", "stdio"]))]
pub struct TunnelArgs {
    /// The hub: `host:port`, `tcp://host:port` or `unix:PATH`.
    #[arg(long, value_name = "ADDR", value_parser = crate::hub::flags::hub_addr)]
    pub hub: String,
    /// The agent: its announced name, or its peer ID.
    #[arg(long)]
    pub peer: String,
    /// The agent's tunnel service (`--expose-tcp NAME=…` on the agent).
    #[arg(long)]
    pub service: String,
    /// Accept connections on this address; each one becomes a tunnel.
    #[arg(long, value_name = "ADDR", value_parser = crate::hub::flags::host_port)]
    pub listen: Option<String>,
    /// Relay stdin and stdout (one tunnel), e.g. as an ssh ProxyCommand.
    #[arg(long)]
    pub stdio: bool,
    /// PEM CA certificate(s) to verify the hub with: enables TLS.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for hubs started with --client-ca.
    #[arg(long, value_name = "FILE", requires = "tls_key", requires = "tls_ca")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The hub's name in its certificate (default: the host part of --hub).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    pub tls_server_name: Option<String>,
    /// A file holding a bearer token for hubs with an access policy (only
    /// sent over TLS, or to a loopback or Unix-socket hub).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// How long connecting and the hub's answer may take.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = crate::hub::flags::positive_seconds, allow_hyphen_values = true)]
    pub timeout: Duration,
}

type Tls = Option<(
    tokio_rustls::TlsConnector,
    rustls_pki_types::ServerName<'static>,
)>;

/// What a tunnel needs to reach the hub: prepared once, used per tunnel.
#[derive(Clone)]
pub struct Dialer {
    hub: Target,
    tls: Tls,
    token: Option<String>,
    peer: String,
    service: String,
    timeout: Duration,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("hub", &self.hub.to_string())
            .field("tls", &self.tls.is_some())
            .field("peer", &self.peer)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Dialer {
    /// Checks the flags (TLS files, token transport) and prepares.
    pub fn new(args: &TunnelArgs) -> anyhow::Result<Dialer> {
        let hub: Target = args
            .hub
            .parse()
            .map_err(|e| anyhow::anyhow!("--hub '{}': {e}", args.hub))?;
        let token = match &args.token_file {
            Some(path) => {
                let t = crate::agent::token::read(path)?;
                crate::agent::token::check_transport(&hub, args.tls_ca.is_some())?;
                Some(t)
            }
            None => None,
        };
        let tls = match &args.tls_ca {
            Some(ca) => {
                let cert_key = match (&args.tls_cert, &args.tls_key) {
                    (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
                    _ => None,
                };
                let name = match &args.tls_server_name {
                    Some(n) => n.clone(),
                    None => hub.host().unwrap_or("localhost").to_string(),
                };
                let server_name = rustls_pki_types::ServerName::try_from(name.clone())
                    .with_context(|| format!("'{name}' is not a valid TLS server name"))?;
                Some((
                    tokio_rustls::TlsConnector::from(crate::tls::client_config(ca, cert_key)?),
                    server_name,
                ))
            }
            None => None,
        };
        // The request is checked now, not at the first connection.
        TunnelRequest::new(args.service.clone())
            .with_metadata(super::hub::PEER_KEY, args.peer.clone())
            .with_timeout(args.timeout);
        Ok(Dialer {
            hub,
            tls,
            token,
            peer: args.peer.clone(),
            service: args.service.clone(),
            timeout: args.timeout,
        })
    }

    /// Connects to the hub and opens the tunnel: its reading and writing
    /// halves.
    pub async fn open(
        &self,
    ) -> anyhow::Result<(
        FrameReader<tokio::io::ReadHalf<BoxIo>>,
        FrameWriter<tokio::io::WriteHalf<BoxIo>>,
    )> {
        let connect = async {
            let io: BoxIo = match &self.hub {
                Target::Unix(path) => Box::new(
                    tokio::net::UnixStream::connect(path)
                        .await
                        .with_context(|| format!("connecting to {}", self.hub))?,
                ),
                Target::Tcp { .. } => {
                    let tcp = tokio::net::TcpStream::connect(self.hub.to_string())
                        .await
                        .with_context(|| format!("connecting to {}", self.hub))?;
                    let _ = tcp.set_nodelay(true);
                    Box::new(tcp)
                }
            };
            let io: BoxIo = match &self.tls {
                Some((c, name)) => Box::new(
                    c.connect(name.clone(), io)
                        .await
                        .with_context(|| format!("TLS to {}", self.hub))?,
                ),
                None => io,
            };
            anyhow::Ok(io)
        };
        let io = tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| anyhow::anyhow!("connecting to {} timed out", self.hub))??;
        let mut request = TunnelRequest::new(self.service.clone())
            .with_metadata(super::hub::PEER_KEY, self.peer.clone())
            .with_timeout(self.timeout);
        if let Some(t) = &self.token {
            request =
                request.with_metadata(crate::hub::identity::AUTHORIZATION, format!("Bearer {t}"));
        }
        let tunnel =
            backchannel::tunnel::connect(io, request, &format!("hub {}", self.hub)).await?;
        let (r, w) = tokio::io::split(tunnel.into_inner());
        Ok((FrameReader::new(r), FrameWriter::new(w)))
    }
}

/// Relays `local` (reading `lr`, writing `lw`) through one tunnel; returns
/// an error naming what failed. Ends when both directions have ended.
pub async fn relay<LR, LW>(dialer: &Dialer, mut lr: LR, mut lw: LW) -> anyhow::Result<()>
where
    LR: AsyncRead + Unpin,
    LW: AsyncWrite + Unpin,
{
    let (mut tr, mut tw) = dialer.open().await?;
    let up = async {
        super::pump(&mut lr, &mut tw, &[])
            .await
            .context("sending into the tunnel")
    };
    let down = async {
        super::pump(&mut tr, &mut lw, &[])
            .await
            .context("the tunnel failed")
    };
    tokio::try_join!(up, down)?;
    Ok(())
}

/// Runs `backchannel tunnel`.
pub async fn run(args: TunnelArgs) -> anyhow::Result<()> {
    let dialer = Dialer::new(&args)?;
    if args.stdio {
        let stdin = tokio::io::stdin();
        let stdout = tokio::io::stdout();
        let (mut tr, mut tw) = dialer.open().await?;
        let mut lr = stdin;
        let mut lw = stdout;
        let up = super::pump(&mut lr, &mut tw, &[]);
        let down = super::pump(&mut tr, &mut lw, &[]);
        // Done when the far side has ended its half (like `ssh -W`); a
        // local stdin still open does not keep the tunnel up.
        let (mut up, mut down) = (std::pin::pin!(up), std::pin::pin!(down));
        tokio::select! {
            r = &mut down => { r.context("the tunnel failed")?; }
            r = &mut up => {
                r.context("sending into the tunnel")?;
                down.await.context("the tunnel failed")?;
            }
        }
        return Ok(());
    }
    let listen = args.listen.clone().unwrap_or_default();
    let l = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!(
        "tunnel to '{}' on peer '{}' listening on {}",
        args.service,
        args.peer,
        l.local_addr()?
    );
    let stop = crate::signal::shutdown();
    let mut stop = std::pin::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = l.accept() => {
                let (tcp, from) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        eprintln!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let dialer = dialer.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.into_split();
                    if let Err(e) = relay(&dialer, &mut r, &mut w).await {
                        eprintln!("tunnel for {from}: {e:#}");
                        // A refused or failed tunnel resets the local
                        // connection: its client must not take a clean
                        // end for the whole of the data.
                        if let Ok(tcp) = r.reunite(w) {
                            #[allow(deprecated)]
                            let _ = tcp.set_linger(Some(Duration::ZERO));
                        }
                    }
                });
            }
        }
    }
}
