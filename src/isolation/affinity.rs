//! CPU pinning (`runtime.cpu_affinity`): which CPUs worker i (or runtime thread i of a single
//! process) may run on. `auto` counts CPUs among those this process may use itself (its own
//! affinity mask, so `taskset` and container cpusets are respected), not all CPUs of the host.
//! The mask is set on the calling thread; a thread or process created afterwards inherits it.

use crate::config::CpuAffinity;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// The CPUs this thread may run on now.
pub fn allowed() -> Vec<usize> {
    match sched_getaffinity(None) {
        Ok(set) => (0..CpuSet::MAX_CPU).filter(|c| set.is_set(*c)).collect(),
        Err(_) => Vec::new(),
    }
}

/// The CPUs for position `i` under `a` (`None`: no pinning), given the `allowed` ones.
pub fn plan(a: &CpuAffinity, i: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    match a {
        CpuAffinity::None => None,
        CpuAffinity::Auto if allowed.is_empty() => None,
        CpuAffinity::Auto => Some(vec![allowed[i % allowed.len()]]),
        CpuAffinity::Lists(lists) if lists.is_empty() => None,
        CpuAffinity::Lists(lists) => Some(lists[i % lists.len()].clone()),
    }
}

/// Pins the calling thread to `cpus`.
pub fn pin(cpus: &[usize]) -> std::io::Result<()> {
    let mut set = CpuSet::new();
    for c in cpus.iter().filter(|c| **c < CpuSet::MAX_CPU) {
        set.set(*c);
    }
    sched_setaffinity(None, &set).map_err(std::io::Error::from)
}

/// Formats CPUs as a Linux CPU list (`0-2,5`).
pub fn list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        while i + 1 < sorted.len() && sorted[i + 1] == sorted[i] + 1 {
            i += 1;
        }
        out.push(if sorted[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", sorted[i])
        });
        i += 1;
    }
    out.join(",")
}

/// Pins each runtime thread of a single process as it starts: thread k (in start order) on
/// [`plan`]'s CPUs for k. For tokio's `on_thread_start`.
pub fn thread_pinner(a: CpuAffinity) -> Option<impl Fn() + Send + Sync + 'static> {
    if a == CpuAffinity::None {
        return None;
    }
    let allowed = allowed();
    let next = std::sync::atomic::AtomicUsize::new(0);
    Some(move || {
        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(cpus) = plan(&a, k, &allowed) {
            if let Err(e) = pin(&cpus) {
                tracing::warn!(cpus = %list(&cpus), error = %e, "cannot pin a runtime thread; it runs on any CPU");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let allowed = [0, 2, 3];
        assert_eq!(plan(&CpuAffinity::None, 0, &allowed), None);
        assert_eq!(plan(&CpuAffinity::Auto, 0, &allowed), Some(vec![0]));
        assert_eq!(plan(&CpuAffinity::Auto, 1, &allowed), Some(vec![2]));
        assert_eq!(plan(&CpuAffinity::Auto, 4, &allowed), Some(vec![2]));
        let l = CpuAffinity::Lists(vec![vec![1], vec![0, 1]]);
        assert_eq!(plan(&l, 3, &allowed), Some(vec![0, 1]));
        assert_eq!(list(&[3, 0, 1, 2, 5]), "0-3,5");
        assert_eq!(list(&[1]), "1");
    }
}
