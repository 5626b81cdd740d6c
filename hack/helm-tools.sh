#!/usr/bin/env bash
# Tools the Helm/kind work needs beyond hack/tools.sh, built once and cached
# the same way (never committed):
#
#   hack/helm-tools.sh kindcheck     build hack/kindcheck (kind's config loader, sigs.k8s.io/kind v0.29.0)
#   hack/helm-tools.sh path kindcheck
#   hack/helm-tools.sh helm          = hack/tools.sh helm
#   hack/helm-tools.sh monitoring-crds   the PodMonitor and PrometheusRule CRDs of prometheus-operator
#                                    (from its Go module, $PROMOP_VERSION, in the Go module cache): prints their paths
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="${DISHPATCH_CACHE:-$HOME/.cache/dishpatch}"
BIN="$CACHE/bin"
KIND_VERSION=v0.29.0
PROMOP_VERSION=v0.80.1

kindcheck_path() { echo "$BIN/kindcheck-kind-$KIND_VERSION-$(cd "$ROOT/hack/kindcheck" && cat go.mod main.go | sha256sum | cut -c1-12)"; }

build_kindcheck() {
  local out; out=$(kindcheck_path)
  [ -x "$out" ] && return 0
  mkdir -p "$BIN"
  echo "helm-tools: building kindcheck against sigs.k8s.io/kind $KIND_VERSION (cached at $out)" >&2
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  cp "$ROOT/hack/kindcheck/go.mod" "$ROOT/hack/kindcheck/main.go" "$work/"
  [ -f "$ROOT/hack/kindcheck/go.sum" ] && cp "$ROOT/hack/kindcheck/go.sum" "$work/"
  (cd "$work" && GOFLAGS=-mod=mod go mod tidy >/dev/null 2>&1 || true)
  (cd "$work" && CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -ldflags="-s -w" -o "$out.tmp" .)
  mv "$out.tmp" "$out"
}

# The chart's monitoring objects are checked by a real apiserver against
# the real CRDs (server-side dry run), not by a copy of their schema.
monitoring_crds() {
  local dir
  dir=$(cd /tmp && GOFLAGS=-mod=mod go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMOP_VERSION" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  local crd
  for crd in podmonitors prometheusrules; do
    echo "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$crd.yaml"
  done
}

case "${1:-}" in
  kindcheck) build_kindcheck ;;
  monitoring-crds) monitoring_crds ;;
  helm) "$ROOT/hack/tools.sh" helm ;;
  path)
    case "${2:-}" in
      kindcheck) kindcheck_path ;;
      helm) "$ROOT/hack/tools.sh" path helm ;;
      *) echo "usage: $0 path kindcheck|helm" >&2; exit 2 ;;
    esac ;;
  *) echo "usage: $0 kindcheck|helm|monitoring-crds|path NAME" >&2; exit 2 ;;
esac
