//! The `baton` command line: parse, load and validate the config, set up logs, run.

use anyhow::Context as _;
use baton::config::Config;
use baton::lifecycle::{self, RunOptions};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "A TCP and HTTP reverse proxy that upgrades its own binary without dropping a connection",
    after_help = "Examples:\n  baton run -c config.yaml        serve with config.yaml\n  baton check -c config.yaml      validate config.yaml and exit\n  kill -TERM $(cat baton.pid)     stop gracefully"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration file: exit 0, or 2 with every error found.
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = "config.yaml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} listeners, {} upstreams)",
                    config.display(),
                    cfg.listeners.len(),
                    cfg.upstreams.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            match run(cfg, config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baton: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(cfg: Config, config_path: PathBuf) -> anyhow::Result<()> {
    let generation = 1;
    baton::logging::init(&cfg.log, generation).context("cannot open the log file")?;
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.runtime.worker_threads > 0 {
        rt.worker_threads(cfg.runtime.worker_threads);
    }
    let rt = rt
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(lifecycle::run(
        cfg,
        RunOptions {
            config_path,
            generation,
        },
    ))?;
    Ok(())
}
