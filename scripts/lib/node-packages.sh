# shellcheck shell=bash
# Debian packages the real test node needs (sourced by scripts/testcluster and scripts/test-images).
#
#   node_packages_ensure    installs what is missing, idempotently; starts no service
#
# containerd, runc and the CNI plugins run only inside the node's own namespaces, with
# configuration under the cluster's DIR: the packages' own services must never start. Debian's
# maintainer scripts ask /usr/sbin/policy-rc.d whether they may start a service; while we
# install, it answers 101 ("action forbidden") unless it already exists. `apt-get update` runs
# only when an install fails (the package lists of a fresh machine may be stale or missing).

# ipset: kube-router's network policy firewall (tests/node/kube-router) keeps the Pods of each
# policy in ipsets.
NODE_PACKAGES=(containerd runc containernetworking-plugins iptables ipset busybox-static)

# Files whose presence says every package above is installed (cheaper than dpkg-query).
node_packages_present() {
  [[ -x /usr/bin/containerd && -x /usr/bin/ctr && -x /usr/bin/containerd-shim-runc-v2 \
    && -x /usr/sbin/runc && -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local \
    && -x /usr/lib/cni/loopback && -x /usr/lib/cni/portmap && -x /usr/sbin/iptables \
    && -x /usr/sbin/ipset && -x /bin/busybox ]] \
    && [[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" == 'install ok installed' ]]
}

node_packages_ensure() {
  node_packages_present && return 0
  [[ "$(id -u)" == 0 ]] || { printf 'node packages: run as root to install %s\n' "${NODE_PACKAGES[*]}" >&2; return 1; }
  command -v apt-get >/dev/null 2>&1 || { printf 'node packages: apt-get not found (Debian/Ubuntu needed)\n' >&2; return 1; }
  local policy=/usr/sbin/policy-rc.d own_policy=0 rc=0 start=$SECONDS
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# written by llmroute scripts/lib/node-packages.sh while installing; removed afterwards\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
  fi
  printf 'node packages: installing %s\n' "${NODE_PACKAGES[*]}" >&2
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${NODE_PACKAGES[@]}")
  if ! "${apt[@]}" >&2; then
    printf 'node packages: install failed; running apt-get update and trying again\n' >&2
    { env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 && "${apt[@]}" >&2; } || rc=1
  fi
  (( own_policy )) && rm -f "$policy"
  if (( rc != 0 )) || ! node_packages_present; then
    printf 'node packages: could not install %s\n' "${NODE_PACKAGES[*]}" >&2
    return 1
  fi
  printf 'node packages: installed in %ss\n' "$((SECONDS - start))" >&2
}
