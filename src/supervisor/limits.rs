//! Per-worker resource limits through cgroups: v2 where the unified hierarchy is mounted at
//! `/sys/fs/cgroup` with the controllers we need, v1 otherwise (one hierarchy per controller,
//! under the supervisor's own cgroup as named in `/proc/self/cgroup`). Each worker process gets
//! its own cgroup `baton-<supervisor pid>/worker-<index>-<pid>`, removed once it has exited,
//! so an OOM kill can be told apart by that cgroup's own `oom_kill` counter. Without
//! permission, the supervisor warns once and workers get only their rlimits (see
//! [`crate::lifecycle::worker::apply_rlimits`]).

use crate::config::WorkerLimits;
use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";
const CPU_PERIOD_US: u64 = 100_000;

/// The cgroup layout in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

/// The supervisor's cgroups: one parent folder per hierarchy in use.
#[derive(Debug)]
pub struct Cgroups {
    /// v1 or v2.
    pub version: Version,
    /// (controller, parent folder); for v2 a single entry with controller "".
    bases: Vec<(&'static str, PathBuf)>,
    limits: WorkerLimits,
}

/// The cgroup folders of one worker.
#[derive(Debug, Default, Clone)]
pub struct WorkerCgroup {
    dirs: Vec<(&'static str, PathBuf)>,
}

fn needed(l: &WorkerLimits) -> Vec<&'static str> {
    let mut v = Vec::new();
    if l.memory.is_some() {
        v.push("memory");
    }
    if l.cpu.is_some() {
        v.push("cpu");
    }
    if l.pids.is_some() {
        v.push("pids");
    }
    if l.cpuset.is_some() {
        v.push("cpuset");
    }
    if l.io_weight.is_some() {
        v.push("io");
    }
    v
}

/// The v1 hierarchy of a (v2-named) controller: the I/O controller is `blkio` there.
fn v1_name(c: &str) -> &str {
    if c == "io" {
        "blkio"
    } else {
        c
    }
}

/// v1: the weight file the block I/O controller offers (CFQ's, or BFQ's), if any.
fn v1_io_weight_file(dir: &Path) -> Option<&'static str> {
    ["blkio.weight", "blkio.bfq.weight"]
        .into_iter()
        .find(|f| dir.join(f).exists())
}

/// This process's cgroup path in the hierarchy that has `controller` ("" for v2).
fn own_path(controller: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then(|| path.trim_start_matches('/').to_string())
    })
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

impl Cgroups {
    /// Prepares the cgroups for `limits`; `None` when no cgroup limit is configured, or (after
    /// one warning) when cgroups cannot be used here.
    pub fn setup(limits: &WorkerLimits) -> Option<Cgroups> {
        let ctrls = needed(limits);
        if ctrls.is_empty() {
            return None;
        }
        let name = format!("baton-{}", std::process::id());
        let v2 = std::fs::read_to_string(Path::new(ROOT).join("cgroup.controllers"))
            .ok()
            .filter(|have| {
                ctrls
                    .iter()
                    .all(|c| have.split_whitespace().any(|h| h == *c))
            });
        let result = if v2.is_some() {
            Self::setup_v2(&ctrls, &name)
        } else {
            Self::setup_v1(&ctrls, &name)
        };
        match result {
            Ok((version, bases)) => {
                tracing::info!(version = ?version, controllers = ?ctrls, "worker limits through cgroups");
                Some(Cgroups {
                    version,
                    bases,
                    limits: limits.clone(),
                })
            }
            Err(e) => {
                tracing::warn!(error = %e,
                    "cannot use cgroups for worker limits (no permission or no controller); rlimits only");
                None
            }
        }
    }

    fn setup_v2(
        ctrls: &[&'static str],
        name: &str,
    ) -> io::Result<(Version, Vec<(&'static str, PathBuf)>)> {
        let own = Path::new(ROOT).join(own_path("").unwrap_or_default());
        let base = own.join(name);
        std::fs::create_dir_all(&base)?;
        let enable: Vec<String> = ctrls.iter().map(|c| format!("+{c}")).collect();
        write(&base, "cgroup.subtree_control", &enable.join(" "))?;
        Ok((Version::V2, vec![("", base)]))
    }

    fn setup_v1(
        ctrls: &[&'static str],
        name: &str,
    ) -> io::Result<(Version, Vec<(&'static str, PathBuf)>)> {
        let mut bases = Vec::new();
        for c in ctrls {
            let mount = Path::new(ROOT).join(v1_name(c));
            if *c == "io" && v1_io_weight_file(&mount).is_none() {
                // No I/O scheduler with weights (none, mq-deadline): the other limits still work.
                tracing::warn!(hierarchy = %mount.display(),
                    "worker_limits.io_weight: this host's blkio controller has no weight file; not in force");
                continue;
            }
            if !mount.join("cgroup.procs").exists() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no cgroup v1 {c} controller at {}", mount.display()),
                ));
            }
            let own = mount.join(own_path(v1_name(c)).unwrap_or_default());
            let base = own.join(name);
            std::fs::create_dir_all(&base)?;
            if *c == "cpuset" {
                // A v1 cpuset starts empty; children draw from it, so it gets its parent's.
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(own.join(f))?;
                    write(&base, f, v.trim())?;
                }
            }
            bases.push((*c, base));
        }
        Ok((Version::V1, bases))
    }

