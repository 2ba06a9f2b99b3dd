//! Spreading new connections across workers that share one accept queue (multi-process mode,
//! `accept: shared`). Every worker's epoll is woken by each new connection and the first to
//! call `accept` wins, which left 6 tunnels on one worker and 44 on the other: the kernel's
//! wake order, not the workers' load, decided. EPOLLEXCLUSIVE does not help (it wakes the
//! first waiter in a fixed order, the same imbalance), so baton does what nginx's
//! `accept_mutex` and `ngx_accept_disabled` aim at, with a board instead of a lock: a worker
//! that serves more connections than the least loaded live worker (plus [`SLACK`]) stops
//! accepting until that one has caught up. One queue stays: a worker that dies or stalls
//! leaves nothing behind.
//!
//! The board is a small memfd the supervisor creates and every worker inherits: one
//! [`Entry`] per worker index (its live connection count and a beat that moves while it
//! accepts), read and written with `pread`/`pwrite` (no shared mapping, no unsafe code). A
//! worker whose beat has not moved for [`LIVE_FOR`] (stalled, stopped, or an old worker
//! handing over) or that the supervisor marked gone does not hold the others back.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many more connections than the least loaded live worker a worker may hold and still
/// accept.
pub const SLACK: u64 = 1;
/// A worker whose beat did not move for this long is not waited for.
pub const LIVE_FOR: Duration = Duration::from_millis(300);
/// How often an accepting worker beats (and publishes its count while idle).
pub const BEAT: Duration = Duration::from_millis(50);
/// How often a worker that stands aside looks at the board again.
const RECHECK: Duration = Duration::from_millis(2);
/// A slot no worker serves (the supervisor writes it when a worker exits).
const GONE: u64 = u64::MAX;
/// Bytes per entry: count, beat.
const ENTRY: usize = 16;

/// One worker's entry on the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    count: u64,
    beat: u64,
}

fn decode(b: &[u8]) -> Entry {
    let word = |r: std::ops::Range<usize>| {
        b.get(r)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .map_or(0, u64::from_le_bytes)
    };
    Entry {
        count: word(0..8),
        beat: word(8..16),
    }
}

/// The board, as the supervisor holds it: created at start, kept across its re-exec, an entry
/// marked gone when a worker exits.
#[derive(Debug)]
pub struct Board {
    file: File,
    workers: usize,
}

impl Board {
    /// A new board for `workers` workers, inheritable (not close-on-exec): every process the
    /// supervisor starts gets it, and so does its own next image.
    pub fn create(workers: usize) -> std::io::Result<Board> {
        let fd = rustix::fs::memfd_create("baton-accept-board", rustix::fs::MemfdFlags::empty())?;
        let file = File::from(fd);
        file.set_len((workers * ENTRY) as u64)?;
        let b = Board { file, workers };
        for i in 0..workers {
            b.gone(i);
        }
        Ok(b)
    }

    /// The board inherited as `fd` (after the supervisor's re-exec, or in a worker).
    pub fn adopt(fd: OwnedFd, workers: usize) -> Board {
        Board {
            file: File::from(fd),
            workers,
        }
    }

    /// Its fd number, for a worker's command line and the re-exec state.
    pub fn raw_fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.file)
    }

    /// Marks slot `index` as served by no worker (it exited): nobody waits for it.
    pub fn gone(&self, index: usize) {
        self.write(
            index,
            Entry {
                count: GONE,
                beat: 0,
            },
        );
    }

    fn write(&self, index: usize, e: Entry) {
        let mut b = [0u8; ENTRY];
        b[..8].copy_from_slice(&e.count.to_le_bytes());
        b[8..].copy_from_slice(&e.beat.to_le_bytes());
        // 16 bytes at an aligned offset of a memfd: written whole or not at all. A failure
        // only makes the spread less even.
        let _ = self.file.write_all_at(&b, (index * ENTRY) as u64);
    }

    fn read(&self) -> Vec<Entry> {
        let mut b = vec![0u8; self.workers * ENTRY];
        if self.file.read_exact_at(&mut b, 0).is_err() {
            return Vec::new();
        }
        b.chunks(ENTRY).map(decode).collect()
    }
}

