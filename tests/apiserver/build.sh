#!/bin/sh
# Build kube-apiserver, kubectl (from the k8s.io/kubernetes module pinned in
# go.mod) and etcd (etcd/main.go, embedded etcd 3.5) into OUT/bin.
#   tests/apiserver/build.sh OUT [GO]
# Go's build and module caches (GOCACHE, GOMODCACHE: default locations) make
# a second build a matter of seconds. Everything the tests run is fetched
# here; a missing Go toolchain or a failed module download fails the build.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build.sh OUT [GO]}
go=${2:-go}
if ! command -v "$go" >/dev/null 2>&1; then
        echo "tests/apiserver/build.sh: no Go toolchain ($go): run packaging/build-deps.sh" >&2
        exit 1
fi
mkdir -p "$out/bin"
cd "$here"
# -mod=readonly: go.mod/go.sum are complete; the build never edits them.
# GOTOOLCHAIN=local: this toolchain, never one downloaded for go.mod.
export GOFLAGS=-mod=readonly CGO_ENABLED=0 GOTOOLCHAIN=local
k8s=$("$go" list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=$(echo "$k8s" | cut -d. -f2)
# The version the binaries report (else "v0.0.0-master+$Format:%H$").
pkg=k8s.io/component-base/version
cpkg=k8s.io/client-go/pkg/version
ver="-X $pkg.gitVersion=$k8s -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
ver="$ver -X $cpkg.gitVersion=$k8s -X $cpkg.gitMajor=1 -X $cpkg.gitMinor=$minor"
"$go" build -o "$out/bin/" -ldflags "-s -w $ver" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl ./etcd
"$out/bin/kube-apiserver" --version
