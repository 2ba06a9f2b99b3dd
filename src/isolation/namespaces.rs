//! Where a worker is placed when the supervisor spawns it: its CPUs and, with
//! `worker_isolation`, new PID, mount and IPC namespaces with a read-only view of the host's
//! files.
//!
//! How: namespaces belong to a *thread* until it creates a process. The supervisor starts a
//! short-lived thread per worker; that thread pins itself to the worker's CPUs, calls
//! `unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC)` (allowed in a multi-threaded process:
//! none of these flags shares memory or a signal table, and `CLONE_NEWNS` only gives this
//! thread its own `fs_struct`), makes every mount of its new mount namespace private (so
//! nothing propagates back to the host) and read-only, except the log file's folder, and then
//! spawns the worker the usual way (`handover::spawn_successor`: `baton worker` with its
//! inherited channel). The child is created inside what the thread prepared: PID 1 of a new
//! PID namespace, in the read-only mount namespace, on its CPUs. Only `/proc` is left to the
//! worker itself, early in `main`: a proc instance shows the PID namespace of whoever mounts
//! it, so it must be mounted from inside ([`mount_own_proc`]).
//!
//! Why not `pre_exec`: a `unshare(CLONE_NEWPID)` there would only apply to the children of
//! the exec'd worker, not to the worker; and code between `fork` and `exec` of a tokio process
//! must be async-signal-safe, which a mount table walk is not. A thread needs neither.
//! Why not a user namespace: it would let the worker be "root" over its namespaces, which is
//! more than it needs; the supervisor runs as root anyway to bind listeners.
//!
//! The handover is untouched by all this: listeners and connections arrive as fds over the
//! inherited socketpair (an fd works in any namespace), and a worker's successor is spawned
//! by the supervisor the same way, so it gets the same isolation.
#![allow(unsafe_code)]

use super::report::ns_id;
use rustix::mount::{MountFlags, MountPropagationFlags};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the supervisor set up for one worker, for status (and kept across its re-exec).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The CPUs it was pinned to (a CPU list), if pinning is configured.
    pub cpus: Option<String>,
    /// Namespaces of its own: (kind, id) e.g. `("mnt", "mnt:[4026532301]")`.
    pub namespaces: Vec<(String, String)>,
    /// Its mount namespace is read-only except `writable`.
    pub read_only: bool,
    /// Paths left writable.
    pub writable: Vec<PathBuf>,
    /// What the host refused (empty when everything asked for is in force).
    pub refused: Vec<String>,
}

/// What to prepare for a worker.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Pin to these CPUs.
    pub cpus: Option<Vec<usize>>,
    /// New PID, mount and IPC namespaces.
    pub namespaces: bool,
    /// Paths to keep writable in the mount namespace.
    pub writable: Vec<PathBuf>,
}

/// Runs `spawn` on a new thread placed as `plan` says; returns its result and what is in force.
pub fn spawn_placed<R: Send>(plan: &Plan, spawn: impl FnOnce() -> R + Send) -> (R, Placement) {
    if plan.cpus.is_none() && !plan.namespaces {
        // Nothing to prepare: spawn from this thread, as without isolation.
        return (spawn(), Placement::default());
    }
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            let mut placement = prepare_thread(plan);
            let r = spawn();
            // A new PID namespace has an id only once its first process exists.
            if placement.read_only || !placement.namespaces.is_empty() {
                if let Some(id) = ns_id("pid_for_children", true) {
                    placement.namespaces.insert(0, ("pid".to_string(), id));
                }
            }
            (r, placement)
        });
        match t.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

