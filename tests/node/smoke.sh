#!/usr/bin/env bash
# Smoke test of the real test node: brings a cluster with a node up in DIR (a temporary directory
# by default), runs real Pods on it, checks what tests rely on, takes it down and checks that
# nothing is left. Prints 'N passed, N failed'; exits non-zero on a failure.
#
#   tests/node/smoke.sh [DIR]
#
# The operator and simulator images need their binaries (LLMROUTE_BIN, LLMROUTE_SIM_BIN; default
# target/debug/...): without them those checks are skipped. SMOKE_SECOND_DIR=0 skips the check
# that a second cluster with a node runs beside the first.
set -uo pipefail
# shellcheck disable=SC2317 # check() calls the functions below by name

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TC="$ROOT/scripts/testcluster"
own_dir=0
if [[ $# -ge 1 ]]; then DIR="$1"; else DIR="$(mktemp -d /tmp/node-smoke.XXXXXX)"; own_dir=1; fi
NS=smoke
pass=0 fail=0 skip=0
NP_ERR=""
OUT="$(mktemp /tmp/node-smoke-out.XXXXXX)"

ok() { pass=$((pass + 1)); echo "ok   - $*"; }
not_ok() { fail=$((fail + 1)); echo "FAIL - $*"; }
skipped() { skip=$((skip + 1)); echo "skip - $*"; }
check() { # check NAME CMD...
  local name="$1" t0=$SECONDS; shift
  if "$@" >"$OUT" 2>&1; then
    ok "$name ($((SECONDS - t0))s)"
  else
    not_ok "$name ($((SECONDS - t0))s)"
    sed 's/^/       /' "$OUT" | tail -n 25
  fi
}
eventually() { # eventually SECONDS CMD...: CMD succeeds within SECONDS
  local deadline=$((SECONDS + $1)); shift
  until "$@"; do
    (( SECONDS < deadline )) || return 1
    sleep 0.5
  done
}
finish() {
  rm -f "$OUT"
  # A temporary DIR holds ~1 GB (containerd's images): removed when everything passed.
  if (( own_dir )); then
    if (( fail == 0 )); then rm -rf "$DIR"; else echo "kept $DIR for inspection (logs/, node/pod-logs/)"; fi
  fi
  echo "$pass passed, $fail failed, $skip skipped (${SECONDS}s)"
  (( fail == 0 ))
  exit
}

# nothing_left DIR: no process names DIR (pgrep excludes itself; this script's command line does
# not name DIR unless given as an argument), no cgroup of its node.
nothing_left() {
  local pids cg
  pids="$(pgrep -f -- "$1/" | grep -vx "$$" || true)"
  [[ -z "$pids" ]] || { ps -o pid,args -p $pids; return 1; }
  cg="$(ls -d /sys/fs/cgroup/*/llmroute-"$(printf '%s' "$1" | sha256sum | cut -c1-12)" 2>/dev/null)"
  [[ -z "$cg" ]] || { echo "left: $cg"; return 1; }
}

links_before="$(ip -o link show | awk -F': ' '{print $2}' | sort)"
mounts_before="$(wc -l </proc/self/mountinfo)"

# Images: the node imports pause, busybox and CoreDNS itself; these come from scripts/test-images.
images=(kubectl openai envoy)
op_bin="${LLMROUTE_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/llmroute}"
sim_bin="${LLMROUTE_SIM_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/llmroute-sim}"
[[ -x "$op_bin" ]] && images+=(operator)
[[ -x "$sim_bin" ]] && images+=(sim)
check "test images build (${images[*]})" "$ROOT/scripts/test-images" "${images[@]}"

t0=$SECONDS
if ! "$TC" up "$DIR" --node; then
  not_ok "up --node"
  "$TC" down "$DIR"
  finish
fi
ok "up --node ($((SECONDS - t0))s)"
k() { "$DIR/bin/kubectl" --kubeconfig "$DIR/kubeconfig" "$@"; }
check "up --node on a running cluster is a no-op" "$TC" up "$DIR" --node
check "status reports the node" bash -c "'$TC' status '$DIR' | grep -q 'node llmroute-node: Ready'"
check "test images import into the node" "$ROOT/scripts/test-images" --import "$DIR" "${images[@]}"

k create namespace "$NS" >/dev/null
k -n "$NS" wait --for=create serviceaccount/default --timeout=30s >/dev/null 2>&1 || true

# --- a Deployment of busybox httpd serving a ConfigMap file and a Secret file ----------------
apply_web() {
  k apply -f - <<EOF
apiVersion: v1
kind: ConfigMap
metadata: {name: web-content, namespace: $NS}
data:
  index.html: "hello from a ConfigMap volume"
---
apiVersion: v1
kind: Secret
metadata: {name: web-secret, namespace: $NS}
stringData:
  password: s3cr3t-value
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: $NS}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      securityContext: {runAsUser: 101, runAsGroup: 101, fsGroup: 101, runAsNonRoot: true}
      containers:
      - name: httpd
        image: localhost/llmroute/busybox:test
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "mkdir -p /tmp/www && ln -s /content /tmp/www/cm && ln -s /secret /tmp/www/secret && hostname >/tmp/www/host.txt && exec httpd -f -vv -p 8080 -h /tmp/www"]
        ports: [{containerPort: 8080, name: http}]
        readinessProbe:
          httpGet: {path: /cm/index.html, port: http}
          periodSeconds: 1
        securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        volumeMounts:
        - {name: content, mountPath: /content, readOnly: true}
        - {name: secret, mountPath: /secret, readOnly: true}
        - {name: tmp, mountPath: /tmp}
      volumes:
      - {name: content, configMap: {name: web-content}}
      - {name: secret, secret: {secretName: web-secret, defaultMode: 0440}}
      - {name: tmp, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: $NS}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
EOF
}
check "apply ConfigMap, Secret, 2-replica Deployment, Service" apply_web
check "both web replicas Ready" k -n "$NS" rollout status deployment/web --timeout=90s

