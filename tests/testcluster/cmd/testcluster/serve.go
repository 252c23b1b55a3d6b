package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// Files in DIR.
const (
	kubeconfigName = "kubeconfig"
	readyName      = "ready"
	pidName        = "testcluster.pid"
	envName        = "cluster.env"
	lockName       = ".lock"
	kcmLogName     = "controller-manager.log"
)

// The controllers a test cluster runs: ownership, namespaces, workloads and
// service accounts, plus the RBAC aggregation of the admin/edit/view roles and
// the kube-root-ca.crt ConfigMap every namespace has in a real cluster.
const defaultControllers = "garbage-collector-controller,namespace-controller,deployment-controller," +
	"replicaset-controller,serviceaccount-controller,serviceaccount-token-controller," +
	"clusterrole-aggregation-controller,root-ca-certificate-publisher-controller"

const serviceAccountIssuer = "https://kubernetes.default.svc.cluster.local"

type serveConfig struct {
	dir          string
	controllers  string
	apiArgs      []string
	kcmArgs      []string
	readyTimeout time.Duration
	node         nodeOptions
}

func runServe(args []string) error {
	var c serveConfig
	fs := pflag.NewFlagSet("serve", pflag.ContinueOnError)
	fs.StringVar(&c.dir, "dir", "", "directory for the cluster's state, credentials and marker files (required)")
	fs.StringVar(&c.controllers, "controllers", defaultControllers, "kube-controller-manager --controllers")
	fs.StringArrayVar(&c.apiArgs, "apiserver-arg", nil, "extra kube-apiserver flag, e.g. --apiserver-arg=--v=2 (repeatable; later flags win)")
	fs.StringArrayVar(&c.kcmArgs, "controller-manager-arg", nil, "extra kube-controller-manager flag (repeatable)")
	fs.DurationVar(&c.readyTimeout, "ready-timeout", 5*time.Minute, "give up if the cluster is not ready by then")
	fs.BoolVar(&c.node.enabled, "node", false, "also run a real node (containerd, kubelet, kube-proxy in their own namespaces), kube-scheduler and CoreDNS")
	fs.StringVar(&c.node.name, "node-name", defaultNodeName, "the node's name (with --node)")
	fs.StringArrayVar(&c.node.images, "node-image", nil, "OCI image archive to import into the node before its kubelet starts (repeatable)")
	fs.StringVar(&c.node.pauseImage, "pause-image", "", "the Pod sandbox image reference (with --node; its archive must be a --node-image)")
	fs.StringVar(&c.node.corednsImage, "coredns-image", "", "the CoreDNS image reference (with --node)")
	fs.StringVar(&c.node.busyboxImage, "busybox-image", "", "a busybox image reference, for the smoke Pod (with --node)")
	fs.StringArrayVar(&c.node.kubeletArgs, "kubelet-arg", nil, "extra kubelet flag (repeatable)")
	fs.StringArrayVar(&c.node.proxyArgs, "kube-proxy-arg", nil, "extra kube-proxy flag (repeatable)")
	fs.StringArrayVar(&c.node.schedulerArgs, "scheduler-arg", nil, "extra kube-scheduler flag (repeatable)")
	fs.StringVar(&c.node.kubeRouter, "kube-router", "", "a kube-router binary: the node enforces NetworkPolicies with its firewall (with --node)")
	fs.StringArrayVar(&c.node.kubeRouterArgs, "kube-router-arg", nil, "extra kube-router flag (repeatable)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if c.dir == "" {
		return errors.New("serve: --dir is required")
	}
	dir, err := filepath.Abs(c.dir)
	if err != nil {
		return err
	}
	c.dir = dir
	return serve(c)
}

