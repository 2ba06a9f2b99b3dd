//! The isolation keys of `runtime:`: `user`, `group`, `capabilities`, `worker_isolation`,
//! `cpu_affinity`, and the `cpuset` / `io_weight` worker limits. Users and groups are looked
//! up here (`getpwnam`/`getgrnam` through nix), so `baton check` refuses one that does not
//! exist on this host instead of the process failing after it bound its listeners. What is
//! done with these values lives in [`crate::isolation`].

use super::errors::Errors;
use super::file::{self, S};
use serde::{Deserialize, Serialize};

/// Capability names `runtime.capabilities` accepts (without `cap_`), the ones a proxy may
/// have a use for. Anything else is refused: keeping, say, `sys_admin` would undo the drop.
pub const CAPABILITY_NAMES: &[&str] = &[
    "net_bind_service",
    "net_admin",
    "net_raw",
    "sys_resource",
    "ipc_lock",
    "sys_nice",
];

/// A user or group resolved on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    /// As written (or the name found for a number).
    pub name: String,
    /// The uid or gid.
    pub id: u32,
}

/// Which CPUs processes or threads are pinned to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CpuAffinity {
    /// No pinning (the default).
    #[default]
    None,
    /// Worker (or runtime thread) i on the i-th allowed CPU, modulo their number.
    Auto,
    /// Worker (or runtime thread) i on `lists[i mod len]`.
    Lists(Vec<Vec<usize>>),
}

/// The validated isolation settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Isolation {
    /// Drop to this user once the listeners are bound or received.
    pub user: Option<Account>,
    /// And this group (default: the user's primary group).
    pub group: Option<Account>,
    /// Capabilities kept after the drop (lower case, without `cap_`).
    pub capabilities: Vec<String>,
    /// Multi-process mode: each worker in new PID, mount and IPC namespaces, read-only.
    pub worker_isolation: bool,
    /// CPU pinning of workers (or of the single process's runtime threads).
    pub cpu_affinity: CpuAffinity,
}

/// `runtime.cpu_affinity` as written: `auto` or a list of CPU lists.
#[derive(Debug, Clone)]
pub enum RawCpuAffinity {
    /// A word (only `auto` is valid).
    Text(String),
    /// `[[0], [1, 2]]`.
    Lists(Vec<Vec<u64>>),
}

impl<'de> Deserialize<'de> for RawCpuAffinity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawCpuAffinity;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("auto, or a list of CPU lists such as [[0], [1]]")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawCpuAffinity, E> {
                Ok(RawCpuAffinity::Text(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawCpuAffinity, A::Error> {
                let mut lists = Vec::new();
                while let Some(l) = seq.next_element::<Vec<u64>>()? {
                    lists.push(l);
                }
                Ok(RawCpuAffinity::Lists(lists))
            }
        }
        d.deserialize_any(V)
    }
}

/// Highest CPU number accepted (the kernel's default `CPU_SETSIZE` is 1024).
const MAX_CPU: u64 = 1023;

pub(super) fn isolation(errs: &mut Errors, r: &file::Runtime) -> Isolation {
    let user = r.user.as_ref().and_then(|u| lookup_user(errs, u));
    let group = match (&r.group, &user) {
        (Some(g), Some(_)) => lookup_group(errs, g),
        (Some(g), None) => {
            errs.at(g, "runtime.group", "needs runtime.user");
            None
        }
        // The user's primary group, as nginx does.
        (None, Some(u)) => nix::unistd::User::from_uid(u.id.into())
            .ok()
            .flatten()
            .map(|pw| Account {
                id: pw.gid.as_raw(),
                name: nix::unistd::Group::from_gid(pw.gid)
                    .ok()
                    .flatten()
                    .map_or_else(|| pw.gid.to_string(), |g| g.name),
            }),
        (None, None) => None,
    };
    let mut capabilities = Vec::new();
    for c in r.capabilities.iter().flatten() {
        let name = c.value.trim().to_ascii_lowercase();
        let name = name.strip_prefix("cap_").unwrap_or(&name).to_string();
        if !CAPABILITY_NAMES.contains(&name.as_str()) {
            errs.at(
                c,
                "runtime.capabilities",
                format!(
                    "unknown or not allowed capability {:?} (allowed: {})",
                    c.value,
                    CAPABILITY_NAMES.join(", ")
                ),
            );
        } else if user.is_none() {
            errs.at(c, "runtime.capabilities", "needs runtime.user");
        } else if !capabilities.contains(&name) {
            capabilities.push(name);
        }
    }
    Isolation {
        user,
        group,
        capabilities,
        worker_isolation: r.worker_isolation.unwrap_or(false),
        cpu_affinity: r
            .cpu_affinity
            .as_ref()
            .map(|a| cpu_affinity(errs, a))
            .unwrap_or_default(),
    }
}

