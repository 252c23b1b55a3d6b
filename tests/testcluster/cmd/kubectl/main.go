// Command kubectl is the kubectl of the k8s.io/kubectl module, at the same
// minor version as the test cluster's control plane.
package main

import (
	"os"

	// Client authentication plugins (exec, OIDC), as in the released kubectl.
	_ "k8s.io/client-go/plugin/pkg/client/auth"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	cmdutil "k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	// The verbosity has to be known before flags are parsed, so that logging
	// while the command tree is built (plugins, .kuberc) honours -v.
	_, _ = logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args))
	if err := cli.RunNoErrOutput(kubectlcmd.NewDefaultKubectlCommand()); err != nil {
		cmdutil.CheckErr(err)
	}
}
