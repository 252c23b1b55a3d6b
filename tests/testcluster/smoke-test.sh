#!/usr/bin/env bash
# Smoke test of the test control plane: brings a cluster up in a temporary
# directory (or uses DIR if given and already up), checks what the project's
# tests rely on, and takes it down again. Prints 'N passed, N failed'.
#
#   tests/testcluster/smoke-test.sh [DIR]
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TC="$ROOT/scripts/testcluster"
DIR="${1:-$(mktemp -d /tmp/testcluster-smoke.XXXXXX)}"
pass=0 fail=0

ok() { pass=$((pass + 1)); echo "ok   - $*"; }
not_ok() { fail=$((fail + 1)); echo "FAIL - $*"; }
check() { # check NAME CMD...
  local name="$1"; shift
  if "$@" >/tmp/smoke.$$.out 2>&1; then ok "$name"; else not_ok "$name"; sed 's/^/       /' /tmp/smoke.$$.out | tail -n 20; fi
}
eventually() { # eventually SECONDS CMD...: CMD succeeds within SECONDS
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}

if ! "$TC" up "$DIR"; then
  echo "0 passed, 1 failed"
  exit 1
fi
k() { "$DIR/bin/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }

has_system_namespaces() {
  local ns; ns="$(k get ns -o name)" || return 1
  for n in default kube-system kube-public kube-node-lease; do grep -qx "namespace/$n" <<<"$ns" || return 1; done
}
check "the four system namespaces exist" has_system_namespaces

server_version() { [[ "$(k version -o json)" == *'"gitVersion": "v1.'* ]]; }
check "server version is the built one" server_version

k create namespace smoke >/dev/null

check "default ServiceAccount appears in a new namespace" eventually 30 k -n smoke get serviceaccount default
check "kube-root-ca.crt is published in a new namespace" eventually 30 k -n smoke get configmap kube-root-ca.crt

deployment_makes_replicaset() {
  k -n smoke create deployment web --image=registry.invalid/web:1 --replicas=2 >/dev/null || return 1
  eventually 30 bash -c "[[ -n \"\$('$DIR/bin/kubectl' --kubeconfig '$DIR/kubeconfig' -n smoke get rs -l app=web -o name)\" ]]"
}
check "a Deployment gets a ReplicaSet" deployment_makes_replicaset

garbage_collection() {
  k -n smoke create configmap owner --from-literal=a=b >/dev/null || return 1
  local uid; uid="$(k -n smoke get configmap owner -o jsonpath='{.metadata.uid}')" || return 1
  k apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: ConfigMap
metadata:
  name: dependent
  namespace: smoke
  ownerReferences:
  - apiVersion: v1
    kind: ConfigMap
    name: owner
    uid: $uid
data: {a: b}
EOF
  k -n smoke delete configmap owner --wait=false >/dev/null || return 1
  eventually 60 bash -c "! '$DIR/bin/kubectl' --kubeconfig '$DIR/kubeconfig' -n smoke get configmap dependent >/dev/null 2>&1"
}
check "the dependent of a deleted owner is garbage-collected" garbage_collection

server_side_apply() {
  local manifest='{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"ssa","namespace":"smoke"},"data":{"k":"v"}}'
  k apply --server-side --field-manager=smoke -f - <<<"$manifest" >/dev/null || return 1
  [[ "$(k -n smoke get configmap ssa -o jsonpath='{.metadata.managedFields[*].operation}')" == *Apply* ]] || return 1
  k apply --server-side --dry-run=server --field-manager=smoke -f - <<<"${manifest/\"v\"/\"w\"}" >/dev/null || return 1
  [[ "$(k -n smoke get configmap ssa -o jsonpath='{.data.k}')" == v ]]
}
check "server-side apply and --dry-run=server" server_side_apply

kustomize_apply() {
  local kdir; kdir="$(mktemp -d)"
  printf 'namespace: smoke\nconfigMapGenerator:\n- name: generated\n  literals: [x=y]\n' >"$kdir/kustomization.yaml"
  k apply -k "$kdir" >/dev/null; local rc=$?
  rm -rf "$kdir"
  (( rc == 0 )) && [[ "$(k -n smoke get configmap -o name)" == *configmap/generated-* ]]
}
check "kubectl apply -k" kustomize_apply

explain() { [[ "$(k explain deployment.spec.replicas)" == *replicas* ]]; }
check "kubectl explain" explain

service_account_token() {
  local token; token="$(k -n smoke create token default)" || return 1
  [[ "$("$DIR/bin/kubectl" --server "$(k config view --minify -o jsonpath='{.clusters[0].cluster.server}')" \
    --certificate-authority "$DIR/pki/ca.crt" --token "$token" auth whoami -o jsonpath='{.status.userInfo.username}')" \
    == system:serviceaccount:smoke:default ]]
}
check "a TokenRequest token authenticates as its ServiceAccount" service_account_token

non_admin_forbidden() {
  local kc="$DIR/smoke-sa.kubeconfig" out
  "$TC" kubeconfig "$DIR" --user system:serviceaccount:llmroute-system:llmroute \
    --group system:serviceaccounts --group system:serviceaccounts:llmroute-system --group system:authenticated \
    --out "$kc" || return 1
  [[ "$("$DIR/bin/kubectl" --kubeconfig "$kc" auth whoami)" == *system:serviceaccount:llmroute-system:llmroute* ]] || return 1
  out="$("$DIR/bin/kubectl" --kubeconfig "$kc" get secrets -A 2>&1)" && return 1
  [[ "$out" == *Forbidden* ]]
}
check "a minted non-admin kubeconfig is Forbidden to list secrets" non_admin_forbidden

namespace_deletion() {
  k delete namespace smoke --wait=false >/dev/null || return 1
  eventually 60 bash -c "! '$DIR/bin/kubectl' --kubeconfig '$DIR/kubeconfig' get namespace smoke >/dev/null 2>&1"
}
check "a namespace deletion completes" namespace_deletion

check "up on a running cluster is a no-op" "$TC" up "$DIR"

"$TC" down "$DIR"
no_process_left() { ! pgrep -f -- "$DIR/bin/testcluster" >/dev/null; }
check "down leaves no process" no_process_left

rm -f /tmp/smoke.$$.out
echo "$pass passed, $fail failed"
(( fail == 0 ))
