package main

import (
	"context"
	"log"
	"os"
	"time"

	"github.com/spf13/cobra"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client metrics, as in the released binaries
	proxyapp "k8s.io/kubernetes/cmd/kube-proxy/app"
	schedulerapp "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubeletapp "k8s.io/kubernetes/cmd/kubelet/app"
)

// The node's components, each the command of its cmd/<component>/app package run the way its
// main() runs it (cli.Run: flags, logging, the component's own signal handling), in a process of
// its own: they are started by `serve` (kube-scheduler) and by `node` (kubelet, kube-proxy).

func runKubelet(args []string) int {
	return runCobra("kubelet", kubeletapp.NewKubeletCommand(context.Background()), args)
}

func runKubeProxy(args []string) int {
	return runCobra("kube-proxy", proxyapp.NewProxyCommand(), args)
}

func runScheduler(args []string) int {
	return runCobra("kube-scheduler", schedulerapp.NewSchedulerCommand(), args)
}

func runCobra(name string, cmd *cobra.Command, args []string) int {
	exitWithParent(name)
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

// exitWithParent ends this process when its parent is gone. The parent also sets Pdeathsig, which
// covers most cases; this covers a parent that died before the child could be told.
func exitWithParent(name string) {
	parent := os.Getppid()
	go func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for range t.C {
			if os.Getppid() != parent {
				log.Printf("%s: parent %d is gone, exiting", name, parent)
				os.Exit(1)
			}
		}
	}()
}
