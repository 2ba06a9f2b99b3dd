//! Isolation: who a baton process runs as and what it can see and touch.
//!
//! * [`privileges`]: `runtime.user`/`group` with `no_new_privs` and only the capabilities of
//!   `runtime.capabilities`; the supervisor, which stays root, keeps only the capabilities it
//!   uses ([`supervisor_capabilities`]).
//! * [`namespaces`]: with `worker_isolation`, each worker in new PID, mount and IPC
//!   namespaces with a read-only view of the files (the supervisor prepares them on a thread
//!   of its own and spawns the worker from it); [`affinity`]: CPU pinning.
//! * [`report`]: what is in force, read back from `/proc/PID/status`, for `baton status`.
//!
//! Everything that changes credentials happens in [`prepare`], called by `main` after the
//! config is loaded and the logs are open, and before the runtime starts any thread: Linux
//! credentials are per thread, and every thread created afterwards inherits the result.
//! A single process binds its listeners there first (then hands them to the lifecycle as it
//! does systemd's), so it never needs root again; a worker does not bind at all (its
//! listeners arrive over its channel), nor does a successor that adopts its predecessor's.

pub mod affinity;
pub mod namespaces;
pub mod privileges;
pub mod report;

use crate::config::{Config, Isolation};
use rustix::thread::CapabilitySet;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why isolation could not be put in place; the process does not serve then.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// A listener could not be bound before the privilege drop.
    #[error("listener {name}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        name: String,
        /// Its address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A path the process must write after the drop is not writable by that user.
    #[error("runtime.user {user}: cannot write {path} ({what}); make it writable by {user} (e.g. a folder owned by {user} such as /run/baton), or leave runtime.user unset")]
    NotWritable {
        /// The user.
        user: String,
        /// The path.
        path: PathBuf,
        /// What it is for.
        what: &'static str,
    },
    /// Any other refusal by the kernel.
    #[error("{0}")]
    Other(String),
}

/// Which process is being prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `workers: 1`; `successor` when started by a predecessor (it adopts its listeners).
    Single {
        /// Started by a predecessor.
        successor: bool,
    },
    /// Worker `index` of a supervisor.
    Worker(usize),
    /// The supervisor of `workers: N > 1` (first start or after its re-exec).
    Supervisor,
}

/// What [`prepare`] leaves for the lifecycle.
#[derive(Debug, Default)]
pub struct Prepared {
    /// Listeners bound before the privilege drop, by name (a single process's first
    /// generation with `runtime.user`).
    pub prebound: BTreeMap<String, std::net::TcpListener>,
}

/// The capabilities the supervisor keeps when it isolates its workers, each for a reason
/// (docs/multiprocess.md, "Isolation"): bind a privileged listener a reload adds
/// (`net_bind_service`); start workers that drop to `runtime.user` (`setuid`, `setgid`) and
/// lower their bounding set (`setpcap`); signal workers that no longer run as root (`kill`);
/// raise a worker's open-file limit above the hard limit (`sys_resource`, when the host gave
/// it); create the workers' namespaces and mounts (`sys_admin`, only with
/// `worker_isolation`); create its cgroup folder at the root of a v1 hierarchy, whose mode is
/// `0555` even for root (`dac_override`, only with cgroup limits in `worker_limits`).
pub fn supervisor_capabilities(cfg: &Config) -> CapabilitySet {
    let iso = &cfg.runtime.isolation;
    let l = &cfg.runtime.worker_limits;
    let mut keep = CapabilitySet::NET_BIND_SERVICE
        | CapabilitySet::SETUID
        | CapabilitySet::SETGID
        | CapabilitySet::SETPCAP
        | CapabilitySet::KILL
        | CapabilitySet::SYS_RESOURCE;
    if iso.worker_isolation {
        keep |= CapabilitySet::SYS_ADMIN;
    }
    let cgroup_limits = l.memory.is_some()
        || l.cpu.is_some()
        || l.pids.is_some()
        || l.cpuset.is_some()
        || l.io_weight.is_some();
    if cgroup_limits {
        keep |= CapabilitySet::DAC_OVERRIDE;
    }
    keep
}

/// The capabilities `runtime.capabilities` names.
pub fn kept_capabilities(iso: &Isolation) -> CapabilitySet {
    iso.capabilities
        .iter()
        .filter_map(|n| privileges::by_name(n))
        .fold(CapabilitySet::empty(), |a, c| a | c)
}

/// Whether any isolation key is set (without one, [`prepare`] changes nothing).
pub fn configured(iso: &Isolation) -> bool {
    iso.user.is_some() || iso.worker_isolation
}

