//! The `backstop` command: `serve` runs the service, `check-config` validates a config file.

use backstop::config::Config;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "backstop",
    version,
    about = "Resilience control plane for fleets of AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (no config file needed: gRPC on 127.0.0.1:50051).
    Serve(ServeArgs),
    /// Validate a config file; prints every error with its line and exits non-zero.
    CheckConfig { file: PathBuf },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML config file; without it, built-in defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides [server] listen); port 0 picks a free port.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// HTTP listen address for metrics, events and the dashboard (overrides [server] http); "off" disables it.
    #[arg(long)]
    http: Option<String>,
    /// Where state is persisted (overrides [server] data_dir; default ./backstop-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep all state in memory: nothing survives a restart.
    #[arg(long, conflicts_with_all = ["data_dir", "reset_state"])]
    ephemeral: bool,
    /// Discard the saved state (open breakers, pauses, queued requests) before starting.
    #[arg(long)]
    reset_state: bool,
    /// Cluster mode: share decision state through this Redis (overrides
    /// [cluster] redis_url; creates [cluster] with defaults if absent).
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// Log format.
    #[arg(long, value_enum, default_value = "pretty")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} targets, {} routes, {} budget groups)",
                    file.display(),
                    c.targets.len(),
                    c.routes.len(),
                    c.groups.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                eprintln!("{} error(s) in {}", e.len(), file.display());
                ExitCode::from(2)
            }
        },
        Command::Serve(args) => {
            let http = match args.http.as_deref() {
                None => None,
                Some("off" | "") => Some(None),
                Some(addr) => match addr.parse() {
                    Ok(a) => Some(Some(a)),
                    Err(_) => {
                        eprintln!(
                            "--http {addr:?} is not an address like 127.0.0.1:9464 (or \"off\")"
                        );
                        return ExitCode::from(2);
                    }
                },
            };
            let source = backstop::config::reload::Source {
                path: args.config.clone(),
                overrides: backstop::config::reload::Overrides {
                    listen: args.listen,
                    http,
                    data_dir: args.data_dir.clone(),
                    ephemeral: args.ephemeral,
                    redis: args.redis.clone(),
                },
            };
            let config = match source.load() {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            let state = backstop::server::StateOptions {
                reset: args.reset_state,
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let format = match args.log_format {
                LogFormat::Pretty => backstop::telemetry::LogFormat::Pretty,
                LogFormat::Json => backstop::telemetry::LogFormat::Json,
            };
            runtime.block_on(async move {
                let _telemetry = match backstop::telemetry::init(format, &config.telemetry) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("backstop: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                match backstop::server::run(config, source, state).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("backstop: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}
