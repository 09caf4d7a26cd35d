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
    /// Run a hub: agents dial in, plain gRPC callers reach them by name with
    /// the `backchannel-peer` metadata key.
    Hub(backchannel_cli::hub::HubArgs),
    /// Run an agent: dial out to a hub and publish a local gRPC server
    /// through it under a name.
    Agent(backchannel_cli::agent::AgentArgs),
    /// Benchmark plain tonic, backchannel forward/reverse calls and raw yamux
    /// against each other, or connect N idle peers (`bench peers N`).
    Bench(backchannel_cli::bench::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A hub logs its audit trail by default.
    let default_filter = match cli.command {
        Command::Hub(_) => "warn,audit=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Demo => backchannel_cli::demo::run().await,
        Command::Hub(args) => backchannel_cli::hub::run(args.into_config()).await,
        Command::Agent(args) => backchannel_cli::agent::run(args.into_config()?).await,
        Command::Bench(args) => backchannel_cli::bench::run(args).await,
    }
}
