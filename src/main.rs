//! The `backchannel` command.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "backchannel",
    version,
    about = "gRPC calls from server to client over one connection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a server and a client on loopback and show forward calls, reverse
    /// calls and a plain gRPC client sharing the port.
    Demo,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo => backchannel_cli::demo::run().await,
    }
}
