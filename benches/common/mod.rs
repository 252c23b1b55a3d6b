//! Helpers shared by the benchmarks.
#![allow(dead_code)]

/// Peak resident set size (VmHWM) of a process, in KiB; `None`: this process.
pub fn peak_rss_kib(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
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

/// The operator's writes as the API server counted them: mutating requests on the kinds it writes.
pub async fn operator_writes(client: &kube::Client) -> u64 {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.expect("apiserver /metrics");
    let mut total = 0u64;
    for line in text
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        let label = |name: &str| {
            line.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("")
        };
        let mutating = matches!(label("verb"), "POST" | "PUT" | "PATCH" | "APPLY");
        let ours = matches!(
            (label("group"), label("resource"), label("subresource")),
            ("", "configmaps" | "secrets" | "services", "")
                | ("apps", "deployments", "")
                | ("policy", "poddisruptionbudgets", "")
                | ("discovery.k8s.io", "endpointslices", "")
                | ("llmroute.io", "llmroutes", _)
                | ("events.k8s.io", "events", _)
        );
        if mutating && ours {
            total += line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
        }
    }
    total
}
