//! Validation of the `runtime:` section: paths, timeouts, and the multi-process settings.

use super::file::{self, S};
use super::validate::{resolve, Errors};
use super::*;

pub(super) fn runtime(errs: &mut Errors, r: &file::Runtime, dir: &Path) -> Runtime {
    Runtime {
        pid_file: resolve(dir, r.pid_file.as_deref().unwrap_or("baton.pid")),
        control_socket: resolve(dir, r.control_socket.as_deref().unwrap_or("baton.sock")),
        drain_timeout: errs.duration(
            &r.drain_timeout,
            "runtime.drain_timeout",
            Duration::from_secs(30),
        ),
        upgrade_timeout: errs.duration(
            &r.upgrade_timeout,
            "runtime.upgrade_timeout",
            Duration::from_secs(10),
        ),
        worker_threads: r.worker_threads.unwrap_or(0),
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
    let memory = l.memory.as_ref().and_then(|m| match &m.value {
        file::NumOrText::Num(n) => Some(*n),
        file::NumOrText::Text(t) => parse_size(t)
            .map_err(|e| errs.at(m, "runtime.worker_limits.memory", e))
            .ok(),
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
    let positive = |errs: &mut Errors, v: &Option<S<u64>>, path: &str| {
        v.as_ref().and_then(|n| {
            if n.value == 0 {
                errs.at(n, path, "must be at least 1");
                None
            } else {
                Some(n.value)
            }
        })
    };
    WorkerLimits {
        memory,
        cpu,
        pids: positive(errs, &l.pids, "runtime.worker_limits.pids"),
        nofile: positive(errs, &l.nofile, "runtime.worker_limits.nofile"),
    }
}

/// Parses a size such as `512MiB`, `1GiB`, `64M` (binary units) or `1000000` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 512MiB)"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("size {s:?} is out of range")),
        Some(v) => Ok(v),
    }
}
