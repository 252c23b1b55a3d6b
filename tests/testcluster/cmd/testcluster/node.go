package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// runNode is the `node` mode: the real node's holder. `serve --node` starts it in new mount and
// network namespaces (the Go runtime unshares them for the child and makes every mount private),
// so nothing it mounts, no interface, route, iptables rule or network sysctl it or its children
// make is seen by the host. It
//  1. covers /run, /var/lib and /var/log with empty tmpfs, and a few /proc/sys files the kubelet
//     would change (they are global, not per network namespace) with files holding the values
//     the kubelet wants;
//  2. creates the bridge with the node's IP, and a route for the Service CIDR;
//  3. starts containerd (configuration, state and images under DIR/node/containerd) and imports
//     the images it is given;
//  4. starts the kubelet and kube-proxy (children of this binary), and kube-router's network policy
//     firewall (--kube-router), and writes DIR/node/runtime-ready;
//  5. on SIGTERM stops the kubelet, kube-proxy and kube-router, every Pod (through CRI),
//     containerd, kills what is still left in the Pods' cgroups and removes those cgroups.
//
// The namespaces end with their last process: the holder and its children.
func runNode(args []string) error {
	fs := pflag.NewFlagSet("node", pflag.ContinueOnError)
	dir := fs.String("dir", "", "the cluster's directory (required)")
	name := fs.String("node-name", defaultNodeName, "the Node's name")
	pause := fs.String("pause-image", "", "the sandbox (pause) image reference (required)")
	images := fs.StringArray("image", nil, "an OCI image archive to import before the kubelet starts (repeatable)")
	kubeletArgs := fs.StringArray("kubelet-arg", nil, "extra kubelet flag (repeatable)")
	proxyArgs := fs.StringArray("kube-proxy-arg", nil, "extra kube-proxy flag (repeatable)")
	kubeRouter := fs.String("kube-router", "", "a kube-router binary to run as the network policy firewall")
	kubeRouterArgs := fs.StringArray("kube-router-arg", nil, "extra kube-router flag (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *pause == "" {
		return errors.New("--dir and --pause-image are required")
	}
	l := newNodeLayout(*dir, *name)
	h := &holder{l: l, pause: *pause, kubeRouterBin: *kubeRouter, kubeRouterArgs: *kubeRouterArgs}
	return h.run(*images, *kubeletArgs, *proxyArgs)
}

type holder struct {
	l           nodeLayout
	pause       string
	snapshotter string

	kubeRouterBin  string
	kubeRouterArgs []string

	containerd, kubelet, proxy, kubeRouter *supervisor
}

