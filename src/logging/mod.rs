//! Log setup: structured events as text or JSON lines, each carrying the process's `pid` and
//! `generation`, so the lines of two generations running side by side can be told apart, and
//! an RFC 3339 timestamp in UTC with milliseconds ([`time`]).
//!
//! HTTP access lines (tracing target [`access::TARGET`]) go to the main log, or, with
//! `log.access_file`, only to that file in its own format ([`access`]) — like nginx's
//! `access_log` next to its `error_log`, and independent of `log.level`.
//!
//! `log.file` and `log.access_file` are reopened on `SIGUSR1` ([`reopen_on_sigusr1`]), so
//! logrotate can rename them and have new lines go to new files at the same paths (no
//! `copytruncate` needed).

pub mod access;
mod format;
pub mod time;

use crate::config::{Log, LogFormat};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

/// The log files, reopened by [`reopen`]. Process-global because the tracing subscriber that
/// writes to them is.
static LOG_FILES: std::sync::OnceLock<Vec<ReopenableFile>> = std::sync::OnceLock::new();

/// A log file that can be reopened at its path while writers hold clones of it.
#[derive(Debug, Clone)]
struct ReopenableFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl ReopenableFile {
    /// Opens `path` for appending; the error names the path.
    fn open(path: &Path) -> std::io::Result<ReopenableFile> {
        let file = open_append(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(ReopenableFile {
            path: path.to_path_buf(),
            file: Arc::new(Mutex::new(file)),
        })
    }

    fn reopen(&self) -> std::io::Result<()> {
        let new = open_append(&self.path)?;
        match self.file.lock() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

/// One event's write: holds the lock so lines from several threads never interleave.
struct LockedFile<'a>(std::sync::MutexGuard<'a, File>);

impl std::io::Write for LockedFile<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for ReopenableFile {
    type Writer = Box<dyn std::io::Write + 'a>;
    fn make_writer(&'a self) -> Self::Writer {
        match self.file.lock() {
            Ok(g) => Box::new(LockedFile(g)),
            // A writer panicked mid-line: keep logging to stderr rather than lose lines.
            Err(_) => Box::new(std::io::stderr()),
        }
    }
}

/// Reopens `log.file` and `log.access_file` at their paths (after logrotate renamed them).
/// A no-op when logging to stderr only. A file that cannot be reopened stays in use; the first
/// error is returned, naming the path.
pub fn reopen() -> std::io::Result<()> {
    let mut first = Ok(());
    for f in LOG_FILES.get().into_iter().flatten() {
        if let Err(e) = f.reopen() {
            if first.is_ok() {
                first = Err(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", f.path.display()),
                ));
            }
        }
    }
    first
}

/// Reopens the log files on every `SIGUSR1` until the runtime ends. Registers the handler
/// now (call it at start, inside the runtime), so a signal is never fatal. Calling it again
/// in the same process does nothing: one reopen per signal.
pub fn reopen_on_sigusr1() -> std::io::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::signal::unix::{signal, SignalKind};
    static WATCHING: AtomicBool = AtomicBool::new(false);
    if WATCHING.load(Ordering::Acquire) {
        return Ok(());
    }
    let mut usr1 = signal(SignalKind::user_defined1())?;
    if WATCHING.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            match reopen() {
                Ok(()) => tracing::info!(signal = "SIGUSR1", "log file reopened"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reopen the log file; still writing to the old one")
                }
            }
        }
    });
    Ok(())
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(cfg: &Log, generation: u64) -> Result<(), std::io::Error> {
    init_as(cfg, generation, None)
}

/// Like [`init`], for worker `index` of a supervisor: every line also carries `worker=index`.
pub fn init_as(cfg: &Log, generation: u64, worker: Option<usize>) -> Result<(), std::io::Error> {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // The acknowledgements of the PINGs baton writes itself before an h2c GOAWAY
    // (`proxy::http::h2`) can reach hyper's h2 stack, which warns about a PING it never sent
    // and ignores it: expected, so not worth a warning (its only warning there).
    if let Ok(d) = "h2::proto::ping_pong=error".parse() {
        filter = filter.add_directive(d);
    }
    // A worker in its own PID namespace is pid 1 to itself; log the pid operators see.
    let pid = crate::isolation::report::outer_pid();
    let mut files = Vec::new();
    let main_writer = match &cfg.file {
        Some(path) => {
            let f = ReopenableFile::open(path)?;
            files.push(f.clone());
            BoxMakeWriter::new(f)
        }
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let access = match &cfg.access_file {
        Some(path) => {
            let f = ReopenableFile::open(path)?;
            files.push(f.clone());
            // Access lines go to their own file only.
            if let Ok(d) = format!("{}=off", access::TARGET).parse() {
                filter = filter.add_directive(d);
            }
            let layer = tracing_subscriber::fmt::layer()
                .event_format(access::AccessLine {
                    format: cfg.access_format,
                    pid,
                    generation,
                })
                .with_writer(f)
                .with_filter(Targets::new().with_target(access::TARGET, tracing::Level::INFO));
            Some(layer)
        }
        None => None,
    };
    let main = tracing_subscriber::fmt::layer()
        .event_format(format::LineFormat {
            json: cfg.format == LogFormat::Json,
            pid,
            generation,
            worker,
        })
        .with_writer(main_writer)
        .with_filter(filter);
    let _ = LOG_FILES.set(files);
    // Already initialised (tests calling twice) is harmless.
    let _ = tracing_subscriber::registry()
        .with(main)
        .with(access)
        .try_init();
    Ok(())
}
