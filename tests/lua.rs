//! The gateway's Lua outside Envoy: `src/gateway/lua/common.lua` and `front.lua` loaded as Envoy
//! gets them (one chunk, common first) into `lua5.1` (the language of Envoy's LuaJIT; Debian's,
//! installed like the GitOps tests' interpreters), their usage reading driven through a mocked
//! Envoy handle by the cases in `tests/lua/front_usage.lua` (the usage event the gateway asked for
//! is hidden by llmroute's Envoy module, tested in `sse-usage/src/scan.rs`). The same code runs in the real Envoy
//! in tests/dataplane.rs; here answers that imitate usage and every chunk cut of a stream are tried.

mod support;

use std::process::Command;

use support::envoy::repo_root;
use support::tools::lua_interpreters;

#[test]
fn the_front_lua_reads_whole_answers_usage() {
    let lua = lua_interpreters()
        .into_iter()
        .find(|l| *l == "lua5.1")
        .expect("lua5.1");
    let root = repo_root();
    let read = |p: &str| std::fs::read_to_string(root.join(p)).unwrap();
    let cases = root.join("tests/lua/front_usage.lua");
    // The functions under test are local to the chunk: the chunk hands them to the cases.
    let script = format!(
        "{}\n{}\nfront = {{ read_usage = read_usage }}\n{}",
        read("src/gateway/lua/common.lua"),
        read("src/gateway/lua/front.lua"),
        format_args!(
            r#"local cases = dofile({path:?})
local names, failed = {{}}, 0
for name in pairs(cases) do names[#names + 1] = name end
table.sort(names)
for _, name in ipairs(names) do
  local ok, err = pcall(cases[name])
  print((ok and "ok   " or "FAIL ") .. name .. (ok and "" or (": " .. tostring(err))))
  if not ok then failed = failed + 1 end
end
print(#names .. " cases")
os.exit(failed == 0 and 0 or 1)"#,
            path = cases.display().to_string()
        )
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("front_test.lua");
    std::fs::write(&file, script).unwrap();
    let out = Command::new(lua).arg(&file).output().expect("run lua5.1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 cases"), "{stdout}");
}
