//! The standard `process_*` family (as Prometheus client libraries export it), read from
//! `/proc/self` at each scrape: CPU time, memory, file descriptors, start time.

use std::fmt::Write as _;

/// What the kernel says about this process now; a value it would not give is left out.
#[derive(Debug, Default)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    /// Resident set size, bytes.
    pub resident_bytes: Option<u64>,
    /// Virtual memory size, bytes.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft open-file limit.
    pub max_fds: Option<u64>,
}

impl ProcessStats {
    /// Reads the stats of this process.
    pub fn read() -> ProcessStats {
        let mut s = ProcessStats::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces or parentheses).
            if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // utime and stime are fields 14 and 15 of the line; `f` starts at field 3.
                if let (Some(Ok(u)), Some(Ok(k))) = (
                    f.get(11).map(|v| v.parse::<u64>()),
                    f.get(12).map(|v| v.parse::<u64>()),
                ) {
                    let hz = rustix::param::clock_ticks_per_second().max(1) as f64;
                    s.cpu_seconds = Some((u + k) as f64 / hz);
                }
            }
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            let page = rustix::param::page_size() as u64;
            let mut f = statm.split_whitespace().map(|v| v.parse::<u64>().ok());
            s.virtual_bytes = f.next().flatten().map(|p| p * page);
            s.resident_bytes = f.next().flatten().map(|p| p * page);
        }
        // Counting needs one fd of its own: at EMFILE this series is left out, not wrong.
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // Minus the directory's own fd.
            s.open_fds = Some((dir.count() as u64).saturating_sub(1));
        }
        s.max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        s
    }

    /// Writes the family, with `start_time` (seconds since the Unix epoch).
    pub fn render(&self, out: &mut String, start_time: f64) {
        let mut one = |name: &str, kind: &str, help: &str, v: Option<String>| {
            if let Some(v) = v {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
                );
            }
        };
        one(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since the Unix epoch, in seconds.",
            Some(format!("{start_time:.3}")),
        );
        one(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent, in seconds.",
            self.cpu_seconds.map(|v| format!("{v:.2}")),
        );
        one(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size, in bytes.",
            self.resident_bytes.map(|v| v.to_string()),
        );
        one(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size, in bytes.",
            self.virtual_bytes.map(|v| v.to_string()),
        );
        one(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.map(|v| v.to_string()),
        );
        one(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors (the soft limit).",
            self.max_fds.map(|v| v.to_string()),
        );
    }
}