func (h *holder) run(images, kubeletArgs, proxyArgs []string) error {
	t0 := time.Now()
	l := h.l
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	os.Remove(filepath.Join(l.dir, nodeReadyName))

	if err := h.setupMounts(); err != nil {
		return fmt.Errorf("mounts: %w", err)
	}
	if err := setupNodeNetwork(); err != nil {
		return fmt.Errorf("network: %w", err)
	}
	// Leftovers of a run that did not stop cleanly: Pod processes and cgroups.
	sweepCgroups(l.cgroupRoot, false)
	if err := createCgroupRoot(l.cgroupRoot); err != nil {
		return fmt.Errorf("cgroup root %s: %w", l.cgroupRoot, err)
	}
	if err := h.prepareContainerd(); err != nil {
		return fmt.Errorf("containerd: %w", err)
	}
	if err := os.WriteFile(filepath.Join(l.root, "snapshotter"), []byte(h.snapshotter+"\n"), 0o644); err != nil {
		return err
	}
	log.Printf("namespaces, bridge %s (%s) and containerd configuration (snapshotter %s) ready after %s",
		nodeBridge, nodeIP, h.snapshotter, time.Since(t0).Round(time.Millisecond))

	h.containerd = &supervisor{
		name:    "containerd",
		logPath: filepath.Join(l.logDir(), "containerd.log"),
		grace:   10 * time.Second,
		command: func(int) *exec.Cmd {
			return exec.Command("containerd", "--config", filepath.Join(l.containerd, "config.toml"))
		},
	}
	h.containerd.run()
	defer h.shutdown()

	if err := waitUntil(30*time.Second, sigs, "containerd ready", func() error {
		return ctr(l, 5*time.Second, "version")
	}); err != nil {
		return err
	}
	log.Printf("containerd ready after %s", time.Since(t0).Round(time.Millisecond))
	// Pods and containers of an earlier run (containerd's metadata is kept after a clean stop)
	// are not this cluster's: remove them before the kubelet sees them.
	h.removePods(20 * time.Second)
	for _, archive := range images {
		if err := importImage(l, h.snapshotter, archive); err != nil {
			return err
		}
	}
	log.Printf("%d images present after %s", len(images), time.Since(t0).Round(time.Millisecond))

	h.kubelet = &supervisor{
		name:    "kubelet",
		logPath: filepath.Join(l.logDir(), "kubelet.log"),
		grace:   10 * time.Second,
		command: selfCommand("kubelet", func(int) []string {
			return append([]string{
				"--config=" + filepath.Join(l.kubelet, "config.yaml"),
				"--kubeconfig=" + filepath.Join(l.kubelet, "kubeconfig"),
				"--root-dir=" + filepath.Join(l.kubelet, "root"),
				"--cert-dir=" + filepath.Join(l.kubelet, "pki"),
				"--hostname-override=" + l.name,
				"--node-ip=" + nodeIP,
				"--v=1",
			}, kubeletArgs...)
		}),
	}
	h.kubelet.run()
	h.proxy = &supervisor{
		name:    "kube-proxy",
		logPath: filepath.Join(l.logDir(), "kube-proxy.log"),
		grace:   5 * time.Second,
		command: selfCommand("kube-proxy", func(int) []string {
			return append([]string{"--config=" + filepath.Join(l.proxy, "config.yaml")}, proxyArgs...)
		}),
	}
	h.proxy.run()
	if h.kubeRouterBin != "" {
		h.kubeRouter = &supervisor{
			name:    "kube-router",
			logPath: filepath.Join(l.logDir(), "kube-router.log"),
			grace:   5 * time.Second,
			command: func(int) *exec.Cmd {
				return exec.Command(h.kubeRouterBin, append(kubeRouterFlags(l), h.kubeRouterArgs...)...)
			},
		}
		h.kubeRouter.run()
	}
	if err := writeFileAtomic(filepath.Join(l.dir, nodeReadyName), []byte(time.Now().UTC().Format(time.RFC3339)+"\n"), 0o644); err != nil {
		return err
	}
	started := "kubelet and kube-proxy"
	if h.kubeRouter != nil {
		started = "kubelet, kube-proxy and kube-router"
	}
	log.Printf("%s started after %s", started, time.Since(t0).Round(time.Millisecond))

	s := <-sigs
	log.Printf("got %s, stopping the node", s)
	return nil
}

// kubeRouterFlags run only kube-router's network policy controller ("firewall"): no routing, no
// service proxy (kube-proxy is that), no CNI; no health or metrics listener. Its iptables rules
// and ipsets live in the node's network namespace and go with it.
func kubeRouterFlags(l nodeLayout) []string {
	return []string{
		"--run-firewall=true",
		"--run-router=false",
		"--run-service-proxy=false",
		"--enable-cni=false",
		"--kubeconfig=" + filepath.Join(l.kubeRouter, "kubeconfig"),
		"--hostname-override=" + l.name,
		"--service-cluster-ip-range=" + serviceCIDR,
		"--health-port=0",
		"--metrics-port=0",
		"--v=1",
	}
}

// shutdown stops everything the holder started, in an order in which nothing restarts a Pod:
// the kubelet, kube-proxy, kube-router, every Pod sandbox and container (through CRI),
// containerd; then it kills whatever is left in the Pods' cgroups and removes them.
func (h *holder) shutdown() {
	t0 := time.Now()
	go func() {
		time.Sleep(50 * time.Second)
		log.Printf("node shutdown took too long, exiting")
		os.Exit(2)
	}()
	os.Remove(filepath.Join(h.l.dir, nodeReadyName))
	var wg sync.WaitGroup
	for _, s := range []*supervisor{h.kubelet, h.proxy, h.kubeRouter} {
		if s != nil {
			wg.Add(1)
			go func(s *supervisor) { defer wg.Done(); s.Stop() }(s)
		}
	}
	wg.Wait()
	clean := false
	if h.containerd != nil {
		if pid, _ := h.containerd.current(); pid != 0 {
			clean = h.removePods(20 * time.Second)
		}
		h.containerd.Stop()
	}
	sweepCgroups(h.l.cgroupRoot, true)
	if clean {
		// containerd's metadata and images can be reused by the next run.
		_ = os.WriteFile(filepath.Join(h.l.dir, nodeCleanName), []byte(h.snapshotter+"\n"), 0o644)
	}
	log.Printf("node stopped in %s", time.Since(t0).Round(time.Millisecond))
}

