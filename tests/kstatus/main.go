// Command kstatus-check prints the kstatus status of each Kubernetes object on stdin, computed by
// the real library Flux and cli-utils use (sigs.k8s.io/cli-utils/pkg/kstatus/status).
//
// Input: a YAML stream (documents separated by ---) or JSON objects. Output: one JSON object per
// input object, one a line: {"kind":..., "name":..., "status":"Current|InProgress|Failed|...",
// "message":...}. Exit status 1 when an object cannot be read or its status cannot be computed.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Kind    string `json:"kind"`
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Stdin, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "kstatus-check:", err)
		os.Exit(1)
	}
}

func run(in io.Reader, out io.Writer) error {
	decoder := utilyaml.NewYAMLOrJSONDecoder(bufio.NewReader(in), 4096)
	encoder := json.NewEncoder(out)
	for {
		var raw json.RawMessage
		if err := decoder.Decode(&raw); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("reading an object: %w", err)
		}
		if len(raw) == 0 || string(raw) == "null" {
			continue // an empty document
		}
		// As clients (Flux's through controller-runtime) decode objects: integers stay int64.
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(raw); err != nil {
			return fmt.Errorf("decoding an object: %w", err)
		}
		res, err := status.Compute(u)
		if err != nil {
			return fmt.Errorf("%s %s: %w", u.GetKind(), u.GetName(), err)
		}
		if err := encoder.Encode(verdict{
			Kind:    u.GetKind(),
			Name:    u.GetName(),
			Status:  res.Status.String(),
			Message: res.Message,
		}); err != nil {
			return err
		}
	}
}
