//! Gateway overhead benchmark, everything on 127.0.0.1. Prints figures; asserts nothing.
//!
//! Two provider simulators from the devkit (an OpenAI primary and a Zhipu fallback) serve
//! non-streaming chat completions. The same requests are sent at a fixed rate with keep-alive
//! connections
//!   (a) straight to the primary simulator,
//!   (b) through the llmroute gateway: a route with those two backends rendered by the library behind
//!       `llmroute render --out-dir`, served by the real Envoy 1.40,
//!   (c) through LiteLLM's proxy configured with the same two backends and the same fallback,
//!   and, as a reference point, through the same Envoy configured as a plain proxy (no filters but
//!   the router), which shows what Envoy itself costs on the machine;
//! the overhead of a path is its latency minus the direct latency at the same percentile. Then
//!   (d) the primary answers OpenAI's region block (403 `unsupported_country_region_territory`): a
//!       request through the gateway fails over to the fallback; its latency minus the failing
//!       primary's own latency (measured directly) is the cost of a failover.
//!   (e) usage exactness: BENCH_USAGE_REQUESTS mixed whole and streamed requests through the gateway;
//!       the answers and tokens the sidecar's receiver counted against what the simulators reported;
//!   (f) streams: time to the first byte of BENCH_STREAM_REQUESTS [300] streamed answers per path;
//!   (g) with BENCH_VARIANTS: each variant in BENCH_PAIRED_REQUESTS [2000] pairs with the gateway as
//!       rendered (one request to each, one at a time, the order alternating), whole answers and
//!       streams' first bytes (BENCH_PAIRED_STREAMS [2]: streams whose client asks for no usage,
//!       then streams whose client asks with `stream_options.include_usage`; 1: the first kind only;
//!       0: whole answers only): the median of the per-pair differences is an edit's cost or saving.
//!       Run it with BENCH_ENVOY_CONCURRENCY=1: with two workers, which worker serves a path's
//!       keep-alive connection shifts a whole phase by up to 0.04 ms (docs/benchmarks.md).
//!       Beside the latencies it prints each Envoy's CPU time per request during the pairs (all
//!       threads and the workers, from /proc/<pid>/task/*/schedstat): what an edit costs in work.
//!
//! Run it with `scripts/bench-overhead` (installs Envoy and LiteLLM, then runs this). Knobs
//! (environment, defaults in brackets): BENCH_RATE (requests/s for (a)-(c), [20]: LiteLLM's proxy must
//! not saturate), BENCH_REQUESTS (measured per path, [800]), BENCH_ROUNDS (the paths are measured in
//! turn, this many times, [3]), BENCH_WARMUP (per path and round, [30]), BENCH_CONNECTIONS (most
//! requests in flight = keep-alive connections per path, [8]), BENCH_FAILOVER_RATE ([50]),
//! BENCH_FAILOVER_REQUESTS (per failover phase, [450]), BENCH_ENVOY_CONCURRENCY (Envoy worker
//! threads, [2]), BENCH_LITELLM_WORKERS (LiteLLM processes, [2]), BENCH_SKIP_LITELLM ([0]; 1: without
//! LiteLLM), BENCH_REFERENCE ([1]; 0: without the plain-proxy reference), BENCH_USAGE_REQUESTS ([10000]; 0: no (e)), BENCH_KEEP ([0]; 1: keep the
//! scratch directory with the configurations and logs), BENCH_VARIANTS ([]; `name=command;...`: more
//! gateways measured next to (b), each on the rendered files edited in place by `sh -c command` in
//! their directory; `name@N` runs that one with --concurrency N). LLMROUTE_BENCH_MODULE (the
//! stream usage module, default target/release, built by scripts/bench-overhead), LLMROUTE_BENCH_ENVOY and
//! LLMROUTE_BENCH_LITELLM locate the binaries (default: under `.tools/`).

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmroute::gateway::envoy::EnvoyOptions;
use llmroute::render::{self, RenderOptions};
use llmroute_devkit::sim::{Fault, Sim, SimConfig, SimProvider};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn knob<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v}: not a valid value")),
        Err(_) => default,
    }
}

#[derive(Clone, Debug)]
struct Settings {
    rate: f64,
    requests: usize,
    rounds: usize,
    warmup: usize,
    connections: usize,
    failover_requests: usize,
    failover_rate: f64,
    envoy_concurrency: usize,
    litellm_workers: usize,
    skip_litellm: bool,
    reference: bool,
    usage_requests: usize,
    stream_requests: usize,
    paired_requests: usize,
    /// The kinds of answer phase (g) pairs.
    paired: Vec<Answer>,
}

impl Settings {
    fn from_env() -> Settings {
        let s = Settings {
            rate: knob("BENCH_RATE", 20.0),
            requests: knob("BENCH_REQUESTS", 800),
            rounds: knob("BENCH_ROUNDS", 3),
            warmup: knob("BENCH_WARMUP", 30),
            connections: knob("BENCH_CONNECTIONS", 8),
            failover_requests: knob("BENCH_FAILOVER_REQUESTS", 450),
            failover_rate: knob("BENCH_FAILOVER_RATE", 50.0),
            envoy_concurrency: knob("BENCH_ENVOY_CONCURRENCY", 2),
            litellm_workers: knob("BENCH_LITELLM_WORKERS", 2),
            skip_litellm: knob::<String>("BENCH_SKIP_LITELLM", "0".into()) == "1",
            reference: knob::<String>("BENCH_REFERENCE", "1".into()) == "1",
            usage_requests: knob("BENCH_USAGE_REQUESTS", 10_000),
            stream_requests: knob("BENCH_STREAM_REQUESTS", 300),
            paired_requests: knob("BENCH_PAIRED_REQUESTS", 2000),
            paired: match knob::<String>("BENCH_PAIRED_STREAMS", "2".into()).as_str() {
                "0" => vec![Answer::Whole],
                "1" => vec![Answer::Whole, Answer::Stream],
                _ => vec![Answer::Whole, Answer::Stream, Answer::StreamWithUsage],
            },
        };
        assert!(s.rate > 0.0 && s.rounds > 0 && s.connections > 0 && s.requests >= s.rounds);
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: each started in its own process group, the whole group stopped on drop.

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("create log");
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { name, child, log }
    }

