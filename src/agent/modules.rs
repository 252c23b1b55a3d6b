//! `llmroute gateway install-modules`: the gateway Pod's init container copies llmroute's Envoy
//! dynamic modules from the operator's image (where the Dockerfile puts them) into a volume the
//! Envoy container mounts, so the official Envoy image runs unchanged. The module reads streamed
//! answers' usage (`sse-usage/`, `crate::gateway::envoy::SSE_USAGE_MODULE_FILE`).

use std::io;
use std::path::{Path, PathBuf};

/// Where the operator's image has the modules (the Dockerfile's runtime stage).
pub const IMAGE_MODULES_DIR: &str = "/usr/local/lib/llmroute";

/// The modules' file names.
pub const MODULES: &[&str] = &[crate::gateway::envoy::SSE_USAGE_MODULE_FILE];

/// Copies each module of `from` into `to`, whole or not at all: a temporary file, then a rename
/// (an Envoy that started early never loads half a library). Returns the files written.
pub fn install(from: &Path, to: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for name in MODULES {
        let source = from.join(name);
        let target = to.join(name);
        let partial = to.join(format!(".{name}.partial"));
        std::fs::copy(&source, &partial).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("copy {} to {}: {e}", source.display(), partial.display()),
            )
        })?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::File::open(&partial)?.sync_all()?;
        std::fs::rename(&partial, &target)?;
        written.push(target);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_the_module_whole_and_says_what_is_missing() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let name = crate::gateway::envoy::SSE_USAGE_MODULE_FILE;
        let err = install(from.path(), to.path()).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
        std::fs::write(from.path().join(name), b"\x7fELF module").unwrap();
        let written = install(from.path(), to.path()).unwrap();
        assert_eq!(written, vec![to.path().join(name)]);
        assert_eq!(std::fs::read(&written[0]).unwrap(), b"\x7fELF module");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&written[0]).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        // Nothing else is left in the volume.
        assert_eq!(std::fs::read_dir(to.path()).unwrap().count(), 1);
    }
}
