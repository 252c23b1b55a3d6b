package main

import (
	"context"
	"fmt"
	"log"
	"os"
	"os/signal"
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
