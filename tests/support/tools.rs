//! Tools of the packaging and GitOps tests, installed on first use by the project's scripts: Helm
//! and kstatus-check (built from Go modules, cached), Lua interpreters (Debian packages).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::envoy::repo_root;

fn install(script: &str, args: &[&str]) -> String {
    let out = Command::new(repo_root().join("scripts").join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    assert!(
        out.status.success(),
        "scripts/{script} {} failed: the tests need it",
        args.join(" ")
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// Helm built from its Go module (`scripts/install-helm`).
pub fn helm() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| PathBuf::from(install("install-helm", &[])))
        .clone()
}

/// kstatus-check built from `tests/kstatus` (`scripts/install-kstatus`).
pub fn kstatus_check() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| PathBuf::from(install("install-kstatus", &[])))
        .clone()
}

/// The Lua interpreters the Argo CD health script is tested with: `lua5.4` and `lua5.1` (the dialect
/// of Argo CD's gopher-lua), installed from Debian's packages by `scripts/install-test-tools lua`.
pub fn lua_interpreters() -> Vec<&'static str> {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        install("install-test-tools", &["lua"]);
    });
    vec!["lua5.4", "lua5.1"]
}
