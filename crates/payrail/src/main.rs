//! The `payrail` command.

mod bench;
mod mobikwik_cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Many small, short-lived allocations cross threads here (requests built on
/// the async workers, rows read on the writer, answers freed on the workers);
/// glibc's allocator showed ~10% of CPU under load, with lock contention,
/// where mimalloc's thread-local heaps do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "payrail",
    version,
    about = "Payment providers' token APIs over one durable double-entry ledger"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(payrail_server::ServeArgs),
    /// The Mobikwik-style wallet API: sign parameters, or call a server as a merchant.
    Mobikwik(Box<mobikwik_cli::MobikwikArgs>),
    /// Load harness: debits and /healthz against a server, with a report.
    Bench(Box<bench::BenchArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    payrail_server::telemetry::init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("payrail: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => payrail_server::serve(args)
                .await
                .map(|()| true)
                .map_err(|e| e.to_string()),
            Command::Mobikwik(args) => mobikwik_cli::run(*args).await,
            Command::Bench(args) => bench::run(*args).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("payrail: {message}");
            ExitCode::from(2)
        }
    }
}