# run_pod NAME IMAGE SCRIPT [extra spec YAML, indented 2]: a Pod that runs SCRIPT once and
# succeeds; prints its log.
run_pod() {
  local name="$1" image="$2" script="$3" extra="${4:-}"
  k -n "$NS" delete pod "$name" --ignore-not-found --grace-period=0 >/dev/null 2>&1
  k apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: $NS}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: $image
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", $(printf '%s' "$script" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))')]
$extra
EOF
  local phase="" deadline=$((SECONDS + 90))
  while (( SECONDS < deadline )); do
    phase="$(k -n "$NS" get pod "$name" -o jsonpath='{.status.phase}' 2>/dev/null)"
    [[ "$phase" == Succeeded || "$phase" == Failed ]] && break
    sleep 0.5
  done
  k -n "$NS" logs "$name" 2>&1
  [[ "$phase" == Succeeded ]] || { echo "Pod $name: phase ${phase:-unknown}"; k -n "$NS" describe pod "$name" | tail -n 15; return 1; }
}

client_reaches_web() {
  local log
  log="$(run_pod client localhost/llmroute/busybox:test '
set -e
nslookup web.smoke.svc.cluster.local
wget -q -O - http://web.smoke.svc/cm/index.html; echo
wget -q -O - http://web.smoke.svc:80/secret/password; echo
for i in $(seq 1 30); do wget -q -O - http://web.smoke.svc/host.txt; done | sort | uniq -c')" || { echo "$log"; return 1; }
  echo "$log"
  grep -q 'hello from a ConfigMap volume' <<<"$log" && grep -q 's3cr3t-value' <<<"$log" \
    && [[ "$(grep -cE '^ +[0-9]+ web-' <<<"$log")" == 2 ]]
}
check "a client Pod resolves web.smoke.svc and reaches both replicas (ConfigMap + Secret files)" client_reaches_web

