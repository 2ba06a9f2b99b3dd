//! The idle watcher: keep-alive connections released from hyper wait here for their next
//! request with no task and no tokio registration of their own.
//!
//! One watcher per HTTP listener, started by the first release. It owns an epoll set
//! (registered in tokio as one [`AsyncFd`]) holding every released connection's socket, and a
//! table of {socket, [`ConnHandle`], connection permit} in keep-alive deadline order
//! (`table`). An idle connection costs a 56-byte slot here (the kernel's epoll item is not
//! process memory) instead of a task (≈ 640 bytes) and a tokio `ScheduledIo` (256 bytes).
//!
//! - Readable: the watcher reads what arrived (up to [`FIRST_READ`] bytes), takes the socket
//!   out of its set and spawns [`server::serve`] with those bytes. EOF or an error closes it
//!   here ("client closed"), without a task.
//! - Keep-alive: one timer per watcher, armed at the earliest deadline rounded up to
//!   [`GRANULARITY`]; an idle connection closes ("idle timeout") between `keepalive_timeout`
//!   and `keepalive_timeout` + [`GRANULARITY`] after its last request ended.
//! - Park, drain, kill: the registry bumps a generation after setting connections' signal bits
//!   ([`crate::registry::Registry::signal_changes`]); the watcher then looks at the bits of its
//!   entries and parks them as [`Parked::IdleHttp`] (no read-ahead: the watcher holds none),
//!   or closes them ("drained", "killed"), as the connection task would have.

use super::server;
use crate::proxy::tcp::{close_log, log_close};
use crate::proxy::ListenerCtx;
use crate::registry::{ConnHandle, SIG_DRAIN, SIG_KILL, SIG_PARK};
use bytes::BytesMut;
use rustix::event::epoll;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

/// How late a keep-alive deadline may be acted on: the watcher's timer fires at most this
/// often, and closes every connection whose deadline passed.
pub const GRANULARITY: Duration = Duration::from_millis(100);

/// How many bytes the watcher reads from a connection that became readable; the rest of the
/// request is read by hyper.
const FIRST_READ: usize = 1024;

/// Events taken from the epoll set per `epoll_wait`.
const BATCH: usize = 256;

/// A released keep-alive connection waiting for its next request.
#[derive(Debug)]
pub struct Idle {
    /// The client socket (non-blocking).
    pub stream: std::net::TcpStream,
    /// Its registry entry.
    pub conn: ConnHandle,
    /// The listener's connection permit it holds.
    pub permit: OwnedSemaphorePermit,
    /// When its last request ended.
    pub idle_since: Instant,
}

mod table;

/// One watched connection: [`Idle`] without `idle_since` (its deadline is in the table).
#[derive(Debug)]
struct Entry {
    stream: std::net::TcpStream,
    conn: ConnHandle,
    permit: OwnedSemaphorePermit,
}

type Table = table::Table<Entry>;

/// The idle watcher of one listener.
#[derive(Debug)]
pub struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    table: Mutex<Table>,
    /// Woken when an entry's deadline is earlier than every other (the timer must move).
    rearm: Notify,
    /// The timer's time origin: deadlines are counted in [`GRANULARITY`] ticks from it.
    base: Instant,
    /// The watcher's task ended: connections wait in their own task again.
    stopped: std::sync::atomic::AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watcher {
    /// Creates the watcher of `ctx`'s listener and spawns its task. Call within the runtime.
    pub fn start(ctx: &Arc<ListenerCtx>) -> std::io::Result<Arc<Watcher>> {
        let fd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        // `with_interest` is deprecated for types whose fd may change or close while
        // registered (tokio#8587); an `OwnedFd` owned by the `AsyncFd` cannot, and its safe
        // replacement is an `unsafe fn`, which this crate keeps out of the data path.
        #[allow(deprecated)]
        let epoll = AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
        let w = Arc::new(Watcher {
            epoll,
            table: Mutex::default(),
            rearm: Notify::new(),
            base: Instant::now(),
            stopped: std::sync::atomic::AtomicBool::new(false),
        });
        let signals = ctx.registry.signal_changes();
        tokio::spawn(run(w.clone(), Arc::downgrade(ctx), signals));
        Ok(w)
    }

    /// Takes a released connection. Gives it back if it must not wait here: a park, drain or
    /// kill was asked for (the caller acts on it), or the socket cannot be watched.
    pub fn watch(&self, ctx: &ListenerCtx, idle: Idle) -> Result<(), Idle> {
        let mut t = lock(&self.table);
        // Checked under the table lock: a signal whose scan of the table has already run set
        // its bits before that scan took the lock, so they are seen here; a later scan sees
        // the entry.
        if idle.conn.signalled() || self.stopped.load(Ordering::Acquire) {
            return Err(idle);
        }
        let idle_since = idle.idle_since;
        let tick = self.tick_of(idle_since + ctx.cfg.http.keepalive_timeout);
        let back = |e: Entry| Idle {
            stream: e.stream,
            conn: e.conn,
            permit: e.permit,
            idle_since,
        };
        let entry = Entry {
            stream: idle.stream,
            conn: idle.conn,
            permit: idle.permit,
        };
        // Full (2³² − 1 entries) is not reachable under the fd limit.
        let (token, earliest) = t.insert(entry, tick).map_err(back)?;
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        let added = match t.get(token) {
            Some(e) => epoll::add(
                self.epoll.get_ref(),
                &e.stream,
                epoll::EventData::new_u64(token),
                flags,
            ),
            None => Ok(()),
        };
        if let Err(err) = added {
            let e = t.remove(token);
            drop(t);
            return match e {
                Some(e) => {
                    tracing::debug!(conn = e.conn.stats().id, error = %err, "cannot watch idle connection");
                    Err(back(e))
                }
                None => Ok(()),
            };
        }
        drop(t);
        if earliest {
            self.rearm.notify_one();
        }
        Ok(())
    }

    /// Number of watched connections.
    pub fn len(&self) -> usize {
        lock(&self.table).len()
    }

    /// Whether no connection is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tick of deadline `at`: rounded up to [`GRANULARITY`], so never early.
    fn tick_of(&self, at: Instant) -> u32 {
        let since = at.saturating_duration_since(self.base).as_nanos();
        u32::try_from(since.div_ceil(GRANULARITY.as_nanos())).unwrap_or(u32::MAX)
    }

    /// The last tick that has passed.
    fn now_tick(&self) -> u32 {
        let since = Instant::now()
            .saturating_duration_since(self.base)
            .as_nanos();
        u32::try_from(since / GRANULARITY.as_nanos()).unwrap_or(u32::MAX)
    }

    /// When the timer should fire next: the earliest deadline's tick.
    fn next_tick(&self) -> Option<Instant> {
        let tick = lock(&self.table).first_tick()?;
        Some(self.base + GRANULARITY * tick)
    }

    /// Removes `token`'s socket from the epoll set (before it leaves the process or goes to
    /// tokio: the set would otherwise keep reporting it).
    fn unwatch(&self, e: &Entry) {
        let _ = epoll::delete(self.epoll.get_ref(), &e.stream);
    }
}

