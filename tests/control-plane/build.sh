#!/usr/bin/env bash
# Builds kube-apiserver, etcd and kubectl from this module's pinned versions, once, into a
# cache directory keyed by the module's go.sum and the Go version; prints that directory.
# Later calls find the binaries there and return at once. Nothing comes from outside the Go
# module proxy.
set -euo pipefail
cd "$(dirname "$0")"

KUBERNETES=v1.34.4   # keep equal to the k8s.io/kubernetes line in go.mod
GO=${GO:-go}
command -v "$GO" >/dev/null || { echo "build.sh: Go is needed to build kube-apiserver (install Go 1.24+)" >&2; exit 1; }

key=$( { cat go.mod go.sum cmd/*/main.go build.sh; "$GO" version; } | sha256sum | cut -c1-16)
cache=${BREAKWATER_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/breakwater/control-plane}
out=$cache/$KUBERNETES-$key
if [[ -x $out/kube-apiserver && -x $out/etcd && -x $out/kubectl ]]; then
  echo "$out"; exit 0
fi

minor=${KUBERNETES#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBERNETES -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

echo "build.sh: building kube-apiserver, etcd and kubectl $KUBERNETES into $out (once; a few minutes)" >&2
tmp=$(mktemp -d "$cache.tmp.XXXXXX" 2>/dev/null || { mkdir -p "$cache"; mktemp -d "$cache.tmp.XXXXXX"; })
trap 'rm -rf "$tmp"' EXIT
# -buildvcs=false: no VCS stamp (a clone owned by another user makes git refuse, and the
# version is set above); GOTOOLCHAIN=local: the machine's Go, never a download.
CGO_ENABLED=0 GOTOOLCHAIN=local "$GO" build -buildvcs=false -trimpath -ldflags "$ldflags" -o "$tmp/" \
  ./cmd/kube-apiserver ./cmd/etcd ./cmd/kubectl
mkdir -p "$cache"
rm -rf "$out"
chmod 755 "$tmp"
mv "$tmp" "$out"
trap - EXIT
echo "$out"