# --- NetworkPolicy: kube-router's firewall enforces it (ingress and egress) -----------------------
# np-server (httpd on 8080) and np-client (sleeps; the checks exec wget in it). A default-deny
# policy selecting one of them blocks np-client -> np-server; deleting it lets traffic through
# again. Each attempt is bounded (timeout 3, kubectl exec --request-timeout), each wait by time.
np_pods() {
  k apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: Pod
metadata: {name: np-server, namespace: $NS, labels: {app: np-server}}
spec:
  terminationGracePeriodSeconds: 0
  securityContext: {runAsUser: 65534, runAsGroup: 65534, runAsNonRoot: true}
  containers:
  - name: httpd
    image: localhost/llmroute/busybox:test
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /tmp/www && echo np-server-ok >/tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"]
    ports: [{containerPort: 8080}]
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: np-server, namespace: $NS}
spec:
  selector: {app: np-server}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: np-client, namespace: $NS, labels: {app: np-client}}
spec:
  terminationGracePeriodSeconds: 0
  securityContext: {runAsUser: 65534, runAsGroup: 65534, runAsNonRoot: true}
  containers:
  - name: main
    image: localhost/llmroute/busybox:test
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
EOF
  k -n "$NS" wait --for=condition=Ready pod/np-server pod/np-client --timeout=60s
}
np_server_ip() { k -n "$NS" get pod np-server -o jsonpath='{.status.podIP}'; }
# np_get URL: np-client fetches URL, for 3 s at most (busybox's own wget -T crashes here, so
# `timeout`). Returns 0 if it got np-server's page, 1 if wget failed or timed out in the Pod
# (why in NP_ERR), 2 if the exec itself failed.
np_get() {
  local out code
  out="$(k --request-timeout=10s -n "$NS" exec np-client -- timeout 3 wget -q -O - "$1" 2>&1)"
  [[ "$out" == np-server-ok ]] && return 0
  code="$(sed -n 's/^command terminated with exit code \([0-9]*\)$/\1/p' <<<"$out")"
  if [[ -n "$code" ]]; then
    NP_ERR="$(grep -m1 '^wget:' <<<"$out")"
    [[ "$code" == 143 ]] && NP_ERR="no answer within 3s"
    NP_ERR="${NP_ERR:-wget exited $code}"
    return 1
  fi
  NP_ERR="$out"
  return 2
}
np_policy() { # np_policy NAME SELECTOR_APP TYPE: a default-deny policy of TYPE (Ingress|Egress)
  k apply -f - >/dev/null <<EOF
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: $1, namespace: $NS}
spec:
  podSelector: {matchLabels: {app: $2}}
  policyTypes: [$3]
