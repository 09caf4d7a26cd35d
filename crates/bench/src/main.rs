//! `backchannel-bench`: plain tonic, backchannel forward/reverse calls, the
//! hub and raw yamux against each other (`backchannel-bench --help`), or N
//! idle peers (`backchannel-bench peers N`).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "backchannel-bench",
    version,
    about = "Benchmark backchannel against plain tonic and tokio-yamux"
)]
struct Cli {
    #[command(flatten)]
    args: backchannel_bench::BenchArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    backchannel_bench::run(Cli::parse().args).await
}
