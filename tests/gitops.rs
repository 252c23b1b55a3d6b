//! GitOps health of LLMRoutes, without a cluster: every sample status in `tests/fixtures/route-status/`
//! through Argo CD's health script (`deploy/argocd/health.lua`, real Lua 5.4 and 5.1) and through the
//! real kstatus library (Flux, cli-utils). `tests/deploy.rs` does the same with routes the operator
//! reconciled on the test control plane.

mod support;

use std::path::PathBuf;

use serde_json::Value;
use support::envoy::repo_root;
use support::gitops::{Verdict, argocd_health, kstatus};
use support::tools::lua_interpreters;

struct Fixture {
    path: PathBuf,
    object: Value,
    argocd: Verdict,
    kstatus_status: String,
    kstatus_message: Option<String>,
}

fn fixtures() -> Vec<Fixture> {
    let dir = repo_root().join("tests/fixtures/route-status");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 8, "fixtures in {}", dir.display());
    paths
        .into_iter()
        .map(|path| {
            let doc: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let argocd: Verdict = serde_json::from_value(doc["expect"]["argocd"].clone())
                .unwrap_or_else(|e| panic!("{}: expect.argocd: {e}", path.display()));
            let k = &doc["expect"]["kstatus"];
            Fixture {
                object: doc["object"].clone(),
                argocd,
                kstatus_status: k["status"].as_str().expect("expect.kstatus.status").into(),
                kstatus_message: k["message"].as_str().map(str::to_string),
                path,
            }
        })
        .collect()
}

#[test]
fn argocd_health_script_reads_every_sample_status_as_expected() {
    let fixtures = fixtures();
    let mut failures = Vec::new();
    for lua in lua_interpreters() {
        for f in &fixtures {
            let got = argocd_health(lua, &f.object);
            if got != f.argocd {
                failures.push(format!(
                    "{} with {lua}: expected {:?}, got {:?}",
                    f.path.display(),
                    f.argocd,
                    got
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kstatus_reads_every_sample_status_as_expected() {
    let fixtures = fixtures();
    let objects: Vec<Value> = fixtures.iter().map(|f| f.object.clone()).collect();
    let verdicts = kstatus(&objects);
    assert_eq!(verdicts.len(), fixtures.len());
    let mut failures = Vec::new();
    for (f, got) in fixtures.iter().zip(&verdicts) {
        let message_ok = f.kstatus_message.as_ref().is_none_or(|m| *m == got.message);
        if got.status != f.kstatus_status || !message_ok {
            failures.push(format!(
                "{}: expected {} {:?}, got {:?}",
                f.path.display(),
                f.kstatus_status,
                f.kstatus_message,
                got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_health_script_needs_no_library_argo_cd_does_not_open() {
    // Argo CD opens only the base, table and (a safe) os library for configured health scripts.
    let script = std::fs::read_to_string(repo_root().join("deploy/argocd/health.lua")).unwrap();
    for lib in ["string.", "io.", "debug.", "require", "utf8.", "math."] {
        let code: String = script
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(!code.contains(lib), "health.lua uses {lib}");
    }
}