EOF
}
# np_until WANT SECONDS URL: polls np_get URL until it succeeds (WANT=open) or fails (WANT=closed);
# prints how long after the call the first attempt that saw WANT started.
np_until() {
  local want="$1" limit="$2" url="$3" t0 now got
  t0="$(date +%s%N)"
  while :; do
    now="$(date +%s%N)"
    np_get "$url"
    case $? in 0) got=open ;; 1) got=closed ;; *) got="exec failed ($NP_ERR)" ;; esac
    if [[ "$got" == "$want" ]]; then
      [[ "$want" == open ]] && NP_ERR=""
      echo "$want: the first attempt that saw it started $(( (now - t0) / 1000000 )) ms after the change${NP_ERR:+ ($NP_ERR)}"
      NP_ERR=""
      return 0
    fi
    (( ($(date +%s%N) - t0) / 1000000000 < limit )) || { echo "still $got after ${limit}s"; return 1; }
    sleep 0.2
  done
}
np_stays() { # np_stays WANT URL: three more attempts, all WANT
  local i rc
  for i in 1 2 3; do
    np_get "$2"; rc=$?
    case "$1:$rc" in
      open:0|closed:1) ;;
      *) echo "attempt $i: wanted $1, got rc $rc ($NP_ERR)"; return 1 ;;
    esac
  done
  NP_ERR=""
}
np_ingress() {
  np_pods || return 1
  local ip url svc=http://np-server.smoke.svc/index.html
  ip="$(np_server_ip)"; url="http://$ip:8080/index.html"
  echo "np-server $ip, np-client $(k -n "$NS" get pod np-client -o jsonpath='{.status.podIP}')"
  np_until open 30 "$url" >/dev/null || return 1
  # (kube-proxy gets the new Service's endpoint a moment after the Pod is Ready)
  np_until open 30 "$svc" >/dev/null || { echo "np-client cannot reach the Service np-server"; return 1; }
  echo "before: np-client -> np-server (Pod IP :8080 and Service :80) connects"
  np_policy deny-ingress np-server Ingress || return 1
  echo "applied NetworkPolicy deny-ingress (podSelector app=np-server, policyTypes [Ingress], no rules)"
  np_until closed 30 "$url" || return 1
  np_stays closed "$url" || return 1
  np_get "$svc"
  [[ $? == 1 ]] || { echo "the Service: not blocked (or exec failed: $NP_ERR)"; return 1; }
  echo "with the policy: Pod IP blocked (3 more attempts) and the Service blocked ($NP_ERR)"
  # kube-router accepts traffic from the node itself (source address LOCAL), as kubelet probes need.
  if [[ "$("$TC" node-exec "$DIR" -- curl -s -m 3 "$url")" == np-server-ok ]]; then
    echo "from the node's own network namespace (10.88.0.1): still connects"
  else
    echo "from the node's own network namespace: blocked"; return 1
  fi
  k -n "$NS" delete networkpolicy deny-ingress >/dev/null || return 1
  echo "deleted the policy"
  np_until open 30 "$url" || return 1
  np_stays open "$url" && np_get "$svc" && echo "after: Pod IP and Service connect again"
}
np_egress() {
  local url; url="http://$(np_server_ip):8080/index.html"
  np_until open 30 "$url" >/dev/null || return 1
  np_policy deny-egress np-client Egress || return 1
  echo "applied NetworkPolicy deny-egress (podSelector app=np-client, policyTypes [Egress], no rules)"
  np_until closed 30 "$url" && np_stays closed "$url" || return 1
  k -n "$NS" delete networkpolicy deny-egress >/dev/null || return 1
  echo "deleted the policy"
  np_until open 30 "$url" && np_stays open "$url"
}
if [[ "$(. "$DIR/node.env" && echo "${NETWORK_POLICY:-}")" == kube-router ]]; then
  check "NetworkPolicy (kube-router): default-deny ingress blocks np-client -> np-server; deleting it restores" np_ingress
  sed 's/^/       /' "$OUT"
  check "NetworkPolicy (kube-router): default-deny egress blocks np-client's connections; deleting it restores" np_egress
  sed 's/^/       /' "$OUT"
  k -n "$NS" delete pod np-server np-client --grace-period=0 >/dev/null 2>&1
else
  skipped "NetworkPolicy checks (the node runs without kube-router: TESTCLUSTER_NETWORK_POLICY=0)"
fi

