package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
)

// nodeOptions are serve's flags for the real node (`serve --node`).
type nodeOptions struct {
	enabled       bool
	name          string
	images        []string
	pauseImage    string
	corednsImage  string
	busyboxImage  string
	kubeletArgs   []string
	proxyArgs     []string
	schedulerArgs []string
	// kubeRouter, if set, is a kube-router binary: the node runs its network policy firewall.
	kubeRouter     string
	kubeRouterArgs []string
}

// The controllers a cluster with a node needs on top of defaultControllers: Service endpoints,
// the node's lifecycle (it removes the not-ready taint the kubelet registers with), Pod garbage
// collection, and the workload controllers tests may use.
var nodeControllers = []string{
	"endpoints-controller", "endpointslice-controller", "endpointslice-mirroring-controller",
	"node-lifecycle-controller", "pod-garbage-collector-controller", "ttl-controller",
	"daemonset-controller", "statefulset-controller", "job-controller", "disruption-controller",
}

// withNodeControllers adds nodeControllers to a --controllers list that does not name them.
func withNodeControllers(list string) string {
	have := map[string]bool{}
	for _, c := range strings.Split(list, ",") {
		have[strings.TrimSpace(c)] = true
	}
	if have["*"] {
		return list
	}
	out := list
	for _, c := range nodeControllers {
		if !have[c] && !have["-"+c] {
			out += "," + c
		}
	}
	return out
}

// nodePlane is serve's side of the node: credentials and configuration files, the holder
// process (in its own namespaces), kube-scheduler and the node-proxy (on the host), the
// cluster add-ons (CoreDNS) and the readiness checks.
type nodePlane struct {
	opts    nodeOptions
	l       nodeLayout
	pkiDir  string
	port    int // the apiserver's port, on 127.0.0.1 of the host and on the node's IP in the node
	holder  *supervisor
	sched   *supervisor
	proxy   *supervisor
	died    chan error // the holder ended
	env     map[string]string
	started time.Time
}

func newNodePlane(opts nodeOptions, dir, pkiDir string) (*nodePlane, error) {
	if opts.pauseImage == "" || opts.corednsImage == "" || opts.busyboxImage == "" {
		return nil, errors.New("--node needs --pause-image, --coredns-image and --busybox-image")
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("--node needs root (namespaces, mounts, containerd)")
	}
	for _, bin := range []string{"containerd", "containerd-shim-runc-v2", "ctr", "runc", "iptables", "ip"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("--node needs %s (scripts/testcluster installs the Debian packages)", bin)
		}
	}
	if opts.kubeRouter != "" {
		if _, err := exec.LookPath(opts.kubeRouter); err != nil {
			return nil, fmt.Errorf("--kube-router: %w", err)
		}
		if _, err := exec.LookPath("ipset"); err != nil {
			return nil, errors.New("--kube-router needs ipset (scripts/testcluster installs the Debian package)")
		}
	}
	l := newNodeLayout(dir, opts.name)
	if err := l.check(); err != nil {
		return nil, err
	}
	return &nodePlane{opts: opts, l: l, pkiDir: pkiDir, died: make(chan error, 1)}, nil
}

// servingHosts are the extra SANs of the apiserver's certificate: the node reaches it at the
// node's IP (10.0.0.1, the `kubernetes` Service, is already there).
func (n *nodePlane) servingHosts() []string { return []string{nodeIP} }

