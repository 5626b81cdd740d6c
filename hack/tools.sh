#!/usr/bin/env bash
# Builds the real control-plane binaries (etcd, kube-apiserver,
# kube-controller-manager), the node's (kubelet, kube-scheduler, kube-proxy,
# CoreDNS), stripe-mock and helm from their published Go modules, once per
# version, into a cache outside the clone.
# Usage: hack/tools.sh [etcd|kube-apiserver|kube-controller-manager|kubelet|kube-scheduler|kube-proxy|coredns|stripe-mock|jaeger|helm|all|node|path NAME]
set -euo pipefail

# Kubernetes minor must match the k8s-openapi feature in Cargo.toml (v1_33).
KUBE_VERSION="${KUBE_VERSION:-v1.33.13}"
ETCD_VERSION="${ETCD_VERSION:-v3.5.35}"
HELM_VERSION="${HELM_VERSION:-v3.19.0}"
STRIPE_MOCK_VERSION="${STRIPE_MOCK_VERSION:-v0.203.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
# The module's v1.x versions carry the v2 all-in-one (cmd/jaeger, an
# OpenTelemetry Collector build). A module build has no UI assets (they are
# an npm build of jaeger-ui): the query API serves, the UI is a placeholder.
JAEGER_VERSION="${JAEGER_VERSION:-v1.75.0}"
CACHE="${DISHPATCH_CACHE:-$HOME/.cache/dishpatch}"
BIN="$CACHE/bin"
mkdir -p "$BIN"

log() { echo "tools: $*" >&2; }

# go_build_from_module OUT MODULE VERSION PKG [replace-lines] [extra-ldflags]
# A throwaway module that requires MODULE@VERSION, so the module's own replace
# directives (which `go install pkg@v` refuses) don't matter.
go_build_from_module() {
  local out=$1 module=$2 version=$3 pkg=$4 replaces=${5:-} ldflags=${6:-}
  [ -x "$out" ] && return 0
  # One build per binary at a time (`make up` and `make node-up` may race).
  exec 9>"$out.lock"
  flock 9
  [ -x "$out" ] && return 0
  local work
  work=$(mktemp -d)
  cat >"$work/go.mod" <<MOD
module dishpatch.dev/hack/build

go 1.24

require $module $version
$replaces
MOD
  log "building $pkg@$version (first time only; cached at $out)"
  local start=$SECONDS
  (cd "$work" && GOFLAGS=-mod=mod go get "$pkg@$version" >/dev/null 2>&1 || true)
  (cd "$work" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags="-s -w $ldflags" -o "$out.tmp" "$pkg")
  mv "$out.tmp" "$out"
  rm -rf "$work"
  log "built $(basename "$out") in $((SECONDS - start))s"
}

build_etcd() {
  go_build_from_module "$BIN/etcd-$ETCD_VERSION" go.etcd.io/etcd/server/v3 "$ETCD_VERSION" go.etcd.io/etcd/server/v3
}

# build_kube NAME: a component of k8s.io/kubernetes (kube-apiserver, kube-controller-manager).
build_kube() {
  local name=$1 out="$BIN/$1-$KUBE_VERSION"
  [ -x "$out" ] && return 0
  # k8s.io/kubernetes refers to its staging modules as v0.0.0 with local
  # replaces; pin each to the published v0.X.Y that matches this release.
  local staging_version="v0.${KUBE_VERSION#v1.}"
  local gomod
  gomod=$(cd "$CACHE" && go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' | xargs cat)
  local replaces
  replaces=$(printf '%s\n' "$gomod" | sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' | sort -u |
    awk -v v="$staging_version" 'BEGIN{print "replace ("} {print "\t" $1 " => " $1 " " v} END{print ")"}')
  # Stamp the version the way the Kubernetes release build does, so /version,
  # kubectl's skew check and the emulation version see v1.X.Y, not v0.0.0-master.
  local minor=${KUBE_VERSION#v1.}; minor=${minor%%.*}
  local ldflags="" pkgpath
  for pkgpath in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkgpath.gitVersion=$KUBE_VERSION -X $pkgpath.gitMajor=1 -X $pkgpath.gitMinor=$minor"
    ldflags+=" -X $pkgpath.gitTreeState=clean -X $pkgpath.buildDate=1970-01-01T00:00:00Z"
  done
  go_build_from_module "$out" k8s.io/kubernetes "$KUBE_VERSION" "k8s.io/kubernetes/cmd/$name" "$replaces" "$ldflags"
}

build_helm() {
  go_build_from_module "$BIN/helm-$HELM_VERSION" helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
}

# CoreDNS for the node's cluster DNS (hack/node.sh runs it as a Deployment).
build_coredns() {
  go_build_from_module "$BIN/coredns-$COREDNS_VERSION" github.com/coredns/coredns "$COREDNS_VERSION" github.com/coredns/coredns
}

# Stripe's own mock of its API, for testing the Stripe adapter.
build_stripe_mock() {
  go_build_from_module "$BIN/stripe-mock-$STRIPE_MOCK_VERSION" github.com/stripe/stripe-mock "$STRIPE_MOCK_VERSION" github.com/stripe/stripe-mock
}

# Jaeger all-in-one (OTLP in, in-memory storage, the UI and its query API),
# which receives every component's spans.
build_jaeger() {
  go_build_from_module "$BIN/jaeger-$JAEGER_VERSION" github.com/jaegertracing/jaeger "$JAEGER_VERSION" github.com/jaegertracing/jaeger/cmd/jaeger
}

path_of() {
  case $1 in
    etcd) echo "$BIN/etcd-$ETCD_VERSION" ;;
    kube-apiserver | kube-controller-manager | kubelet | kube-scheduler | kube-proxy) echo "$BIN/$1-$KUBE_VERSION" ;;
    coredns) echo "$BIN/coredns-$COREDNS_VERSION" ;;
    helm) echo "$BIN/helm-$HELM_VERSION" ;;
    stripe-mock) echo "$BIN/stripe-mock-$STRIPE_MOCK_VERSION" ;;
    jaeger) echo "$BIN/jaeger-$JAEGER_VERSION" ;;
  esac
}

case "${1:-all}" in
  etcd) build_etcd ;;
  kube-apiserver | kube-controller-manager | kubelet | kube-scheduler | kube-proxy) build_kube "$1" ;;
  coredns) build_coredns ;;
  node) build_kube kubelet; build_kube kube-scheduler; build_kube kube-proxy; build_coredns ;;
  helm) build_helm ;;
  stripe-mock) build_stripe_mock ;;
  jaeger) build_jaeger ;;
  path) path_of "${2:?name}" ;;
  version) case "${2:?kube|coredns}" in kube) echo "$KUBE_VERSION" ;; coredns) echo "$COREDNS_VERSION" ;; esac ;;
  all) build_etcd; build_kube kube-apiserver; build_kube kube-controller-manager; build_stripe_mock; build_jaeger ;;
  *) echo "usage: $0 [etcd|kube-apiserver|kube-controller-manager|kubelet|kube-scheduler|kube-proxy|coredns|stripe-mock|jaeger|helm|all|node|path NAME]" >&2; exit 2 ;;
esac