fn lookup_user(errs: &mut Errors, u: &S<String>) -> Option<Account> {
    let found = match u.value.parse::<u32>() {
        Ok(n) => nix::unistd::User::from_uid(n.into()),
        Err(_) => nix::unistd::User::from_name(&u.value),
    };
    match found {
        Ok(Some(pw)) => Some(Account {
            name: pw.name,
            id: pw.uid.as_raw(),
        }),
        Ok(None) => {
            errs.at(u, "runtime.user", format!("no such user {:?}", u.value));
            None
        }
        Err(e) => {
            errs.at(
                u,
                "runtime.user",
                format!("cannot look up {:?}: {e}", u.value),
            );
            None
        }
    }
}

fn lookup_group(errs: &mut Errors, g: &S<String>) -> Option<Account> {
    let found = match g.value.parse::<u32>() {
        Ok(n) => nix::unistd::Group::from_gid(n.into()),
        Err(_) => nix::unistd::Group::from_name(&g.value),
    };
    match found {
        Ok(Some(gr)) => Some(Account {
            name: gr.name,
            id: gr.gid.as_raw(),
        }),
        Ok(None) => {
            errs.at(g, "runtime.group", format!("no such group {:?}", g.value));
            None
        }
        Err(e) => {
            errs.at(
                g,
                "runtime.group",
                format!("cannot look up {:?}: {e}", g.value),
            );
            None
        }
    }
}

fn cpu_affinity(errs: &mut Errors, a: &S<RawCpuAffinity>) -> CpuAffinity {
    match &a.value {
        RawCpuAffinity::Text(t) if t == "auto" => CpuAffinity::Auto,
        RawCpuAffinity::Text(t) if t == "none" => CpuAffinity::None,
        RawCpuAffinity::Text(t) => {
            errs.at(
                a,
                "runtime.cpu_affinity",
                format!("expected auto, none or a list of CPU lists such as [[0], [1]], got {t:?}"),
            );
            CpuAffinity::None
        }
        RawCpuAffinity::Lists(lists) => {
            let bad = lists.is_empty()
                || lists
                    .iter()
                    .any(|l| l.is_empty() || l.iter().any(|c| *c > MAX_CPU));
            if bad {
                errs.at(
                    a,
                    "runtime.cpu_affinity",
                    format!("expected a non-empty list of non-empty CPU lists (CPUs 0 to {MAX_CPU}), e.g. [[0], [1]]"),
                );
                return CpuAffinity::None;
            }
            CpuAffinity::Lists(
                lists
                    .iter()
                    .map(|l| l.iter().map(|c| *c as usize).collect())
                    .collect(),
            )
        }
    }
}

/// `runtime.worker_limits.cpuset`: a cpuset list such as `0-3,6`, checked and normalised.
pub(super) fn cpuset(errs: &mut Errors, v: &Option<S<String>>) -> Option<String> {
    let v = v.as_ref()?;
    match parse_cpu_list(&v.value) {
        Ok(cpus) if !cpus.is_empty() => Some(v.value.trim().to_string()),
        Ok(_) | Err(_) => {
            errs.at(
                v,
                "runtime.worker_limits.cpuset",
                format!("expected a CPU list such as 0-3,6, got {:?}", v.value),
            );
            None
        }
    }
}

/// `runtime.worker_limits.io_weight`: 1 to 10000 (cgroup v2 `io.weight`; v1 `blkio.weight`
/// takes 10 to 1000 and gets it scaled).
pub(super) fn io_weight(errs: &mut Errors, v: &Option<S<u64>>) -> Option<u64> {
    let v = v.as_ref()?;
    if (1..=10_000).contains(&v.value) {
        Some(v.value)
    } else {
        errs.at(
            v,
            "runtime.worker_limits.io_weight",
            "expected a number from 1 to 10000 (100 is the default weight)",
        );
        None
    }
}

/// Parses a Linux CPU list (`0-3,6`, as in `Cpus_allowed_list` and `cpuset.cpus`).
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.trim().is_empty()) {
        let num = |x: &str| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n as u64 <= MAX_CPU)
                .ok_or_else(|| format!("bad CPU {x:?} in {s:?}"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("bad CPU range {part:?} in {s:?}"));
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(num(part)?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,6").unwrap(), vec![0, 1, 2, 3, 6]);
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<usize>::new());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert!(parse_cpu_list("5000").is_err());
    }
}