// prepare writes the node's credentials and configuration, removing any earlier run's state but
// containerd's (the holder decides about that).
func (n *nodePlane) prepare(ca *authority, port int) error {
	n.port = port
	l := n.l
	for _, p := range []string{l.kubelet, l.podLogs, l.proxy, l.kubeRouter, l.cni, l.fakesys, l.run,
		filepath.Join(l.dir, nodeReadyName), filepath.Join(l.dir, nodeEnvName), filepath.Join(l.root, "snapshotter")} {
		if err := os.RemoveAll(p); err != nil {
			return err
		}
	}
	for _, d := range []string{l.root, filepath.Join(l.kubelet, "pki"), filepath.Join(l.kubelet, "volume-plugins"),
		l.podLogs, l.proxy} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	year := 365 * 24 * time.Hour
	nodeServer := fmt.Sprintf("https://%s:%d", nodeIP, port)
	hostServer := fmt.Sprintf("https://127.0.0.1:%d", port)

	// The kubelet: client certificate of the node identity (the Node authorizer and the
	// NodeRestriction admission plugin know it by the system:node: prefix and group), and a
	// serving certificate the apiserver verifies with the cluster's CA.
	crt, key, err := ca.issue("system:node:"+l.name, []string{"system:nodes"}, nil, false, year)
	if err != nil {
		return err
	}
	if err := writeKubeconfig(filepath.Join(l.kubelet, "kubeconfig"), nodeServer, ca.certPEM, crt, key, "system:node:"+l.name); err != nil {
		return err
	}
	crt, key, err = ca.issue("system:node:"+l.name, []string{"system:nodes"}, []string{l.name, nodeIP}, true, year)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(l.kubelet, "pki", "kubelet.crt"), crt, 0o644); err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(l.kubelet, "pki", "kubelet.key"), key, 0o600); err != nil {
		return err
	}
	// kube-proxy: the bootstrap ClusterRoleBinding system:node-proxier names this user.
	crt, key, err = ca.issue("system:kube-proxy", nil, nil, false, year)
	if err != nil {
		return err
	}
	if err := writeKubeconfig(filepath.Join(l.proxy, "kubeconfig"), nodeServer, ca.certPEM, crt, key, "system:kube-proxy"); err != nil {
		return err
	}
	// kube-router (the network policy firewall): the ClusterRole grantKubeRouter binds.
	if n.opts.kubeRouter != "" {
		if err := os.MkdirAll(l.kubeRouter, 0o755); err != nil {
			return err
		}
		crt, key, err = ca.issue(kubeRouterUser, nil, nil, false, year)
		if err != nil {
			return err
		}
		if err := writeKubeconfig(filepath.Join(l.kubeRouter, "kubeconfig"), nodeServer, ca.certPEM, crt, key, kubeRouterUser); err != nil {
			return err
		}
	}
	// kube-scheduler (on the host): bootstrap bindings for system:kube-scheduler.
	crt, key, err = ca.issue("system:kube-scheduler", nil, nil, false, year)
	if err != nil {
		return err
	}
	if err := writeKubeconfig(filepath.Join(n.pkiDir, "scheduler.kubeconfig"), hostServer, ca.certPEM, crt, key, "system:kube-scheduler"); err != nil {
		return err
	}
	// The apiserver's client certificate towards kubelets (logs, exec, port-forward).
	crt, key, err = ca.issue("kube-apiserver-kubelet-client", []string{"system:masters"}, nil, false, year)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(n.pkiDir, "apiserver-kubelet-client.crt"), crt, 0o644); err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(n.pkiDir, "apiserver-kubelet-client.key"), key, 0o600); err != nil {
		return err
	}
	egress := fmt.Sprintf(egressSelectorConfig, l.egressSock())
	if err := writeFileAtomic(filepath.Join(n.pkiDir, "egress-selector.yaml"), []byte(egress), 0o644); err != nil {
		return err
	}
	// Pods with dnsPolicy Default (CoreDNS itself) get no upstream server: the node has no way out.
	if err := writeFileAtomic(filepath.Join(l.kubelet, "resolv.conf"), []byte("# the test node has no upstream DNS\n"), 0o644); err != nil {
		return err
	}
	kubelet := fmt.Sprintf(kubeletConfig, l.cgroupRoot, "unix://"+l.containerdSock(), l.podLogs,
		filepath.Join(l.kubelet, "volume-plugins"), nodeIP, kubeletPort,
		filepath.Join(l.kubelet, "pki", "kubelet.crt"), filepath.Join(l.kubelet, "pki", "kubelet.key"),
		filepath.Join(n.pkiDir, caCertFile), clusterDomain, clusterDNSIP, filepath.Join(l.kubelet, "resolv.conf"))
	if err := writeFileAtomic(filepath.Join(l.kubelet, "config.yaml"), []byte(kubelet), 0o644); err != nil {
		return err
	}
	proxy := fmt.Sprintf(kubeProxyConfig, filepath.Join(l.proxy, "kubeconfig"), l.name, podCIDR)
	return writeFileAtomic(filepath.Join(l.proxy, "config.yaml"), []byte(proxy), 0o644)
}

