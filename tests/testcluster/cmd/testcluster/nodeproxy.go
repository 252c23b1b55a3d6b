package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"
)

// runNodeProxy is the `node-proxy` mode, a process in the host's network namespace that connects
// it with the node's:
//
//   - apiserver forwarder: a TCP listener opened *inside* the node's namespace (on the node's IP,
//     at the apiserver's port), whose connections go to the apiserver on the host's 127.0.0.1. The
//     kubelet, kube-proxy, and Pods through the `kubernetes` Service (its endpoint is the node's
//     IP) reach the apiserver through it. TLS passes through untouched.
//   - egress proxy: an HTTP CONNECT proxy on a Unix socket on the host, which kube-apiserver's
//     egress selector uses for the "cluster" network: connections to kubelets (logs, exec,
//     port-forward), to Pods and Services (the proxy subresources, Service-referenced webhooks)
//     are made inside the node's namespace. A loopback target is dialled on the host.
//
// A socket belongs to the network namespace of the thread that created it: listeners and
// outgoing connections for the node are created on a locked OS thread that has switched into the
// node's namespace (setns) and back.
func runNodeProxy(args []string) error {
	fs := pflag.NewFlagSet("node-proxy", pflag.ContinueOnError)
	netnsPath := fs.String("netns", "", "the node's network namespace, e.g. /proc/PID/ns/net (required)")
	listen := fs.String("listen", "", "address to listen on inside the node's namespace (required)")
	upstream := fs.String("upstream", "", "the apiserver's address on the host (required)")
	egress := fs.String("egress-socket", "", "Unix socket for the apiserver's egress (HTTP CONNECT) proxy")
	dnsServer := fs.String("dns", clusterDNSIP+":53", "cluster DNS server (in the node's namespace) for CONNECT to a name")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *netnsPath == "" || *listen == "" || *upstream == "" {
		return errors.New("--netns, --listen and --upstream are required")
	}
	exitWithParent("node-proxy")
	ns, err := openNetns(*netnsPath)
	if err != nil {
		return err
	}
	ln, err := ns.listen("tcp", *listen)
	if err != nil {
		return fmt.Errorf("listen on %s in %s: %w", *listen, *netnsPath, err)
	}
	log.Printf("node-proxy: forwarding %s (node namespace) to %s (host)", *listen, *upstream)
	go serveForward(ln, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", *upstream)
	})
	if *egress != "" {
		_ = os.Remove(*egress)
		eln, err := net.Listen("unix", *egress)
		if err != nil {
			return fmt.Errorf("egress socket: %w", err)
		}
		_ = os.Chmod(*egress, 0o600)
		defer os.Remove(*egress)
		log.Printf("node-proxy: egress (HTTP CONNECT) proxy on %s into the node's namespace", *egress)
		go serveConnect(eln, ns, *dnsServer)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	s := <-sigs
	log.Printf("node-proxy: got %s, stopping", s)
	return nil
}

// netns is an open network namespace and the host's (this process's) own.
type netns struct {
	node, host *os.File
}

func openNetns(path string) (*netns, error) {
	node, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	host, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
	if err != nil {
		node.Close()
		return nil, err
	}
	return &netns{node: node, host: host}, nil
}

func (n *netns) close() {
	n.node.Close()
	n.host.Close()
}

// in runs fn on an OS thread switched into the node's namespace. The thread switches back
// afterwards; if it cannot, it stays locked and is thrown away when the goroutine ends.
func (n *netns) in(fn func()) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(int(n.node.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		fn()
		if err := unix.Setns(int(n.host.Fd()), unix.CLONE_NEWNET); err != nil {
			log.Printf("node-proxy: cannot switch a thread back to the host namespace: %v", err)
			errc <- nil
			return // the thread ends with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- nil
	}()
	return <-errc
}

func (n *netns) listen(network, addr string) (ln net.Listener, err error) {
	if e := n.in(func() { ln, err = net.Listen(network, addr) }); e != nil {
		return nil, e
	}
	return ln, err
}

// dial connects from inside the node's namespace. The socket is created there; connecting and
// all later I/O work from any thread.
func (n *netns) dial(ctx context.Context, network, addr string) (c net.Conn, err error) {
	if e := n.in(func() {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
	}); e != nil {
		return nil, e
	}
	return c, err
}

func serveForward(ln net.Listener, dial func(context.Context) (net.Conn, error)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			log.Printf("node-proxy: accept: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			up, err := dial(ctx)
			cancel()
			if err != nil {
				log.Printf("node-proxy: %s: %v", c.RemoteAddr(), err)
				c.Close()
				return
			}
			splice(c, up, nil)
		}()
	}
}

// serveConnect answers HTTP CONNECT requests on ln by dialling the target in the node's namespace
// (a loopback target on the host), then relays bytes both ways.
func serveConnect(ln net.Listener, ns *netns, dnsServer string) {
	resolver := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return ns.dial(ctx, network, dnsServer)
		},
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			log.Printf("node-proxy: egress accept: %v", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go handleConnect(c, ns, resolver)
	}
}

func handleConnect(c net.Conn, ns *netns, resolver *net.Resolver) {
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(c)
	req, err := http.ReadRequest(br)
	if err != nil {
		c.Close()
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	if req.Method != http.MethodConnect {
		fmt.Fprintf(c, "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
		c.Close()
		return
	}
	target := req.Host
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	up, err := dialTarget(ctx, ns, resolver, target)
	cancel()
	if err != nil {
		log.Printf("node-proxy: egress CONNECT %s: %v", target, err)
		fmt.Fprintf(c, "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
			len(err.Error()), err.Error())
		c.Close()
		return
	}
	if _, err := io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n"); err != nil {
		c.Close()
		up.Close()
		return
	}
	splice(c, up, br)
}

func dialTarget(ctx context.Context, ns *netns, resolver *net.Resolver, target string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return nil, err
	}
	if host == "localhost" {
		host = "127.0.0.1"
	}
	ip := net.ParseIP(host)
	if ip == nil {
		// A name: the cluster's DNS answers for Services and Pods.
		addrs, err := resolver.LookupIPAddr(ctx, host)
		if err != nil {
			return nil, err
		}
		if len(addrs) == 0 {
			return nil, fmt.Errorf("%s: no address", host)
		}
		ip = addrs[0].IP
	}
	addr := net.JoinHostPort(ip.String(), port)
	if ip.IsLoopback() {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
	return ns.dial(ctx, "tcp", addr)
}

// splice copies both ways until both directions are done; r, if set, holds bytes of a's side
// already read.
func splice(a, b net.Conn, r *bufio.Reader) {
	var wg sync.WaitGroup
	wg.Add(2)
	var src io.Reader = a
	if r != nil {
		src = r
	}
	go func() {
		defer wg.Done()
		_, _ = io.Copy(b, src)
		closeWrite(b)
	}()
	go func() {
		defer wg.Done()
		_, _ = io.Copy(a, b)
		closeWrite(a)
	}()
	wg.Wait()
	a.Close()
	b.Close()
}

func closeWrite(c net.Conn) {
	type closeWriter interface{ CloseWrite() error }
	if cw, ok := c.(closeWriter); ok {
		_ = cw.CloseWrite()
		return
	}
	_ = c.Close()
}
