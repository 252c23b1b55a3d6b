// Command envoy-api writes the protobuf descriptors of the Envoy 1.40 xDS API that llmroute's xDS
// server needs, as one serialized google.protobuf.FileDescriptorSet, to stdout.
//
// The descriptors come from github.com/envoyproxy/go-control-plane/envoy v1.40.0, the Go bindings the
// Envoy project publishes for each Envoy release: every generated package registers its .proto
// files' descriptors in protoregistry.GlobalFiles when imported. This program imports the packages
// of the resources and extensions llmroute configures, then writes every registered file whose
// package is in `roots`, with all the files they import, dependencies first.
//
// Run by scripts/gen-envoy-api (which writes src/xds/envoy-api.bin); tests/xds_api.rs checks that
// the committed file is what this program writes.
package main

import (
	"fmt"
	"os"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
	"google.golang.org/protobuf/types/descriptorpb"

	// Resources and services.
	_ "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/service/accesslog/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	// Extensions named by `@type` in llmroute's configuration.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/file/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/grpc/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/access_loggers/stream/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/bootstrap/internal_listener/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/clusters/aggregate/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/credential_injector/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/dynamic_modules/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/json_to_metadata/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/local_ratelimit/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/lua/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/set_metadata/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/http/injected_credentials/generic/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/resource_monitors/downstream_connections/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/priority/previous_priorities/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
)

// Packages whose files are written (with everything they import).
var roots = []string{
	"envoy.admin.v3",
	"envoy.config.",
	"envoy.service.accesslog.v3",
	"envoy.service.discovery.v3",
	"envoy.service.secret.v3",
	"envoy.extensions.",
}

func wanted(pkg string) bool {
	for _, r := range roots {
		if pkg == r || (strings.HasSuffix(r, ".") && strings.HasPrefix(pkg, r)) {
			return true
		}
	}
	return false
}

func main() {
	var starts []protoreflect.FileDescriptor
	protoregistry.GlobalFiles.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		if wanted(string(fd.Package())) {
			starts = append(starts, fd)
		}
		return true
	})
	sort.Slice(starts, func(i, j int) bool { return starts[i].Path() < starts[j].Path() })
	// Depth-first, dependencies before dependents: a stable topological order.
	seen := map[string]bool{}
	set := &descriptorpb.FileDescriptorSet{}
	var visit func(fd protoreflect.FileDescriptor)
	visit = func(fd protoreflect.FileDescriptor) {
		if seen[fd.Path()] {
			return
		}
		seen[fd.Path()] = true
		imports := fd.Imports()
		for i := 0; i < imports.Len(); i++ {
			visit(imports.Get(i).FileDescriptor)
		}
		fdp := protodesc.ToFileDescriptorProto(fd)
		// Comments are not needed to encode or decode; leave them out.
		fdp.SourceCodeInfo = nil
		set.File = append(set.File, fdp)
	}
	for _, fd := range starts {
		visit(fd)
	}
	out, err := proto.MarshalOptions{Deterministic: true}.Marshal(set)
	if err != nil {
		fmt.Fprintln(os.Stderr, "envoy-api:", err)
		os.Exit(1)
	}
	if _, err := os.Stdout.Write(out); err != nil {
		fmt.Fprintln(os.Stderr, "envoy-api:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "envoy-api: %d files, %d bytes\n", len(set.File), len(out))
}