// apiserverArgs are the kube-apiserver flags for a cluster with a node.
func (n *nodePlane) apiserverArgs() []string {
	return []string{
		// The `kubernetes` Service's endpoint is the node's IP at the apiserver's port: the
		// node-proxy listens there inside the node. The lease reconciler writes the Endpoints and
		// EndpointSlice (loopback addresses are not valid endpoints, hence `none` without a node).
		"--advertise-address=" + nodeIP,
		"--endpoint-reconciler-type=lease",
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--kubelet-client-certificate=" + filepath.Join(n.pkiDir, "apiserver-kubelet-client.crt"),
		"--kubelet-client-key=" + filepath.Join(n.pkiDir, "apiserver-kubelet-client.key"),
		"--kubelet-certificate-authority=" + filepath.Join(n.pkiDir, caCertFile),
		"--kubelet-preferred-address-types=InternalIP,Hostname",
		// Connections to the cluster (kubelets, Pods, Services) through the node-proxy.
		"--egress-selector-config-file=" + filepath.Join(n.pkiDir, "egress-selector.yaml"),
	}
}

// controllerManagerArgs are the kube-controller-manager flags for a cluster with a node: the
// node-lifecycle controller looks at the node every second (default 5 s), so the not-ready taint
// the kubelet registers with goes soon after the node is Ready.
func (n *nodePlane) controllerManagerArgs() []string {
	return []string{"--node-monitor-period=1s"}
}

// startHolder starts `testcluster node` in new mount and network namespaces. It is not
// restarted: if it ends, the node is gone and serve stops.
func (n *nodePlane) startHolder() {
	l := n.l
	n.started = time.Now()
	args := []string{"--dir=" + l.dir, "--node-name=" + l.name, "--pause-image=" + n.opts.pauseImage}
	for _, a := range n.opts.images {
		args = append(args, "--image="+a)
	}
	for _, a := range n.opts.kubeletArgs {
		args = append(args, "--kubelet-arg="+a)
	}
	for _, a := range n.opts.proxyArgs {
		args = append(args, "--kube-proxy-arg="+a)
	}
	if n.opts.kubeRouter != "" {
		args = append(args, "--kube-router="+n.opts.kubeRouter)
		for _, a := range n.opts.kubeRouterArgs {
			args = append(args, "--kube-router-arg="+a)
		}
	}
	build := selfCommand("node", func(int) []string { return args })
	n.holder = &supervisor{
		name:    "node",
		logPath: filepath.Join(l.logDir(), nodeHolderLogName),
		grace:   60 * time.Second,
		command: func(port int) *exec.Cmd {
			cmd := build(port)
			cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWNET}
			return cmd
		},
		onStart: func(pid, _ int) { log.Printf("node holder started, pid %d", pid) },
		onExit: func(err error) bool {
			select {
			case n.died <- fmt.Errorf("the node (holder) exited: %v; see %s", err, filepath.Join(l.logDir(), nodeHolderLogName)):
			default:
			}
			return false
		},
	}
	n.holder.run()
}

