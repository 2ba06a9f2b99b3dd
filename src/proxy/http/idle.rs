//! The idle watcher: keep-alive connections released from hyper wait here for their next
//! request with no task and no tokio registration of their own.
//!
//! One watcher per HTTP listener, started by the first release. It owns an epoll set
//! (registered in tokio as one [`AsyncFd`]) holding every released connection's socket, a table
//! of {socket, [`ConnHandle`], connection permit, idle-since}, and the keep-alive deadlines in
//! order. An idle connection costs that entry (≈ 200 bytes with the kernel's own epoll item
//! outside the process) instead of a task (≈ 640 bytes) and a tokio `ScheduledIo` (256 bytes).
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
use crate::proxy::tcp::close_log;
use crate::proxy::ListenerCtx;
use crate::registry::{ConnHandle, SIG_KILL, SIG_PARK};
use bytes::BytesMut;
use rustix::event::epoll;
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
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

/// One watched connection.
#[derive(Debug)]
struct Entry {
    idle: Idle,
    /// Its keep-alive deadline (its key in [`Table::deadlines`]).
    deadline: Instant,
}

#[derive(Debug, Default)]
struct Table {
    /// The next token (epoll user data); never reused, so an event of a removed entry read in
    /// the same batch finds nothing.
    next: u64,
    entries: HashMap<u64, Entry>,
    /// Keep-alive deadlines, earliest first.
    deadlines: BTreeSet<(Instant, u64)>,
}

impl Table {
    fn remove(&mut self, token: u64) -> Option<Entry> {
        let e = self.entries.remove(&token)?;
        self.deadlines.remove(&(e.deadline, token));
        Some(e)
    }
}

/// The idle watcher of one listener.
#[derive(Debug)]
pub struct Watcher {
    epoll: AsyncFd<OwnedFd>,
    table: Mutex<Table>,
    /// Woken when an entry's deadline is earlier than every other (the timer must move).
    rearm: Notify,
    /// The timers' time origin, to round deadlines to [`GRANULARITY`].
    base: Instant,
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
        if idle.conn.signalled() {
            return Err(idle);
        }
        let token = t.next;
        let flags = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        if let Err(e) = epoll::add(
            self.epoll.get_ref(),
            &idle.stream,
            epoll::EventData::new_u64(token),
            flags,
        ) {
            tracing::debug!(conn = idle.conn.stats().id, error = %e, "cannot watch idle connection");
            return Err(idle);
        }
        t.next += 1;
        let deadline = idle.idle_since + ctx.cfg.http.keepalive_timeout;
        let earliest = t.deadlines.first().is_none_or(|&(d, _)| deadline < d);
        t.deadlines.insert((deadline, token));
        t.entries.insert(token, Entry { idle, deadline });
        drop(t);
        if earliest {
            self.rearm.notify_one();
        }
        Ok(())
    }

    /// Number of watched connections.
    pub fn len(&self) -> usize {
        lock(&self.table).entries.len()
    }

    /// Whether no connection is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the timer should fire next: the earliest deadline, rounded up to [`GRANULARITY`].
    fn next_tick(&self) -> Option<Instant> {
        let d = lock(&self.table).deadlines.first()?.0;
        let g = GRANULARITY.as_nanos();
        let since = d.saturating_duration_since(self.base).as_nanos();
        let ticks = since.div_ceil(g);
        Some(self.base + Duration::from_nanos(u64::try_from(ticks * g).unwrap_or(u64::MAX)))
    }

    /// Removes `token`'s socket from the epoll set (before it leaves the process or goes to
    /// tokio: the set would otherwise keep reporting it).
    fn unwatch(&self, e: &Entry) {
        let _ = epoll::delete(self.epoll.get_ref(), &e.idle.stream);
    }
}

/// What became of a watched connection that had an event.
enum Outcome {
    /// Request bytes arrived: serve them.
    Serve(Entry, BytesMut),
    /// Closed, for this reason.
    Close(Entry, &'static str),
}

async fn run(w: Arc<Watcher>, ctx: Weak<ListenerCtx>, mut signals: watch::Receiver<u64>) {
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
                on_signals(&w, &ctx);
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
                drain_ready(&w, &ctx);
                guard.clear_ready();
            }
            _ = w.rearm.notified() => {}
            _ = &mut timer => {
                let Some(ctx) = ctx.upgrade() else { return };
                on_timer(&w, &ctx);
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
            let Some(e) = t.entries.get_mut(&token) else {
                continue;
            };
            let mut buf = [0u8; FIRST_READ];
            let outcome = match (&e.idle.stream).read(&mut buf) {
                Ok(0) => "client closed",
                Ok(n) => {
                    e.idle
                        .conn
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
                let Idle {
                    stream,
                    conn,
                    permit,
                    ..
                } = e.idle;
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(s) => {
                        tokio::spawn(server::serve(ctx.clone(), conn, s, buf, permit));
                    }
                    Err(err) => {
                        tracing::warn!(conn = conn.stats().id, error = %err, "cannot serve idle connection");
                        close_log(ctx, &conn, "error");
                    }
                }
            }
            // Dropping the socket closes it, which also takes it out of the epoll set.
            Outcome::Close(e, reason) => close_log(ctx, &e.idle.conn, reason),
        }
    }
}

/// Closes the connections whose keep-alive deadline passed.
fn on_timer(w: &Watcher, ctx: &ListenerCtx) {
    let now = Instant::now();
    let mut expired = Vec::new();
    {
        let mut t = lock(&w.table);
        while let Some(&(d, token)) = t.deadlines.first() {
            if d > now {
                break;
            }
            if let Some(e) = t.remove(token) {
                expired.push(e);
            } else {
                t.deadlines.pop_first();
            }
        }
    }
    for e in expired {
        close_log(ctx, &e.idle.conn, "idle timeout");
    }
}

/// Acts on park, drain and kill requests for the watched connections.
fn on_signals(w: &Watcher, ctx: &ListenerCtx) {
    let asked: Vec<Entry> = {
        let mut t = lock(&w.table);
        let tokens: Vec<u64> = t
            .entries
            .iter()
            .filter(|(_, e)| e.idle.conn.signalled())
            .map(|(&k, _)| k)
            .collect();
        tokens.into_iter().filter_map(|k| t.remove(k)).collect()
    };
    for e in asked {
        w.unwatch(&e);
        let bits = e.idle.conn.stats().signals();
        if bits & SIG_KILL != 0 {
            close_log(ctx, &e.idle.conn, "killed");
        } else if bits & SIG_PARK != 0 {
            server::park_std(ctx, e.idle.conn, e.idle.stream, bytes::Bytes::new());
        } else {
            close_log(ctx, &e.idle.conn, "drained");
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
        assert!(entry <= 80, "{entry}");
    }
}
