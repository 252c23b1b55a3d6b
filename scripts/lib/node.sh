# shellcheck shell=bash
# The real test node's part of scripts/testcluster (sourced by it; ROOT, log and die come from
# there). See tests/node/README.md.

# shellcheck source=scripts/lib/node-packages.sh
source "$ROOT/scripts/lib/node-packages.sh"
# shellcheck source=scripts/lib/images.sh
source "$ROOT/scripts/lib/images.sh"

# node_prepare DIR: installs the Debian packages, builds CoreDNS, kube-router and the images the
# node imports itself (all cached), and prints serve's node flags, one a line.
node_prepare() {
  [[ "$(id -u)" == 0 ]] || { log "error: --node needs root (namespaces, mounts, containerd)"; return 1; }
  command -v unshare >/dev/null && command -v nsenter >/dev/null && command -v ip >/dev/null \
    || { log "error: --node needs util-linux (nsenter) and iproute2 (ip)"; return 1; }
  node_packages_ensure || return 1
  local name archive
  printf '%s\n' --node
  # NetworkPolicies: kube-router's firewall (tests/node/kube-router); TESTCLUSTER_NETWORK_POLICY=0
  # runs the node without it.
  if [[ "${TESTCLUSTER_NETWORK_POLICY:-1}" != 0 ]]; then
    local mod="$ROOT/tests/node/kube-router" pkg=github.com/cloudnativelabs/kube-router/v2 version kube_router
    version="$(awk -v m="$pkg" '$1 == m { print $2; exit }' "$mod/go.mod")"
    # shellcheck source=scripts/lib/go-tool.sh
    source "$ROOT/scripts/lib/go-tool.sh"
    kube_router="$(go_tool_build kube-router "$mod" "$pkg/cmd/kube-router" "-X $pkg/pkg/version.Version=$version")" || return 1
    printf '%s\n' "--kube-router=$kube_router"
  fi
  for name in pause coredns busybox; do
    archive="$(image_build "$name")" || return 1
    printf '%s\n' "--node-image=$archive" "--$name-image=$(image_ref "$name")"
  done
}

# The kubelet's cgroupRoot for DIR, as `testcluster` derives it.
node_cgroup_root() { printf '/llmroute-%s' "$(printf '%s' "$1" | sha256sum | cut -c1-12)"; }

# node_cleanup DIR: kills what is left of DIR's node (containerd, shims, Pod processes), removes
# the Pods' cgroups, and checks that nothing of DIR is mounted on the host.
node_cleanup() {
  local dir="$1" root pids deadline m left
  root="$(node_cgroup_root "$dir")"
  deadline=$((SECONDS + 15))
  while :; do
    pids="$(node_pids "$dir")"
    # Pod processes are found by cgroup: their command lines do not name DIR.
    for m in $(node_cgroup_mounts); do
      [[ -d "$m$root" ]] || continue
      pids+=" $(find "$m$root" -name cgroup.procs -exec cat {} + 2>/dev/null | tr '\n' ' ')"
    done
    # shellcheck disable=SC2086,SC2116 # one line, single spaces
    pids="$(echo $pids)"
    [[ -z "$pids" ]] && break
    if (( SECONDS >= deadline )); then
      log "warning: processes of the node still running: $pids"
      break
    fi
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
  done
  deadline=$((SECONDS + 10))
  while :; do
    left=0
    for m in $(node_cgroup_mounts); do
      [[ -d "$m$root" ]] || continue
      find "$m$root" -depth -type d -exec rmdir {} + 2>/dev/null || true
      [[ -d "$m$root" ]] && left=1
    done
    (( left == 0 )) && break
    if (( SECONDS >= deadline )); then
      log "warning: cgroups under $root could not be removed"
      break
    fi
    sleep 0.2
  done
  if grep -qF " $dir/" /proc/self/mountinfo; then
    log "warning: mounts under $dir on the host:"
    grep -F " $dir/" /proc/self/mountinfo >&2 || true
  fi
}

