//! The `baton` command line: parse, load and validate the config, set up logs, run; or talk
//! to the running process over its control socket.

use anyhow::Context as _;
use baton::admin::control::{self, Command as Ctl};
use baton::config::Config;
use baton::lifecycle::{self, RunOptions};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

// mimalloc: fewer instructions per malloc/free on the request path than glibc, and freed
// per-connection buffers go back to the OS instead of staying resident (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How often freed allocator memory past mimalloc's purge delay (1 s) is returned to the OS.
const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

// mimalloc returns freed pages to the OS (MADV_DONTNEED) only once they have stayed free for
// its purge delay, and it checks that only inside later allocator calls. After a burst (9,500
// connections served, then idle and released from hyper) the process goes quiet and the freed
// pages stayed resident: 9.1 KiB per idle HTTP connection instead of 3.8
// (docs/benchmarks-history.md, "Idle HTTP memory, third pass"). A purge delay of 0 fixes that too, but then a busy process
// gives pages back and faults them in again all the time (0.4 `madvise` per request with a new
// connection per request); a slow tick keeps the delay and still purges once traffic stops.
#[allow(unsafe_code)]
mod mi {
    extern "C" {
        /// `void mi_collect(bool force)` from the mimalloc linked in by the `mimalloc` crate.
        fn mi_collect(force: bool);
    }

    /// Frees this thread's empty pages and purges every arena range whose delay has passed
    /// (the arena part is process-wide).
    pub fn collect() {
        // SAFETY: mi_collect takes no pointers and is safe to call from any thread at any time.
        unsafe { mi_collect(false) }
    }

    /// No transparent huge pages for this process (and its successors: the flag survives
    /// `execve`). mimalloc asks for huge pages on its arenas (`MADV_HUGEPAGE`), so with THP in
    /// `madvise` mode one touched byte made 2 MiB resident: 16.4 MiB RSS at start instead of
    /// 10.7, and a little more per connection. A proxy's heap is small; TLB reach does not
    /// matter to it.
    pub fn no_huge_pages() {
        // SAFETY: prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) takes integers only; failure (an old
        // kernel) only leaves THP as it was.
        let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
}

/// Starts the thread that lets mimalloc purge freed memory while the process is quiet.
fn start_purge_tick() {
    let spawned = std::thread::Builder::new()
        .name("baton-mem-purge".into())
        .spawn(|| loop {
            std::thread::sleep(PURGE_INTERVAL);
            mi::collect();
        });
    if let Err(e) = spawned {
        // Only memory use after bursts is at stake: go on without it.
        tracing::warn!(error = %e, "cannot start the allocator purge thread");
    }
}

const EXAMPLES: &str = "Examples:
  baton run -c config.yaml          serve with config.yaml (foreground)
  baton check -c config.yaml        validate config.yaml: exit 0, or 2 listing every error
  baton status -c config.yaml       show the running process (--json for scripts)
  baton upgrade -c config.yaml      hand everything over to the binary on disk, print a summary
  baton reload -c config.yaml       the same with a re-read config.yaml
  baton stop -c config.yaml         stop gracefully (--fast: close connections now)
  kill -USR2 $(cat baton.pid)       upgrade by signal; SIGHUP reloads, SIGTERM stops";

#[derive(Parser)]
#[command(
    name = "baton",
    version,
    about = "A TCP and HTTP reverse proxy that upgrades its own binary without dropping a connection",
    after_help = EXAMPLES
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
        /// Generation number, set by a predecessor for its successor.
        #[arg(long, hide = true, default_value_t = 1)]
        generation: u64,
        /// Multi-process mode: the supervisor's state after it re-executed itself (an fd).
        #[arg(long, hide = true)]
        resume_supervisor: Option<i32>,
    },
    /// Validate a configuration file: exit 0, or 2 with every error found.
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = "config.yaml")]
        config: PathBuf,
    },
    /// Show the running process: pid, generation, listeners, upstreams, connections, upgrades.
    Status {
        /// Configuration file (names the control socket).
        #[arg(short, long, default_value = "config.yaml")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running process gracefully.
    Stop {
        /// Configuration file (names the control socket).
        #[arg(short, long, default_value = "config.yaml")]
        config: PathBuf,
        /// Close connections now instead of draining them.
        #[arg(long)]
        fast: bool,
    },
    /// Start the upgraded binary and hand it every listener and live connection.
    Upgrade {
        /// Configuration file (names the control socket).
        #[arg(short, long, default_value = "config.yaml")]
        config: PathBuf,
        /// Binary to start instead of the one the process was started from.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Multi-process mode: one worker, started by the supervisor (not for direct use).
    #[command(hide = true)]
    Worker {
        /// Configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Worker index.
        #[arg(long)]
        index: usize,
        /// Generation number.
        #[arg(long, default_value_t = 1)]
        generation: u64,
    },
    /// Re-read the configuration: an upgrade to the same binary with the new config.
    Reload {
        /// Configuration file (names the control socket).
        #[arg(short, long, default_value = "config.yaml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    mi::no_huge_pages();
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
        Command::Run {
            config,
            generation,
            resume_supervisor,
        } => run(config, generation, None, resume_supervisor),
        Command::Worker {
            config,
            index,
            generation,
        } => run(config, generation, Some(index), None),
        Command::Status { config, json } => ctl(&config, Ctl::Status, json),
        Command::Stop { config, fast } => ctl(&config, Ctl::Stop { fast }, false),
        Command::Upgrade { config, binary } => {
            let binary = binary.map(|b| std::path::absolute(&b).unwrap_or(b));
            ctl(&config, Ctl::Upgrade { binary }, false)
        }
        Command::Reload { config } => ctl(&config, Ctl::Reload, false),
    }
}

/// The runtime: with one worker thread a `current_thread` runtime, which skips the
/// multi-thread scheduler's cross-thread machinery (work stealing, remote queues, an extra
/// thread handing tasks over); measured in docs/benchmarks-history.md ("After the perf pass").
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if threads == 1 {
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        rt.worker_threads(threads);
    }
    rt.enable_all().build()
}