    /// Fails with the log's tail when the process has exited.
    fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait().expect("poll child") {
            None => Ok(()),
            Some(status) => Err(format!(
                "{} exited with {status}; its log ends with:\n{}",
                self.name,
                self.log_tail(40)
            )),
        }
    }

    /// CPU time the process has used so far (ns): all its threads, and its Envoy worker threads
    /// (`wrk:*`) alone, from /proc/<pid>/task/*/{schedstat,comm} (the scheduler's nanosecond
    /// accounting, not the 10 ms ticks of /proc/<pid>/stat).
    fn cpu_ns(&self) -> (u64, u64) {
        let (mut all, mut workers) = (0, 0);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) else {
            return (0, 0);
        };
        for task in tasks.flatten() {
            let ran: u64 = std::fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            all += ran;
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.starts_with("wrk:") {
                workers += ran;
            }
        }
        (all, workers)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let signal = |sig: &str| {
            let _ = Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Whatever is left of the group (LiteLLM's worker processes), and the leader if it lingers.
        signal("-KILL");
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("addr")
        .port()
}

// ---------------------------------------------------------------------------------------------
// The machine and the versions.

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into())
}

fn memory_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn command_output(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        })
        .unwrap_or_default()
}

fn envoy_version(envoy: &Path) -> String {
    // "envoy  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
    let out = command_output(envoy, &["--version"]);
    out.split_once("version: ")
        .and_then(|(_, v)| v.split('/').nth(1))
        .map(str::to_string)
        .unwrap_or_else(|| out.trim().to_string())
}

fn litellm_version(litellm: &Path) -> String {
    let python = litellm.with_file_name("python");
    command_output(
        &python,
        &[
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
    )
    .trim()
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// The load generator: open loop at a fixed rate, keep-alive, bounded in requests and in time.

/// A request to send and what a good answer is.
#[derive(Clone)]
struct Target {
    name: String,
    url: String,
    bearer: String,
    model: &'static str,
    status: u16,
    /// Response header that must be present with this value (which backend answered).
    header: Option<(&'static str, &'static str)>,
    /// A response header carrying a number to summarise (a proxy's own overhead estimate).
    report_header: Option<&'static str>,
}

#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    /// Values of the target's `report_header`.
    reported: Vec<f64>,
    failures: usize,
    first_failures: Vec<String>,
    /// Requests not sent because the phase ran out of time.
    not_sent: usize,
    /// Largest delay between a request's scheduled time and when the generator issued it.
    max_lag: Duration,
    /// Requests that waited for a free connection before being sent.
    waited: usize,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.reported.extend(other.reported);
        self.failures += other.failures;
        for f in other.first_failures {
            if self.first_failures.len() < 3 {
                self.first_failures.push(f);
            }
        }
        self.not_sent += other.not_sent;
        self.max_lag = self.max_lag.max(other.max_lag);
        self.waited += other.waited;
    }

    fn sorted(&self) -> Vec<Duration> {
        let mut v = self.latencies.clone();
        v.sort();
        v
    }
}

/// Nearest-rank percentile of sorted values, in milliseconds.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1].as_secs_f64() * 1000.0
}

const PERCENTILES: [(&str, f64); 4] = [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("max", 100.0)];

fn quantiles(s: &Samples) -> [f64; 4] {
    let sorted = s.sorted();
    PERCENTILES.map(|(_, p)| percentile(&sorted, p))
}

fn request_body(model: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": [
            { "role": "system", "content": "You are a concise assistant." },
            { "role": "user", "content": "Say hello in one short sentence." },
        ],
        "max_tokens": 32,
        "temperature": 0,
    }))
    .expect("json")
}

/// One request; returns the report header's value, or what was wrong with the answer.
async fn send(
    client: &reqwest::Client,
    target: &Target,
    body: Vec<u8>,
) -> Result<Option<f64>, String> {
    let resp = client
        .post(&target.url)
        .bearer_auth(&target.bearer)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    let status = resp.status().as_u16();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let backend = target.header.map(|(name, _)| header(name));
    let reported = target
        .report_header
        .and_then(header)
        .and_then(|v| v.parse().ok());
    let text = resp.bytes().await.map_err(|e| format!("body: {e}"))?;
    if status != target.status {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&text[..text.len().min(300)])
        ));
    }
    if let (Some((name, want)), Some(got)) = (target.header, backend)
        && got.as_deref() != Some(want)
    {
        return Err(format!("{name}: {got:?}, expected {want:?}"));
    }
    Ok(reported)
}

