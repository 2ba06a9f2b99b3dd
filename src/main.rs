//! The `baton` command line: parse, load and validate the config, set up logs, run; or talk
//! to the running process over its control socket.

use anyhow::Context as _;
use baton::admin::control::{self, Command as Ctl};
use baton::config::Config;
use baton::isolation;
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
  baton check --dump -c config.yaml print the effective config, defaults filled in
  baton status -c config.yaml       show the running process (--json for scripts)
  baton status --socket PATH        the same, by control socket (no config file needed)
  baton upgrade -c config.yaml      hand everything over to the binary on disk; returns once it serves
  baton upgrade --wait -c ...       the same, returning once the old process has finished
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
        /// Print the effective configuration (defaults filled in, variables substituted).
        #[arg(long)]
        dump: bool,
    },
    /// Show the running process: pid, generation, listeners, upstreams, connections, upgrades.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running process gracefully.
    Stop {
        #[command(flatten)]
        target: Target,
        /// Close connections now instead of draining them.
        #[arg(long)]
        fast: bool,
    },
    /// Start the upgraded binary and hand it every listener and live connection.
    Upgrade {
        #[command(flatten)]
        target: Target,
        /// Binary to start instead of the one the process was started from.
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Return once the old process has finished (drained), not once the new one serves.
        #[arg(long)]
        wait: bool,
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
        /// The supervisor's accept board (an inherited fd; `accept: shared`).
        #[arg(long)]
        accept_board: Option<i32>,
    },
    /// Re-read the configuration: an upgrade to the same binary with the new config.
    Reload {
        #[command(flatten)]
        target: Target,
        /// Return once the old process has finished (drained), not once the new one serves.
        #[arg(long)]
        wait: bool,
    },
}

/// Which running baton a control command talks to.
#[derive(clap::Args)]
struct Target {
    /// Configuration file (names the control socket).
    #[arg(short, long, default_value = "config.yaml")]
    config: PathBuf,
    /// The control socket itself (no config file needed).
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    socket: Option<PathBuf>,
}

fn main() -> ExitCode {
    mi::no_huge_pages();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, dump } => match Config::load(&config) {
            Ok(cfg) if dump => {
                print!("{}", cfg.dump());
                ExitCode::SUCCESS
            }
            Ok(cfg) => {
                for w in cfg.warnings() {
                    eprintln!("{w}");
                }
                if cfg.listeners.is_empty() {
                    eprintln!(
                        "{}: warning: no listeners: this config serves nothing, and reload and upgrade refuse it",
                        config.display()
                    );
                }
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
        } => run(
            config,
            generation,
            lifecycle::Role::Single,
            resume_supervisor,
        ),
        Command::Worker {
            config,
            index,
            generation,
            accept_board,
        } => run(
            config,
            generation,
            lifecycle::Role::Worker {
                index,
                accept_board,
            },
            None,
        ),
        Command::Status { target, json } => ctl(&target, Ctl::Status, json),
        Command::Stop { target, fast } => ctl(&target, Ctl::Stop { fast }, false),
        Command::Upgrade {
            target,
            binary,
            wait,
        } => {
            let binary = binary.map(|b| std::path::absolute(&b).unwrap_or(b));
            ctl(&target, Ctl::Upgrade { binary, wait }, false)
        }
        Command::Reload { target, wait } => ctl(&target, Ctl::Reload { wait }, false),
    }
}

/// The runtime: with one worker thread a `current_thread` runtime, which skips the
/// multi-thread scheduler's cross-thread machinery (work stealing, remote queues, an extra
/// thread handing tasks over); measured in docs/benchmarks-history.md ("After the perf pass").
/// `pin` runs on each runtime thread as it starts (CPU pinning, `runtime.cpu_affinity`).
fn runtime(
    threads: usize,
    pin: Option<impl Fn() + Send + Sync + 'static>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if threads > 0 {
            rt.worker_threads(threads);
        }
        rt
    };
    if let Some(pin) = pin {
        rt.on_thread_start(pin);
    }
    rt.enable_all().build()
}

