//! What is in force for a process, read back from the kernel rather than assumed: its
//! `/proc/PID/status` (uid, gid, groups, `NoNewPrivs`, effective capabilities, allowed CPUs,
//! its pid in each nested PID namespace). That file is world-readable, so the supervisor can
//! read it for workers that run as another user without `CAP_SYS_PTRACE`; the namespaces it
//! cannot look up that way (`/proc/PID/ns/*` needs ptrace access) it records when it creates
//! them ([`super::namespaces::Placement`]).

use serde::{Deserialize, Serialize};

/// The value of `Key:` in a `/proc/PID/status` text.
pub(super) fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// The credentials and placement of one process as the kernel reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InForce {
    /// Real, effective, saved uid.
    pub uid: Vec<u32>,
    /// Real, effective, saved gid.
    pub gid: Vec<u32>,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// `NoNewPrivs: 1`.
    pub no_new_privs: bool,
    /// Effective capabilities, by name (empty: none).
    pub capabilities: Vec<String>,
    /// `Cpus_allowed_list`, e.g. `0-1`.
    pub cpus: String,
    /// Its own pid namespace (its `NSpid` has more than one entry).
    pub own_pid_namespace: bool,
}

fn ids(v: Option<&str>, n: usize) -> Vec<u32> {
    v.unwrap_or_default()
        .split_whitespace()
        .take(n)
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// Reads `/proc/PID/status` (`None`: this process's own).
pub fn in_force(pid: Option<u32>) -> std::io::Result<InForce> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_string(),
    };
    let s = std::fs::read_to_string(path)?;
    let cap_eff = field(&s, "CapEff")
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0);
    Ok(InForce {
        uid: ids(field(&s, "Uid"), 3),
        gid: ids(field(&s, "Gid"), 3),
        groups: ids(field(&s, "Groups"), usize::MAX),
        no_new_privs: field(&s, "NoNewPrivs") == Some("1"),
        capabilities: super::privileges::names(rustix::thread::CapabilitySet::from_bits_retain(
            cap_eff,
        )),
        cpus: field(&s, "Cpus_allowed_list")
            .unwrap_or_default()
            .to_string(),
        own_pid_namespace: field(&s, "NSpid").is_some_and(|v| v.split_whitespace().count() > 1),
    })
}

/// This process's pid as its parent sees it: the first `NSpid` entry of a `/proc` mounted
/// for the parent's PID namespace (a worker in its own namespace is pid 1 to itself). Read
/// before the worker mounts its own `/proc`, so log lines carry the pid an operator can use.
pub fn outer_pid() -> u32 {
    // Read once, at the first call (logging's set-up, before a worker mounts its own
    // `/proc`, where NSpid would only say 1): a process's pid never changes.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| field(&s, "NSpid")?.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(std::process::id)
    })
}

/// The namespace id of `/proc/self/ns/KIND` (or `/proc/thread-self/…` for `thread`), e.g.
/// `mnt:[4026531841]`.
pub(super) fn ns_id(kind: &str, thread: bool) -> Option<String> {
    let base = if thread { "thread-self" } else { "self" };
    std::fs::read_link(format!("/proc/{base}/ns/{kind}"))
        .ok()
        .map(|p| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = in_force(None).unwrap();
        assert_eq!(me.uid.len(), 3);
        assert_eq!(me.uid[0], rustix::process::getuid().as_raw());
        assert!(!me.cpus.is_empty());
        assert_eq!(outer_pid(), std::process::id());
        assert!(ns_id("mnt", false).unwrap().starts_with("mnt:["));
    }
}
