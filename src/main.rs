//! The `backchannel` command: the demo, and the sidecar's hub and agent.

use backchannel_sidecar::{agent, hub, peers_cmd};
use clap::{Parser, Subcommand};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

#[derive(Parser)]
#[command(
    name = "backchannel",
    version,
    about = "gRPC calls from server to client over one connection"
)]
struct Cli {
    /// Threads that run the process's tasks (default: one per CPU core).
    /// `--threads 1` runs everything on one thread: on a small or shared
    /// machine, under light load, a routed call then waits for fewer
    /// thread wake-ups (lower latency), at the cost of using one core.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start: the size of the hub's flags does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Start a server and a client on loopback and show forward calls, reverse
    /// calls and a plain gRPC client sharing the port; then a hub, an agent and
    /// callers reaching a private service through it.
    Demo,
    /// Run a hub: agents dial in, plain gRPC callers reach them by name with
    /// the `backchannel-peer` metadata key.
    Hub(hub::HubArgs),
    /// Run an agent: dial out to a hub and publish a local gRPC server
    /// through it under a name.
    Agent(agent::AgentArgs),
    /// Show the peers a hub holds (its admin view: names, sessions, calls,
    /// bytes, round-trip time and throughput ceiling), once or refreshed.
    Peers(peers_cmd::PeersArgs),
    /// Open a tunnel through a hub to a TCP service an agent offers
    /// (`--expose-tcp`): stdin/stdout (`--stdio`, e.g. as an ssh
    /// ProxyCommand) or each connection accepted on `--listen`.
    Tunnel(backchannel_sidecar::tunnel::cli::TunnelArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = match cli.threads {
        Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n.into())
            .enable_all()
            .build()?,
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // A hub logs its audit trail by default.
    let default_filter = match cli.command {
        Command::Hub(_) => "warn,audit=info",
        _ => "warn",
    };
    // The hub writes a line per routed call: a thread of its own writes
    // them, not the task that finishes the call (flushed when `_logs` drops).
    let (writer, _logs) = match cli.command {
        Command::Hub(_) => {
            let (logs, guard) = backchannel_sidecar::log_writer::stderr();
            (BoxMakeWriter::new(move || logs.writer()), Some(guard))
        }
        _ => (BoxMakeWriter::new(std::io::stderr), None),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Demo => backchannel_demo::run().await,
        Command::Hub(args) => hub::run(args.into_config()).await,
        Command::Peers(args) => peers_cmd::run(args).await,
        // Exit at once when the tunnel ends: a blocking read of stdin (an
        // ssh ProxyCommand's stdin stays open) must not hold the process.
        Command::Tunnel(args) => match backchannel_sidecar::tunnel::cli::run(args).await {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
        },
        Command::Agent(args) => match args.into_config() {
            Ok(cfg) => agent::run(cfg).await,
            // A bad flag value: like clap's own usage errors, exit 2.
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
        },
    }
}
