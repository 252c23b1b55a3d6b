package main

import (
	"log"
	"net"
	"os"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
	"time"
)

// supervisor keeps one child process running until stopped: the controller-manager and
// kube-scheduler of `serve`, the node's containerd, kubelet and kube-proxy under `node`.
type supervisor struct {
	name string
	// command builds the child for one start; port is a free 127.0.0.1 port when wantPort is set.
	command  func(port int) *exec.Cmd
	wantPort bool
	logPath  string
	onStart  func(pid, port int)
	// onExit, if set, is told about every unexpected exit; returning false stops restarting.
	onExit func(err error) bool
	grace  time.Duration

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

// selfCommand is a command builder for a subcommand of this very binary.
func selfCommand(sub string, args func(port int) []string) func(port int) *exec.Cmd {
	exe, err := os.Executable()
	if err != nil {
		exe = os.Args[0]
	}
	return func(port int) *exec.Cmd {
		return exec.Command(exe, append([]string{sub}, args(port)...)...)
	}
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
				log.Printf("%s: start failed: %v", s.name, err)
			} else {
				select {
				case <-s.stop:
					_ = cmd.Process.Signal(syscall.SIGTERM)
					select {
					case <-exited:
					case <-time.After(s.grace):
						log.Printf("%s did not stop within %s; killing it", s.name, s.grace)
						_ = cmd.Process.Kill()
						select {
						case <-exited:
						case <-time.After(5 * time.Second):
						}
					}
					return
				case err := <-exited:
					s.mu.Lock()
					s.pid = 0
					s.mu.Unlock()
					if s.onExit != nil && !s.onExit(err) {
						<-s.stop
						return
					}
					log.Printf("%s exited unexpectedly (%v); restarting; see %s", s.name, err, s.logPath)
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
	port := 0
	if s.wantPort {
		var err error
		if port, err = freePort(); err != nil {
			return nil, nil, err
		}
	}
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, err
	}
	defer logf.Close()
	cmd := s.command(port)
	cmd.Stdout, cmd.Stderr = logf, logf
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
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

// current returns the running child's pid and port (0 when none runs).
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
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	select {
	case <-s.done:
	case <-time.After(s.grace + 10*time.Second):
		log.Printf("%s supervisor did not stop in time", s.name)
	}
}