/// How handing a released connection to the idle watcher went.
pub(super) enum ToWatcher {
    /// The watcher has it.
    Watched,
    /// The socket could not be moved (logged and closed).
    Closed,
    /// It waits in its task after all: a signal is pending, or there is no watcher.
    Back(ConnHandle, TcpStream, OwnedSemaphorePermit),
}

/// The listener's idle watcher, started by the first release.
fn watcher(ctx: &Arc<ListenerCtx>) -> Option<&Arc<Watcher>> {
    ctx.idle_watcher
        .get_or_init(|| match Watcher::start(ctx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(listener = %ctx.name, error = %e, "no idle watcher: idle connections keep a task");
                None
            }
        })
        .as_ref()
}

/// Hands a released connection (nothing read ahead) to the listener's idle watcher.
pub(super) fn to_watcher(
    ctx: &Arc<ListenerCtx>,
    conn: ConnHandle,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
    idle_since: Instant,
) -> ToWatcher {
    let Some(w) = watcher(ctx).filter(|_| !conn.signalled()) else {
        return ToWatcher::Back(conn, stream, permit);
    };
    let stream = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(conn = conn.stats().id, error = %e, "cannot take idle connection from tokio");
            close_log(ctx, &conn, "error");
            return ToWatcher::Closed;
        }
    };
    let idle = Idle {
        stream,
        conn,
        permit,
        idle_since,
    };
    match w.watch(ctx, idle) {
        Ok(()) => ToWatcher::Watched,
        Err(idle) => match TcpStream::from_std(idle.stream) {
            Ok(s) => ToWatcher::Back(idle.conn, s, idle.permit),
            Err(e) => {
                tracing::debug!(conn = idle.conn.stats().id, error = %e, "cannot give idle connection back to tokio");
                close_log(ctx, &idle.conn, "error");
                ToWatcher::Closed
            }
        },
    }
}

/// What became of a watched connection that had an event.
enum Outcome {
    /// Request bytes arrived: serve them.
    Serve(Entry, BytesMut),
    /// Closed, for this reason.
    Close(Entry, &'static str),
}

async fn run(w: Arc<Watcher>, ctx: Weak<ListenerCtx>, signals: watch::Receiver<u64>) {
    watch_loop(&w, &ctx, signals).await;
    // Stopped (the listener is gone, the runtime is shutting down, or the epoll set failed):
    // take no more connections, and close the ones held rather than leave them with nobody
    // to serve them. A graceful stop closes the listeners before it asks connections to
    // drain, so this is where the watched ones of a stopping process close.
    let held = {
        let mut t = lock(&w.table);
        w.stopped.store(true, Ordering::Release);
        t.take_where(|_| true)
    };
    let ctx = ctx.upgrade();
    for e in held {
        match &ctx {
            Some(ctx) => close_log(ctx, &e.conn, "error"),
            // The listener is gone (the process stops, or a reload removed it): its counters
            // went with it, but the close is logged as any other, with why.
            None => log_close(&e.conn, gone_reason(&e.conn)),
        }
    }
}

/// Why a watched connection closes after its listener is gone.
fn gone_reason(conn: &ConnHandle) -> &'static str {
    let bits = conn.stats().signals();
    if bits & SIG_KILL != 0 {
        "killed"
    } else if bits & SIG_DRAIN != 0 {
        "drained"
    } else {
        "listener closed"
    }
}

