package main

import (
	"context"
	"fmt"
	"log"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/rest"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	logsapi "k8s.io/component-base/logs/api/v1"
	kcmapp "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	kcmoptions "k8s.io/kubernetes/cmd/kube-controller-manager/app/options"
)

// runControllerManager is the `controller-manager` mode: kube-controller-manager
// as cmd/kube-controller-manager/app runs it, in its own process (it has its
// own feature gates, metrics and flags, which cannot share a process with the
// apiserver's). It is started by `serve`, and ends when that parent ends.
func runControllerManager(args []string) error {
	parent := os.Getppid()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Stop on SIGTERM/SIGINT, and when the parent is gone (Pdeathsig covers
	// that too; this also covers the parent dying before Pdeathsig was set).
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case s := <-sigs:
				log.Printf("controller-manager: got %s, stopping", s)
				cancel()
				// Its state is all in the apiserver: no need to wait long.
				time.Sleep(3 * time.Second)
				os.Exit(0)
			case <-t.C:
				if os.Getppid() != parent {
					log.Printf("controller-manager: parent %d is gone, exiting", parent)
					os.Exit(1)
				}
			}
		}
	}()

	s, err := kcmoptions.NewKubeControllerManagerOptions()
	if err != nil {
		return err
	}
	known, disabled, aliases := kcmapp.KnownControllers(), kcmapp.ControllersDisabledByDefault(), kcmapp.ControllerAliases()
	named := s.Flags(known, disabled, aliases)
	s.ParsedFlags = &named
	fs := pflag.NewFlagSet("kube-controller-manager", pflag.ContinueOnError)
	for _, f := range named.FlagSets {
		fs.AddFlagSet(f)
	}
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("kube-controller-manager flags: %w", err)
	}
	// Watching deprecated APIs is expected; do not log warnings for it.
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	if err := s.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	if err := logsapi.ValidateAndApply(s.Logs, utilfeature.DefaultFeatureGate); err != nil {
		return err
	}
	c, err := s.Config(ctx, known, disabled, aliases)
	if err != nil {
		return err
	}
	fg := s.ComponentGlobalsRegistry.FeatureGateFor(basecompatibility.DefaultKubeComponent)
	fg.(featuregate.MutableFeatureGate).AddMetrics()
	s.ComponentGlobalsRegistry.AddMetrics()
	return kcmapp.Run(ctx, c.Complete())
}

// supervisor keeps one controller-manager child running until stopped.
type supervisor struct {
	exe     string
	args    func(port int) []string
	logPath string
	onStart func(pid, port int)
	grace   time.Duration

	mu   sync.Mutex
	pid  int
	port int
	stop chan struct{}
	done chan struct{}
}

// freePort asks the kernel for a free port on 127.0.0.1.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// run starts the child and restarts it when it dies, until Stop. All children
// are started from one goroutine locked to its OS thread: Pdeathsig fires when
// the *thread* that started a child ends, and a locked thread lives as long as
// this loop does.
func (s *supervisor) run() {
	s.stop = make(chan struct{})
	s.done = make(chan struct{})
	go func() {
		runtime.LockOSThread()
		defer close(s.done)
		backoff := time.Second
		for {
			started := time.Now()
			cmd, exited, err := s.startOnce()
			if err != nil {
				log.Printf("controller-manager: start failed: %v", err)
			} else {
				select {
				case <-s.stop:
					_ = cmd.Process.Signal(syscall.SIGTERM)
					select {
					case <-exited:
					case <-time.After(s.grace):
						_ = cmd.Process.Kill()
						select {
						case <-exited:
						case <-time.After(5 * time.Second):
						}
					}
					return
				case err := <-exited:
					log.Printf("controller-manager exited unexpectedly (%v); restarting; see %s", err, s.logPath)
				}
			}
			if time.Since(started) > time.Minute {
				backoff = time.Second
			}
			select {
			case <-s.stop:
				return
			case <-time.After(backoff):
			}
			if backoff < 16*time.Second {
				backoff *= 2
			}
		}
	}()
}

func (s *supervisor) startOnce() (*exec.Cmd, <-chan error, error) {
	port, err := freePort()
	if err != nil {
		return nil, nil, err
	}
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close()
	cmd := exec.Command(s.exe, append([]string{"controller-manager"}, s.args(port)...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	s.pid, s.port = cmd.Process.Pid, port
	s.mu.Unlock()
	if s.onStart != nil {
		s.onStart(cmd.Process.Pid, port)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	return cmd, exited, nil
}

// current returns the running child's pid and healthz port.
func (s *supervisor) current() (pid, port int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pid, s.port
}

// Stop ends the child (SIGTERM, then SIGKILL after the grace period) and the
// restart loop.
func (s *supervisor) Stop() {
	if s.stop == nil {
		return
	}
	close(s.stop)
	select {
	case <-s.done:
	case <-time.After(s.grace + 10*time.Second):
		log.Printf("controller-manager supervisor did not stop in time")
	}
}