# Processes of DIR's node found by their command line: containerd (--config DIR/node/...), its
# shims (-address DIR/node/run/...) and kube-router (--kubeconfig DIR/node/kube-router/...).
node_pids() {
  local pattern pid comm
  pattern="$(printf '%s' "$1/node/" | sed 's/[][\.*^$+?(){}|]/\\&/g')"
  for pid in $(pgrep -f -- "$pattern" || true); do
    comm="$(cat "/proc/$pid/comm" 2>/dev/null || true)"
    case "$comm" in containerd*|runc*|kube-router) echo "$pid" ;; esac
  done
}

node_cgroup_mounts() {
  awk '{ for (i = 1; i <= NF; i++) if ($i == "-") { if ($(i+1) == "cgroup" || $(i+1) == "cgroup2") print $5; break } }' /proc/self/mountinfo
}

node_env() { # DIR: sources DIR/node.env or dies
  [[ -f "$1/node.env" ]] || die "no node runs in $1 (start one with 'scripts/testcluster up $1 --node')"
  # shellcheck disable=SC1091
  source "$1/node.env"
}

cmd_node_exec() {
  [[ $# -ge 2 ]] || usage
  local dir
  [[ -d "$1" ]] || die "$1 does not exist"
  dir="$(abs_dir "$1")"; shift
  [[ "$1" == -- ]] && shift
  [[ $# -ge 1 ]] || usage
  node_env "$dir"
  [[ -e "$NODE_NETNS" ]] || die "the node's network namespace $NODE_NETNS is gone"
  exec nsenter --net="$NODE_NETNS" -- "$@"
}

# Prints a Pod's container log (CRI format lines, with the time stamp and stream stripped) from
# the node's podLogsDir; with no CONTAINER, every container's, each line prefixed by its name.
cmd_node_logs() {
  [[ $# -ge 3 ]] || usage
  local dir ns="$2" pod="$3" container="${4:-}" pod_dir c f found=0
  [[ -d "$1" ]] || die "$1 does not exist"
  dir="$(abs_dir "$1")"
  node_env "$dir"
  pod_dir="$(ls -1dt -- "$POD_LOGS_DIR/${ns}_${pod}_"* 2>/dev/null | head -n 1)"
  [[ -n "$pod_dir" ]] || die "no logs of Pod $ns/$pod in $POD_LOGS_DIR"
  for c in "$pod_dir"/*/; do
    c="$(basename "$c")"
    [[ -z "$container" || "$c" == "$container" ]] || continue
    found=1
    # Oldest first: rotated files (N.log.TIMESTAMP), then the current N.log; restarts count N up.
    while IFS= read -r f; do
      if [[ -n "$container" ]]; then
        sed -E 's/^[^ ]+ (stdout|stderr) [FP] //' "$f"
      else
        sed -E "s/^[^ ]+ (stdout|stderr) [FP] /[$c] /" "$f"
      fi
    done < <(find "$pod_dir/$c" -maxdepth 1 -type f -name '*.log*' ! -name '*.gz' ! -name '*.tmp' -printf '%T@ %p\n' | sort -n | cut -d' ' -f2-)
  done
  (( found )) || die "Pod $ns/$pod has no container ${container:-at all} in $pod_dir"
}

cmd_image() {
  [[ $# -ge 2 ]] || usage
  local dir
  [[ -d "$1" ]] || die "$1 does not exist"
  dir="$(abs_dir "$1")"
  node_env "$dir"
  case "$2" in
    import) shift 2; [[ $# -ge 1 ]] || usage; exec "$dir/bin/testcluster" image-import --dir "$dir" "$@" ;;
    list) exec ctr --address "$CONTAINERD_SOCK" --namespace "$CONTAINERD_NAMESPACE" images list ;;
    *) usage ;;
  esac
}
