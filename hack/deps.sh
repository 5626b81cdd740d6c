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
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "deps: installing ${need_apt[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
for tool in go cargo kubectl; do
  command -v "$tool" >/dev/null || { echo "deps: $tool is required and missing" >&2; exit 1; }
done
# aiosmtpd, the real SMTP server the notification tests send to, in a venv in the cache.
VENV="${DISHPATCH_CACHE:-$HOME/.cache/dishpatch}/venv"
"$VENV/bin/python" -c 'import aiosmtpd' 2>/dev/null || { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q aiosmtpd==1.4.6; }
"$ROOT/hack/tools.sh" all