fn run(config: PathBuf, generation: u64, worker: Option<usize>, resume: Option<i32>) -> ExitCode {
    let cfg = match Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            // Started as a successor: tell the running process why, so it keeps serving and says so.
            if std::env::var_os(baton::handover::HANDOVER_FD_ENV).is_some() {
                if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    rt.block_on(lifecycle::refuse(format!("invalid config:\n{e}")));
                }
            }
            return ExitCode::from(2);
        }
    };
    match serve(cfg, config, generation, worker, resume) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(
    cfg: Config,
    config_path: PathBuf,
    generation: u64,
    worker: Option<usize>,
    resume: Option<i32>,
) -> anyhow::Result<()> {
    baton::logging::init_as(&cfg.log, generation, worker).context("cannot open the log file")?;
    start_purge_tick();
    let opts = RunOptions {
        config_path,
        binary: lifecycle::own_binary_path(),
        generation,
        worker,
    };
    // With workers, `baton run` is their supervisor: one thread is plenty for it.
    if let Some(fd) = resume {
        let rt = runtime(1).context("cannot start the runtime")?;
        rt.block_on(baton::supervisor::resume(cfg, opts, fd))?;
        return Ok(());
    }
    if worker.is_none() && cfg.runtime.workers > 1 {
        let rt = runtime(1).context("cannot start the runtime")?;
        rt.block_on(baton::supervisor::run(cfg, opts))?;
        return Ok(());
    }
    let rt = runtime(cfg.runtime.worker_threads).context("cannot start the runtime")?;
    rt.spawn(timer_floor());
    rt.block_on(lifecycle::run(cfg, opts))?;
    Ok(())
}

/// How far ahead the runtime's timer wheel always has an entry (see [`timer_floor`]).
const TIMER_FLOOR: std::time::Duration = std::time::Duration::from_millis(100);

/// Keeps a timer due within [`TIMER_FLOOR`] at all times. tokio wakes its own I/O driver (an
/// eventfd write, and an extra epoll_wait return) whenever a timer is registered that is due
/// before the earliest one it knew of at its last park, or when it knew of none — even on the
/// current-thread runtime that is running the registering task (tokio issue #5207). The
/// proxy registers connect, response and idle timers per connection, all further away than
/// this, so with this tick they never cost that wake-up: 0.7 eventfd writes per new L4
/// connection and 2 per new HTTP connection before (docs/BENCHMARKS.md). The tick itself costs
/// ten wake-ups a second.
async fn timer_floor() {
    loop {
        tokio::time::sleep(TIMER_FLOOR).await;
    }
}

fn ctl(config: &std::path::Path, command: Ctl, json: bool) -> ExitCode {
    // Only the control socket's path is needed; a config with other errors still names it.
    let socket = match Config::load(config) {
        Ok(c) => c.runtime.control_socket,
        Err(e) => match Config::control_socket_of(config) {
            Some(s) => s,
            None => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(control::request(&socket, &command)) {
        Err(e) => {
            eprintln!("baton: {e}");
            ExitCode::FAILURE
        }
        Ok(reply) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&reply.data).unwrap_or_default()
                );
            } else if matches!(command, Ctl::Status) && reply.ok && reply.data["workers"].is_array()
            {
                print!("{}", baton::supervisor::render_status(&reply.data));
            } else if matches!(command, Ctl::Status) && reply.ok {
                print!("{}", baton::admin::render_status(&reply.data));
            } else {
                println!("{}", reply.message);
            }
            if reply.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