// startHostSide grants kube-router its permissions and starts kube-scheduler and the
// node-proxy, once the apiserver is ready.
func (n *nodePlane) startHostSide(ctx context.Context, client kubernetes.Interface) error {
	pid, _ := n.holder.current()
	if pid == 0 {
		return errors.New("the node holder is not running")
	}
	if n.opts.kubeRouter != "" {
		if err := grantKubeRouter(ctx, client); err != nil {
			return fmt.Errorf("kube-router's RBAC: %w", err)
		}
	}
	netns := fmt.Sprintf("/proc/%d/ns/net", pid)
	n.proxy = &supervisor{
		name:    "node-proxy",
		logPath: filepath.Join(n.l.logDir(), "node-proxy.log"),
		grace:   5 * time.Second,
		command: selfCommand("node-proxy", func(int) []string {
			return []string{
				"--netns=" + netns,
				fmt.Sprintf("--listen=%s:%d", nodeIP, n.port),
				fmt.Sprintf("--upstream=127.0.0.1:%d", n.port),
				"--egress-socket=" + n.l.egressSock(),
			}
		}),
	}
	n.proxy.run()
	n.sched = &supervisor{
		name:     "kube-scheduler",
		wantPort: true,
		logPath:  filepath.Join(n.l.logDir(), "scheduler.log"),
		grace:    5 * time.Second,
		command: selfCommand("scheduler", func(port int) []string {
			kc := filepath.Join(n.pkiDir, "scheduler.kubeconfig")
			return append([]string{
				"--kubeconfig=" + kc,
				"--authentication-kubeconfig=" + kc,
				"--authorization-kubeconfig=" + kc,
				"--leader-elect=false",
				"--bind-address=127.0.0.1",
				"--secure-port=" + strconv.Itoa(port),
			}, n.opts.schedulerArgs...)
		}),
		onStart: func(pid, port int) { log.Printf("kube-scheduler started, pid %d, port %d", pid, port) },
	}
	n.sched.run()
	n.env = map[string]string{
		"NODE_NAME":            n.l.name,
		"NODE_IP":              nodeIP,
		"POD_CIDR":             podCIDR,
		"SERVICE_CIDR":         serviceCIDR,
		"CLUSTER_DNS":          clusterDNSIP,
		"CLUSTER_DOMAIN":       clusterDomain,
		"NODE_PID":             strconv.Itoa(pid),
		"NODE_NETNS":           netns,
		"NODE_APISERVER_URL":   fmt.Sprintf("https://%s:%d", nodeIP, n.port),
		"CONTAINERD_SOCK":      n.l.containerdSock(),
		"CONTAINERD_NAMESPACE": criNamespace,
		"POD_LOGS_DIR":         n.l.podLogs,
		"KUBELET_ROOT_DIR":     filepath.Join(n.l.kubelet, "root"),
		"NODE_CGROUP_ROOT":     n.l.cgroupRoot,
		"PAUSE_IMAGE":          n.opts.pauseImage,
		"BUSYBOX_IMAGE":        n.opts.busyboxImage,
		"COREDNS_IMAGE":        n.opts.corednsImage,
		// What enforces NetworkPolicies on the node ("" when nothing does).
		"NETWORK_POLICY": "",
	}
	if n.opts.kubeRouter != "" {
		n.env["NETWORK_POLICY"] = "kube-router"
	}
	return nil
}

// stop ends the node first (nothing restarts Pods then), then the host side.
func (n *nodePlane) stop() {
	if n == nil {
		return
	}
	os.Remove(filepath.Join(n.l.dir, nodeEnvName))
	if n.holder != nil {
		n.holder.Stop()
	}
	for _, s := range []*supervisor{n.proxy, n.sched} {
		if s != nil {
			s.Stop()
		}
	}
}

// bringUp creates the add-ons and waits until the node is Ready, CoreDNS is Ready and a smoke
// Pod resolved the `kubernetes` Service by name and reached the apiserver through it.
func (n *nodePlane) bringUp(ctx context.Context, client kubernetes.Interface, waitFor func(string, func() (bool, string)) error) error {
	if err := createCoreDNS(ctx, client, n.opts.corednsImage); err != nil {
		return fmt.Errorf("CoreDNS objects: %w", err)
	}
	if err := waitFor("node runtime ready (containerd, images, kubelet started)", func() (bool, string) {
		if _, err := os.Stat(filepath.Join(n.l.dir, nodeReadyName)); err != nil {
			return false, "no " + nodeReadyName
		}
		return true, ""
	}); err != nil {
		return err
	}
	if err := waitFor("node "+n.l.name+" Ready", func() (bool, string) {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		node, err := client.CoreV1().Nodes().Get(rctx, n.l.name, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady {
				return c.Status == corev1.ConditionTrue, c.Reason + ": " + c.Message
			}
		}
		return false, "no Ready condition"
	}); err != nil {
		return err
	}
	if err := waitFor("CoreDNS Ready", func() (bool, string) {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		d, err := client.AppsV1().Deployments("kube-system").Get(rctx, "coredns", metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		return d.Status.AvailableReplicas >= 1, fmt.Sprintf("%d available", d.Status.AvailableReplicas)
	}); err != nil {
		return err
	}
	pid, _ := n.holder.current()
	if n.opts.kubeRouter != "" {
		if err := waitFor("kube-router's network policy firewall synced", func() (bool, string) {
			return kubeRouterSynced(pid)
		}); err != nil {
			return err
		}
	}
	// kube-proxy has the kube-dns Service's rules once a query to it from the node is answered.
	ns, err := openNetns(fmt.Sprintf("/proc/%d/ns/net", pid))
	if err != nil {
		return err
	}
	defer ns.close()
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return ns.dial(ctx, network, clusterDNSIP+":53")
	}}
	name := "kubernetes.default.svc." + clusterDomain
	if err := waitFor("cluster DNS answers through the kube-dns Service", func() (bool, string) {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		addrs, err := resolver.LookupHost(rctx, name)
		if err != nil {
			return false, err.Error()
		}
		return len(addrs) == 1 && addrs[0] == "10.0.0.1", fmt.Sprintf("%s: %v", name, addrs)
	}); err != nil {
		return err
	}
	return n.smoke(ctx, client, waitFor)
}