// setupMounts covers the host paths the node's programs hard-code with private tmpfs mounts,
// and the global sysctls the kubelet sets with files holding the values it wants.
func (h *holder) setupMounts() error {
	// The Go runtime already made every mount private when it unshared the mount namespace for
	// this process; do it again so that nothing here can propagate to the host.
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	if same, err := sameNamespace("mnt", "/proc/1/ns/mnt"); err == nil && same {
		return errors.New("not in a mount namespace of its own; refusing to mount anything")
	}
	if same, err := sameNamespace("net", "/proc/1/ns/net"); err == nil && same {
		return errors.New("not in a network namespace of its own; refusing to change the network")
	}
	for _, d := range nodeTmpfsDirs {
		if err := syscall.Mount("tmpfs", d, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "mode=0755"); err != nil {
			return fmt.Errorf("tmpfs on %s: %w", d, err)
		}
	}
	if err := os.MkdirAll(h.l.fakesys, 0o755); err != nil {
		return err
	}
	for _, f := range fakeSysctls {
		p := "/proc/sys/" + f.path
		if _, err := os.Stat(p); err != nil {
			continue
		}
		fake := filepath.Join(h.l.fakesys, strings.ReplaceAll(f.path, "/", "."))
		if err := os.WriteFile(fake, []byte(f.value+"\n"), 0o644); err != nil {
			return err
		}
		if err := syscall.Mount(fake, p, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s over %s: %w", fake, p, err)
		}
	}
	return nil
}

// fakeSysctls are the kernel settings the kubelet (protectKernelDefaults: false) sets on start,
// with the values it wants; they are not per network namespace, so it must not see the real ones.
var fakeSysctls = []struct{ path, value string }{
	{"vm/overcommit_memory", "1"},
	{"vm/panic_on_oom", "0"},
	{"kernel/panic", "10"},
	{"kernel/panic_on_oops", "1"},
	{"kernel/keys/root_maxkeys", "1000000"},
	{"kernel/keys/root_maxbytes", "25000000"},
}

func sameNamespace(kind, other string) (bool, error) {
	a, err := os.Readlink("/proc/self/ns/" + kind)
	if err != nil {
		return false, err
	}
	b, err := os.Readlink(other)
	if err != nil {
		return false, err
	}
	return a == b, nil
}

// setupNodeNetwork brings lo up and creates the bridge the CNI plugin attaches Pods to, with the
// node's IP (the Pods' gateway), and routes the Service CIDR to it so that the node's own
// connections to ClusterIPs (the namespace has no default route) reach kube-proxy's rules.
func setupNodeNetwork() error {
	steps := [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", nodeBridge, "type", "bridge"},
		{"addr", "add", fmt.Sprintf("%s/%d", nodeIP, podCIDRBits), "dev", nodeBridge},
		{"link", "set", nodeBridge, "up"},
		{"route", "add", serviceCIDR, "dev", nodeBridge, "src", nodeIP},
	}
	for _, s := range steps {
		if out, err := exec.Command("ip", s...).CombinedOutput(); err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(s, " "), err, strings.TrimSpace(string(out)))
		}
	}
	// Network sysctls are per network namespace: these change only the node's.
	for p, v := range map[string]string{
		"net/ipv4/ip_forward":                 "1",
		"net/bridge/bridge-nf-call-iptables":  "1",
		"net/bridge/bridge-nf-call-ip6tables": "1",
	} {
		if err := os.WriteFile("/proc/sys/"+p, []byte(v), 0o644); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("sysctl %s: %w", p, err)
		}
	}
	return nil
}

