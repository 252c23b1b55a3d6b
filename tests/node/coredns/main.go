// Command coredns is CoreDNS with only the plugins the test node's cluster DNS uses, built from
// CoreDNS's Go module the way CoreDNS documents for custom builds (coremain plus the plugin
// packages; each registers itself). The Corefile is written by `testcluster serve --node`.
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/rewrite"
	_ "github.com/coredns/coredns/plugin/whoami"
)

func main() {
	// dnsserver's directive list (execution order) names every plugin of a full build; the ones
	// not linked in here are skipped.
	coremain.Run()
}
