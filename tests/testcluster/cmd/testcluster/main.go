// Command testcluster runs a real Kubernetes control plane for tests:
// embedded etcd, kube-apiserver and kube-controller-manager, on 127.0.0.1;
// with --node also a real node (containerd, kubelet, kube-proxy in namespaces
// of their own), kube-scheduler and CoreDNS.
//
//	testcluster serve --dir DIR                 run until SIGTERM; DIR/ready when ready
//	testcluster status --dir DIR                exit 0 if DIR's cluster runs and is ready
//	testcluster kubeconfig --dir DIR --user U [--group G]... --out FILE
//	testcluster image-import --dir DIR ARCHIVE... import OCI image archives into DIR's node
//	testcluster controller-manager FLAGS...     (internal: started by serve)
//	testcluster scheduler FLAGS...              (internal: kube-scheduler, started by serve --node)
//	testcluster node --dir DIR ...              (internal: the node's holder, started by serve --node)
//	testcluster node-proxy ...                  (internal: host <-> node connections, started by serve --node)
//	testcluster kubelet|kube-proxy FLAGS...     (internal: started by node)
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/component-base/version"
)

const usage = `usage:
  testcluster serve --dir DIR [--controllers LIST] [--apiserver-arg FLAG]... [--controller-manager-arg FLAG]...
                    [--node --pause-image REF --coredns-image REF --busybox-image REF [--node-image ARCHIVE]...]
  testcluster status --dir DIR
  testcluster kubeconfig --dir DIR --user NAME [--group GROUP]... --out FILE|- [--validity DURATION]
  testcluster image-import --dir DIR ARCHIVE...
  testcluster version
`

