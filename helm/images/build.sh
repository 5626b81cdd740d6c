#!/usr/bin/env bash
# Images the chart needs besides the components' own (`make images`):
#
#   dishpatch/rabbitmq:<ver>-debian  the in-chart broker, Debian's rabbitmq-server
#   dishpatch/chart-test:<ver>       the `helm test` client: bash, curl, openssl
#
# With no registry here, each is a root filesystem made of the files of
# Debian packages installed on this machine (their dpkg file lists and their
# dependency closure), imported with `docker import` and finished with a
# Dockerfile (USER, ENV, ENTRYPOINT). A user with a registry needs neither:
# the chart's documented default on kind is the official `rabbitmq` image,
# and rabbitmq.Dockerfile / chart-test.Dockerfile build these two from
# debian:12-slim with apt-get.
#
#   helm/images/build.sh [rabbitmq|chart-test|all]   (default all)
#   helm/images/build.sh tags                        print the references
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX="${DISHPATCH_IMAGE_PREFIX:-dishpatch}"
log() { echo "helm-images: $*" >&2; }
die() { log "error: $*"; exit 1; }

rmq_version() { dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null | sed 's/-.*//'; }
RMQ_REF() { echo "$PREFIX/rabbitmq:$(rmq_version)-debian"; }
TEST_REF() { echo "$PREFIX/chart-test:1"; }

# closure of installed packages the given ones depend on (Depends, Pre-Depends)
closure() {
  apt-cache depends --recurse --installed --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances "$@" 2>/dev/null |
    grep -v '^ ' | sed 's/:.*//; s/^<//; s/>$//' | sort -u |
    while read -r p; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null && echo "$p"
    done
}

rootfs() { # <dir> <packages...>
  local dir=$1; shift
  local pkgs list
  # without the init system and login stack a container never runs
  pkgs=$(closure "$@" base-files | grep -Ev '^(systemd.*|libsystemd-shared|udev|dmsetup|libdevmapper.*|libcryptsetup.*|init-system-helpers|sysvinit-utils|libpam.*|login|passwd|adduser|mount|util-linux.*|logsave|e2fsprogs|kmod|libkmod2|libapparmor1|libseccomp2|libcap2-bin)$')
  list=$(mktemp)
  # every file and symlink the packages own (directories come with them)
  for p in $pkgs; do dpkg -L "$p" 2>/dev/null || true; done | grep '^/' | sort -u |
    while read -r f; do
      if [ -L "$f" ] || { [ -e "$f" ] && [ ! -d "$f" ]; }; then echo "${f#/}"; fi
    done >"$list"
  mkdir -p "$dir/usr"
  # /bin, /lib, /sbin are symlinks into /usr on Debian 12 (merged /usr): make them first
  for l in bin lib lib64 sbin; do
    if [ -L "/$l" ]; then mkdir -p "$dir/usr/$l"; ln -sfn "$(readlink "/$l")" "$dir/$l"; fi
  done
  tar -C / --no-recursion -cf - -T "$list" 2>/dev/null | tar -C "$dir" --keep-directory-symlink -xf -
  rm -f "$list"
  mkdir -p "$dir/etc" "$dir/tmp" "$dir/home/nonroot" "$dir/var/lib/rabbitmq"
  chmod 1777 "$dir/tmp"
  printf 'root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/usr/sbin/nologin\n' >"$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
  cp /etc/nsswitch.conf "$dir/etc/" 2>/dev/null || true
  [ -d /etc/ssl/certs ] && mkdir -p "$dir/etc/ssl" && cp -rL /etc/ssl/certs "$dir/etc/ssl/" 2>/dev/null || true
  chown -R 65532:65532 "$dir/var/lib/rabbitmq" "$dir/home/nonroot"
}

build() { # <ref> <dockerfile> <packages...>
  local ref=$1 df=$2; shift 2
  for p in "$@"; do dpkg-query -W "$p" >/dev/null 2>&1 || die "$p is not installed (apt-get install $p)"; done
  local work; work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  log "rootfs for $ref from Debian packages: $*"
  rootfs "$work/root" "$@"
  tar -C "$work/root" -cf - . | docker import - "$ref-rootfs" >/dev/null
  docker build -q --network none --build-arg "BASE=$ref-rootfs" -t "$ref" -f "$HERE/$df" "$HERE" >/dev/null
  docker rmi "$ref-rootfs" >/dev/null 2>&1 || true
  log "built $ref ($(docker image inspect -f '{{.Size}}' "$ref" | awk '{printf "%.0f MB", $1/1e6}'))"
}

case "${1:-all}" in
  rabbitmq) build "$(RMQ_REF)" rabbitmq.Dockerfile rabbitmq-server dash bash coreutils sed grep procps ;;
  chart-test) build "$(TEST_REF)" chart-test.Dockerfile dash bash curl openssl coreutils sed grep ;;
  all) "$0" rabbitmq; "$0" chart-test ;;
  tags) RMQ_REF; TEST_REF ;;
  *) die "usage: $0 [rabbitmq|chart-test|all|tags]" ;;
esac