# --- a Secret file as runAsUser 101 sees it, with and without fsGroup --------------------------
# These Pods mount the Secret of the web Deployment (defaultMode 0440, as the gateway's keys).
perm_pod() { # NAME FSGROUP
  k -n "$NS" delete pod "$1" --ignore-not-found --grace-period=0 >/dev/null 2>&1
  k apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: Pod
metadata: {name: $1, namespace: $NS}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  securityContext: {runAsUser: 101, runAsGroup: 101${2:+, fsGroup: $2}}
  containers:
  - name: main
    image: localhost/llmroute/busybox:test
    command: ["sh", "-c", "f=/secret/password; echo owner=\$(stat -L -c %u:%g \$f) mode=\$(stat -L -c %a \$f) uid=\$(id -u) groups=\$(id -G); if cat \$f >/dev/null 2>&1; then echo readable; else echo unreadable; fi"]
    volumeMounts: [{name: secret, mountPath: /secret, readOnly: true}]
  volumes: [{name: secret, secret: {secretName: web-secret, defaultMode: 0440}}]
EOF
  k -n "$NS" wait --for=jsonpath='{.status.phase}'=Succeeded "pod/$1" --timeout=60s >/dev/null || return 1
  k -n "$NS" logs "$1"
}
perm_without_fsgroup() {
  local log; log="$(perm_pod perm-nofsgroup "")" || { echo "$log"; return 1; }
  echo "$log"; grep -q 'owner=0:0 mode=440' <<<"$log" && grep -qx unreadable <<<"$log"
}
perm_with_fsgroup() {
  local log; log="$(perm_pod perm-fsgroup 101)" || { echo "$log"; return 1; }
  echo "$log"; grep -q 'owner=0:101 mode=440' <<<"$log" && grep -qx readable <<<"$log"
}
check "Secret (defaultMode 0440) as runAsUser 101 without fsGroup: root:root 440, unreadable" perm_without_fsgroup
sed -n '1p' "$OUT" | sed 's/^/       /'
check "Secret (defaultMode 0440) as runAsUser 101 with fsGroup 101: root:101 440, readable" perm_with_fsgroup
sed -n '1p' "$OUT" | sed 's/^/       /'

# --- in-cluster config: kubectl in a Pod, through 10.0.0.1 with its ServiceAccount token --------
in_cluster_kubectl() {
  k apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader, namespace: $NS}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: $NS}
rules: [{apiGroups: [""], resources: [pods], verbs: [get, list]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader, namespace: $NS}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}
subjects: [{kind: ServiceAccount, name: reader, namespace: $NS}]
EOF
  local log
  log="$(run_pod kubectl-in-cluster localhost/llmroute/kubectl:test '
set -e
echo "KUBERNETES_SERVICE_HOST=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
kubectl auth whoami -o jsonpath="{.status.userInfo.username}"; echo
kubectl get pods -n smoke -l app=web -o name
if kubectl get secrets -n smoke >/dev/null 2>&1; then echo "secrets: allowed"; else echo "secrets: forbidden"; fi' \
  "  serviceAccountName: reader")" || { echo "$log"; return 1; }
  echo "$log"
  grep -q 'KUBERNETES_SERVICE_HOST=10.0.0.1:443' <<<"$log" && grep -qx 'system:serviceaccount:smoke:reader' <<<"$log" \
    && [[ "$(grep -c '^pod/web-' <<<"$log")" == 2 ]] && grep -qx 'secrets: forbidden' <<<"$log"
}
check "a Pod with in-cluster config (kubectl, SA token, 10.0.0.1) lists Pods, RBAC applies" in_cluster_kubectl