fn run(config: PathBuf, generation: u64, role: lifecycle::Role, resume: Option<i32>) -> ExitCode {
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
    // A first start (not a successor, worker or re-executed supervisor) whose control socket
    // answers would only fail to bind, or with SO_REUSEPORT share the ports and take the
    // socket over: say what is going on instead.
    let first_start = role == lifecycle::Role::Single
        && resume.is_none()
        && std::env::var_os(baton::handover::HANDOVER_FD_ENV).is_none();
    if first_start {
        if let Some(pid) = running_pid(&cfg.runtime.control_socket) {
            eprintln!(
                "baton: already running as pid {pid} (its control socket {} answers); \
                 `baton upgrade` or `baton reload` replaces it, `baton stop` stops it",
                cfg.runtime.control_socket.display()
            );
            return ExitCode::FAILURE;
        }
    }
    match serve(cfg, config, generation, role, resume) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The pid of the baton answering on `socket`, if one does within a few seconds.
fn running_pid(socket: &std::path::Path) -> Option<u64> {
    if !socket.exists() {
        return None;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let reply = rt.block_on(async {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            control::request(socket, &Ctl::Status),
        )
        .await
    });
    match reply {
        Ok(Ok(r)) if r.ok => r.data["pid"].as_u64(),
        _ => None,
    }
}

/// `e` and its causes, each cause left out when the text before already says it (a
/// `thiserror` message that embeds its source would otherwise print the OS error twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

fn serve(
    cfg: Config,
    config_path: PathBuf,
    generation: u64,
    role: lifecycle::Role,
    resume: Option<i32>,
) -> anyhow::Result<()> {
    let worker = role.worker_index();
    baton::logging::init_as(&cfg.log, generation, worker).context("cannot open the log file")?;
    baton::test_hooks::announce();
    for w in cfg.warnings() {
        tracing::warn!(warning = %w, "configuration warning");
    }
    // Credentials are per thread: isolation goes first, before any other thread starts.
    let isolated_as = match worker {
        Some(i) => isolation::Role::Worker(i),
        None if resume.is_some() || cfg.runtime.workers > 1 => isolation::Role::Supervisor,
        None => isolation::Role::Single {
            successor: std::env::var_os(baton::handover::HANDOVER_FD_ENV).is_some(),
        },
    };
    let prepared = isolation::prepare(&cfg, isolated_as).context("cannot isolate this process")?;
    start_purge_tick();
    let opts = RunOptions {
        config_path,
        binary: lifecycle::own_binary_path(),
        generation,
        role,
    };
    // With workers, `baton run` is their supervisor: one thread is plenty for it.
    if let Some(fd) = resume {
        let rt = runtime(1, None::<fn()>).context("cannot start the runtime")?;
        rt.block_on(baton::supervisor::resume(cfg, opts, fd))?;
        return Ok(());
    }
    if worker.is_none() && cfg.runtime.workers > 1 {
        let rt = runtime(1, None::<fn()>).context("cannot start the runtime")?;
        rt.block_on(baton::supervisor::run(cfg, opts))?;
        return Ok(());
    }
    let pin = match worker {
        // A worker is pinned as a whole by its supervisor.
        Some(_) => None,
        None => isolation::affinity::thread_pinner(cfg.runtime.isolation.cpu_affinity.clone()),
    };
    let rt = runtime(cfg.runtime.worker_threads, pin).context("cannot start the runtime")?;
    rt.spawn(timer_floor());
    rt.block_on(lifecycle::run_prebound(cfg, opts, prepared.prebound))?;
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

/// The control socket `target` names: `--socket`, or the one of the config file (a config
/// with other errors still names it). `Err` is the config's error.
fn socket_of(target: &Target) -> Result<PathBuf, String> {
    if let Some(s) = &target.socket {
        return Ok(s.clone());
    }
    match Config::load(&target.config) {
        Ok(c) => Ok(c.runtime.control_socket),
        Err(e) => Config::control_socket_of(&target.config).ok_or_else(|| e.to_string()),
    }
}

fn ctl(target: &Target, command: Ctl, json: bool) -> ExitCode {
    let socket = match socket_of(target) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
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