/// Puts this process's isolation in place; see the module doc for when it must run.
pub fn prepare(cfg: &Config, role: Role) -> Result<Prepared, IsolationError> {
    let iso = &cfg.runtime.isolation;
    let mut out = Prepared::default();
    match role {
        Role::Supervisor => {
            if configured(iso) {
                own_log_file(cfg, None)?;
                privileges::restrict_capabilities(supervisor_capabilities(cfg))?;
                log_in_force("supervisor capabilities restricted");
            }
        }
        Role::Worker(index) => {
            // PID 1 of its own namespace: the supervisor isolated it (see `namespaces`).
            if iso.worker_isolation && std::process::id() == 1 {
                if let Err(e) = namespaces::mount_own_proc() {
                    tracing::warn!(error = %e, "cannot mount this worker's own /proc; it sees the host's");
                }
            }
            // Before the drop: raising the hard limit needs privileges.
            crate::lifecycle::worker::apply_rlimits(&cfg.runtime.worker_limits);
            match (&iso.user, &iso.group) {
                (Some(u), Some(g)) => {
                    privileges::drop_to(u.id, g.id, kept_capabilities(iso))?;
                    log_in_force(&format!("worker {index} runs as {}:{}", u.name, g.name));
                }
                _ if iso.worker_isolation => {
                    // Root in its namespaces, but with no capability it cannot undo them.
                    privileges::restrict_capabilities(CapabilitySet::empty())?;
                    log_in_force(&format!("worker {index} runs without capabilities"));
                }
                _ => {}
            }
        }
        Role::Single { successor } => {
            if iso.worker_isolation {
                tracing::warn!("runtime.worker_isolation has no effect with a single process (runtime.workers: 1)");
            }
            let (Some(u), Some(g)) = (&iso.user, &iso.group) else {
                return Ok(out);
            };
            if !successor {
                out.prebound = bind_listeners(cfg)?;
                own_log_file(cfg, Some(u.id))?;
            }
            let keep = kept_capabilities(iso);
            if !keep.contains(CapabilitySet::NET_BIND_SERVICE) {
                for l in cfg.listeners.values() {
                    if l.listen.port() != 0 && l.listen.port() < 1024 {
                        tracing::debug!(listener = %l.name, "a privileged port: an upgrade can adopt it, a new listener on such a port needs runtime.capabilities: [net_bind_service]");
                    }
                }
            }
            if rustix::process::geteuid().is_root() {
                check_writable(cfg, &u.name, u.id, g.id)?;
            }
            privileges::drop_to(u.id, g.id, keep)?;
            log_in_force(&format!("running as {}:{}", u.name, g.name));
        }
    }
    Ok(out)
}

fn log_in_force(what: &str) {
    match report::in_force(None) {
        Ok(f) => {
            tracing::info!(uid = ?f.uid, gid = ?f.gid, groups = ?f.groups, no_new_privs = f.no_new_privs,
            capabilities = ?f.capabilities, cpus = %f.cpus, "{what}")
        }
        Err(e) => tracing::warn!(error = %e, "{what}; cannot read /proc/self/status"),
    }
}

/// Binds every listener (or adopts systemd's), as the lifecycle would, before the drop.
fn bind_listeners(cfg: &Config) -> Result<BTreeMap<String, std::net::TcpListener>, IsolationError> {
    let mut activated = crate::admin::notify::systemd_listeners();
    let mut out = BTreeMap::new();
    for l in cfg.listeners.values() {
        let s = match activated.remove(&l.name) {
            Some(fd) => crate::listener::adopt_for(fd, l),
            None => crate::listener::bind(l),
        }
        .map_err(|source| IsolationError::Bind {
            name: l.name.clone(),
            addr: l.listen,
            source,
        })?;
        out.insert(l.name.clone(), s);
    }
    Ok(out)
}

/// Makes the log file writable after the drop, as nginx does with its logs: owned by the
/// user (single process), or group-writable by the workers' group (the supervisor stays its
/// owner, root).
fn own_log_file(cfg: &Config, uid: Option<u32>) -> Result<(), IsolationError> {
    let Some(g) = &cfg.runtime.isolation.group else {
        return Ok(());
    };
    for path in cfg.log.file.iter().chain(cfg.log.access_file.iter()) {
        if path.exists() {
            own_file(path, uid, g.id)?;
        }
    }
    Ok(())
}

fn own_file(path: &Path, uid: Option<u32>, gid: u32) -> Result<(), IsolationError> {
    let fail = |e: std::io::Error| {
        IsolationError::Other(format!(
            "log file {}: cannot hand it to runtime.user: {e}",
            path.display()
        ))
    };
    std::os::unix::fs::chown(path, uid, Some(gid)).map_err(fail)?;
    if uid.is_none() {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_err(fail)?.permissions().mode();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o060))
            .map_err(fail)?;
    }
    Ok(())
}

