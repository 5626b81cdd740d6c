// kindcheck loads a kind cluster configuration with kind's own loader and
// validator (the code `kind create cluster --config` runs before it touches
// a container runtime), then checks what dishpatch needs from it.
//
// kind's loader lives in an internal package. Go allows importing
// sigs.k8s.io/kind/pkg/internal/... from import paths under
// sigs.k8s.io/kind/pkg, which is why this module has the path it has; it is
// a local program, never published.
//
//	kindcheck -kube-version v1.33.13 -node-port 30080 -host-port 8080 kind-config.yaml
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"

	"sigs.k8s.io/kind/pkg/internal/apis/config"
	"sigs.k8s.io/kind/pkg/internal/apis/config/encoding"
)

func minor(v string) string {
	v = strings.TrimPrefix(v, "v")
	parts := strings.SplitN(v, ".", 3)
	if len(parts) < 2 {
		return v
	}
	return parts[0] + "." + parts[1]
}

func main() {
	kube := flag.String("kube-version", "", "the project's Kubernetes pin; every node image must have its minor")
	nodePort := flag.Int("node-port", 0, "the façade's NodePort that must be mapped")
	hostPort := flag.Int("host-port", 0, "the host port it must be mapped to")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: kindcheck [flags] kind-config.yaml")
		os.Exit(2)
	}
	path := flag.Arg(0)
	cfg, err := encoding.Load(path)
	if err != nil {
		fail("%s: kind refuses to load it: %v", path, err)
	}
	if cfg.Name == "" {
		cfg.Name = "kind" // what `kind create cluster` does without --name
	}
	if err := cfg.Validate(); err != nil {
		fail("%s: kind refuses it: %v", path, err)
	}
	var cp, workers int
	mapped := false
	for i, n := range cfg.Nodes {
		switch n.Role {
		case config.ControlPlaneRole:
			cp++
		case config.WorkerRole:
			workers++
		}
		tag := n.Image[strings.LastIndex(n.Image, ":")+1:]
		if at := strings.Index(n.Image, "@"); at >= 0 {
			img := n.Image[:at]
			tag = img[strings.LastIndex(img, ":")+1:]
		}
		if *kube != "" && minor(tag) != minor(*kube) {
			fail("node %d (%s): image %s is Kubernetes %s, the project pins %s", i, n.Role, n.Image, tag, *kube)
		}
		for _, m := range n.ExtraPortMappings {
			if int(m.ContainerPort) == *nodePort && int(m.HostPort) == *hostPort {
				mapped = true
			}
		}
		fmt.Printf("node %d: %s %s, %d port mapping(s)\n", i, n.Role, n.Image, len(n.ExtraPortMappings))
	}
	if cp != 1 || workers != 1 {
		fail("want one control-plane and one worker, got %d and %d", cp, workers)
	}
	if *nodePort != 0 && !mapped {
		fail("no extraPortMapping from node port %d to host port %d", *nodePort, *hostPort)
	}
	fmt.Printf("%s: valid for kind (%d nodes, node port %d -> host %d)\n", path, len(cfg.Nodes), *nodePort, *hostPort)
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kindcheck: "+format+"\n", args...)
	os.Exit(1)
}
