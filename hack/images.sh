#!/usr/bin/env bash
# Container images for the dishpatch components: one per component, built
# from binaries cargo compiled outside the image (see images/Dockerfile).
#
#   hack/images.sh build        the base (if needed) and every component image
#   hack/images.sh base         only the local base image
#   hack/images.sh tag          print the tag `build` uses
#   hack/images.sh list         the image references `build` produces
#   hack/images.sh check        each image: user 65532, no shell, runs read-only with no capabilities
#   hack/images.sh docker-up    start dockerd if it is not running (Debian's docker.io)
#   hack/images.sh docker-down  stop the dockerd this script started
#
# Environment:
#   DISHPATCH_IMAGE_TAG      tag (default: `git describe --always --dirty`)
#   DISHPATCH_IMAGE_PREFIX   repository prefix (default: dishpatch, giving dishpatch/operator:<tag>)
#   DISHPATCH_BASE_IMAGE     base to build on; unset builds and uses the local base
#                            (a user with a registry sets gcr.io/distroless/cc-debian12:nonroot)
#   DISHPATCH_IMAGE_PROFILE  cargo profile of the binaries (default: release)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEV="${DISHPATCH_DEV_DIR:-$ROOT/.dev}"
TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/dishpatch/target}"
PROFILE="${DISHPATCH_IMAGE_PROFILE:-release}"
PREFIX="${DISHPATCH_IMAGE_PREFIX:-dishpatch}"
COMPONENTS=(operator payment kitchen delivery notification facade)
LOCAL_BASE="$PREFIX/base:debian12"

log() { echo "images: $*" >&2; }
die() { log "error: $*"; exit 1; }

tag() {
  if [ -n "${DISHPATCH_IMAGE_TAG:-}" ]; then
    echo "$DISHPATCH_IMAGE_TAG"
  else
    git -C "$ROOT" describe --always --dirty 2>/dev/null || echo dev
  fi
}

docker_ok() { docker info >/dev/null 2>&1; }

# Debian's dockerd, started the way the node work needs it: no bridge and no
# iptables rules (it would set the FORWARD policy to DROP, which breaks pod
# traffic); builds that need the network use --network host.
docker_up() {
  docker_ok && return 0
  if ! command -v dockerd >/dev/null; then
    log "installing Debian's docker.io"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  mkdir -p "$DEV/logs" "$DEV/run"
  log "starting dockerd (log $DEV/logs/dockerd.log)"
  setsid dockerd --iptables=false --ip-forward=false --bridge=none \
    --pidfile "$DEV/run/dockerd.pid" >>"$DEV/logs/dockerd.log" 2>&1 </dev/null &
  local deadline=$((SECONDS + 60))
  until docker_ok; do
    [ $SECONDS -lt $deadline ] || die "dockerd did not answer within 60s; see $DEV/logs/dockerd.log"
    sleep 0.5
  done
}

docker_down() {
  local pidfile="$DEV/run/dockerd.pid"
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    log "stopped dockerd"
  fi
  rm -f "$pidfile"
}

binary() { echo "$TARGET/$PROFILE/dishpatch-$1"; }

# The local base: every shared library the binaries load (as the host's
# dynamic linker resolves them), CA certificates, and passwd/group entries
# for nonroot (65532), as distroless has them.
base() {
  docker_up
  local rootfs
  rootfs=$(mktemp -d)
  mkdir -p "$rootfs/rootfs/etc/ssl/certs" "$rootfs/rootfs/tmp" "$rootfs/rootfs/home/nonroot"
  local libs=() c lib
  for c in "${COMPONENTS[@]}"; do
    [ -x "$(binary "$c")" ] || die "$(binary "$c") is not built (cargo build --$PROFILE --bins)"
    while read -r lib; do libs+=("$lib"); done < <(ldd "$(binary "$c")" | grep -o '/[^ ]*' | sort -u)
  done
  for lib in $(printf '%s\n' "${libs[@]}" | sort -u); do
    mkdir -p "$rootfs/rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs/rootfs$lib"
  done
  cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/rootfs/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$rootfs/rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/rootfs/etc/group"
  chmod 1777 "$rootfs/rootfs/tmp"
  chown 65532:65532 "$rootfs/rootfs/home/nonroot"
  cp "$ROOT/images/base.Dockerfile" "$rootfs/Dockerfile"
  quiet docker build -q -t "$LOCAL_BASE" "$rootfs"
  rm -rf "$rootfs"
  log "built $LOCAL_BASE ($(size "$LOCAL_BASE"))"
}

# Runs a command, showing its output only if it fails (the docker client
# warns about the legacy builder on every build).
quiet() {
  local out
  if ! out=$("$@" 2>&1); then
    printf '%s\n' "$out" >&2
    return 1
  fi
}

size() { docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; }

build() {
  docker_up
  local base="${DISHPATCH_BASE_IMAGE:-}"
  if [ -z "$base" ]; then
    base "$@"
    base="$LOCAL_BASE"
  fi
  local t c ctx
  t=$(tag)
  for c in "${COMPONENTS[@]}"; do
    ctx=$(mktemp -d)
    # Stripped: debug symbols are half the binary and no use in a pod.
    objcopy --strip-debug "$(binary "$c")" "$ctx/dishpatch-$c"
    cp "$ROOT/images/Dockerfile" "$ctx/Dockerfile"
    quiet docker build -q --build-arg "BASE=$base" --build-arg "COMPONENT=$c" --build-arg "VERSION=$t" \
      -t "$PREFIX/$c:$t" "$ctx"
    rm -rf "$ctx"
    log "built $PREFIX/$c:$t ($(size "$PREFIX/$c:$t"))"
  done
}

# Each image: numeric non-root user, no shell, and the binary runs on a
# read-only root filesystem with every capability dropped.
check() {
  docker_up
  local img user out failed=0
  for img in $(list); do
    user=$(docker image inspect --format '{{.Config.User}}' "$img")
    if [ "$user" != "65532:65532" ]; then
      log "FAIL $img runs as '$user', not 65532:65532"; failed=1; continue
    fi
    if docker run --rm --read-only --cap-drop ALL --security-opt no-new-privileges \
      --entrypoint /bin/sh "$img" -c true >/dev/null 2>&1; then
      log "FAIL $img has a shell"; failed=1; continue
    fi
    if ! out=$(docker run --rm --read-only --cap-drop ALL --security-opt no-new-privileges \
      --network none "$img" --version 2>&1); then
      log "FAIL $img: $out"; failed=1; continue
    fi
    log "ok   $img ($(size "$img")): $out"
  done
  return $failed
}

list() {
  local t c
  t=$(tag)
  for c in "${COMPONENTS[@]}"; do echo "$PREFIX/$c:$t"; done
}

case "${1:-build}" in
  build) build ;;
  base) base ;;
  tag) tag ;;
  list) list ;;
  check) check ;;
  docker-up) docker_up ;;
  docker-down) docker_down ;;
  *) echo "usage: $0 build|base|tag|list|check|docker-up|docker-down" >&2; exit 2 ;;
esac