async fn watch_loop(w: &Arc<Watcher>, ctx: &Weak<ListenerCtx>, mut signals: watch::Receiver<u64>) {
    let far = Duration::from_secs(86400 * 365);
    let timer = tokio::time::sleep(far);
    tokio::pin!(timer);
    loop {
        let next = w.next_tick().unwrap_or_else(|| Instant::now() + far);
        if timer.deadline() != next {
            timer.as_mut().reset(next);
        }
        tokio::select! {
            biased;
            changed = signals.changed() => {
                if changed.is_err() {
                    return; // The registry is gone: the process is exiting.
                }
                let Some(ctx) = ctx.upgrade() else { return };
                on_signals(w, &ctx);
            }
            guard = w.epoll.readable() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(e) => {
                        tracing::warn!(error = %e, "idle watcher failed");
                        return;
                    }
                };
                let Some(ctx) = ctx.upgrade() else { return };
                // Cleared only after a wait that found nothing: events that arrive meanwhile
                // are in that wait's answer or make tokio's epoll report the set again.
                drain_ready(w, &ctx);
                guard.clear_ready();
            }
            _ = w.rearm.notified() => {}
            _ = &mut timer => {
                let Some(ctx) = ctx.upgrade() else { return };
                on_timer(w, &ctx);
            }
        }
    }
}

/// Takes the ready events from the epoll set and handles them until it has none left.
fn drain_ready(w: &Watcher, ctx: &Arc<ListenerCtx>) {
    let mut events = [std::mem::MaybeUninit::<epoll::Event>::uninit(); BATCH];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        let ready = match epoll::wait(w.epoll.get_ref(), &mut events, Some(&zero)) {
            Ok((ready, _)) => ready,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                // Not expected on a valid epoll fd; the watcher waits for the next readiness
                // rather than spin on the error.
                tracing::warn!(error = %e, "idle watcher: epoll_wait failed");
                return;
            }
        };
        if ready.is_empty() {
            return;
        }
        on_events(w, ctx, ready);
    }
}

/// Reads what arrived on each ready connection; serves or closes it.
fn on_events(w: &Watcher, ctx: &Arc<ListenerCtx>, events: &[epoll::Event]) {
    let mut done = Vec::new();
    {
        let mut t = lock(&w.table);
        for ev in events {
            let token = ev.data.u64();
            let Some(e) = t.get(token) else {
                continue;
            };
            let mut buf = [0u8; FIRST_READ];
            let outcome = match (&e.stream).read(&mut buf) {
                Ok(0) => "client closed",
                Ok(n) => {
                    e.conn
                        .stats()
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                    let Some(e) = t.remove(token) else { continue };
                    done.push(Outcome::Serve(e, BytesMut::from(&buf[..n])));
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => "client closed",
            };
            if let Some(e) = t.remove(token) {
                done.push(Outcome::Close(e, outcome));
            }
        }
    }
    for o in done {
        match o {
            Outcome::Serve(e, buf) => {
                w.unwatch(&e);
                let Entry {
                    stream,
                    conn,
                    permit,
                } = e;
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(s) => {
                        tokio::spawn(server::serve(ctx.clone(), conn, s, buf, permit, false));
                    }
                    Err(err) => {
                        tracing::warn!(conn = conn.stats().id, error = %err, "cannot serve idle connection");
                        close_log(ctx, &conn, "error");
                    }
                }
            }
            // Dropping the socket closes it, which also takes it out of the epoll set.
            Outcome::Close(e, reason) => close_log(ctx, &e.conn, reason),
        }
    }
}

/// Closes the connections whose keep-alive deadline passed.
fn on_timer(w: &Watcher, ctx: &ListenerCtx) {
    let now = w.now_tick();
    let mut expired = Vec::new();
    {
        let mut t = lock(&w.table);
        while let Some(e) = t.pop_due(now) {
            expired.push(e);
        }
    }
    for e in expired {
        close_log(ctx, &e.conn, "idle timeout");
    }
}

/// Acts on park, drain and kill requests for the watched connections.
fn on_signals(w: &Watcher, ctx: &ListenerCtx) {
    let asked = lock(&w.table).take_where(|e| e.conn.signalled());
    for e in asked {
        w.unwatch(&e);
        let bits = e.conn.stats().signals();
        if bits & SIG_KILL != 0 {
            close_log(ctx, &e.conn, "killed");
        } else if bits & SIG_PARK != 0 {
            server::park_std(ctx, e.conn, e.stream, bytes::Bytes::new());
        } else {
            close_log(ctx, &e.conn, "drained");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a watched connection costs in the table (the figure in docs/BENCHMARKS.md).
    #[test]
    fn an_entry_stays_small() {
        let entry = std::mem::size_of::<Entry>();
        assert!(entry <= 40, "{entry}");
        let slot = table::slot_size::<Entry>();
        assert!(slot <= 56, "{slot}");
    }
}
