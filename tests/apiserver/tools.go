//go:build tools

// The binaries this module builds (see build.sh): blank imports keep them
// in go.mod/go.sum, the "tools" tag keeps them out of any compile.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
