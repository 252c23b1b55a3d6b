package main

import (
	"context"
	"fmt"
	"net"
	"strconv"

	"github.com/spf13/pflag"

	utilerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/apiserver/pkg/server/flagz"
	"k8s.io/client-go/rest"
	basecompatibility "k8s.io/component-base/compatibility"
	"k8s.io/component-base/featuregate"
	logsapi "k8s.io/component-base/logs/api/v1"
	apiserverapp "k8s.io/kubernetes/cmd/kube-apiserver/app"
	apiserveroptions "k8s.io/kubernetes/cmd/kube-apiserver/app/options"
)

// startAPIServer runs kube-apiserver in this process the way
// cmd/kube-apiserver/app's command does (flags -> Complete -> Validate ->
// Run), but without its process-wide signal handler: it stops when ctx is
// cancelled, and the returned channel receives Run's result.
//
// ln is an already bound listener for the secure port, so no port can be
// taken by someone else between choosing it and serving on it.
func startAPIServer(ctx context.Context, ln net.Listener, args []string) (<-chan error, error) {
	s := apiserveroptions.NewServerRunOptions()
	fs := pflag.NewFlagSet("kube-apiserver", pflag.ContinueOnError)
	named := s.Flags()
	for _, f := range named.FlagSets {
		fs.AddFlagSet(f)
	}
	s.Flagz = flagz.NamedFlagSetsReader{FlagSets: named}
	port := ln.Addr().(*net.TCPAddr).Port
	args = append([]string{"--secure-port=" + strconv.Itoa(port)}, args...)
	if err := fs.Parse(args); err != nil {
		return nil, fmt.Errorf("kube-apiserver flags: %w", err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("kube-apiserver takes no arguments, got %q", fs.Args())
	}
	registry := s.GenericServerRunOptions.ComponentGlobalsRegistry
	if err := registry.Set(); err != nil {
		return nil, err
	}
	// The apiserver's loopback clients should not log self-issued warnings.
	rest.SetDefaultWarningHandler(rest.NoWarnings{})
	featureGate := registry.FeatureGateFor(basecompatibility.DefaultKubeComponent)
	if err := logsapi.ValidateAndApply(s.Logs, featureGate); err != nil {
		return nil, err
	}

	s.SecureServing.Listener = ln
	s.SecureServing.BindPort = port

	completed, err := s.Complete(ctx)
	if err != nil {
		return nil, err
	}
	if errs := completed.Validate(); len(errs) != 0 {
		return nil, utilerrors.NewAggregate(errs)
	}
	featureGate.(featuregate.MutableFeatureGate).AddMetrics()
	registry.AddMetrics()

	done := make(chan error, 1)
	go func() {
		done <- apiserverapp.Run(ctx, completed)
		close(done)
	}()
	return done, nil
}
