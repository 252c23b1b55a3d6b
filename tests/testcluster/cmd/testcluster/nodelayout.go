package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"
)

// The real node's fixed addresses. Every node lives in a network namespace of its own, so two
// clusters on one machine can both use them.
const (
	defaultNodeName = "llmroute-node"
	nodeBridge      = "llmr0"
	nodeIP          = "10.88.0.1"
	podCIDR         = "10.88.0.0/16"
	podCIDRBits     = 16
	serviceCIDR     = "10.0.0.0/24"
	clusterDNSIP    = "10.0.0.10"
	clusterDomain   = "cluster.local"
	kubeletPort     = 10250
	// containerd's namespace for Kubernetes (CRI) containers and images.
	criNamespace = "k8s.io"
)

// Files in DIR for the node.
const (
	nodeEnvName       = "node.env"
	nodeReadyName     = "node/runtime-ready"
	nodeCleanName     = "node/containerd/clean-shutdown"
	nodeHolderLogName = "node.log"
)

// nodeLayout is where the node keeps everything, under DIR/node.
type nodeLayout struct {
	dir        string // the cluster's DIR
	name       string // the Node's name
	root       string // DIR/node
	run        string // sockets
	containerd string // config, root (images; kept between runs after a clean stop), state
	kubelet    string // config, kubeconfig, root dir, volume plugins, resolv.conf
	podLogs    string // the kubelet's podLogsDir: container logs, readable from the host
	proxy      string // kube-proxy's config and kubeconfig
	kubeRouter string // kube-router's kubeconfig (the network policy firewall)
	cni        string // CNI configuration and IPAM state
	fakesys    string // files bind-mounted over /proc/sys entries the kubelet would change
	cgroupRoot string // the kubelet's cgroupRoot (host-global: one per DIR)
}

func newNodeLayout(dir, name string) nodeLayout {
	root := filepath.Join(dir, "node")
	sum := sha256.Sum256([]byte(dir))
	return nodeLayout{
		dir:        dir,
		name:       name,
		root:       root,
		run:        filepath.Join(root, "run"),
		containerd: filepath.Join(root, "containerd"),
		kubelet:    filepath.Join(root, "kubelet"),
		podLogs:    filepath.Join(root, "pod-logs"),
		proxy:      filepath.Join(root, "kube-proxy"),
		kubeRouter: filepath.Join(root, "kube-router"),
		cni:        filepath.Join(root, "cni"),
		fakesys:    filepath.Join(root, "fakesys"),
		cgroupRoot: "/llmroute-" + hex.EncodeToString(sum[:6]),
	}
}

func (l nodeLayout) containerdSock() string { return filepath.Join(l.run, "containerd.sock") }
func (l nodeLayout) egressSock() string     { return filepath.Join(l.run, "egress.sock") }
func (l nodeLayout) logDir() string         { return filepath.Join(l.dir, "logs") }

// check refuses directories the node cannot use: Unix socket paths are limited to 107 bytes, and
// the node hides /run, /var/lib and /var/log of the host behind its own tmpfs.
func (l nodeLayout) check() error {
	for _, p := range []string{l.containerdSock() + ".ttrpc", l.egressSock()} {
		if len(p) > 100 {
			return fmt.Errorf("the path %s is too long for a Unix socket: use a shorter DIR", p)
		}
	}
	for _, hidden := range nodeTmpfsDirs {
		if l.dir == hidden || strings.HasPrefix(l.dir, hidden+"/") {
			return fmt.Errorf("DIR %s is under %s, which the node hides behind a tmpfs: use another DIR", l.dir, hidden)
		}
	}
	return nil
}

// nodeTmpfsDirs are host directories the node's mount namespace covers with an empty tmpfs, so
// that paths containerd, the CNI plugins and the kubelet hard-code (/run/containerd, /var/lib/cni,
// /var/lib/kubelet/device-plugins, /var/log/containers...) are private to the node and nothing is
// created on the host.
var nodeTmpfsDirs = []string{"/run", "/var/lib", "/var/log"}