/// Whether `uid`/`gid` (no supplementary group) may write in `dir`, by its mode bits.
fn writable_by(dir: &Path, uid: u32, gid: u32) -> bool {
    let Ok(m) = std::fs::metadata(dir) else {
        return false;
    };
    let mode = m.mode();
    if m.uid() == uid {
        mode & 0o300 == 0o300
    } else if m.gid() == gid {
        mode & 0o030 == 0o030
    } else {
        mode & 0o003 == 0o003
    }
}

/// A single process rewrites its pid file and binds its control socket after the drop, and
/// so does every successor: refuse now, with the reason, rather than at the first upgrade.
fn check_writable(cfg: &Config, user: &str, uid: u32, gid: u32) -> Result<(), IsolationError> {
    let rt = &cfg.runtime;
    for (path, what) in [
        (&rt.pid_file, "the pid file's folder"),
        (&rt.control_socket, "the control socket's folder"),
    ] {
        let dir = path.parent().unwrap_or(Path::new("/"));
        if !writable_by(dir, uid, gid) {
            return Err(IsolationError::NotWritable {
                user: user.to_string(),
                path: dir.to_path_buf(),
                what,
            });
        }
    }
    Ok(())
}

/// How the supervisor places worker `index`: its CPUs ([`affinity::plan`] over the CPUs the
/// supervisor may use) and, with `worker_isolation`, its namespaces, with the log files'
/// folders left writable (a reopen after rotation creates the file anew).
pub fn worker_plan(cfg: &Config, index: usize) -> namespaces::Plan {
    let iso = &cfg.runtime.isolation;
    namespaces::Plan {
        cpus: affinity::plan(&iso.cpu_affinity, index, &affinity::allowed()),
        namespaces: iso.worker_isolation,
        writable: {
            let mut dirs: Vec<PathBuf> = cfg
                .log
                .file
                .iter()
                .chain(cfg.log.access_file.iter())
                .filter_map(|f| f.parent().map(Path::to_path_buf))
                .collect();
            dirs.dedup();
            dirs
        },
    }
}

/// `isolation` of one worker in `baton status --json`: what the kernel reports for it now
/// (uid, gid, groups, `no_new_privs`, effective capabilities, CPUs) and what the supervisor
/// set up at its spawn (namespaces, read-only mounts, what the host refused).
/// `cgroups` are the worker's cgroup folders (controller, path; controller "" for v2).
pub fn worker_status(
    pid: u32,
    placement: &namespaces::Placement,
    cgroups: Vec<(String, PathBuf)>,
) -> serde_json::Value {
    let now = report::in_force(Some(pid)).ok();
    let controllers: Vec<String> = cgroups
        .iter()
        .map(|(c, _)| if c.is_empty() { "v2".into() } else { c.clone() })
        .collect();
    serde_json::json!({
        "in_force": now,
        "namespaces": placement.namespaces.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "namespace_ids": placement.namespaces.iter().cloned().collect::<BTreeMap<_, _>>(),
        "read_only": placement.read_only,
        "writable": placement.writable,
        "pinned_cpus": placement.cpus,
        "refused": placement.refused,
        "cgroups": controllers,
        "cgroup_dirs": cgroups.into_iter().map(|(_, d)| d).collect::<Vec<_>>(),
    })
}

/// One line for a person: `uid 65534 gid 65534 groups none no_new_privs caps none cpus 0
/// namespaces pid,mnt,ipc read-only (writable: /var/log/baton)`.
pub fn render_line(v: &serde_json::Value) -> String {
    let f = &v["in_force"];
    let list = |x: &serde_json::Value| {
        let items: Vec<String> = x
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
            .collect();
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(",")
        }
    };
    let mut out = format!(
        "uid {} gid {} groups {} {} caps {} cpus {} namespaces {}",
        f["uid"][0],
        f["gid"][0],
        list(&f["groups"]),
        if f["no_new_privs"].as_bool() == Some(true) {
            "no_new_privs"
        } else {
            "new_privs_allowed"
        },
        list(&f["capabilities"]),
        f["cpus"].as_str().unwrap_or("?"),
        list(&v["namespaces"]),
    );
    if v["read_only"].as_bool() == Some(true) {
        out.push_str(&format!(" read-only (writable: {})", list(&v["writable"])));
    }
    if v["cgroups"].as_array().is_some_and(|c| !c.is_empty()) {
        out.push_str(&format!(" cgroups {}", list(&v["cgroups"])));
    }
    if v["refused"].as_array().is_some_and(|r| !r.is_empty()) {
        out.push_str(&format!(" refused: {}", list(&v["refused"])));
    }
    out
}