    /// Creates the worker's cgroups, writes the limits and moves `pid` in.
    pub fn place(&self, index: usize, pid: u32) -> io::Result<WorkerCgroup> {
        let mut w = WorkerCgroup::default();
        let l = &self.limits;
        for (ctrl, base) in &self.bases {
            let dir = base.join(format!("worker-{index}-{pid}"));
            std::fs::create_dir_all(&dir)?;
            w.dirs.push((ctrl, dir.clone()));
            let v1 = self.version == Version::V1;
            if let (Some(m), true) = (l.memory, *ctrl == "memory" || ctrl.is_empty()) {
                if v1 {
                    write(&dir, "memory.limit_in_bytes", &m.to_string())?;
                    // With swap, the limit would push pages out instead of killing; best effort.
                    let _ = write(&dir, "memory.memsw.limit_in_bytes", &m.to_string());
                } else {
                    write(&dir, "memory.max", &m.to_string())?;
                    let _ = write(&dir, "memory.swap.max", "0");
                }
            }
            if let (Some(c), true) = (l.cpu, *ctrl == "cpu" || ctrl.is_empty()) {
                let quota = ((c * CPU_PERIOD_US as f64) as u64).max(1000);
                if v1 {
                    write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
                } else {
                    write(&dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
                }
            }
            if let (Some(p), true) = (l.pids, *ctrl == "pids" || ctrl.is_empty()) {
                write(&dir, "pids.max", &p.to_string())?;
            }
            if let (Some(cpus), true) = (&l.cpuset, *ctrl == "cpuset" || ctrl.is_empty()) {
                if v1 {
                    let mems = std::fs::read_to_string(base.join("cpuset.mems"))?;
                    write(&dir, "cpuset.mems", mems.trim())?;
                }
                write(&dir, "cpuset.cpus", cpus)?;
            }
            if let (Some(w), true) = (l.io_weight, *ctrl == "io" || ctrl.is_empty()) {
                match v1_io_weight_file(&dir) {
                    // CFQ takes 10..1000, BFQ 1..1000; the config's 1..10000 is v2's scale.
                    Some(f) if v1 => write(&dir, f, &(w / 10).clamp(10, 1000).to_string())?,
                    _ => write(&dir, "io.weight", &format!("default {w}"))?,
                }
            }
            write(&dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(w)
    }
}

impl WorkerCgroup {
    /// Its folders as (controller, path), for the supervisor's re-exec state.
    pub fn dirs(&self) -> Vec<(String, PathBuf)> {
        self.dirs
            .iter()
            .map(|(c, d)| (c.to_string(), d.clone()))
            .collect()
    }

    /// The folders of a worker adopted after a re-exec; unknown controllers are skipped.
    pub fn from_dirs(dirs: Vec<(String, PathBuf)>) -> WorkerCgroup {
        let known = |c: &str| {
            ["memory", "cpu", "pids", "cpuset", "io", ""]
                .into_iter()
                .find(|k| *k == c)
        };
        WorkerCgroup {
            dirs: dirs
                .into_iter()
                .filter_map(|(c, d)| Some((known(&c)?, d)))
                .collect(),
        }
    }

    /// How many processes the kernel killed in this cgroup for exceeding its memory limit.
    pub fn oom_kills(&self) -> u64 {
        self.dirs
            .iter()
            .filter(|(c, _)| *c == "memory" || c.is_empty())
            .filter_map(|(c, d)| {
                let file = if c.is_empty() {
                    "memory.events"
                } else {
                    "memory.oom_control"
                };
                std::fs::read_to_string(d.join(file)).ok()
            })
            .filter_map(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
            })
            .sum()
    }

    /// Removes the (now empty) folders of an exited worker.
    pub fn remove(&self) {
        for (_, d) in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for (_, base) in &self.bases {
            let _ = std::fs::remove_dir(base);
        }
    }
}