fn prepare_thread(plan: &Plan) -> Placement {
    let mut p = Placement::default();
    if let Some(cpus) = &plan.cpus {
        let l = super::affinity::list(cpus);
        match super::affinity::pin(cpus) {
            Ok(()) => p.cpus = Some(l),
            Err(e) => p.refused.push(format!("cpu_affinity {l}: {e}")),
        }
    }
    if !plan.namespaces {
        return p;
    }
    let flags = rustix::thread::UnshareFlags::NEWPID
        | rustix::thread::UnshareFlags::NEWNS
        | rustix::thread::UnshareFlags::NEWIPC;
    // SAFETY: `unshare_unsafe` is unsafe only because of `CLONE_FILES`, which would give this
    // thread an fd table of its own while other threads hold fds of the shared one. These
    // flags do not include it: the thread keeps the process's fd table, memory and signal
    // handlers, and only its namespace pointers (and its own `fs_struct`, for NEWNS) change.
    if let Err(e) = unsafe { rustix::thread::unshare_unsafe(flags) } {
        p.refused
            .push(format!("worker_isolation: unshare(PID, mount, IPC): {e}"));
        return p;
    }
    for (kind, link) in [("mnt", "mnt"), ("ipc", "ipc")] {
        if let Some(id) = ns_id(link, true) {
            p.namespaces.push((kind.to_string(), id));
        }
    }
    match read_only_mounts(&plan.writable) {
        Ok(errors) => {
            p.read_only = true;
            p.writable = plan.writable.clone();
            p.refused.extend(errors);
        }
        Err(e) => p
            .refused
            .push(format!("worker_isolation: read-only mounts: {e}")),
    }
    p
}

/// Mount options (from mountinfo) that a bind remount must repeat, or it would clear them.
fn kept_flags(options: &str) -> MountFlags {
    let mut f = MountFlags::empty();
    for o in options.split(',') {
        f |= match o {
            "nosuid" => MountFlags::NOSUID,
            "nodev" => MountFlags::NODEV,
            "noexec" => MountFlags::NOEXEC,
            "noatime" => MountFlags::NOATIME,
            "nodiratime" => MountFlags::NODIRATIME,
            "relatime" => MountFlags::RELATIME,
            "nosymfollow" => MountFlags::NOSYMFOLLOW,
            _ => MountFlags::empty(),
        };
    }
    f
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(d) = octal {
            let n =
                u16::from(d[0] - b'0') * 64 + u16::from(d[1] - b'0') * 8 + u16::from(d[2] - b'0');
            out.push(n as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (mount point, per-mount options) of every mount of this thread's mount namespace.
fn mounts() -> std::io::Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string("/proc/thread-self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let point = f.nth(4)?;
            let opts = f.next()?;
            Some((unescape(point), opts.to_string()))
        })
        .collect())
}

/// Makes every mount private and read-only, then `writable` paths writable again (bound on
/// themselves, nosuid, nodev, noexec). Returns the mounts that could not be made read-only
/// (other than `/`, whose failure is an error).
fn read_only_mounts(writable: &[PathBuf]) -> std::io::Result<Vec<String>> {
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )?;
    let mut errors = Vec::new();
    for (point, opts) in mounts()? {
        let flags = MountFlags::BIND | MountFlags::RDONLY | kept_flags(&opts);
        if let Err(e) = rustix::mount::mount_remount(point.as_str(), flags, "") {
            if point == "/" {
                return Err(e.into());
            }
            errors.push(format!("{point} stays writable: {e}"));
        }
    }
    for w in writable {
        let bound = rustix::mount::mount_bind(w, w).and_then(|()| {
            rustix::mount::mount_remount(
                w,
                MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                "",
            )
        });
        if let Err(e) = bound {
            errors.push(format!("{} stays read-only: {e}", w.display()));
        }
    }
    Ok(errors)
}

/// In a worker that is PID 1 of its own namespace: mounts a `/proc` of that namespace
/// (read-only), so the worker sees only itself there. Must run before the runtime starts.
pub fn mount_own_proc() -> std::io::Result<()> {
    rustix::mount::mount(
        "proc",
        Path::new("/proc"),
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::RDONLY,
        None,
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_details() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape(r"/end\"), r"/end\");
        let f = kept_flags("rw,nosuid,nodev,relatime");
        assert!(f.contains(MountFlags::NOSUID | MountFlags::NODEV | MountFlags::RELATIME));
        assert!(!f.contains(MountFlags::NOEXEC));
    }
}
