#!/usr/bin/env bash
# Installs what dishpatch needs that a fresh machine may lack, and builds the
# control-plane binaries (cached by version outside the clone). Idempotent.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

need_apt=()
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need_apt+=(rabbitmq-server)
python3 -c 'import ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# The façade's browser test drives Debian's Chromium headless.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
command -v npm >/dev/null || need_apt+=(npm)
# PostgreSQL holds the order history (`make up`, and the history tests).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "deps: installing ${need_apt[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# promtool, which checks the chart's alerts and every component's /metrics
# (e2e/helm/test.sh). Only the package: not its recommended node exporter.
if ! command -v promtool >/dev/null; then
  echo "deps: installing prometheus (for promtool)" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
for tool in go cargo kubectl; do
  command -v "$tool" >/dev/null || { echo "deps: $tool is required and missing" >&2; exit 1; }
done
# aiosmtpd, the real SMTP server the notification tests send to, in a venv in the cache.
VENV="${DISHPATCH_CACHE:-$HOME/.cache/dishpatch}/venv"
"$VENV/bin/python" -c 'import aiosmtpd' 2>/dev/null || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q aiosmtpd==1.4.6; }
# schemathesis, which checks the façade against its OpenAPI 3.1 document (services/facade/tests/contract.rs).
SCHEMATHESIS=4.32.5
"$VENV/bin/st" --version 2>/dev/null | grep -qF "$SCHEMATHESIS" || "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS"
# playwright-core, which drives Chromium in the façade's browser test (services/facade/tests/browser.rs).
NODE_DIR="${DISHPATCH_CACHE:-$HOME/.cache/dishpatch}/node"
PLAYWRIGHT=1.65.1
grep -qF "\"version\": \"$PLAYWRIGHT\"" "$NODE_DIR/node_modules/playwright-core/package.json" 2>/dev/null || {
  mkdir -p "$NODE_DIR"
  npm install --prefix "$NODE_DIR" --no-audit --no-fund --silent "playwright-core@$PLAYWRIGHT"
}
"$ROOT/hack/tools.sh" all