const smokePodName = "llmroute-node-smoke"

// kube-router's identity towards the apiserver, bound to the ClusterRole of the same name.
const kubeRouterUser = "system:kube-router"

// grantKubeRouter lets kube-router read what its informers watch (it starts informers for
// Services, Endpoints and EndpointSlices too, though only the firewall runs) and its Node.
func grantKubeRouter(ctx context.Context, client kubernetes.Interface) error {
	read := []string{"get", "list", "watch"}
	role := &rbacv1.ClusterRole{
		ObjectMeta: metav1.ObjectMeta{Name: kubeRouterUser},
		Rules: []rbacv1.PolicyRule{
			{APIGroups: []string{""}, Resources: []string{"pods", "namespaces", "nodes", "services", "endpoints"}, Verbs: read},
			{APIGroups: []string{"networking.k8s.io"}, Resources: []string{"networkpolicies"}, Verbs: read},
			{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: read},
		},
	}
	binding := &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: kubeRouterUser},
		RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: kubeRouterUser},
		Subjects:   []rbacv1.Subject{{APIGroup: rbacv1.GroupName, Kind: rbacv1.UserKind, Name: kubeRouterUser}},
	}
	for _, create := range []func(context.Context) error{
		func(ctx context.Context) error {
			_, err := client.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{})
			return err
		},
		func(ctx context.Context) error {
			_, err := client.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{})
			return err
		},
	} {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := create(rctx)
		cancel()
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
	}
	return nil
}

// kubeRouterSynced reports whether kube-router's network policy controller has done its first
// full sync in the node's network namespace: only that adds the rule accepting traffic its
// policy chains marked (mark 0x20000) to KUBE-ROUTER-FORWARD.
func kubeRouterSynced(holderPid int) (bool, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "nsenter", fmt.Sprintf("--net=/proc/%d/ns/net", holderPid), "--",
		"iptables", "-w", "5", "-S", "KUBE-ROUTER-FORWARD").CombinedOutput()
	if err != nil {
		return false, fmt.Sprintf("iptables -S KUBE-ROUTER-FORWARD: %v: %s", err, strings.TrimSpace(string(out)))
	}
	if !strings.Contains(string(out), "0x20000/0x20000") {
		return false, "no full sync yet"
	}
	return true, ""
}

// smoke runs a busybox Pod that resolves the `kubernetes` Service through CoreDNS and gets an
// answer from the apiserver through it (kube-proxy, the node-proxy), and reads its log through
// the apiserver (the egress proxy, the kubelet). The Pod is deleted afterwards.
func (n *nodePlane) smoke(ctx context.Context, client kubernetes.Interface, waitFor func(string, func() (bool, string)) error) error {
	pods := client.CoreV1().Pods(metav1.NamespaceDefault)
	zero := int64(0)
	no := false
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: smokePodName, Labels: map[string]string{"app.kubernetes.io/name": smokePodName}},
		Spec: corev1.PodSpec{
			RestartPolicy:                 corev1.RestartPolicyNever,
			AutomountServiceAccountToken:  &no,
			EnableServiceLinks:            &no,
			TerminationGracePeriodSeconds: &zero,
			Containers: []corev1.Container{{
				Name:            "smoke",
				Image:           n.opts.busyboxImage,
				ImagePullPolicy: corev1.PullIfNotPresent,
				// busybox's TLS client and the apiserver share no cipher suite: plain HTTP to the
				// HTTPS port gets the apiserver's own "400 Bad Request" answer, which is enough
				// to show the Service leads to it.
				Command: []string{"sh", "-c", "nslookup kubernetes.default.svc." + clusterDomain + " && " +
					"{ timeout 20 wget -q -O - http://kubernetes.default.svc." + clusterDomain + ":443/version 2>&1; true; }"},
			}},
		},
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_ = pods.Delete(rctx, smokePodName, metav1.DeleteOptions{GracePeriodSeconds: &zero})
	_, err := pods.Create(rctx, pod, metav1.CreateOptions{})
	cancel()
	if err != nil {
		return fmt.Errorf("smoke Pod: %w", err)
	}
	phase := corev1.PodPending
	if err := waitFor("smoke Pod finished", func() (bool, string) {
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		p, err := pods.Get(rctx, smokePodName, metav1.GetOptions{})
		if err != nil {
			return false, err.Error()
		}
		phase = p.Status.Phase
		return phase == corev1.PodSucceeded || phase == corev1.PodFailed, string(phase)
	}); err != nil {
		return err
	}
	var logs string
	if err := waitFor("smoke Pod's log read through the apiserver", func() (bool, string) {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		b, err := pods.GetLogs(smokePodName, &corev1.PodLogOptions{}).DoRaw(rctx)
		if err != nil {
			return false, err.Error()
		}
		logs = string(b)
		return true, ""
	}); err != nil {
		return err
	}
	if phase != corev1.PodSucceeded || !strings.Contains(logs, "Address: 10.0.0.1") || !strings.Contains(logs, "400 Bad Request") {
		return fmt.Errorf("the smoke Pod %s; its log:\n%s", phase, logs)
	}
	rctx, cancel = context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := pods.Delete(rctx, smokePodName, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return nil
}

