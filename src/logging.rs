//! Log setup: structured events as text or JSON lines, each carrying the process's `pid` and
//! `generation`, so the lines of two generations running side by side can be told apart.
//!
//! A `log.file` is reopened on `SIGUSR1` ([`reopen_on_sigusr1`]), so logrotate can rename it
//! and have new lines go to a new file at the same path (no `copytruncate` needed).

use crate::config::{Log, LogFormat};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The log file, swapped by [`reopen`]. Process-global because the tracing subscriber that
/// writes to it is.
static LOG_FILE: std::sync::OnceLock<ReopenableFile> = std::sync::OnceLock::new();

/// A log file that can be reopened at its path while writers hold clones of it.
#[derive(Debug, Clone)]
struct ReopenableFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
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

/// Reopens `log.file` at its path (after logrotate renamed it). A no-op when logging to
/// stderr. On failure the old file stays in use and the error is returned.
pub fn reopen() -> std::io::Result<()> {
    let Some(f) = LOG_FILE.get() else {
        return Ok(());
    };
    let new = open_append(&f.path)?;
    match f.file.lock() {
        Ok(mut g) => *g = new,
        Err(p) => *p.into_inner() = new,
    }
    Ok(())
}

/// Reopens the log file on every `SIGUSR1` until the runtime ends. Registers the handler
/// now (call it at start, inside the runtime), so a signal is never fatal.
pub fn reopen_on_sigusr1() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr1 = signal(SignalKind::user_defined1())?;
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

/// Formats every event as one line with pid and generation.
struct LineFormat {
    json: bool,
    pid: u32,
    generation: u64,
    /// The worker index in multi-process mode.
    worker: Option<usize>,
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, serde_json::Value)>,
}

impl Visit for Fields {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        if f.name() == "message" {
            self.message = format!("{v:?}");
        } else {
            self.rest
                .push((f.name(), serde_json::Value::String(format!("{v:?}"))));
        }
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        if f.name() == "message" {
            self.message = v.to_string();
        } else {
            self.rest.push((f.name(), v.into()));
        }
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.rest.push((f.name(), v.into()));
    }
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.rest.push((f.name(), v.into()));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.rest.push((f.name(), v.into()));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.rest.push((f.name(), v.into()));
    }
}

fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", now.as_secs(), now.subsec_millis())
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        ev: &Event<'_>,
    ) -> std::fmt::Result {
        let mut f = Fields::default();
        ev.record(&mut f);
        let meta = ev.metadata();
        if self.json {
            let mut m = serde_json::Map::new();
            m.insert("ts".into(), timestamp().into());
            m.insert(
                "level".into(),
                meta.level().as_str().to_ascii_lowercase().into(),
            );
            m.insert("pid".into(), self.pid.into());
            m.insert("generation".into(), self.generation.into());
            if let Some(i) = self.worker {
                m.insert("worker".into(), i.into());
            }
            m.insert("target".into(), meta.target().into());
            m.insert("msg".into(), f.message.into());
            for (k, v) in f.rest {
                m.insert(k.into(), v);
            }
            writeln!(w, "{}", serde_json::Value::Object(m))
        } else {
            let mut line = format!(
                "{} {:5} pid={} gen={} {}: {}",
                timestamp(),
                meta.level(),
                self.pid,
                self.generation,
                meta.target(),
                f.message
            );
            if let Some(i) = self.worker {
                line = line.replacen(" pid=", &format!(" worker={i} pid="), 1);
            }
            for (k, v) in f.rest {
                match v {
                    serde_json::Value::String(s)
                        if !s.contains([' ', '"', '=']) && !s.is_empty() =>
                    {
                        let _ = write!(line, " {k}={s}");
                    }
                    v => {
                        let _ = write!(line, " {k}={v}");
                    }
                }
            }
            writeln!(w, "{line}")
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(cfg: &Log, generation: u64) -> Result<(), std::io::Error> {
    init_as(cfg, generation, None)
}

/// Like [`init`], for worker `index` of a supervisor: every line also carries `worker=index`.
pub fn init_as(cfg: &Log, generation: u64, worker: Option<usize>) -> Result<(), std::io::Error> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let format = LineFormat {
        json: cfg.format == LogFormat::Json,
        pid: std::process::id(),
        generation,
        worker,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .event_format(format);
    let res = match &cfg.file {
        Some(path) => {
            let file = ReopenableFile {
                path: path.clone(),
                file: Arc::new(Mutex::new(open_append(path)?)),
            };
            let _ = LOG_FILE.set(file.clone());
            builder.with_writer(file).try_init()
        }
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    // Already initialised (tests calling twice) is harmless.
    let _ = res;
    Ok(())
}
