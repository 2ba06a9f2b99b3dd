//! What a process is to the others, chosen once when it starts (`baton run` or `baton
//! worker`) and given to it in [`super::RunOptions`]. The run loop and the upgrade path ask
//! the role where the two differ, instead of checking a flag in each place:
//!
//! | | single | worker |
//! |---|---|---|
//! | first listeners | bound here (or systemd's, or a predecessor's) | its supervisor's, through a take-over ([`super::worker`]) |
//! | control socket, pid file, admin endpoint | its own | its supervisor's |
//! | `baton upgrade` | starts a successor | refused: the supervisor replaces its workers |
//! | session-ticket keys | its own, rotated here | its supervisor's ([`Ticketer::follower`]) |
//! | `accept: shared` | — | takes turns with the other workers ([`crate::spread`]) |
//! | a take-over with no history | an upgrade from an older predecessor | its first start |
//! | the predecessor's counters | added to its own | left to the supervisor, which adds up every worker's |

use crate::tls::tickets::Ticketer;
use std::os::fd::RawFd;

/// What this process is: a process of its own, or one worker of a supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A process of its own (`baton run` with one worker), first generation or successor.
    Single,
    /// Worker `index` of a supervisor (`baton worker`).
    Worker {
        /// Its position among the supervisor's workers.
        index: usize,
        /// `accept: shared`: the supervisor's accept board, an inherited fd.
        accept_board: Option<RawFd>,
    },
}

impl Role {
    /// The worker's index (`None` for a process of its own).
    pub fn worker_index(&self) -> Option<usize> {
        match self {
            Role::Single => None,
            Role::Worker { index, .. } => Some(*index),
        }
    }

    /// Whether this process serves the control socket, writes the pid file and serves
    /// `admin.listen` once it serves (a worker's supervisor does all three).
    pub(super) fn owns_control(&self) -> bool {
        *self == Role::Single
    }

    /// Why this process refuses to upgrade itself, if it does.
    pub(super) fn upgrade_refusal(&self) -> Option<&'static str> {
        match self {
            Role::Single => None,
            Role::Worker { .. } => {
                Some("upgrade refused: this is a worker; upgrade its supervisor")
            }
        }
    }

    /// The session-ticket keys this process starts with.
    pub(super) fn ticketer(&self) -> Ticketer {
        match self {
            Role::Single => Ticketer::default(),
            Role::Worker { .. } => Ticketer::follower(),
        }
    }

    /// Whether this process adds its predecessor's counters to its own at the end of a
    /// take-over, so they continue instead of restarting at zero. A worker does not: its
    /// supervisor adds up its workers' counters and keeps those of every worker gone, so a
    /// replacement carrying its old worker's would count them twice (and the totals would dip
    /// between the old one's exit and the new one's next heartbeat).
    pub(super) fn carries_counters(&self) -> bool {
        *self == Role::Single
    }

    /// Whether a take-over whose predecessor passed no upgrade history was a first start
    /// rather than an upgrade: a worker's first predecessor is its supervisor, which has no
    /// history to pass on (an old worker's ends with the record of this very upgrade).
    pub(super) fn first_start_without_history(&self) -> bool {
        matches!(self, Role::Worker { .. })
    }
}
