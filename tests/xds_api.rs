//! The committed Envoy API descriptors (src/xds/envoy-api.bin, which the operator's xDS server
//! encodes resources with) are exactly what tools/envoy-api writes from go-control-plane v1.40.0:
//! an extension added to the generated configuration without regenerating them fails here, not
//! in a cluster. Builds the Go tool (cached per machine by scripts/lib/go-tool.sh); needs Go and
//! the Go module proxy, as the test cluster does.

use std::path::Path;
use std::process::Command;

#[test]
fn committed_envoy_api_descriptors_are_what_the_generator_writes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/gen-envoy-api"))
        .arg("--check")
        .output()
        .expect("run scripts/gen-envoy-api --check");
    assert!(
        out.status.success(),
        "scripts/gen-envoy-api --check: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
