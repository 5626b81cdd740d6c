#!/usr/bin/env bash
# A RabbitMQ image for the node test, with no registry: Debian's
# rabbitmq-server installed into a `debootstrap --variant=minbase` root
# (cached in ~/.cache/dishpatch/images), imported into Docker. It runs as
# 65532 with a read-only root: state, logs and the Erlang cookie go to /data
# (an emptyDir in the pod).
#
#   e2e/node/rabbitmq-image.sh     build dishpatch/rabbitmq:3 (once) and print its reference
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE="${DISHPATCH_CACHE:-$HOME/.cache/dishpatch}/images"
REF=dishpatch/rabbitmq:3
MIRROR="${DISHPATCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
log() { echo "rabbitmq-image: $*" >&2; }

"$ROOT/hack/images.sh" docker-up
if docker image inspect "$REF" >/dev/null 2>&1; then echo "$REF"; exit 0; fi

tarball="$CACHE/rabbitmq-bookworm-minbase.tar"
if [ ! -f "$tarball" ]; then
  command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  mkdir -p "$CACHE"
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap bookworm (minbase + rabbitmq-server) from $MIRROR"
  start=$SECONDS
  debootstrap --variant=minbase --include=rabbitmq-server bookworm "$rootfs" "$MIRROR" \
    >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc "$rootfs"/usr/share/man
  mkdir -p "$rootfs/etc/rabbitmq" "$rootfs/data"
  # Guest may connect from other pods (test only); AMQP on 5672.
  printf 'loopback_users = none\nlisteners.tcp.default = 5672\nlog.console = true\nlog.file = false\n' \
    >"$rootfs/etc/rabbitmq/rabbitmq.conf"
  echo '[].' >"$rootfs/etc/rabbitmq/enabled_plugins"
  tar -C "$rootfs" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
  log "root built in $((SECONDS - start))s"
fi
docker import \
  --change 'USER 65532:65532' \
  --change 'ENV HOME=/data RABBITMQ_MNESIA_BASE=/data/mnesia RABBITMQ_LOG_BASE=/data/log RABBITMQ_NODENAME=rabbit@localhost RABBITMQ_CONFIG_FILE=/etc/rabbitmq/rabbitmq RABBITMQ_ENABLED_PLUGINS_FILE=/etc/rabbitmq/enabled_plugins' \
  --change 'ENTRYPOINT ["/usr/lib/rabbitmq/bin/rabbitmq-server"]' \
  "$tarball" "$REF" >/dev/null
log "built $REF ($(docker image inspect --format '{{.Size}}' "$REF" | awk '{printf "%.0f MB", $1/1e6}'))"
echo "$REF"
