# Shared by scripts/install-helm and scripts/install-kstatus: builds a Go command from a module of
# this repository once per machine and keeps the binary in a cache, the way scripts/testcluster keeps
# its binaries.
#
#   go_tool_build NAME MODULE_DIR PACKAGE [LDFLAGS]   -> prints the path of the cached binary
#
# The cache key hashes the module's *.go files, go.mod, go.sum, `go version`, GOOS/GOARCH, the extra
# linker flags and GO_TOOL_RECIPE; binaries live in ${LLMROUTE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmroute/tools}/NAME/<hash>/
# (the 3 newest builds of each tool are kept). Builds of one tool are serialised by a lock, so
# concurrent callers build once. go.sum is committed: no checksum database is needed.

export GOFLAGS=-buildvcs=false
export GOTOOLCHAIN=local # never fetch another Go toolchain
export CGO_ENABLED=0

GO_TOOL_RECIPE=1

go_tool_log() { printf '%s: %s\n' "${GO_TOOL_NAME:-go-tool}" "$*" >&2; }

go_tool_hash() { # MODULE_DIR LDFLAGS
  {
    echo "ldflags=$2"
    (cd "$1" && find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -not -path './.*' -print0 \
      | LC_ALL=C sort -z | xargs -0 sha256sum)
    go version
    go env GOOS GOARCH CGO_ENABLED
    echo "recipe=$GO_TOOL_RECIPE"
  } | sha256sum | cut -c1-20
}

go_tool_build() { # NAME MODULE_DIR PACKAGE [LDFLAGS]
  local name="$1" mod="$2" pkg="$3" ldflags="-s -w ${4:-}" cache hash out tmp start i
  GO_TOOL_NAME="$name"
  command -v go >/dev/null 2>&1 || { go_tool_log "error: go is not installed (needed to build $name)"; return 1; }
  cache="${LLMROUTE_TOOLS_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/llmroute/tools}/$name"
  hash="$(go_tool_hash "$mod" "$ldflags")"
  out="$cache/$hash"
  if [[ -x "$out/$name" ]]; then
    echo "$out/$name"
    return 0
  fi
  mkdir -p "$cache"
  exec 7>"$cache/.build.lock"
  flock -w 3600 7 || { go_tool_log "error: timed out waiting for another build of $name"; return 1; }
  if [[ ! -x "$out/$name" ]]; then
    start=$SECONDS
    go_tool_log "building $pkg from $mod (cache $out); the first build takes a few minutes"
    for i in 1 2 3; do
      (cd "$mod" && go mod download >&2) && break
      if (( i == 3 )); then go_tool_log "error: go mod download failed"; exec 7>&-; return 1; fi
      sleep $((i * 10))
    done
    tmp="$(mktemp -d "$cache/.build.XXXXXX")"
    if ! (cd "$mod" && go build -trimpath -ldflags="$ldflags" -o "$tmp/$name" "$pkg" >&2); then
      rm -rf "$tmp"
      exec 7>&-
      go_tool_log "error: go build failed"
      return 1
    fi
    rm -rf "$out"
    mv -T "$tmp" "$out"
    go_tool_log "built in $((SECONDS - start))s"
    (cd "$cache" && ls -1dt -- */ 2>/dev/null | tail -n +4 | xargs -r rm -rf --) || true
  fi
  exec 7>&-
  echo "$out/$name"
}

# Links BINARY as .tools/bin/NAME of the repository ROOT (replaced by rename, never in place).
go_tool_link() { # ROOT NAME BINARY
  mkdir -p "$1/.tools/bin"
  ln -sfn "$3" "$1/.tools/bin/.$2.new"
  mv -fT "$1/.tools/bin/.$2.new" "$1/.tools/bin/$2"
}