/// Sends `n` requests to `target` at `rate` per second, at most `connections` at a time; a request's
/// latency runs from when the generator issued it (so waiting for a connection counts) until its
/// whole response was read.
async fn run_phase(
    client: &reqwest::Client,
    target: &Target,
    n: usize,
    rate: f64,
    connections: usize,
) -> Samples {
    let period = Duration::from_secs_f64(1.0 / rate);
    let slots = Arc::new(Semaphore::new(connections));
    let start = tokio::time::Instant::now() + Duration::from_millis(5);
    // Bounded in time: the schedule may slip by half its length at most.
    let last_issue = start + period.mul_f64(n as f64 * 1.5) + Duration::from_secs(1);
    let mut tasks = JoinSet::new();
    let mut samples = Samples::default();
    for i in 0..n {
        let at = start + period.mul_f64(i as f64);
        tokio::time::sleep_until(at).await;
        let issued = tokio::time::Instant::now();
        if issued > last_issue {
            samples.not_sent = n - i;
            break;
        }
        samples.max_lag = samples.max_lag.max(issued - at);
        let (client, target, slots) = (client.clone(), target.clone(), slots.clone());
        let body = request_body(target.model);
        tasks.spawn(async move {
            let issued = issued.into_std();
            let (_slot, waited) = match slots.clone().try_acquire_owned() {
                Ok(slot) => (slot, false),
                Err(_) => (slots.acquire_owned().await.expect("semaphore"), true),
            };
            let result = send(&client, &target, body).await;
            (issued.elapsed(), waited, result)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (latency, waited, result) = joined.expect("request task");
        samples.waited += waited as usize;
        match result {
            Ok(reported) => {
                samples.latencies.push(latency);
                samples.reported.extend(reported);
            }
            Err(e) => {
                samples.failures += 1;
                if samples.first_failures.len() < 3 {
                    samples.first_failures.push(e);
                }
            }
        }
    }
    samples
}

fn client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

// ---------------------------------------------------------------------------------------------
// The llmroute gateway: a rendered route served by the real Envoy.

/// Name of the reference path: the same Envoy as a plain proxy in front of the primary.
const REFERENCE: &str = "envoy, plain proxy";

const PRIMARY_KEY: &str = "sk-bench-openai-0123456789";
const FALLBACK_KEY: &str = "bench-zhipu.0123456789";

struct Gateway {
    envoy: Proc,
    port: u16,
    route_key: String,
    /// What the gateway Pod's sidecar counts from the usage log (the same receiver).
    usage: std::sync::Arc<llmroute::agent::counters::UsageCounters>,
}

fn route_yaml(primary_base: &str, fallback_base: &str) -> String {
    // Both backends are `openai-compatible`: the catalog accepts plain http:// endpoints only for
    // that provider, and the simulators are plain HTTP. The paths are OpenAI's and Zhipu's.
    format!(
        r#"apiVersion: llmroute.io/v1alpha1
kind: LLMRoute
metadata: {{ name: chat, namespace: bench }}
spec:
  defaultModel: gpt-4o
  backends:
    - name: openai
      provider: openai-compatible
      endpoint: {primary_base}
      credentialsSecretRef: {{ name: openai-key, key: api-key }}
      models: {{ gpt-4o: gpt-4o }}
    - name: zhipu
      provider: openai-compatible
      endpoint: {fallback_base}
      priority: 1
      credentialsSecretRef: {{ name: zhipu-key, key: api-key }}
      models: {{ gpt-4o: glm-4-plus }}
"#
    )
}

/// llmroute's Envoy module reading streams' usage (`sse-usage/`), built optimised by
/// `scripts/bench-overhead`; LLMROUTE_BENCH_MODULE overrides.
fn usage_module() -> PathBuf {
    let path = std::env::var_os("LLMROUTE_BENCH_MODULE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            root()
                .join("target/release")
                .join(llmroute::gateway::envoy::SSE_USAGE_MODULE_FILE)
        });
    assert!(
        path.exists(),
        "no usage module at {} (cargo build --release -p llmroute-sse-usage, or scripts/bench-overhead)",
        path.display()
    );
    path
}

fn start_gateway(
    envoy_bin: &Path,
    dir: &Path,
    primary_base: &str,
    fallback_base: &str,
    concurrency: usize,
    edit: Option<&str>,
) -> Gateway {
    let routes = render::parse_routes("bench-route.yaml", &route_yaml(primary_base, fallback_base))
        .unwrap_or_else(|e| panic!("route: {e:?}"));
    // The operator serves these resources over xDS; the offline layout (`llmroute render --out-dir`)
    // is the same resources from files, which Envoy handles the same once loaded.
    let opts = EnvoyOptions {
        port: free_port(),
        address: "127.0.0.1".into(),
        admin_port: free_port(),
        health_port: free_port(),
        usage_log: dir.join("access.log").display().to_string(),
        usage_module: usage_module().display().to_string(),
        ..Default::default()
    };
    // The access log goes where it goes in a Pod: to a file the sidecar follows to count usage,
    // followed here in-process (its lines not printed).
    let (follower, counters) =
        llmroute::agent::follow::Follower::open(Path::new(&opts.usage_log), "bench");
    let usage = std::sync::Arc::new(counters);
    let (c, stop) = (usage.clone(), std::sync::Arc::default());
    std::thread::spawn(move || llmroute::agent::follow::follow(follower, c, stop));
    let renders = render::translate_offline(
        &routes,
        &RenderOptions {
            namespace: "bench".into(),
            default_region: "us".into(),
            envoy: opts.clone(),
            xds: Default::default(),
            deployment: Default::default(),
            operator_namespace: "llmroute-system".into(),
        },
    );
    assert_eq!(renders.len(), 1);
    let route_keys =
        render::write_gateway_dir(&renders[0], dir, &opts).expect("write gateway files");
    // The render writes placeholder provider keys: replace them with the simulators' keys.
    for key in &renders[0].translation.gateway.provider_keys {
        let value = match key.source.name.as_str() {
            "openai-key" => PRIMARY_KEY,
            "zhipu-key" => FALLBACK_KEY,
            other => panic!("unexpected provider key source {other}"),
        };
        std::fs::write(dir.join("keys").join(&key.entry), value).expect("write key");
    }
    // A variant: a command edits the rendered files in place before Envoy starts.
    if let Some(edit) = edit {
        let status = Command::new("sh")
            .args(["-c", edit])
            .current_dir(dir)
            .status()
            .expect("run the variant's edit command");
        assert!(status.success(), "variant edit {edit:?} failed: {status}");
    }
    let envoy = start_envoy(
        "envoy (llmroute gateway)",
        envoy_bin,
        &dir.join("bootstrap.yaml"),
        opts.health_port,
        concurrency,
    );
    Gateway {
        envoy,
        port: opts.port,
        route_key: route_keys["chat"].clone(),
        usage,
    }
}

/// Starts Envoy on `bootstrap` and waits until `/ready` on `ready_port` says LIVE.
fn start_envoy(
    name: &'static str,
    envoy_bin: &Path,
    bootstrap: &Path,
    ready_port: u16,
    concurrency: usize,
) -> Proc {
    let mut envoy = Proc::spawn(
        name,
        Command::new(envoy_bin)
            .args(["--log-level", "warn", "--disable-hot-restart"])
            .args(["--concurrency", &concurrency.to_string()])
            // As the gateway Deployment runs it: the access log written out every second.
            .args([
                llmroute::gateway::objects::ACCESS_LOG_FLUSH_FLAG,
                &llmroute::gateway::objects::ACCESS_LOG_FLUSH_MS.to_string(),
            ])
            .arg("-c")
            .arg(bootstrap),
        bootstrap.with_extension("log"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        envoy.alive().unwrap_or_else(|e| panic!("{e}"));
        if http_get(ready_port, "/ready").is_some_and(|b| b.contains("LIVE")) {
            return envoy;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready in 30 s:\n{}",
            envoy.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A reference point, not a gateway: the same Envoy as a plain HTTP proxy (one listener, the router
/// filter, one static upstream cluster; no Lua, no key injection, no failover, no access log). What
/// Envoy itself costs on this machine, against which the gateway's filter chain can be read.
fn start_plain_envoy(
    envoy_bin: &Path,
    dir: &Path,
    upstream_port: u16,
    concurrency: usize,
) -> (Proc, u16) {
    let (port, admin_port) = (free_port(), free_port());
    let bootstrap = format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin_port} }} }}
static_resources:
  listeners:
    - name: plain
      address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: plain
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: upstream }} }}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: upstream
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
              - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream_port} }} }} }}
