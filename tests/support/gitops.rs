//! How GitOps tools read an LLMRoute's health: Argo CD through `deploy/argocd/health.lua` (run by a
//! real Lua interpreter with `obj` built as Argo CD builds it) and Flux/cli-utils through the real
//! kstatus library (`tests/kstatus`).

use std::io::Write;
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::Value;

use super::envoy::repo_root;
use super::tools;

/// A verdict: status and message.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Verdict {
    pub status: String,
    #[serde(default)]
    pub message: String,
}

/// `value` as a Lua expression, the way Argo CD's `decodeValue` turns an unstructured object into a
/// Lua value: objects become tables keyed by string, arrays 1-based tables, null nil, numbers numbers.
pub fn to_lua(value: &Value) -> String {
    match value {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => lua_string(s),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(to_lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("[{}] = {}", lua_string(k), to_lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn lua_string(s: &str) -> String {
    let mut bytes = Vec::with_capacity(s.len() + 2);
    bytes.push(b'"');
    for b in s.bytes() {
        match b {
            b'"' => bytes.extend_from_slice(b"\\\""),
            b'\\' => bytes.extend_from_slice(b"\\\\"),
            // Control bytes as decimal escapes (valid in Lua 5.1 and 5.4); UTF-8 passes through.
            0..=31 | 127 => bytes.extend_from_slice(format!("\\{b:03}").as_bytes()),
            _ => bytes.push(b),
        }
    }
    bytes.push(b'"');
    String::from_utf8(bytes).expect("escaped UTF-8 stays UTF-8")
}

/// Argo CD's verdict on `object` from `deploy/argocd/health.lua`, run by the interpreter `lua`.
pub fn argocd_health(lua: &str, object: &Value) -> Verdict {
    let dir = tempfile::tempdir().expect("tempdir");
    let object_file = dir.path().join("object.lua");
    std::fs::write(&object_file, format!("return {}\n", to_lua(object))).expect("write object");
    let out = Command::new(lua)
        .arg(repo_root().join("tests/support/argocd_health.lua"))
        .arg(repo_root().join("deploy/argocd/health.lua"))
        .arg(&object_file)
        .output()
        .unwrap_or_else(|e| panic!("run {lua}: {e}"));
    assert!(
        out.status.success(),
        "{lua} health.lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = text.lines();
    Verdict {
        status: lines.next().unwrap_or_default().to_string(),
        message: lines.next().unwrap_or_default().to_string(),
    }
}

/// kstatus's verdicts on `objects`, in order (one run of kstatus-check).
pub fn kstatus(objects: &[Value]) -> Vec<Verdict> {
    let stream: String = objects
        .iter()
        .map(|o| format!("{o}\n"))
        .collect::<Vec<_>>()
        .join("");
    let mut child = Command::new(tools::kstatus_check())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kstatus-check");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stream.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("kstatus-check output");
    assert!(
        out.status.success(),
        "kstatus-check failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("kstatus-check prints JSON lines"))
        .collect()
}