// prepareContainerd writes containerd's configuration and the CNI configuration. containerd's
// root (images and metadata) is kept from an earlier run only if that run stopped cleanly with
// the same snapshotter; its state, the CNI IPAM state and the kubelet's root are always fresh.
func (h *holder) prepareContainerd() error {
	l := h.l
	h.snapshotter = "overlayfs"
	if err := tryOverlay(filepath.Join(l.containerd, "overlay-test")); err != nil {
		log.Printf("overlayfs does not work here (%v); using the native snapshotter", err)
		h.snapshotter = "native"
	}
	prev, err := os.ReadFile(filepath.Join(l.dir, nodeCleanName))
	if err != nil || strings.TrimSpace(string(prev)) != h.snapshotter {
		if err := os.RemoveAll(filepath.Join(l.containerd, "root")); err != nil {
			return err
		}
	}
	os.Remove(filepath.Join(l.dir, nodeCleanName))
	for _, d := range []string{filepath.Join(l.containerd, "state"), filepath.Join(l.containerd, "runc"), l.run,
		filepath.Join(l.cni, "ipam")} {
		if err := os.RemoveAll(d); err != nil {
			return err
		}
	}
	for _, d := range []string{filepath.Join(l.containerd, "root"), filepath.Join(l.containerd, "state"),
		filepath.Join(l.containerd, "runc"), filepath.Join(l.containerd, "opt"), l.run,
		filepath.Join(l.cni, "conf"), filepath.Join(l.cni, "ipam")} {
		if err := os.MkdirAll(d, 0o711); err != nil {
			return err
		}
	}
	cfg := fmt.Sprintf(containerdConfig, l.containerd, l.containerdSock(), h.pause, h.snapshotter,
		filepath.Join(l.cni, "conf"))
	if err := writeFileAtomic(filepath.Join(l.containerd, "config.toml"), []byte(cfg), 0o644); err != nil {
		return err
	}
	cni := fmt.Sprintf(cniConfig, nodeBridge, podCIDR, nodeIP, filepath.Join(l.cni, "ipam"))
	return writeFileAtomic(filepath.Join(l.cni, "conf", "10-llmroute.conflist"), []byte(cni), 0o644)
}

// tryOverlay mounts an overlay file system in dir and unmounts it again.
func tryOverlay(dir string) error {
	defer os.RemoveAll(dir)
	for _, d := range []string{"lower", "upper", "work", "merged"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", filepath.Join(dir, "lower"),
		filepath.Join(dir, "upper"), filepath.Join(dir, "work"))
	// volatile: unmounting a normal overlay syncs the whole upper file system, which takes
	// seconds on a busy disk.
	if err := syscall.Mount("overlay", filepath.Join(dir, "merged"), "overlay", 0, opts+",volatile"); err != nil {
		if err := syscall.Mount("overlay", filepath.Join(dir, "merged"), "overlay", 0, opts); err != nil {
			return err
		}
	}
	return syscall.Unmount(filepath.Join(dir, "merged"), syscall.MNT_DETACH)
}

// containerd's configuration: %[1]s containerd dir, %[2]s socket, %[3]s pause image,
// %[4]s snapshotter, %[5]s CNI configuration dir.
const containerdConfig = `# Written by testcluster node. containerd for one test node: every path under the cluster's DIR.
version = 2
root = "%[1]s/root"
state = "%[1]s/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "%[2]s"

[ttrpc]
  address = "%[2]s.ttrpc"

[debug]
  level = "info"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "%[3]s"
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    disable_apparmor = true
    # The sandbox this runs in lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
    restrict_oom_score_adj = true
    tolerate_missing_hugetlb_controller = true
    disable_hugetlb_controller = true
    netns_mounts_under_state_dir = true
    # As containerd 2.x does by default: non-root Pods may bind ports below 1024 and ping.
    enable_unprivileged_ports = true
    enable_unprivileged_icmp = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "%[4]s"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          BinaryName = "/usr/sbin/runc"
          Root = "%[1]s/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "%[5]s"
      max_conf_num = 1
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = ""
  [plugins."io.containerd.internal.v1.opt"]
    path = "%[1]s/opt"
`