func main() {
	log.SetPrefix("testcluster: ")
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = runServe(os.Args[2:])
	case "controller-manager":
		err = runControllerManager(os.Args[2:])
	case "kubelet":
		os.Exit(runKubelet(os.Args[2:]))
	case "kube-proxy":
		os.Exit(runKubeProxy(os.Args[2:]))
	case "scheduler":
		os.Exit(runScheduler(os.Args[2:]))
	case "node":
		err = runNode(os.Args[2:])
	case "node-proxy":
		err = runNodeProxy(os.Args[2:])
	case "image-import":
		err = runImageImport(os.Args[2:])
	case "kubeconfig":
		err = runKubeconfig(os.Args[2:])
	case "status":
		err = runStatus(os.Args[2:])
	case "version":
		fmt.Println(version.Get().GitVersion)
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "testcluster %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// runKubeconfig mints a kubeconfig for any identity: a client certificate
// with CN=user and O=groups, signed by DIR's CA. Kubernetes authenticates it
// as that user in those groups (plus system:authenticated); RBAC decides.
func runKubeconfig(args []string) error {
	fs := pflag.NewFlagSet("kubeconfig", pflag.ContinueOnError)
	dir := fs.String("dir", "", "the cluster's directory (required)")
	user := fs.String("user", "", "user name, e.g. system:serviceaccount:NS:NAME (required)")
	groups := fs.StringArray("group", nil, "group (repeatable)")
	out := fs.String("out", "", "file to write, or - for stdout (required)")
	validity := fs.Duration("validity", 365*24*time.Hour, "certificate lifetime")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *user == "" || *out == "" {
		return errors.New("--dir, --user and --out are required")
	}
	ca, err := loadAuthority(filepath.Join(*dir, "pki"))
	if err != nil {
		return fmt.Errorf("reading the cluster's CA (is the cluster up?): %w", err)
	}
	admin, err := clientcmd.LoadFromFile(filepath.Join(*dir, kubeconfigName))
	if err != nil {
		return err
	}
	cluster := admin.Clusters[admin.Contexts[admin.CurrentContext].Cluster]
	crt, key, err := ca.issue(*user, *groups, nil, false, *validity)
	if err != nil {
		return err
	}
	if *out == "-" {
		tmp, err := os.MkdirTemp("", "testcluster-kubeconfig")
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		p := filepath.Join(tmp, "kubeconfig")
		if err := writeKubeconfig(p, cluster.Server, ca.certPEM, crt, key, *user); err != nil {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		_, err = os.Stdout.Write(data)
		return err
	}
	return writeKubeconfig(*out, cluster.Server, ca.certPEM, crt, key, *user)
}

// runStatus exits 0 when DIR's cluster is running and ready: the serve
// process is alive, DIR/ready exists, /readyz is OK and the
// controller-manager is healthy.
func runStatus(args []string) error {
	fs := pflag.NewFlagSet("status", pflag.ContinueOnError)
	dir := fs.String("dir", "", "the cluster's directory (required)")
	quiet := fs.BoolP("quiet", "q", false, "print nothing")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("--dir is required")
	}
	node, err := checkStatus(*dir)
	if !*quiet {
		if err != nil {
			fmt.Printf("not running or not ready: %v\n", err)
		} else {
			fmt.Println("running and ready")
			if node != "" {
				fmt.Println(node)
			}
		}
	}
	if err != nil {
		os.Exit(1)
	}
	return nil
}

func processAlive(pidStr string) bool {
	pid, err := strconv.Atoi(strings.TrimSpace(pidStr))
	if err != nil || pid <= 0 {
		return false
	}
	if syscall.Kill(pid, 0) != nil {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := strings.LastIndexByte(string(stat), ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	return true
}

// checkStatus returns nil when DIR's cluster is running and ready, and, for a cluster with a
// node, a line about the node.
func checkStatus(dir string) (string, error) {
	err := checkControlPlane(dir)
	if err != nil {
		return "", err
	}
	env, err := readEnv(filepath.Join(dir, envName))
	if err != nil || env["NODE"] != "1" {
		return "", err
	}
	return checkNode(dir, env)
}

func checkNode(dir string, env map[string]string) (string, error) {
	node, err := readEnv(filepath.Join(dir, nodeEnvName))
	if err != nil {
		return "", fmt.Errorf("node: %w", err)
	}
	if !processAlive(node["NODE_PID"]) {
		return "", fmt.Errorf("the node's holder (pid %s) is not running", node["NODE_PID"])
	}
	if !processAlive(env["SCHEDULER_PID"]) {
		return "", errors.New("kube-scheduler is not running")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(dir, kubeconfigName))
	if err != nil {
		return "", err
	}
	cfg.Timeout = 5 * time.Second
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	n, err := client.CoreV1().Nodes().Get(ctx, node["NODE_NAME"], metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("node %s: %w", node["NODE_NAME"], err)
	}
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			if c.Status != corev1.ConditionTrue {
				return "", fmt.Errorf("node %s is not Ready: %s %s", n.Name, c.Reason, c.Message)
			}
			return fmt.Sprintf("node %s: Ready, IP %s, Pod CIDR %s, netns %s, kubelet %s, containerd %s",
				n.Name, node["NODE_IP"], node["POD_CIDR"], node["NODE_NETNS"], n.Status.NodeInfo.KubeletVersion,
				n.Status.NodeInfo.ContainerRuntimeVersion), nil
		}
	}
	return "", fmt.Errorf("node %s has no Ready condition", n.Name)
}

func checkControlPlane(dir string) error {
	pid, err := os.ReadFile(filepath.Join(dir, pidName))
	if err != nil {
		return fmt.Errorf("no pid file: %w", err)
	}
	if !processAlive(string(pid)) {
		return fmt.Errorf("process %s is not running", strings.TrimSpace(string(pid)))
	}
	if _, err := os.Stat(filepath.Join(dir, readyName)); err != nil {
		return errors.New("not ready yet")
	}
	env, err := readEnv(filepath.Join(dir, envName))
	if err != nil {
		return err
	}
	if !processAlive(env["CONTROLLER_MANAGER_PID"]) {
		return errors.New("controller-manager is not running")
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", filepath.Join(dir, kubeconfigName))
	if err != nil {
		return err
	}
	cfg.Timeout = 5 * time.Second
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).Raw(); err != nil {
		return fmt.Errorf("/readyz: %v %s", err, body)
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}}
	resp, err := hc.Get(env["CONTROLLER_MANAGER_HEALTHZ"])
	if err != nil {
		return fmt.Errorf("controller-manager healthz: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("controller-manager healthz: %s", resp.Status)
	}
	return nil
}