"#
    );
    let file = dir.join("plain-envoy.yaml");
    std::fs::write(&file, bootstrap).expect("write plain envoy bootstrap");
    let envoy = start_envoy(
        "envoy (plain proxy)",
        envoy_bin,
        &file,
        admin_port,
        concurrency,
    );
    (envoy, port)
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// LiteLLM's proxy with the same two backends and fallback.

const LITELLM_MASTER_KEY: &str = "sk-llmroute-bench-litellm-master-key-0123456789abcdef";

async fn start_litellm(
    litellm: &Path,
    dir: &Path,
    primary_base: &str,
    fallback_base: &str,
    workers: usize,
) -> (Proc, u16) {
    let config = format!(
        r#"model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_base: {primary_base}
      api_key: {PRIMARY_KEY}
  - model_name: glm-4-plus
    litellm_params:
      model: openai/glm-4-plus
      api_base: {fallback_base}
      api_key: {FALLBACK_KEY}
router_settings:
  fallbacks: [{{"gpt-4o": ["glm-4-plus"]}}]
litellm_settings:
  drop_params: true
"#
    );
    let config_file = dir.join("litellm.yaml");
    std::fs::write(&config_file, config).expect("write litellm config");
    let port = free_port();
    let mut proc = Proc::spawn(
        "litellm",
        Command::new(litellm)
            .arg("--config")
            .arg(&config_file)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--num_workers", &workers.to_string()])
            // uvicorn's supervisor kills a worker that does not answer its health check within 5 s
            // (the default); importing LiteLLM on a busy 2-core machine takes longer, and the restarts
            // would overlap the measurements.
            .args(["--timeout_worker_healthcheck", "120"])
            .env("LITELLM_MASTER_KEY", LITELLM_MASTER_KEY)
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_TELEMETRY_DISABLED", "true")
            .current_dir(dir),
        dir.join("litellm.log"),
    );
    // Ready when a chat completion goes through (start-up takes several seconds).
    let probe = client(1);
    let target = Target {
        name: "litellm".into(),
        url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
        bearer: LITELLM_MASTER_KEY.into(),
        model: "gpt-4o",
        status: 200,
        header: None,
        report_header: None,
    };
    // Ready when every worker has started and a chat completion goes through.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        proc.alive().unwrap_or_else(|e| panic!("{e}"));
        let started = litellm_log_count(&proc, LITELLM_STARTED);
        match send(&probe, &target, request_body("gpt-4o")).await {
            Ok(_) if started >= workers => break,
            Ok(_) if Instant::now() > deadline => panic!(
                "litellm: {started} of {workers} workers started in 180 s; its log ends with:\n{}",
                proc.log_tail(40)
            ),
            Ok(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            Err(e) if Instant::now() > deadline => panic!(
                "litellm not ready in 180 s ({e}); its log ends with:\n{}",
                proc.log_tail(40)
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    (proc, port)
}

/// What uvicorn logs when a worker has started, and when the supervisor finds one dead.
const LITELLM_STARTED: &str = "Application startup complete.";
const LITELLM_DIED: &str = "died";

fn litellm_log_count(proc: &Proc, needle: &str) -> usize {
    std::fs::read_to_string(&proc.log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Report.

fn ms(v: f64) -> String {
    format!("{v:.3}")
}

fn row(out: &mut String, name: &str, values: &[f64], extra: &str) {
    let mut cells: Vec<String> = values.iter().map(|v| format!("{:>9}", ms(*v))).collect();
    // Differences of maxima say nothing: such rows stop at p99.
    cells.resize(PERCENTILES.len(), format!("{:>9}", "-"));
    let _ = writeln!(out, "  {name:<34}{}  {extra}", cells.join(""));
}

fn header(out: &mut String, title: &str) {
    let cols: Vec<String> = PERCENTILES.iter().map(|(n, _)| format!("{n:>9}")).collect();
    let _ = writeln!(out, "  {title:<34}{}", cols.join(""));
}

fn describe(s: &Samples) -> String {
    let mut d = format!("n={}", s.latencies.len());
    if s.failures > 0 {
        d += &format!(" FAILED={} ({:?})", s.failures, s.first_failures);
    }
    if s.not_sent > 0 {
        d += &format!(" NOT-SENT={}", s.not_sent);
    }
    if s.waited > 0 {
        d += &format!(" waited-for-connection={}", s.waited);
    }
    d += &format!(
        " max-schedule-lag={:.1}ms",
        s.max_lag.as_secs_f64() * 1000.0
    );
    d
}

fn minus(a: [f64; 4], b: [f64; 4]) -> [f64; 4] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]]
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    // cargo passes `--bench` (and filters) to harness = false benchmarks; none apply here.
    llmroute_devkit::tls::install_default_provider();
    let settings = Settings::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        tokio::select! {
            _ = run(settings) => {}
            _ = tokio::signal::ctrl_c() => eprintln!("interrupted: stopping Envoy, LiteLLM and the simulators"),
        }
    });
    // Dropping `run`'s future stopped every process it started.
    runtime.shutdown_timeout(Duration::from_secs(2));
}