// createCoreDNS creates CoreDNS as a cluster add-on: a Deployment in kube-system serving the
// `kube-dns` Service at clusterDNSIP, as unprivileged user on port 1053.
func createCoreDNS(ctx context.Context, client kubernetes.Interface, image string) error {
	labels := map[string]string{"k8s-app": "kube-dns"}
	one := int32(1)
	uid := int64(65532)
	yes, no := true, false
	corefile := `.:1053 {
    errors
    health :8080
    ready :8181
    kubernetes ` + clusterDomain + ` in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }
    loadbalance
}
`
	objs := []func(context.Context) error{
		func(ctx context.Context) error {
			_, err := client.CoreV1().ServiceAccounts("kube-system").Create(ctx, &corev1.ServiceAccount{
				ObjectMeta: metav1.ObjectMeta{Name: "coredns"}}, metav1.CreateOptions{})
			return err
		},
		func(ctx context.Context) error {
			_, err := client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{
				ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
				Rules: []rbacv1.PolicyRule{
					{APIGroups: []string{""}, Resources: []string{"endpoints", "services", "pods", "namespaces"}, Verbs: []string{"list", "watch"}},
					{APIGroups: []string{"discovery.k8s.io"}, Resources: []string{"endpointslices"}, Verbs: []string{"list", "watch"}},
				},
			}, metav1.CreateOptions{})
			return err
		},
		func(ctx context.Context) error {
			_, err := client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
				ObjectMeta: metav1.ObjectMeta{Name: "system:coredns"},
				RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:coredns"},
				Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Name: "coredns", Namespace: "kube-system"}},
			}, metav1.CreateOptions{})
			return err
		},
		func(ctx context.Context) error {
			_, err := client.CoreV1().ConfigMaps("kube-system").Create(ctx, &corev1.ConfigMap{
				ObjectMeta: metav1.ObjectMeta{Name: "coredns"},
				Data:       map[string]string{"Corefile": corefile},
			}, metav1.CreateOptions{})
			return err
		},
		func(ctx context.Context) error {
			_, err := client.CoreV1().Services("kube-system").Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: "kube-dns", Labels: labels},
				Spec: corev1.ServiceSpec{
					ClusterIP: clusterDNSIP,
					Selector:  labels,
					Ports: []corev1.ServicePort{
						{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, TargetPort: intstr.FromInt32(1053)},
						{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(1053)},
					},
				},
			}, metav1.CreateOptions{})
			return err
		},
		func(ctx context.Context) error {
			_, err := client.AppsV1().Deployments("kube-system").Create(ctx, &appsv1.Deployment{
				ObjectMeta: metav1.ObjectMeta{Name: "coredns", Labels: labels},
				Spec: appsv1.DeploymentSpec{
					Replicas: &one,
					Selector: &metav1.LabelSelector{MatchLabels: labels},
					Template: corev1.PodTemplateSpec{
						ObjectMeta: metav1.ObjectMeta{Labels: labels},
						Spec: corev1.PodSpec{
							ServiceAccountName: "coredns",
							PriorityClassName:  "system-cluster-critical",
							DNSPolicy:          corev1.DNSDefault,
							EnableServiceLinks: &no,
							SecurityContext: &corev1.PodSecurityContext{
								RunAsUser: &uid, RunAsGroup: &uid, RunAsNonRoot: &yes,
								SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
							},
							Containers: []corev1.Container{{
								Name:            "coredns",
								Image:           image,
								ImagePullPolicy: corev1.PullIfNotPresent,
								Args:            []string{"-conf", "/etc/coredns/Corefile"},
								Ports: []corev1.ContainerPort{
									{Name: "dns", ContainerPort: 1053, Protocol: corev1.ProtocolUDP},
									{Name: "dns-tcp", ContainerPort: 1053, Protocol: corev1.ProtocolTCP},
								},
								ReadinessProbe: &corev1.Probe{
									ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromInt32(8181)}},
									PeriodSeconds: 1,
								},
								LivenessProbe: &corev1.Probe{
									ProbeHandler:        corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/health", Port: intstr.FromInt32(8080)}},
									InitialDelaySeconds: 10,
									PeriodSeconds:       10,
									FailureThreshold:    5,
								},
								Resources: corev1.ResourceRequirements{
									Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("10m"), corev1.ResourceMemory: resource.MustParse("32Mi")},
									Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("170Mi")},
								},
								SecurityContext: &corev1.SecurityContext{
									AllowPrivilegeEscalation: &no,
									ReadOnlyRootFilesystem:   &yes,
									Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
								},
								VolumeMounts: []corev1.VolumeMount{{Name: "config", MountPath: "/etc/coredns", ReadOnly: true}},
							}},
							Volumes: []corev1.Volume{{Name: "config", VolumeSource: corev1.VolumeSource{
								ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "coredns"}},
							}}},
						},
					},
				},
			}, metav1.CreateOptions{})
			return err
		},
	}
	for _, create := range objs {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := create(rctx)
		cancel()
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return err
		}
	}
	return nil
}