# --- kubectl logs / exec / port-forward (apiserver -> kubelet through the egress proxy) ---------
logs_exec() {
  local pod
  pod="$(k -n "$NS" get pods -l app=web -o jsonpath='{.items[0].metadata.name}')" || return 1
  # (grep -q would end the pipe early: pipefail would see kubectl's SIGPIPE)
  k -n "$NS" logs "$pod" | grep -c 'url:/cm/index.html' >/dev/null || { echo "no request in kubectl logs"; return 1; }
  [[ "$(k -n "$NS" exec "$pod" -- cat /content/index.html)" == 'hello from a ConfigMap volume' ]] || return 1
  "$TC" node-logs "$DIR" "$NS" "$pod" httpd | grep -c 'url:/cm/index.html' >/dev/null
}
check "kubectl logs, kubectl exec, scripts/testcluster node-logs" logs_exec
port_forward() {
  local port pf rc=1
  port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  k -n "$NS" port-forward svc/web "$port:80" >/dev/null 2>&1 &
  pf=$!
  for _ in $(seq 1 40); do
    if [[ "$(curl -s -m 2 "http://127.0.0.1:$port/cm/index.html")" == 'hello from a ConfigMap volume' ]]; then rc=0; break; fi
    sleep 0.25
  done
  kill "$pf" 2>/dev/null; wait "$pf" 2>/dev/null
  return $rc
}
check "kubectl port-forward to the Service" port_forward
node_exec() {
  local ip
  ip="$(k -n "$NS" get svc web -o jsonpath='{.spec.clusterIP}')" || return 1
  [[ "$("$TC" node-exec "$DIR" -- curl -s -m 5 "http://$ip/cm/index.html")" == 'hello from a ConfigMap volume' ]]
}
check "scripts/testcluster node-exec curls the ClusterIP from the host" node_exec

configmap_update() {
  k -n "$NS" create configmap web-content --from-literal=index.html=updated --dry-run=client -o yaml | k apply -f - >/dev/null || return 1
  local ip; ip="$(k -n "$NS" get svc web -o jsonpath='{.spec.clusterIP}')"
  eventually 90 bash -c "[[ \"\$('$TC' node-exec '$DIR' -- curl -s -m 2 http://$ip/cm/index.html)\" == updated ]]"
}
check "a ConfigMap update reaches the mounted file" configmap_update

# --- the images tests use ------------------------------------------------------------------------
openai_sdk() {
  local tmp log
  tmp="$(mktemp -d)"
  openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=smoke-ca -keyout "$tmp/ca.key" -out "$tmp/ca.crt" 2>/dev/null \
    && openssl req -newkey rsa:2048 -nodes -subj /CN=fake-openai -keyout "$tmp/tls.key" -out "$tmp/tls.csr" 2>/dev/null \
    && printf 'subjectAltName=DNS:fake-openai.smoke.svc,DNS:fake-openai.smoke.svc.cluster.local\n' >"$tmp/ext" \
    && openssl x509 -req -in "$tmp/tls.csr" -CA "$tmp/ca.crt" -CAkey "$tmp/ca.key" -CAcreateserial -days 1 \
      -extfile "$tmp/ext" -out "$tmp/tls.crt" 2>/dev/null || { rm -rf "$tmp"; return 1; }
  k -n "$NS" create secret tls fake-openai-tls --cert "$tmp/tls.crt" --key "$tmp/tls.key" >/dev/null \
    && k -n "$NS" create configmap smoke-ca --from-file=ca.crt="$tmp/ca.crt" >/dev/null
  rm -rf "$tmp"
  k apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: ConfigMap
metadata: {name: fake-openai, namespace: $NS}
data:
  server.py: |
    import http.server, json, ssl
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "gpt-smoke", "object": "model", "created": 0, "owned_by": "smoke"}]}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    s = http.server.ThreadingHTTPServer(("", 8443), H)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain("/tls/tls.crt", "/tls/tls.key")
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
    s.serve_forever()
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: fake-openai, namespace: $NS}
spec:
  replicas: 1
  selector: {matchLabels: {app: fake-openai}}
  template:
    metadata: {labels: {app: fake-openai}}
    spec:
      securityContext: {fsGroup: 1000}
      containers:
      - name: server
        image: localhost/llmroute/openai-python:test
        command: ["python3", "/app/server.py"]
        ports: [{containerPort: 8443}]
        readinessProbe: {tcpSocket: {port: 8443}, periodSeconds: 1}
        volumeMounts: [{name: app, mountPath: /app}, {name: tls, mountPath: /tls}]
      volumes:
      - {name: app, configMap: {name: fake-openai}}
      - {name: tls, secret: {secretName: fake-openai-tls}}
---
apiVersion: v1
kind: Service
metadata: {name: fake-openai, namespace: $NS}
spec:
  selector: {app: fake-openai}
  ports: [{port: 443, targetPort: 8443}]
EOF
  k -n "$NS" rollout status deployment/fake-openai --timeout=90s >/dev/null || return 1
  log="$(run_pod openai-client localhost/llmroute/openai-python:test '
python3 -c "import openai, sys; print(\"openai\", openai.__version__, \"python\", sys.version.split()[0])"
SSL_CERT_FILE=/ca/ca.crt python3 -c "import openai; c = openai.OpenAI(base_url=\"https://fake-openai.smoke.svc/v1\", api_key=\"sk-smoke\", max_retries=0); print(\"with the CA:\", [m.id for m in c.models.list()])"
python3 -c "import openai; c = openai.OpenAI(base_url=\"https://fake-openai.smoke.svc/v1\", api_key=\"sk-smoke\", max_retries=0)
try:
    c.models.list(); print(\"without the CA: accepted\")
except openai.APIConnectionError as e:
    print(\"without the CA: rejected\", type(e.__cause__).__name__)"' \
  "    volumeMounts: [{name: ca, mountPath: /ca}]
  volumes: [{name: ca, configMap: {name: smoke-ca}}]")" || { echo "$log"; return 1; }
  echo "$log"
  grep -q '^openai [0-9]' <<<"$log" && grep -q "with the CA: \['gpt-smoke'\]" <<<"$log" && grep -q 'without the CA: rejected' <<<"$log"
}
check "OpenAI Python SDK in a Pod (non-root): imports; HTTPS verified with a mounted CA, refused without" openai_sdk
grep -E '^openai|^with|^without' "$OUT" | sed 's/^/       /'

# exec_pod NAME IMAGE UID ARGS...: a Pod running ARGS (no shell: these images have none) as UID,
# with a read-only root and no capabilities; prints its log, fails unless it exits 0.
exec_pod() {
  local name="$1" image="$2" uid="$3"; shift 3
  local args overrides
  args="$(printf '%s\n' "$@" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read().splitlines()))')"
  overrides="{\"spec\": {\"securityContext\": {\"runAsUser\": $uid, \"runAsGroup\": $uid, \"runAsNonRoot\": true},
    \"containers\": [{\"name\": \"$name\", \"image\": \"$image\", \"command\": $args,
      \"securityContext\": {\"allowPrivilegeEscalation\": false, \"readOnlyRootFilesystem\": true, \"capabilities\": {\"drop\": [\"ALL\"]}}}]}}"
  k -n "$NS" delete pod "$name" --ignore-not-found --grace-period=0 >/dev/null 2>&1
  k -n "$NS" run "$name" --image="$image" --image-pull-policy=IfNotPresent --restart=Never --overrides="$overrides" >/dev/null || return 1
  local phase="" deadline=$((SECONDS + 60))
  while (( SECONDS < deadline )); do
    phase="$(k -n "$NS" get pod "$name" -o jsonpath='{.status.phase}' 2>/dev/null)"
    [[ "$phase" == Succeeded || "$phase" == Failed ]] && break
    sleep 0.5
  done
  k -n "$NS" logs "$name" 2>&1 | head -n 8
  [[ "$phase" == Succeeded ]]
}
check "envoy image: envoy --version as uid 101, read-only root" exec_pod envoy-version docker.io/envoyproxy/envoy:v1.40.0 101 envoy --version
grep -m1 version "$OUT" | cut -c1-110 | sed 's/^/       /'
envoy_serves() {
  k apply -f - >/dev/null <<EOF || return 1
apiVersion: v1
kind: ConfigMap
metadata: {name: envoy-config, namespace: $NS}
data:
  envoy.yaml: |
    admin:
      address: {socket_address: {address: 127.0.0.1, port_value: 9901}}
    static_resources:
      listeners:
      - name: http
        address: {socket_address: {address: 0.0.0.0, port_value: 8080}}
        filter_chains:
        - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
              stat_prefix: http
              http_filters:
              - name: envoy.filters.http.router
                typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
              route_config:
                virtual_hosts:
                - name: all
                  domains: ["*"]
                  routes:
                  - match: {prefix: /}
                    direct_response: {status: 200, body: {inline_string: "hello from envoy"}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: envoy, namespace: $NS}
spec:
  replicas: 1
  selector: {matchLabels: {app: envoy}}
  template:
    metadata: {labels: {app: envoy}}
    spec:
      securityContext: {runAsUser: 101, runAsGroup: 101, runAsNonRoot: true, seccompProfile: {type: RuntimeDefault}}
      containers:
      - name: envoy
        image: docker.io/envoyproxy/envoy:v1.40.0
        command: ["envoy"]
        args: ["-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart", "--log-level", "warn"]
        ports: [{containerPort: 8080, name: http}]
        readinessProbe: {tcpSocket: {port: http}, periodSeconds: 1}
        securityContext: {allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {drop: [ALL]}}
        volumeMounts: [{name: config, mountPath: /etc/envoy, readOnly: true}, {name: tmp, mountPath: /tmp}]
      volumes:
      - {name: config, configMap: {name: envoy-config}}
      - {name: tmp, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: envoy, namespace: $NS}
spec:
  selector: {app: envoy}
  ports: [{port: 8080, targetPort: http}]
EOF
  k -n "$NS" rollout status deployment/envoy --timeout=90s || return 1
  local log
  log="$(run_pod envoy-client localhost/llmroute/busybox:test 'wget -q -O - http://envoy.smoke.svc:8080/')" || { echo "$log"; return 1; }
  echo "$log"; grep -q 'hello from envoy' <<<"$log"
}
check "Envoy 1.40 Deployment as uid 101 (command envoy, read-only root, RuntimeDefault seccomp) serves through its Service" envoy_serves
if [[ " ${images[*]} " == *" operator "* ]]; then
  check "operator image: llmroute --help as 65532 (the Dockerfile's user)" exec_pod op-help ghcr.io/llmroute/llmroute:0.1.0 65532 llmroute --help
else
  skipped "operator image ($op_bin not built)"
fi
if [[ " ${images[*]} " == *" sim "* ]]; then
  check "simulator image: llmroute-sim --help as 65532" exec_pod sim-help localhost/llmroute/sim:test 65532 llmroute-sim --help
else
  skipped "simulator image ($sim_bin not built)"
fi

# --- a second cluster with a node beside the first ---------------------------------------------
if [[ "${SMOKE_SECOND_DIR:-1}" == 1 ]]; then
  DIR2="$(mktemp -d /tmp/node-smoke2.XXXXXX)"
  second() {
    "$TC" up "$DIR2" --node || return 1
    "$DIR2/bin/kubectl" --kubeconfig "$DIR2/kubeconfig" run hello --image=localhost/llmroute/busybox:test \
      --restart=Never -- sh -c 'nslookup kubernetes.default.svc.cluster.local' >/dev/null || return 1
    "$DIR2/bin/kubectl" --kubeconfig "$DIR2/kubeconfig" wait --for=jsonpath='{.status.phase}'=Succeeded pod/hello --timeout=60s \
      && k -n "$NS" get deployment web >/dev/null
  }
  check "a second cluster with a node runs beside the first" second
  "$TC" down "$DIR2" >/dev/null 2>&1
  check "the second cluster's down leaves nothing (processes, cgroups)" nothing_left "$DIR2"
  rm -rf "$DIR2"
fi

t0=$SECONDS
"$TC" down "$DIR"
ok "down ($((SECONDS - t0))s)"
check "no process of DIR left (pgrep -f DIR), no cgroup of the node left" nothing_left "$DIR"
check "no mount of DIR on the host, mount count unchanged" bash -c "! grep -F ' $DIR/' /proc/self/mountinfo && [[ \$(wc -l </proc/self/mountinfo) == $mounts_before ]]"
check "host network interfaces unchanged" bash -c "[[ \"\$(ip -o link show | awk -F': ' '{print \$2}' | sort)\" == '$links_before' ]]"
check "container logs readable after down (podLogsDir under DIR)" bash -c "ls '$DIR'/node/pod-logs/${NS}_web-*/httpd/0.log"
finish
