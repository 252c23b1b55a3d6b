package main

import (
	"archive/tar"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// runImageImport is the `image-import` mode: imports OCI image archives into a running node's
// containerd (namespace k8s.io), each under the reference it names, unless an image of that
// name with the same manifest is already there.
func runImageImport(args []string) error {
	fs := pflag.NewFlagSet("image-import", pflag.ContinueOnError)
	dir := fs.String("dir", "", "the cluster's directory (required)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || fs.NArg() == 0 {
		return errors.New("usage: testcluster image-import --dir DIR ARCHIVE...")
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	l := newNodeLayout(abs, defaultNodeName)
	if _, err := os.Stat(filepath.Join(l.dir, nodeReadyName)); err != nil {
		return fmt.Errorf("no running node in %s (start it with 'scripts/testcluster up %s --node')", l.dir, l.dir)
	}
	snap, err := os.ReadFile(filepath.Join(l.root, "snapshotter"))
	if err != nil {
		return err
	}
	for _, a := range fs.Args() {
		t0 := time.Now()
		if err := importImage(l, strings.TrimSpace(string(snap)), a); err != nil {
			return err
		}
		ref, digest, _ := archiveImage(a)
		fmt.Printf("%s %s (%s)\n", ref, digest, time.Since(t0).Round(time.Millisecond))
	}
	return nil
}

// archiveImage reads the image reference and manifest digest from an OCI archive's index.json.
func archiveImage(archive string) (ref, digest string, err error) {
	f, err := os.Open(archive)
	if err != nil {
		return "", "", err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return "", "", fmt.Errorf("%s: no index.json (not an OCI image archive)", archive)
		}
		if err != nil {
			return "", "", fmt.Errorf("%s: %w", archive, err)
		}
		if strings.TrimPrefix(h.Name, "./") != "index.json" {
			continue
		}
		var index struct {
			Manifests []struct {
				Digest      string            `json:"digest"`
				Annotations map[string]string `json:"annotations"`
			} `json:"manifests"`
		}
		if err := json.NewDecoder(tr).Decode(&index); err != nil {
			return "", "", fmt.Errorf("%s: index.json: %w", archive, err)
		}
		if len(index.Manifests) != 1 {
			return "", "", fmt.Errorf("%s: expected one manifest, found %d", archive, len(index.Manifests))
		}
		m := index.Manifests[0]
		ref = m.Annotations["io.containerd.image.name"]
		if ref == "" {
			return "", "", fmt.Errorf("%s: the manifest has no io.containerd.image.name annotation", archive)
		}
		return ref, m.Digest, nil
	}
}