// The apiserver's egress: the "cluster" network (kubelets, Pods, Services) through the
// node-proxy's HTTP CONNECT proxy. %s is its Unix socket.
const egressSelectorConfig = `apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: %s
`

// The kubelet's configuration. Arguments: cgroupRoot, runtime endpoint, podLogsDir,
// volumePluginDir, address, port, TLS cert, TLS key, client CA, cluster domain, cluster DNS,
// resolv.conf.
const kubeletConfig = `# Written by testcluster serve --node.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine kind runs cgroup v1 (hybrid); Kubernetes 1.35 refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
# One cgroup tree per test cluster, so that two can run side by side; removed at 'down'.
cgroupRoot: %[1]s
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
containerRuntimeEndpoint: %[2]s
imageServiceEndpoint: %[2]s
podLogsDir: %[3]s
volumePluginDir: %[4]s
address: %[5]s
port: %[6]d
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: %[7]s
tlsPrivateKeyFile: %[8]s
rotateCertificates: false
serverTLSBootstrap: false
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
    cacheTTL: 30s
  x509:
    clientCAFile: %[9]s
authorization:
  mode: Webhook
  webhook:
    cacheAuthorizedTTL: 30s
    cacheUnauthorizedTTL: 5s
clusterDomain: %[10]s
clusterDNS: ["%[11]s"]
resolvConf: %[12]s
registerNode: true
# Faster than the defaults: a test cluster wants changes seen quickly.
syncFrequency: 10s
fileCheckFrequency: 20s
nodeStatusUpdateFrequency: 10s
kubeAPIQPS: 50
kubeAPIBurst: 100
serializeImagePulls: false
# Images are imported, never pulled: never garbage-collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Low thresholds: a shared test machine should not evict Pods.
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "100Mi"
  nodefs.inodesFree: "1%%"
  imagefs.available: "100Mi"
  imagefs.inodesFree: "1%%"
failSwapOn: false
protectKernelDefaults: false
localStorageCapacityIsolation: true
shutdownGracePeriod: 0s
containerLogMaxSize: 10Mi
containerLogMaxFiles: 3
maxPods: 110
`

// kube-proxy's configuration. Arguments: kubeconfig, node name, cluster CIDR.
const kubeProxyConfig = `# Written by testcluster serve --node.
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: %s
  qps: 50
  burst: 100
mode: iptables
hostnameOverride: %s
clusterCIDR: %s
detectLocalMode: ClusterCIDR
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the (global) conntrack sysctls alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
iptables:
  localhostNodePorts: false
  syncPeriod: 30s
  minSyncPeriod: 1s
`
