//! The quickstart (`make demo` → `scripts/demo`) run non-interactively, as a newcomer runs it, on the
//! tests' control plane: its key lines are checked (OpenAI answers, the next request after OpenAI's
//! region block is answered by Zhipu, the route's status and Events say why, the route fails back),
//! and nothing it started is left running.

mod support;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::cluster::cluster;
use support::envoy::repo_root;

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// Index of the first line at or after `from` that satisfies `pred`, or a failure showing the output.
fn find_line(lines: &[&str], from: usize, what: &str, pred: impl Fn(&str) -> bool) -> usize {
    lines[from..]
        .iter()
        .position(|l| pred(l))
        .map(|i| from + i)
        .unwrap_or_else(|| {
            panic!(
                "no line with {what} after line {from} in:\n{}",
                lines.join("\n")
            )
        })
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[test]
fn quickstart_shows_the_failover_and_leaves_nothing_running() {
    let cluster = cluster();
    let root = repo_root();
    let state = root.join("target/demo-test");
    let state_str = state.display().to_string();
    let log = root.join("target/demo-test.out");
    let out_file = std::fs::File::create(&log).unwrap();
    let started = Instant::now();
    let mut command = Command::new(root.join("scripts/demo"));
    // What `cargo test` sets for this package: build scripts that watch such variables (ring's
    // `rerun-if-env-changed=CARGO_PKG_NAME`...) would otherwise rerun in the demo's `cargo build` and
    // recompile most dependencies.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_EXE_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|p| name.starts_with(p))
            || ["CARGO_TARGET_TMPDIR", "CARGO_PRIMARY_PACKAGE", "OUT_DIR"].contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let mut child = command
        .arg("--failback")
        .env("LLMROUTE_DEMO_DIR", &state)
        .env("LLMROUTE_DEMO_CLUSTER", &cluster.dir)
        // The feature set `cargo test` already built: only the devkit's binaries (and tests) are
        // compiled, instead of a second build of every dependency without dev-dependency features.
        .env("LLMROUTE_DEMO_BUILD_FLAGS", "--tests")
        .stdin(Stdio::null())
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .process_group(0)
        .spawn()
        .expect("run scripts/demo");
    let limit = Duration::from_secs(300);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            // As a Ctrl-C would: the script's trap stops what it started.
            let _ = Command::new("kill")
                .args(["-INT", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!(
                "scripts/demo did not finish within {limit:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log).unwrap();
    eprintln!("scripts/demo took {:?}", started.elapsed());
    assert!(
        status.success(),
        "scripts/demo failed ({status}):\n{output}"
    );
    let lines: Vec<&str> = output.lines().collect();

    // The route is served by OpenAI first.
    let i = find_line(&lines, 0, "the route Ready with OpenAI active", |l| {
        words(l).starts_with(&["chat", "True", "openai", "Failover"])
    });
    let i = find_line(&lines, i, "the first answer from openai", |l| {
        l.contains("HTTP 200")
            && l.contains("x-llmroute-backend: openai")
            && l.contains("\"hello from openai\"")
    });
    // OpenAI blocks the region; the very next request is answered by Zhipu.
    let i = find_line(&lines, i, "the region block switched on", |l| {
        l.contains("{\"fault\":\"region-blocked\"}")
    });
    let i = find_line(&lines, i, "the answer after the block from zhipu", |l| {
        l.contains("HTTP 200")
            && l.contains("x-llmroute-backend: zhipu")
            && l.contains("\"hello from zhipu\"")
    });
    // Status and Events say why.
    let i = find_line(&lines, i, "kubectl get llmr with zhipu active", |l| {
        words(l).starts_with(&["chat", "True", "zhipu", "Failover"])
    });
    let i = find_line(&lines, i, "openai RegionBlocked in status.backends", |l| {
        words(l).starts_with(&["openai", "RegionBlocked"])
            && l.contains("unsupported_country_region_territory")
    });
    find_line(&lines, i, "the Degraded condition", |l| {
        l.contains("Degraded=True NotPreferredBackend")
    });
    let i = find_line(&lines, i, "a FailedOver event", |l| {
        words(l).get(1..3) == Some(&["Warning", "FailedOver"][..])
            && l.contains("openai is RegionBlocked")
    });
    // Once the new order is loaded, OpenAI is not tried at all.
    let i = find_line(
        &lines,
        i,
        "the answer once the chain starts at zhipu",
        |l| l.contains("x-llmroute-backend: zhipu"),
    );
    let i = find_line(&lines, i, "OpenAI not tried", |l| {
        l.contains("OpenAI's simulator did not see this request")
    });
    // --failback: OpenAI recovers, the route moves back after the failback delay.
    let i = find_line(
        &lines,
        i,
        "kubectl get llmr with openai active again",
        |l| words(l).starts_with(&["chat", "True", "openai", "Failover"]),
    );
    let i = find_line(&lines, i, "a FailedBack event", |l| {
        words(l).get(1..3) == Some(&["Normal", "FailedBack"][..])
    });
    let i = find_line(&lines, i, "an answer from openai after the failback", |l| {
        l.contains("x-llmroute-backend: openai") && l.contains("\"hello from openai\"")
    });
    find_line(&lines, i, "the stop", |l| {
        l.contains("Stopping everything the demo started")
    });

    // Nothing it started is left: no process mentions its directory, no pid file remains.
    let left = processes_mentioning(&format!("{state_str}/"));
    assert!(left.is_empty(), "processes left by the demo: {left:?}");
    let pids = std::fs::read_dir(state.join("pids"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        pids,
        0,
        "pid files left in {}",
        state.join("pids").display()
    );
    // On a control plane it did not start, it removes its namespace (deletion may still be running).
    let ns = cluster.kubectl(&[
        "get",
        "namespace",
        "demo",
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(
        !ns.status.success() || !ns.stdout.is_empty(),
        "namespace demo is still there and not being deleted"
    );
}