/// One worker's side: publishes its load, and decides when it takes its turn to accept.
#[derive(Debug)]
pub struct Turn {
    board: Board,
    index: usize,
    /// Whether this worker's listeners accept (not while it hands over or drains).
    accepting: AtomicBool,
    beat: AtomicU64,
    /// Per other worker: the last beat seen and when it was seen to move.
    seen: Mutex<Vec<(u64, Instant)>>,
}

impl Turn {
    /// Worker `index`'s side of `board`.
    pub fn new(board: Board, index: usize) -> Turn {
        let now = Instant::now();
        Turn {
            seen: Mutex::new(vec![(0, now); board.workers]),
            board,
            index,
            accepting: AtomicBool::new(false),
            beat: AtomicU64::new(0),
        }
    }

    /// Starts or stops taking part (the listeners accept, or are paused for a handover).
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::Relaxed);
    }

    /// Writes this worker's count and moves its beat.
    pub fn publish(&self, count: usize) {
        if !self.accepting.load(Ordering::Relaxed) {
            return;
        }
        let beat = self.beat.fetch_add(1, Ordering::Relaxed) + 1;
        self.board.write(
            self.index,
            Entry {
                count: count as u64,
                beat,
            },
        );
    }

    /// The least count among the other live workers, `None` if there is none.
    fn least_other(&self) -> Option<u64> {
        let entries = self.board.read();
        let now = Instant::now();
        let mut seen = self.seen.lock().ok()?;
        let mut least: Option<u64> = None;
        for (i, e) in entries.iter().enumerate() {
            let Some(s) = seen.get_mut(i) else { continue };
            if e.beat != s.0 {
                *s = (e.beat, now);
            }
            if i == self.index || e.count == GONE || now.duration_since(s.1) > LIVE_FOR {
                continue;
            }
            least = Some(least.map_or(e.count, |l| l.min(e.count)));
        }
        least
    }

    /// Waits until this worker may accept: it serves no more than [`SLACK`] connections more
    /// than the least loaded other live worker. `count` gives its live connections.
    pub async fn wait(&self, count: impl Fn() -> usize) {
        loop {
            let mine = count();
            self.publish(mine);
            match self.least_other() {
                Some(least) if mine as u64 > least.saturating_add(SLACK) => {
                    tokio::time::sleep(RECHECK).await;
                }
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Turn, Turn) {
        let board = Board::create(2).unwrap();
        let dup = board.file.try_clone().unwrap();
        let a = Turn::new(board, 0);
        let b = Turn::new(Board::adopt(OwnedFd::from(dup), 2), 1);
        a.set_accepting(true);
        b.set_accepting(true);
        (a, b)
    }

    #[tokio::test]
    async fn a_worker_ahead_of_a_live_one_stands_aside_until_it_catches_up() {
        let (a, b) = pair();
        b.publish(3);
        // Not ahead: goes at once.
        a.wait(|| 4).await;
        // Ahead by two: waits while b is live and behind.
        let waiting = tokio::time::timeout(Duration::from_millis(50), a.wait(|| 5)).await;
        assert!(
            waiting.is_err(),
            "a went ahead of a live, less loaded worker"
        );
        b.publish(4);
        tokio::time::timeout(Duration::from_secs(5), a.wait(|| 5))
            .await
            .expect("b caught up");
    }

    #[tokio::test]
    async fn a_stalled_or_gone_worker_holds_nobody_back() {
        let (a, b) = pair();
        b.publish(0);
        // b never beats again: after LIVE_FOR it is not waited for.
        tokio::time::timeout(LIVE_FOR * 10, a.wait(|| 10))
            .await
            .expect("a stalled worker held the others back");
        b.publish(0);
        a.board.gone(1);
        tokio::time::timeout(Duration::from_millis(100), a.wait(|| 10))
            .await
            .expect("a gone worker held the others back");
    }
}