async fn run(s: Settings) {
    let started = Instant::now();
    let envoy_bin = std::env::var_os("LLMROUTE_BENCH_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".tools/bin/envoy"));
    let litellm_bin = std::env::var_os("LLMROUTE_BENCH_LITELLM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".tools/litellm/bin/litellm"));
    assert!(
        envoy_bin.exists(),
        "no envoy at {} (run scripts/install-envoy, or scripts/bench-overhead)",
        envoy_bin.display()
    );
    let with_litellm = !s.skip_litellm;
    assert!(
        !with_litellm || litellm_bin.exists(),
        "no litellm at {} (run scripts/bench-overhead, or set BENCH_SKIP_LITELLM=1)",
        litellm_bin.display()
    );
    let load_start = load_average();
    let scratch = tempfile::Builder::new()
        .prefix("llmroute-bench-overhead")
        .tempdir()
        .expect("scratch dir");

    // The devkit's simulators, each following its provider's contract (path, auth, models, error
    // bodies); request recording off, as for any benchmark.
    let primary = Sim::start(
        SimConfig::new(SimProvider::OpenAI)
            .key(PRIMARY_KEY)
            .record(false),
    )
    .await
    .expect("start the OpenAI simulator");
    let fallback = Sim::start(
        SimConfig::new(SimProvider::Zhipu)
            .key(FALLBACK_KEY)
            .record(false),
    )
    .await
    .expect("start the Zhipu simulator");

    let gw_dir = scratch.path().join("gateway");
    std::fs::create_dir_all(&gw_dir).unwrap();
    let gateway = start_gateway(
        &envoy_bin,
        &gw_dir,
        primary.base_url(),
        fallback.base_url(),
        s.envoy_concurrency,
        None,
    );
    // Variants of the gateway's configuration, measured next to it: BENCH_VARIANTS="name=command;..."
    // (the command edits the rendered files in their directory; a name ending in `@N` runs Envoy
    // with --concurrency N).
    let variants: Vec<(String, Gateway)> = knob::<String>("BENCH_VARIANTS", String::new())
        .split(';')
        .filter(|v| !v.trim().is_empty())
        .enumerate()
        .map(|(i, spec)| {
            let (name, edit) = spec.split_once('=').unwrap_or((spec, ""));
            let name = name.trim().to_string();
            let concurrency = name
                .rsplit_once('@')
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(s.envoy_concurrency);
            let dir = scratch.path().join(format!("variant-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let edit = Some(edit).filter(|e| !e.trim().is_empty());
            let gw = start_gateway(
                &envoy_bin,
                &dir,
                primary.base_url(),
                fallback.base_url(),
                concurrency,
                edit,
            );
            (name, gw)
        })
        .collect();
    let plain = s.reference.then(|| {
        start_plain_envoy(
            &envoy_bin,
            scratch.path(),
            primary.port(),
            s.envoy_concurrency,
        )
    });
    let litellm = if with_litellm {
        Some(
            start_litellm(
                &litellm_bin,
                scratch.path(),
                primary.base_url(),
                fallback.base_url(),
                s.litellm_workers,
            )
            .await,
        )
    } else {
        None
    };
    let setup = started.elapsed();
    let litellm_deaths_at_start = litellm
        .as_ref()
        .map_or(0, |(p, _)| litellm_log_count(p, LITELLM_DIED));

    let direct = Target {
        name: "direct".into(),
        url: format!("{}/chat/completions", primary.base_url()),
        bearer: PRIMARY_KEY.into(),
        model: "gpt-4o",
        status: 200,
        header: None,
        report_header: None,
    };
    let via_gateway = Target {
        name: "llmroute".into(),
        url: format!("http://127.0.0.1:{}/chat/v1/chat/completions", gateway.port),
        bearer: gateway.route_key.clone(),
        model: "gpt-4o",
        status: 200,
        header: Some(("x-llmroute-backend", "openai")),
        report_header: None,
    };
    let mut targets = vec![direct.clone()];
    if let Some((_, port)) = &plain {
        targets.push(Target {
            name: REFERENCE.into(),
            url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
            ..direct.clone()
        });
    }
    targets.push(via_gateway.clone());
    for (name, gw) in &variants {
        targets.push(Target {
            name: format!("llmroute [{name}]"),
            url: format!("http://127.0.0.1:{}/chat/v1/chat/completions", gw.port),
            bearer: gw.route_key.clone(),
            // An edit may remove what names the backend.
            header: None,
            ..via_gateway.clone()
        });
    }
    if let Some((_, port)) = &litellm {
        targets.push(Target {
            name: "litellm".into(),
            url: format!("http://127.0.0.1:{port}/v1/chat/completions"),
            bearer: LITELLM_MASTER_KEY.into(),
            model: "gpt-4o",
            status: 200,
            header: None,
            report_header: Some("x-litellm-overhead-duration-ms"),
        });
    }

    // (a), (b), (c): the paths in turn, round after round, each with its own warm connections.
    let http = client(s.connections);
    let mut results: Vec<Samples> = targets.iter().map(|_| Samples::default()).collect();
    let per_round = s.requests / s.rounds;
    for round in 0..s.rounds {
        for (t, acc) in targets.iter().zip(results.iter_mut()) {
            let warm = run_phase(&http, t, s.warmup, s.rate, s.connections).await;
            assert!(
                warm.failures < s.warmup.max(1),
                "{}: every warm-up request failed: {:?}",
                t.name,
                warm.first_failures
            );
            let phase = run_phase(&http, t, per_round, s.rate, s.connections).await;
            eprintln!(
                "round {}/{} {:<24} p50 {} ms  {}",
                round + 1,
                s.rounds,
                t.name,
                ms(quantiles(&phase)[0]),
                describe(&phase)
            );
            acc.merge(phase);
        }
    }

    // (d) failover: the primary answers the region block; measured directly and through the gateway,
    // and the fallback's own latency directly.
    primary.set_fault(Fault::RegionBlocked);
    let failing_direct = Target {
        name: "primary blocked, direct".into(),
        status: 403,
        ..direct.clone()
    };
    let fallback_direct = Target {
        name: "fallback, direct".into(),
        url: format!("{}/chat/completions", fallback.base_url()),
        bearer: FALLBACK_KEY.into(),
        model: "glm-4-plus",
        ..direct.clone()
    };
    let failover = Target {
        name: "failed over, llmroute".into(),
        header: Some(("x-llmroute-backend", "zhipu")),
        ..via_gateway.clone()
    };
    let mut fo_targets = vec![failing_direct, fallback_direct, failover];
    for (name, gw) in &variants {
        fo_targets.push(Target {
            name: format!("failed over, llmroute [{name}]"),
            url: format!("http://127.0.0.1:{}/chat/v1/chat/completions", gw.port),
            bearer: gw.route_key.clone(),
            ..fo_targets[2].clone()
        });
    }
    let mut fo_results: Vec<Samples> = fo_targets.iter().map(|_| Samples::default()).collect();
    let fo_per_round = (s.failover_requests / s.rounds).max(1);
    for round in 0..s.rounds {
        for (t, acc) in fo_targets.iter().zip(fo_results.iter_mut()) {
            let _ = run_phase(&http, t, s.warmup.min(20), s.failover_rate, s.connections).await;
            let phase = run_phase(&http, t, fo_per_round, s.failover_rate, s.connections).await;
            eprintln!(
                "round {}/{} {:<24} p50 {} ms  {}",
                round + 1,
                s.rounds,
                t.name,
                ms(quantiles(&phase)[0]),
                describe(&phase)
            );
            acc.merge(phase);
        }
    }
    primary.set_fault(Fault::None);

    // (e) usage exactness: mixed whole and streamed answers through the gateway, every one counted
    // once by the sidecar's receiver against what the simulators reported.
    let exactness = usage_exactness(
        &http,
        &via_gateway,
        &gateway,
        [&primary, &fallback],
        s.usage_requests,
        s.connections,
    )
    .await;

    // (f) streams: time to the first byte of a streamed answer, per path, the paths in turn.
    let stream_targets: Vec<&Target> = targets.iter().filter(|t| t.name != "litellm").collect();
    let first_bytes = first_byte_phase(&http, &stream_targets, s.stream_requests).await;

    // (g) each variant in pairs with the gateway: whole answers, then streams' first bytes.
    let mut paired = Vec::new();
    for (name, gw) in &variants {
        let other = targets
            .iter()
            .find(|t| t.name == format!("llmroute [{name}]"))
            .expect("the variant's target");
        for &answer in &s.paired {
            let before = (gateway.envoy.cpu_ns(), gw.envoy.cpu_ns());
            let mut p = paired_phase(&http, &via_gateway, other, s.paired_requests, answer).await;
            let after = (gateway.envoy.cpu_ns(), gw.envoy.cpu_ns());
            // (Saturating: a thread that exits takes its time with it; Envoy's threads do not.)
            p.cpu = [
                (
                    after.0.0.saturating_sub(before.0.0),
                    after.1.0.saturating_sub(before.1.0),
                ),
                (
                    after.0.1.saturating_sub(before.0.1),
                    after.1.1.saturating_sub(before.1.1),
                ),
            ];
            paired.push((name.clone(), answer, p));
        }
    }
    let load_end = load_average();
    let measured = started.elapsed() - setup;

    // Versions and worker counts, then the figures.
    let mut out = String::new();
    let _ = writeln!(out, "\n== llmroute gateway overhead (loopback) ==");
    let _ = writeln!(
        out,
        "machine: {} CPUs ({}), {:.1} GiB memory; load average (1/5/15 min) {} at start, {} at end",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        memory_gib(),
        load_start,
        load_end
    );
    let _ = writeln!(
        out,
        "Envoy {} (--concurrency {}); {}; simulators and load generator: one process, tokio with 2 worker threads; nothing pinned",
        envoy_version(&envoy_bin),
        s.envoy_concurrency,
        if with_litellm {
            format!(
                "LiteLLM {} (--num_workers {}; workers restarted during the measurements: {})",
                litellm_version(&litellm_bin),
                s.litellm_workers,
                litellm
                    .as_ref()
                    .map_or(0, |(p, _)| litellm_log_count(p, LITELLM_DIED))
                    - litellm_deaths_at_start
            )
        } else {
            "LiteLLM not measured".into()
        }
    );
    let _ = writeln!(
        out,
        "load: open loop at {} req/s, non-streaming chat completions, keep-alive, at most {} connections (= requests in flight) per path; \
         {} measured requests per path in {} rounds (paths in turn), {} warm-up requests per path and round; failover phases at {} req/s, {} requests each",
        s.rate,
        s.connections,
        per_round * s.rounds,
        s.rounds,
        s.warmup,
        s.failover_rate,
        fo_per_round * s.rounds
    );
    let _ = writeln!(
        out,
        "set-up {:.1} s, measuring {:.1} s\n",
        setup.as_secs_f64(),
        measured.as_secs_f64()
    );

    header(&mut out, "latency (ms)");
    let q: Vec<[f64; 4]> = results.iter().map(quantiles).collect();
    for (t, (r, qv)) in targets.iter().zip(results.iter().zip(&q)) {
        row(&mut out, &t.name, qv, &describe(r));
    }
    let of = |name: &str| {
        targets
            .iter()
            .position(|t| t.name == name)
            .map(|i| (&results[i], minus(q[i], q[0])))
    };
    let _ = writeln!(out);
    header(&mut out, "overhead = path - direct (ms)");
    if let Some((_, envoy_only)) = of(REFERENCE) {
        row(
            &mut out,
            REFERENCE,
            &envoy_only[..3],
            "(reference: Envoy itself on this machine)",
        );
    }
    let (_, ours) = of("llmroute").expect("llmroute measured");
    row(
        &mut out,
        "llmroute",
        &ours[..3],
        &format!(
            "target p50 <= 0.5: {}; p99 <= 2: {}",
            verdict(ours[0] <= 0.5),
            verdict(ours[2] <= 2.0)
        ),
    );
    for (name, _) in &variants {
        let name = format!("llmroute [{name}]");
        if let Some((_, v)) = of(&name) {
            row(&mut out, &name, &v[..3], "(variant)");
        }
    }
    if let Some((litellm_samples, theirs)) = of("litellm") {
        let mut rep = litellm_samples.reported.clone();
        rep.sort_by(f64::total_cmp);
        let rep_p50 = rep.get(rep.len() / 2).copied().unwrap_or(f64::NAN);
        row(
            &mut out,
            "litellm",
            &theirs[..3],
            &format!("(its own x-litellm-overhead-duration-ms: median {rep_p50:.3})"),
        );
        let ratio: Vec<f64> = (0..3).map(|i| theirs[i] / ours[i]).collect();
        let cells: Vec<String> = ratio.iter().map(|v| format!("{v:>9.1}")).collect();
        let _ = writeln!(
            out,
            "  {:<34}{}  target >= 20 at p50: {}; at p99: {}",
            "ratio litellm / llmroute",
            cells.join(""),
            verdict(ratio[0] >= 20.0),
            verdict(ratio[2] >= 20.0)
        );
    }
    let _ = writeln!(out);
    header(&mut out, "failover (ms)");
    let fq: Vec<[f64; 4]> = fo_results.iter().map(quantiles).collect();
    for (t, (r, qv)) in fo_targets.iter().zip(fo_results.iter().zip(&fq)) {
        row(&mut out, &t.name, qv, &describe(r));
    }
    let cost = minus(fq[2], fq[0]);
    row(
        &mut out,
        "failed over - failed attempt",
        &cost[..3],
        &format!(
            "target <= 2 (p50: {}, p99: {})",
            verdict(cost[0] <= 2.0),
            verdict(cost[2] <= 2.0)
        ),
    );
    row(
        &mut out,
        "  of which the gateway's own",
        &minus(cost, fq[1])[..3],
        "(also minus the fallback's direct latency)",
    );
    for (i, (name, _)) in variants.iter().enumerate() {
        row(
            &mut out,
            &format!("failed over - failed attempt [{name}]"),
            &minus(fq[3 + i], fq[0])[..3],
            "(variant)",
        );
    }
    let _ = writeln!(
        out,
        "\nPercentiles are nearest-rank over all rounds; differences are taken percentile by percentile."
    );
    // Every answer of the gateway reached the usage counters (the log is flushed every second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let counted = gateway_answers(&gateway.usage.encode());
    let _ = writeln!(
        out,
        "Usage log: {} answers of the gateway counted by the sidecar's receiver ({} prompt and {} completion tokens).",
        counted.0, counted.1, counted.2
    );
    if !first_bytes.is_empty() {
        let _ = writeln!(out);
        header(&mut out, "stream first byte (ms)");
        for (t, samples) in stream_targets.iter().zip(&first_bytes) {
            row(&mut out, &t.name, &quantiles(samples), &describe(samples));
        }
        if let (Some(direct), Some(gw)) = (
            first_bytes.first(),
            stream_targets
                .iter()
                .position(|t| t.name == "llmroute")
                .map(|i| &first_bytes[i]),
        ) {
            row(
                &mut out,
                "llmroute - direct",
                &minus(quantiles(gw), quantiles(direct))[..3],
                "",
            );
        }
    }
    if !paired.is_empty() {
        let _ = writeln!(
            out,
            "\n  paired with llmroute, one request at a time (ms)   llmroute p50  variant p50  median(variant - llmroute)"
        );
        for (name, answer, p) in &paired {
            let what = match answer {
                Answer::Whole => "whole answer",
                Answer::Stream => "stream first byte",
                Answer::StreamWithUsage => "stream (usage asked) first byte",
            };
            // Envoy CPU per request (µs): the gateway's, and the variant's minus it.
            let n = (p.base.latencies.len() + p.base.failures).max(1) as f64;
            let per = |ns: u64| ns as f64 / n / 1000.0;
            let [(all_b, all_o), (wrk_b, wrk_o)] = p.cpu;
            let _ = writeln!(
                out,
                "  {:<49}{:>12}{:>13}{:>27}  pairs={} failures={}/{}  Envoy CPU/request (us): llmroute {:.1} (workers {:.1}), variant - llmroute {:+.1} (workers {:+.1})",
                format!("[{name}] {what}"),
                ms(quantiles(&p.base)[0]),
                ms(quantiles(&p.other)[0]),
                format!("{:+.3}", median(&p.diffs)),
                p.diffs.len(),
                p.base.failures,
                p.other.failures,
                per(all_b),
                per(wrk_b),
                per(all_o) - per(all_b),
                per(wrk_o) - per(wrk_b),
            );
        }
    }
    let _ = writeln!(out, "{exactness}");
    println!("{out}");
    drop(litellm);
    drop(plain);
    drop(gateway);
    drop(variants);
    if knob::<String>("BENCH_KEEP", "0".into()) == "1" {
        eprintln!(
            "logs and configuration kept in {}",
            scratch.keep().display()
        );
    }
}

/// What a timed request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// A whole answer.
    Whole,
    /// A stream, without `stream_options` (the gateway asks the provider for its usage, and hides
    /// it).
    Stream,
    /// A stream whose client asks for its usage (`stream_options.include_usage`).
    StreamWithUsage,
}

/// One request to `t`, alone: the time from sending it to the end of a whole answer, or to the
/// first byte of a streamed one (the rest of the stream is read too).
async fn timed(http: &reqwest::Client, t: &Target, answer: Answer) -> Result<Duration, String> {
    let mut body: serde_json::Value = serde_json::from_slice(&request_body(t.model)).expect("json");
    let stream = answer != Answer::Whole;
    if stream {
        body["stream"] = true.into();
    }
    if answer == Answer::StreamWithUsage {
        body["stream_options"] = serde_json::json!({ "include_usage": true });
    }
    let sent = Instant::now();
    let mut r = http
        .post(&t.url)
        .bearer_auth(&t.bearer)
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let mut first = None;
    while r.chunk().await.map_err(|e| e.to_string())?.is_some() {
        if stream && first.is_none() {
            first = Some(sent.elapsed());
        }
    }
    Ok(first.unwrap_or_else(|| sent.elapsed()))
}

fn record(acc: &mut Samples, result: Result<Duration, String>) -> Option<Duration> {
    match result {
        Ok(d) => {
            acc.latencies.push(d);
            Some(d)
        }
        Err(e) => {
            acc.failures += 1;
            if acc.first_failures.len() < 3 {
                acc.first_failures.push(e);
            }
            None
        }
    }
}

/// Streams `n` chat completions (without `stream_options`) to each target, the targets in turn one
/// request at a time, and records each one's time from sending to the first byte of its body.
async fn first_byte_phase(http: &reqwest::Client, targets: &[&Target], n: usize) -> Vec<Samples> {
    let mut samples: Vec<Samples> = targets.iter().map(|_| Samples::default()).collect();
    if n == 0 {
        return Vec::new();
    }
    let started = Instant::now();
    for _ in 0..n {
        if started.elapsed() > Duration::from_secs(300) {
            break;
        }
        for (t, acc) in targets.iter().zip(samples.iter_mut()) {
            record(acc, timed(http, t, Answer::Stream).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    samples
}

/// A variant measured in pairs with the gateway as rendered.
struct Paired {
    base: Samples,
    other: Samples,
    /// Per pair, variant − gateway (ms).
    diffs: Vec<f64>,
    /// Envoy CPU time during the pairs (ns), gateway and variant: all threads, then workers only.
    /// Both served the same requests, so the difference per request is what an edit costs in
    /// work, without the latency's noise (it includes work after a stream's first byte).
    cpu: [(u64, u64); 2],
}

/// (g) `n` pairs: one request to the gateway as rendered and one to `other`, one at a time, which
/// goes first alternating; whole answers or streams' first bytes. Both requests of a pair meet the
/// machine in the same state, so the median of the per-pair differences shows what a variant's
/// edit costs or saves well below the drift between (b)'s separate rounds. Bounded to 2 min.
async fn paired_phase(
    http: &reqwest::Client,
    base: &Target,
    other: &Target,
    n: usize,
    answer: Answer,
) -> Paired {
    let mut p = Paired {
        base: Samples::default(),
        other: Samples::default(),
        diffs: Vec::new(),
        cpu: [(0, 0); 2],
    };
    let started = Instant::now();
    for i in 0..n {
        if started.elapsed() > Duration::from_secs(120) {
            p.base.not_sent = n - i;
            break;
        }
        let (b, o) = if i % 2 == 0 {
            let b = record(&mut p.base, timed(http, base, answer).await);
            (b, record(&mut p.other, timed(http, other, answer).await))
        } else {
            let o = record(&mut p.other, timed(http, other, answer).await);
            (record(&mut p.base, timed(http, base, answer).await), o)
        };
        if let (Some(b), Some(o)) = (b, o) {
            p.diffs.push((o.as_secs_f64() - b.as_secs_f64()) * 1000.0);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    p
}

/// The median of `v` (ms).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Sends `n` chat completions through the gateway, a third whole, a third streamed, a third
/// streamed with `stream_options.include_usage` (at most `connections` at once, bounded to 10 min),
/// then compares the sidecar receiver's counts with what the simulators reported. Returns the
/// printed line.
async fn usage_exactness(
    http: &reqwest::Client,
    target: &Target,
    gateway: &Gateway,
    sims: [&Sim; 2],
    n: usize,
    connections: usize,
) -> String {
    if n == 0 {
        return "Usage exactness: not run (BENCH_USAGE_REQUESTS=0).".into();
    }
    let sent_before: u64 = sims.iter().map(|s| s.usage_sent().prompt).sum::<u64>();
    let completion_before: u64 = sims.iter().map(|s| s.usage_sent().completion).sum::<u64>();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = gateway_answers(&gateway.usage.encode());
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(connections));
    let mut tasks = JoinSet::new();
    let mut ok = 0usize;
    let mut refused = 0usize;
    let mut failed = Vec::new();
    const KINDS: usize = 6;
    for i in 0..n {
        if started.elapsed() > Duration::from_secs(600) {
            failed.push(format!("not sent: {} (10 min bound)", n - i));
            break;
        }
        let slot = slots.clone().acquire_owned().await.expect("semaphore");
        let (http, url, key) = (http.clone(), target.url.clone(), target.bearer.clone());
        let mut body: serde_json::Value =
            serde_json::from_slice(&request_body(target.model)).expect("json");
        // Kinds, in turn: whole; streamed; streamed asking for usage; and what a client that wants
        // its streams not counted sends: `stream_options: {}`, `include_usage: false`; and a
        // model outside the route's list, hidden behind a nested one (must be refused).
        let kind = i % KINDS;
        if kind > 0 && kind < 5 {
            body["stream"] = true.into();
        }
        match kind {
            2 => body["stream_options"] = serde_json::json!({ "include_usage": true }),
            3 => body["stream_options"] = serde_json::json!({}),
            4 => body["stream_options"] = serde_json::json!({ "include_usage": false }),
            5 => {
                body["metadata"] = serde_json::json!({ "model": target.model });
                body["model"] = "o1-pro".into();
            }
            _ => {}
        }
        tasks.spawn(async move {
            let _slot = slot;
            let r = http.post(url).bearer_auth(key).json(&body).send().await;
            match r {
                Ok(r) if kind == 5 && r.status() == 404 => Ok(false),
                Ok(r) if kind != 5 && r.status() == 200 => {
                    r.bytes().await.map(|_| true).map_err(|e| e.to_string())
                }
                Ok(r) => Err(format!("kind {kind}: status {}", r.status())),
                Err(e) => Err(e.to_string()),
            }
        });
        while let Some(done) = tasks.try_join_next() {
            match done.expect("request task") {
                Ok(true) => ok += 1,
                Ok(false) => refused += 1,
                Err(e) => failed.push(e),
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        match done.expect("request task") {
            Ok(true) => ok += 1,
            Ok(false) => refused += 1,
            Err(e) => failed.push(e),
        }
    }
    let took = started.elapsed();
    // The log is flushed every second; wait (bounded) until every answer is in.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = gateway_answers(&gateway.usage.encode());
    while after.0 < before.0 + ok as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = gateway_answers(&gateway.usage.encode());
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    after = gateway_answers(&gateway.usage.encode());
    let prompt_sent = sims.iter().map(|s| s.usage_sent().prompt).sum::<u64>() - sent_before;
    let completion_sent =
        sims.iter().map(|s| s.usage_sent().completion).sum::<u64>() - completion_before;
    let counted = after.0 - before.0;
    let (prompt, completion) = (after.1 - before.1, after.2 - before.2);
    // The refused ones are counted as answers too (404s of the gateway, no tokens).
    let counted = counted.saturating_sub(refused as u64);
    let of_kind = |k: usize| (0..n).filter(|i| i % KINDS == k).count();
    format!(
        "Usage exactness: {n} requests ({} whole, {} streamed, {} streamed with include_usage, {} with stream_options {{}}, {} with include_usage false, {} with a model outside the route behind a nested one) in {:.1} s: \
         {ok} answered 200, {refused} refused 404 (of {}), {} failed{}; \
         answers counted {counted} (lost {}, extra {}); prompt tokens counted {prompt} of {prompt_sent} reported, completion tokens {completion} of {completion_sent}: {}.",
        of_kind(0),
        of_kind(1),
        of_kind(2),
        of_kind(3),
        of_kind(4),
        of_kind(5),
        took.as_secs_f64(),
        of_kind(5),
        failed.len(),
        failed
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        (ok as u64).saturating_sub(counted),
        counted.saturating_sub(ok as u64),
        if counted == ok as u64
            && refused == of_kind(5)
            && prompt == prompt_sent
            && completion == completion_sent
        {
            "exact"
        } else {
            "NOT exact"
        }
    )
}

/// Answers, prompt and completion tokens in a usage-counter exposition.
fn gateway_answers(text: &str) -> (u64, u64, u64) {
    let sum = |name: &str, filter: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    (
        sum("llmroute_gateway_requests_total{", ""),
        sum("llmroute_gateway_tokens_total{", r#"kind="prompt""#),
        sum("llmroute_gateway_tokens_total{", r#"kind="completion""#),
    )
}