// The CNI network: a bridge with the node's IP as the Pods' gateway, host-local IPAM with its
// state under DIR. %[1]s bridge, %[2]s Pod CIDR, %[3]s gateway, %[4]s IPAM dir.
const cniConfig = `{
  "cniVersion": "1.0.0",
  "name": "llmroute",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "%[1]s",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "%[2]s", "gateway": "%[3]s"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "%[4]s"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

// ctr runs containerd's client against the node's containerd, in its Kubernetes namespace.
func ctr(l nodeLayout, timeout time.Duration, args ...string) error {
	_, err := ctrOutput(l, timeout, args...)
	return err
}

func ctrOutput(l nodeLayout, timeout time.Duration, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	full := append([]string{"--address", l.containerdSock(), "--namespace", criNamespace}, args...)
	out, err := exec.CommandContext(ctx, "ctr", full...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// removePods stops and removes every Pod sandbox (and so its containers) through CRI, and
// reports whether none is left.
func (h *holder) removePods(timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+h.l.containerdSock(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Printf("CRI client: %v", err)
		return false
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	resp, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		log.Printf("list Pod sandboxes: %v", err)
		return false
	}
	if n := len(resp.Items); n > 0 {
		log.Printf("removing %d Pod sandboxes", n)
	}
	var wg sync.WaitGroup
	for _, sb := range resp.Items {
		wg.Add(1)
		go func(id string) {
			defer wg.Done()
			if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id}); err != nil {
				log.Printf("stop Pod sandbox %.12s: %v", id, err)
			}
			if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id}); err != nil {
				log.Printf("remove Pod sandbox %.12s: %v", id, err)
			}
		}(sb.Id)
	}
	wg.Wait()
	// Anything not made through CRI, or that CRI failed to remove.
	out, err := ctrOutput(h.l, 10*time.Second, "containers", "list", "-q")
	if err != nil {
		log.Printf("%v", err)
		return false
	}
	left := strings.Fields(out)
	for _, id := range left {
		_ = ctr(h.l, 10*time.Second, "tasks", "kill", "--all", "--signal", "SIGKILL", id)
		_ = ctr(h.l, 10*time.Second, "tasks", "delete", "--force", id)
		if err := ctr(h.l, 10*time.Second, "containers", "delete", id); err != nil {
			log.Printf("%v", err)
		}
	}
	if len(left) > 0 {
		out, _ = ctrOutput(h.l, 10*time.Second, "containers", "list", "-q")
		return len(strings.Fields(out)) == 0
	}
	return true
}

// cgroupMounts lists the mount points of the host's cgroup hierarchies (v1 controllers and the
// v2 unified hierarchy of a hybrid setup).
func cgroupMounts() []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS... - FSTYPE SOURCE SUPEROPTS
		fields := strings.Fields(sc.Text())
		for i, f := range fields {
			if f == "-" && i+1 < len(fields) && i >= 5 {
				if fields[i+1] == "cgroup" || fields[i+1] == "cgroup2" {
					out = append(out, fields[4])
				}
				break
			}
		}
	}
	return out
}

// createCgroupRoot creates the kubelet's cgroupRoot in every hierarchy (the kubelet requires it
// to exist). A new cpuset cgroup starts with no CPUs and no memory nodes: copy its parent's.
func createCgroupRoot(root string) error {
	for _, m := range cgroupMounts() {
		p := filepath.Join(m, root)
		if err := os.MkdirAll(p, 0o755); err != nil {
			return err
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			if cur, err := os.ReadFile(filepath.Join(p, f)); err == nil && strings.TrimSpace(string(cur)) == "" {
				if v, err := os.ReadFile(filepath.Join(m, f)); err == nil {
					if err := os.WriteFile(filepath.Join(p, f), v, 0o644); err != nil {
						return fmt.Errorf("%s: %w", filepath.Join(p, f), err)
					}
				}
			}
		}
	}
	return nil
}

// sweepCgroups kills every process left under root in any hierarchy and removes the cgroups
// (deepest first), retrying for a few seconds while killed processes exit.
func sweepCgroups(root string, report bool) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		left := 0
		killed := 0
		for _, m := range cgroupMounts() {
			top := filepath.Join(m, root)
			if _, err := os.Stat(top); err != nil {
				continue
			}
			var dirs []string
			_ = filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			for i := len(dirs) - 1; i >= 0; i-- {
				if data, err := os.ReadFile(filepath.Join(dirs[i], "cgroup.procs")); err == nil {
					for _, f := range strings.Fields(string(data)) {
						if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
							_ = syscall.Kill(pid, syscall.SIGKILL)
							killed++
						}
					}
				}
				if err := syscall.Rmdir(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
					left++
				}
			}
		}
		if report && killed > 0 {
			log.Printf("killed %d processes left in %s", killed, root)
		}
		if left == 0 {
			return
		}
		if time.Now().After(deadline) {
			log.Printf("%d cgroups under %s could not be removed", left, root)
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// importImage imports an OCI archive into the node's containerd unless an image of that name
// with the same manifest is already there.
func importImage(l nodeLayout, snapshotter, archive string) error {
	ref, digest, err := archiveImage(archive)
	if err != nil {
		return err
	}
	out, err := ctrOutput(l, 30*time.Second, "images", "list")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == ref && f[2] == digest {
			return nil
		}
	}
	t0 := time.Now()
	if err := ctr(l, 10*time.Minute, "images", "import", "--snapshotter", snapshotter, archive); err != nil {
		return err
	}
	log.Printf("imported %s (%s) in %s", ref, digest, time.Since(t0).Round(time.Millisecond))
	return nil
}

// waitUntil polls cond every 100 ms until it succeeds, the timeout passes or a signal arrives.
func waitUntil(timeout time.Duration, sigs <-chan os.Signal, what string, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s waiting for %s: %v", timeout, what, err)
		}
		select {
		case s := <-sigs:
			return fmt.Errorf("got %s while waiting for %s", s, what)
		case <-time.After(100 * time.Millisecond):
		}
	}
}
