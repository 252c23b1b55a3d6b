//! Helpers shared by the benchmarks.
#![allow(dead_code)]

/// Peak resident set size (VmHWM) of this process, in KiB.
pub fn peak_rss_kib() -> u64 {
    let path = "/proc/self/status";
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The machine, for the record: CPUs, model, memory.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    format!(
        "{} CPUs ({model}), {:.1} GiB",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        mem_kib as f64 / 1024.0 / 1024.0
    )
}