func serve(c serveConfig) error {
	t0 := time.Now()
	dir := c.dir
	pkiDir := filepath.Join(dir, "pki")
	for _, d := range []string{dir, filepath.Join(dir, "logs")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}

	// One server per DIR: hold an exclusive lock for the whole run.
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		return fmt.Errorf("another testcluster is serving %s: %w", dir, err)
	}

	// A fresh cluster every time: no state survives from an earlier run.
	for _, name := range []string{readyName, envName, kubeconfigName, "etcd", "pki"} {
		if err := os.RemoveAll(filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	pidPath := filepath.Join(dir, pidName)
	if err := writeFileAtomic(pidPath, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
		return err
	}
	defer os.Remove(pidPath)
	defer os.Remove(filepath.Join(dir, readyName))

	// Stop on SIGTERM/SIGINT at any point, including during start-up.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)

	// PKI.
	ca, err := newAuthority()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(pkiDir, 0o700); err != nil {
		return err
	}
	if err := ca.save(pkiDir); err != nil {
		return err
	}
	servingHosts := []string{"127.0.0.1", "localhost", "10.0.0.1", "kubernetes", "kubernetes.default",
		"kubernetes.default.svc", "kubernetes.default.svc.cluster.local"}
	var node *nodePlane
	var nodeDied <-chan error
	if c.node.enabled {
		if node, err = newNodePlane(c.node, dir, pkiDir); err != nil {
			return err
		}
		servingHosts = append(servingHosts, node.servingHosts()...)
		nodeDied = node.died
	}
	crt, key, err := ca.issue("kube-apiserver", nil, servingHosts, true, 365*24*time.Hour)
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(pkiDir, servingCertFile), crt, 0o644); err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(pkiDir, servingKeyFile), key, 0o600); err != nil {
		return err
	}
	saPriv, saPub, err := newServiceAccountKey()
	if err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(pkiDir, saKeyFile), saPriv, 0o600); err != nil {
		return err
	}
	if err := writeFileAtomic(filepath.Join(pkiDir, saPubFile), saPub, 0o644); err != nil {
		return err
	}

	// etcd.
	etcd, etcdURL, err := startEtcd(filepath.Join(dir, "etcd"), time.Minute)
	if err != nil {
		return err
	}
	etcdClosed := false
	closeEtcd := func() {
		if etcdClosed {
			return
		}
		etcdClosed = true
		done := make(chan struct{})
		go func() { etcd.Close(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			log.Printf("etcd did not close in time")
		}
	}
	defer closeEtcd()
	log.Printf("etcd ready at %s after %s", etcdURL, time.Since(t0).Round(time.Millisecond))

	// kube-apiserver on a listener bound now, on a free port.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	server := "https://" + ln.Addr().String()

	// Credentials: the admin (system:masters) and the controller-manager.
	crt, key, err = ca.issue("kubernetes-admin", []string{"system:masters"}, nil, false, 365*24*time.Hour)
	if err != nil {
		return err
	}
	adminKubeconfig := filepath.Join(dir, kubeconfigName)
	if err := writeKubeconfig(adminKubeconfig, server, ca.certPEM, crt, key, "kubernetes-admin"); err != nil {
		return err
	}
	crt, key, err = ca.issue("system:kube-controller-manager", []string{"system:masters"}, nil, false, 365*24*time.Hour)
	if err != nil {
		return err
	}
	kcmKubeconfig := filepath.Join(pkiDir, kcmKubeconfigFile)
	if err := writeKubeconfig(kcmKubeconfig, server, ca.certPEM, crt, key, "system:kube-controller-manager"); err != nil {
		return err
	}
	// --authorization-mode is a list: a second one would add to it, not replace it.
	nodeArgs := []string{"--authorization-mode=RBAC"}
	if node != nil {
		// The node starts now: containerd and the image imports overlap the apiserver's start.
		if err := node.prepare(ca, ln.Addr().(*net.TCPAddr).Port); err != nil {
			ln.Close()
			return fmt.Errorf("node: %w", err)
		}
		node.startHolder()
		nodeArgs = node.apiserverArgs()
	}

	// The audit log records who wrote what (tests count a client's writes from it, independently
	// of the client's own figures); reads are not logged.
	auditPolicy := filepath.Join(pkiDir, "audit-policy.yaml")
	if err := os.WriteFile(auditPolicy, []byte(auditPolicyYAML), 0o644); err != nil {
		return err
	}
	apiArgs := append([]string{
		"--audit-policy-file=" + auditPolicy,
		"--audit-log-path=" + filepath.Join(dir, auditLogFile),
		"--audit-log-format=json",
		"--audit-log-maxsize=200",
		"--audit-log-maxbackup=1",
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--cert-dir=" + filepath.Join(pkiDir, "apiserver-generated"),
		"--tls-cert-file=" + filepath.Join(pkiDir, servingCertFile),
		"--tls-private-key-file=" + filepath.Join(pkiDir, servingKeyFile),
		"--client-ca-file=" + filepath.Join(pkiDir, caCertFile),
		"--etcd-servers=" + etcdURL,
		"--service-account-issuer=" + serviceAccountIssuer,
		"--service-account-key-file=" + filepath.Join(pkiDir, saPubFile),
		"--service-account-signing-key-file=" + filepath.Join(pkiDir, saKeyFile),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--endpoint-reconciler-type=none",
		"--allow-privileged=true",
		"--profiling=false",
	}, append(nodeArgs, c.apiArgs...)...)
	apiCtx, apiCancel := context.WithCancel(ctx)
	defer apiCancel()
	apiDone, err := startAPIServer(apiCtx, ln, apiArgs)
	if err != nil {
		ln.Close()
		return fmt.Errorf("kube-apiserver: %w", err)
	}
	stopAPIServer := func() {
		apiCancel()
		select {
		case err := <-apiDone:
			if err != nil {
				log.Printf("kube-apiserver stopped: %v", err)
			}
		case <-time.After(20 * time.Second):
			log.Printf("kube-apiserver did not stop in time")
		}
	}

	kubeconfigBytes, err := os.ReadFile(adminKubeconfig)
	if err != nil {
		return err
	}
	restCfg, err := clientcmd.RESTConfigFromKubeConfig(kubeconfigBytes)
	if err != nil {
		return err
	}
	restCfg.Timeout = 5 * time.Second
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return err
	}

	deadline := time.Now().Add(c.readyTimeout)
	// waitFor polls cond until it is true, the deadline passes, a signal
	// arrives or the apiserver ends.
	waitFor := func(what string, cond func() (bool, string)) error {
		last := ""
		for {
			ok, why := cond()
			if ok {
				log.Printf("%s after %s", what, time.Since(t0).Round(time.Millisecond))
				return nil
			}
			last = why
			if time.Now().After(deadline) {
				return fmt.Errorf("timed out after %s waiting for: %s (last: %s)", c.readyTimeout, what, last)
			}
			select {
			case s := <-sigs:
				return fmt.Errorf("got %s while waiting for: %s", s, what)
			case err := <-apiDone:
				return fmt.Errorf("kube-apiserver ended while waiting for %s: %v", what, err)
			case err := <-etcd.Err():
				return fmt.Errorf("etcd failed while waiting for %s: %v", what, err)
			case err := <-nodeDied:
				return fmt.Errorf("while waiting for %s: %v", what, err)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}

	fail := func(err error) error {
		node.stop()
		stopAPIServer()
		closeEtcd()
		return err
	}

	if err := waitFor("kube-apiserver ready", func() (bool, string) {
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		defer rcancel()
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(rctx).Raw()
		if err != nil {
			return false, fmt.Sprintf("%v %s", err, body)
		}
		return true, ""
	}); err != nil {
		return fail(err)
	}

	controllers := c.controllers
	var kcmNodeArgs []string
	if node != nil {
		kcmNodeArgs = node.controllerManagerArgs()
		controllers = withNodeControllers(controllers)
		if err := node.startHostSide(ctx, client); err != nil {
			return fail(err)
		}
	}

	// kube-controller-manager, in a child process.
	env := map[string]string{
		"TESTCLUSTER_DIR": dir,
		"TESTCLUSTER_PID": strconv.Itoa(os.Getpid()),
		"APISERVER_URL":   server,
		"ETCD_URL":        etcdURL,
		"KUBECONFIG":      adminKubeconfig,
	}
	kcm := &supervisor{
		name:     "controller-manager",
		wantPort: true,
		logPath:  filepath.Join(dir, "logs", kcmLogName),
		grace:    5 * time.Second,
		command: selfCommand("controller-manager", func(port int) []string {
			return append([]string{
				"--kubeconfig=" + kcmKubeconfig,
				"--leader-elect=false",
				"--controllers=" + controllers,
				"--service-account-private-key-file=" + filepath.Join(pkiDir, saKeyFile),
				"--root-ca-file=" + filepath.Join(pkiDir, caCertFile),
				"--use-service-account-credentials=false",
				"--bind-address=127.0.0.1",
				"--secure-port=" + strconv.Itoa(port),
				"--cert-dir=" + filepath.Join(pkiDir, "controller-manager-generated"),
				"--profiling=false",
			}, append(kcmNodeArgs, c.kcmArgs...)...)
		}),
		onStart: func(pid, port int) {
			env["CONTROLLER_MANAGER_PID"] = strconv.Itoa(pid)
			env["CONTROLLER_MANAGER_HEALTHZ"] = fmt.Sprintf("https://127.0.0.1:%d/healthz", port)
			if err := writeEnv(filepath.Join(dir, envName), env); err != nil {
				log.Printf("write %s: %v", envName, err)
			}
			log.Printf("controller-manager started, pid %d, healthz port %d", pid, port)
		},
	}
	kcm.run()
	fail = func(err error) error {
		node.stop()
		kcm.Stop()
		stopAPIServer()
		closeEtcd()
		return err
	}

	insecure := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		// The controller-manager serves with a certificate it made itself;
		// only its local health endpoint is read here.
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
	}}
	if err := waitFor("kube-controller-manager healthy", func() (bool, string) {
		_, port := kcm.current()
		if port == 0 {
			return false, "not started"
		}
		resp, err := insecure.Get(fmt.Sprintf("https://127.0.0.1:%d/healthz", port))
		if err != nil {
			return false, err.Error()
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, resp.Status
	}); err != nil {
		return fail(err)
	}
	// The controllers are running once they have done their first work: the
	// system namespaces exist and the serviceaccount controller made `default`.
	if err := waitFor("system namespaces and default ServiceAccount", func() (bool, string) {
		rctx, rcancel := context.WithTimeout(ctx, 5*time.Second)
		defer rcancel()
		for _, ns := range []string{"default", "kube-system", "kube-public", "kube-node-lease"} {
			if _, err := client.CoreV1().Namespaces().Get(rctx, ns, metav1.GetOptions{}); err != nil {
				return false, err.Error()
			}
		}
		if _, err := client.CoreV1().ServiceAccounts("default").Get(rctx, "default", metav1.GetOptions{}); err != nil {
			return false, err.Error()
		}
		return true, ""
	}); err != nil {
		return fail(err)
	}

	if node != nil {
		if err := node.bringUp(ctx, client, waitFor); err != nil {
			return fail(fmt.Errorf("node: %w", err))
		}
		if err := writeEnv(filepath.Join(dir, nodeEnvName), node.env); err != nil {
			return fail(err)
		}
		env["NODE"] = "1"
		if pid, port := node.sched.current(); pid != 0 {
			env["SCHEDULER_PID"] = strconv.Itoa(pid)
			env["SCHEDULER_HEALTHZ"] = fmt.Sprintf("https://127.0.0.1:%d/healthz", port)
		}
		if err := writeEnv(filepath.Join(dir, envName), env); err != nil {
			return fail(err)
		}
	}

	ready := fmt.Sprintf("%s\n%s\n", server, time.Now().UTC().Format(time.RFC3339))
	if err := writeFileAtomic(filepath.Join(dir, readyName), []byte(ready), 0o644); err != nil {
		return fail(err)
	}
	log.Printf("READY in %s: KUBECONFIG=%s", time.Since(t0).Round(time.Millisecond), adminKubeconfig)

	var runErr error
	select {
	case s := <-sigs:
		log.Printf("got %s, shutting down", s)
	case err := <-apiDone:
		runErr = fmt.Errorf("kube-apiserver ended: %v", err)
	case err := <-etcd.Err():
		runErr = fmt.Errorf("etcd failed: %v", err)
	case err := <-nodeDied:
		runErr = err
	}
	os.Remove(filepath.Join(dir, readyName))

	// A watchdog: shutting down must not hang.
	watchdog := 45 * time.Second
	if node != nil {
		watchdog += 60 * time.Second
	}
	go func() {
		time.Sleep(watchdog)
		log.Printf("shutdown took too long, exiting")
		os.Remove(pidPath)
		os.Exit(2)
	}()
	t1 := time.Now()
	node.stop()
	if node != nil {
		log.Printf("node stopped in %s", time.Since(t1).Round(time.Millisecond))
	}
	kcm.Stop()
	stopAPIServer()
	closeEtcd()
	log.Printf("stopped")
	return runErr
}

// writeEnv writes KEY=VALUE lines, sorted, readable by a shell's `source`.
func writeEnv(path string, env map[string]string) error {
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "%s='%s'\n", k, strings.ReplaceAll(env[k], "'", `'\''`))
	}
	return writeFileAtomic(path, []byte(b.String()), 0o644)
}

// readEnv reads a file written by writeEnv.
func readEnv(path string) (map[string]string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	env := map[string]string{}
	for _, line := range strings.Split(string(data), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		v = strings.TrimSuffix(strings.TrimPrefix(v, "'"), "'")
		env[k] = strings.ReplaceAll(v, `'\''`, "'")
	}
	return env, nil
}

// auditLogFile (in the cluster's directory) has one JSON event per line for every request that
// changes something, at the Metadata level: user, verb, resource, namespace, name; no bodies, so
// no Secret's data.
const auditLogFile = "audit.log"

const auditPolicyYAML = `apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    verbs: [create, update, patch, delete, deletecollection]
  - level: None
`
