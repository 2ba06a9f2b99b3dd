//! Privilege drop: `no_new_privs`, the capability bounding set, supplementary groups, gid,
//! uid, then the capabilities kept (permitted, effective, inheritable and ambient, so a
//! successor started by `execve` keeps them too).
//!
//! Credentials are per *thread* on Linux (`setresuid(2)` the syscall, `capset(2)`,
//! `PR_SET_NO_NEW_PRIVS` and `PR_CAPBSET_DROP` all act on the calling thread only; glibc
//! broadcasts only the set*id calls to the other threads). So every function here must run
//! while the process has a single thread — before the tokio runtime and the allocator's purge
//! thread start — and checks that it does: every thread created later inherits the result.

use super::IsolationError;
use rustix::process::{Gid, Uid};
use rustix::thread::{self, CapabilitySet, CapabilitySets};

/// Fails unless the calling process has exactly one thread.
pub(super) fn ensure_single_thread(what: &str) -> Result<(), IsolationError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| IsolationError::Other(format!("{what}: /proc/self/status: {e}")))?;
    let threads = super::report::field(&status, "Threads").unwrap_or_default();
    if threads.trim() != "1" {
        return Err(IsolationError::Other(format!(
            "{what}: must run before any other thread starts (this process has {threads})"
        )));
    }
    Ok(())
}

/// The highest capability number the kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63)
}

/// Maps `runtime.capabilities` names to their bits.
pub fn by_name(name: &str) -> Option<CapabilitySet> {
    Some(match name {
        "net_bind_service" => CapabilitySet::NET_BIND_SERVICE,
        "net_admin" => CapabilitySet::NET_ADMIN,
        "net_raw" => CapabilitySet::NET_RAW,
        "sys_resource" => CapabilitySet::SYS_RESOURCE,
        "ipc_lock" => CapabilitySet::IPC_LOCK,
        "sys_nice" => CapabilitySet::SYS_NICE,
        "kill" => CapabilitySet::KILL,
        "setuid" => CapabilitySet::SETUID,
        "setgid" => CapabilitySet::SETGID,
        "setpcap" => CapabilitySet::SETPCAP,
        "sys_admin" => CapabilitySet::SYS_ADMIN,
        "dac_override" => CapabilitySet::DAC_OVERRIDE,
        _ => return None,
    })
}

/// Lower-case names of the capabilities in `set` (numbers for ones without a name here).
pub fn names(set: CapabilitySet) -> Vec<String> {
    const KNOWN: &[&str] = &[
        "net_bind_service",
        "net_admin",
        "net_raw",
        "sys_resource",
        "ipc_lock",
        "sys_nice",
        "kill",
        "setuid",
        "setgid",
        "setpcap",
        "sys_admin",
        "dac_override",
    ];
    (0..64)
        .map(|n| CapabilitySet::from_bits_retain(1 << n))
        .filter(|c| set.contains(*c))
        .map(|c| {
            KNOWN.iter().find(|k| by_name(k) == Some(c)).map_or_else(
                || format!("cap_{}", c.bits().trailing_zeros()),
                |k| k.to_string(),
            )
        })
        .collect()
}

/// Sets `no_new_privs` and lowers the bounding set to `keep`: nothing this process or its
/// children exec can gain a capability outside `keep` (a setuid-root binary included).
fn restrict_bounding_set(keep: CapabilitySet) -> Result<(), IsolationError> {
    thread::set_no_new_privs(true)
        .map_err(|e| IsolationError::Other(format!("cannot set no_new_privs: {e}")))?;
    for n in 0..=last_cap() {
        let cap = CapabilitySet::from_bits_retain(1 << n);
        if keep.contains(cap) || !thread::capability_is_in_bounding_set(cap).unwrap_or(false) {
            continue;
        }
        thread::remove_capability_from_bounding_set(cap).map_err(|e| {
            IsolationError::Other(format!(
                "cannot drop capability {n} from the bounding set: {e}"
            ))
        })?;
    }
    Ok(())
}

