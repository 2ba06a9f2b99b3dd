//! Validation of the `runtime:` section: paths, timeouts, and the multi-process settings.

use super::errors::Errors;
use super::file::{self, S};
use super::validate::resolve;
use super::*;

/// The folder of the pid file and control socket when the config names neither: systemd's
/// `RuntimeDirectory=` (`$RUNTIME_DIRECTORY`, the first if it lists several), which a
/// successor inherits, else the config's own folder. Relative paths the config gives stay
/// relative to the config's folder.
pub(super) fn default_runtime_dir(config_dir: &Path) -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| std::env::split_paths(&v).next())
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| config_dir.to_path_buf())
}

pub(super) fn runtime(errs: &mut Errors, r: &file::Runtime, dir: &Path) -> Runtime {
    let run_dir = default_runtime_dir(dir);
    let path = |given: &Option<String>, default: &str| match given {
        Some(p) => resolve(dir, p),
        None => run_dir.join(default),
    };
    Runtime {
        pid_file: path(&r.pid_file, "baton.pid"),
        control_socket: path(&r.control_socket, "baton.sock"),
        drain_timeout: errs.duration(
            &r.drain_timeout,
            "runtime.drain_timeout",
            Duration::from_secs(30),
        ),
        upgrade_timeout: errs.nonzero_duration(
            &r.upgrade_timeout,
            "runtime.upgrade_timeout",
            Duration::from_secs(10),
            "every upgrade would be rolled back before its successor is ready",
        ),
        worker_threads: worker_threads(errs, &r.worker_threads),
        binary: r.binary.as_deref().map(|b| resolve(dir, b)),
        workers: workers(errs, &r.workers),
        accept: errs.choice(
            &r.accept,
            "runtime.accept",
            &[
                ("shared", AcceptMode::Shared),
                ("reuseport", AcceptMode::Reuseport),
            ],
            AcceptMode::Shared,
        ),
        worker_limits: r
            .worker_limits
            .as_ref()
            .map(|l| worker_limits(errs, l))
            .unwrap_or_default(),
        isolation: super::isolation::isolation(errs, r),
    }
}

/// Most tokio worker threads: each is started at once with its own stack, and past one per
/// core a proxy gains nothing (100,000 threads took minutes to start and never served).
pub(super) const MAX_WORKER_THREADS: usize = 256;

/// Smallest per-worker memory limit: a worker needs a few MiB to start, and below this it
/// would be killed by the OOM killer and restarted in a loop.
pub(super) const MIN_WORKER_MEMORY: u64 = 16 << 20;

/// Smallest per-worker open-file limit: listeners, the control channel, logs and a few
/// connections need this many.
pub(super) const MIN_WORKER_NOFILE: u64 = 64;

/// Smallest per-worker process/thread limit: tokio's threads and the runtime's blocking pool.
pub(super) const MIN_WORKER_PIDS: u64 = 8;

/// `runtime.worker_threads`: 0 (one per core) up to [`MAX_WORKER_THREADS`].
fn worker_threads(errs: &mut Errors, w: &Option<S<usize>>) -> usize {
    match w {
        None => 0,
        Some(n) if n.value > MAX_WORKER_THREADS => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            errs.at(
                n,
                "runtime.worker_threads",
                format!(
                    "at most {MAX_WORKER_THREADS}: every thread starts at once with its own stack, \
                     and more threads than cores ({cores} here) serve no faster (0 = one per core)"
                ),
            );
            0
        }
        Some(n) => n.value,
    }
}

/// `runtime.workers`: a positive number or `auto` (one per core).
fn workers(errs: &mut Errors, w: &Option<S<file::NumOrText>>) -> usize {
    let Some(w) = w else { return 1 };
    match &w.value {
        file::NumOrText::Num(n) if *n >= 1 && *n <= 1024 => *n as usize,
        file::NumOrText::Text(t) if t == "auto" => {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
        _ => {
            errs.at(
                w,
                "runtime.workers",
                "expected a number from 1 to 1024, or auto",
            );
            1
        }
    }
}

fn worker_limits(errs: &mut Errors, l: &file::WorkerLimits) -> WorkerLimits {
    let memory = l.memory.as_ref().and_then(|m| {
        let path = "runtime.worker_limits.memory";
        let n = errs.size(m, path)?;
        if n < MIN_WORKER_MEMORY {
            errs.at(
                m,
                path,
                "must be at least 16MiB: a worker needs a few MiB to start, and below this it \
                 would be killed and restarted in a loop",
            );
            return None;
        }
        Some(n)
    });
    let cpu = l.cpu.as_ref().and_then(|c| {
        if c.value.is_finite() && c.value > 0.0 && c.value <= 4096.0 {
            Some(c.value)
        } else {
            errs.at(
                c,
                "runtime.worker_limits.cpu",
                "expected a number of CPUs above 0, e.g. 1.5",
            );
            None
        }
    });
    let floor = |errs: &mut Errors, v: &Option<S<u64>>, path: &str, min: u64, why: &str| {
        v.as_ref().and_then(|n| {
            if n.value < min {
                errs.at(n, path, format!("must be at least {min}: {why}"));
                None
            } else {
                Some(n.value)
            }
        })
    };
    WorkerLimits {
        memory,
        cpu,
        pids: floor(
            errs,
            &l.pids,
            "runtime.worker_limits.pids",
            MIN_WORKER_PIDS,
            "a worker's runtime threads need them",
        ),
        nofile: floor(
            errs,
            &l.nofile,
            "runtime.worker_limits.nofile",
            MIN_WORKER_NOFILE,
            "listeners, logs and the supervisor's channel need them before any connection",
        ),
        cpuset: super::isolation::cpuset(errs, &l.cpuset),
        io_weight: super::isolation::io_weight(errs, &l.io_weight),
    }
}

/// Parses a size such as `512MiB`, `1.5GiB`, `64M` (binary units), `1MB` (decimal units) or
/// `1000000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite())
        .ok_or_else(|| format!("invalid size {s:?} (expected e.g. 512MiB or 1.5GiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use B, KiB, MiB, GiB or TiB, or KB, MB, GB)"
            ))
        }
    };
    let v = n * mult as f64;
    if v < 1.0 || v >= u64::MAX as f64 {
        return Err(format!("size {s:?} is out of range"));
    }
    if v.fract() != 0.0 {
        return Err(format!("size {s:?} is not a whole number of bytes"));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1.5").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("1e400GiB").is_err());
    }
}