/// Keeps only `keep` in every capability set of this thread; with `ambient`, raises them in
/// the ambient set too (kept across the `execve` of a successor that is not root).
fn restrict_sets(keep: CapabilitySet, ambient: bool) -> Result<(), IsolationError> {
    let have = thread::capabilities(None)
        .map_err(|e| IsolationError::Other(format!("cannot read capabilities: {e}")))?;
    let keep = keep & have.permitted;
    thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: keep,
        },
    )
    .map_err(|e| IsolationError::Other(format!("cannot set capabilities: {e}")))?;
    thread::clear_ambient_capability_set()
        .map_err(|e| IsolationError::Other(format!("cannot clear ambient capabilities: {e}")))?;
    for c in CapabilitySet::all()
        .iter()
        .filter(|c| ambient && keep.contains(*c))
    {
        thread::configure_capability_in_ambient_set(c, true).map_err(|e| {
            IsolationError::Other(format!("cannot keep capability {:?}: {e}", names(c)))
        })?;
    }
    Ok(())
}

/// Stays at the same uid (root: the supervisor, or an isolated worker without
/// `runtime.user`), keeps only `keep`, sets `no_new_privs`. What a process of uid 0 execs
/// afterwards (the supervisor's re-exec, a worker) gets the bounding set: `keep` from now on.
pub fn restrict_capabilities(keep: CapabilitySet) -> Result<(), IsolationError> {
    ensure_single_thread("restricting capabilities")?;
    let keep = keep & thread::capabilities(None).map_or(keep, |c| c.permitted);
    if thread::capability_is_in_bounding_set(CapabilitySet::SETPCAP).unwrap_or(false)
        && thread::capabilities(None).is_ok_and(|c| c.effective.contains(CapabilitySet::SETPCAP))
    {
        restrict_bounding_set(keep)?;
    } else {
        // Already restricted (a re-exec without setpcap): the bounding set cannot be lowered
        // any more, and it is already no more than what a previous image kept.
        thread::set_no_new_privs(true)
            .map_err(|e| IsolationError::Other(format!("cannot set no_new_privs: {e}")))?;
    }
    restrict_sets(keep, false)
}

/// Switches this (single-threaded) process to `uid`/`gid` with no supplementary group,
/// `no_new_privs`, and only `keep` among its capabilities. A process already running as that
/// user (a successor started by one that dropped) only checks and tightens what it has.
pub fn drop_to(uid: u32, gid: u32, keep: CapabilitySet) -> Result<(), IsolationError> {
    ensure_single_thread("dropping privileges")?;
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    let already = rustix::process::getuid() == uid
        && rustix::process::geteuid() == uid
        && rustix::process::getgid() == gid
        && rustix::process::getegid() == gid;
    if already {
        // Lowering is allowed without privileges; the bounding set only with CAP_SETPCAP,
        // which such a process no longer has (its predecessor already lowered it).
        thread::set_no_new_privs(true)
            .map_err(|e| IsolationError::Other(format!("cannot set no_new_privs: {e}")))?;
        return restrict_sets(keep, true);
    }
    if !rustix::process::geteuid().is_root() {
        return Err(IsolationError::Other(format!(
            "cannot switch to uid {} gid {}: running as uid {}, not root",
            uid.as_raw(),
            gid.as_raw(),
            rustix::process::geteuid().as_raw()
        )));
    }
    restrict_bounding_set(keep)?;
    if !keep.is_empty() {
        // Otherwise the uid change below empties the permitted set.
        thread::set_keep_capabilities(true)
            .map_err(|e| IsolationError::Other(format!("cannot keep capabilities: {e}")))?;
    }
    let fail =
        |what: &str, e: rustix::io::Errno| IsolationError::Other(format!("cannot {what}: {e}"));
    thread::set_thread_groups(&[]).map_err(|e| fail("clear supplementary groups", e))?;
    thread::set_thread_res_gid(gid, gid, gid).map_err(|e| fail("set the group", e))?;
    thread::set_thread_res_uid(uid, uid, uid).map_err(|e| fail("set the user", e))?;
    if !keep.is_empty() {
        thread::set_keep_capabilities(false)
            .map_err(|e| IsolationError::Other(format!("cannot reset keep-caps: {e}")))?;
    }
    restrict_sets(keep, true)?;
    // Never trust the calls alone: a process that could get root back must not serve.
    if thread::set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT).is_ok() {
        return Err(IsolationError::Other(
            "the privilege drop did not hold: uid 0 could be set again".into(),
        ));
    }
    Ok(())
}
