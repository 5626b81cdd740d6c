#!/usr/bin/env bash
# The local platform as plain processes on loopback: a real etcd,
# kube-apiserver and kube-controller-manager, a real RabbitMQ, and (for
# `make up`) the dishpatch components. Shared by `make up`, `make down` and
# `make test`.
#
#   hack/cluster.sh up          start the control plane and RabbitMQ (idempotent), apply the CRDs
#   hack/cluster.sh control-plane   the same without RabbitMQ (start it beside with rabbitmq-up)
#   hack/cluster.sh platform    also start the dishpatch components from the built binaries, and Jaeger
#   hack/cluster.sh down        stop everything this script started
#   hack/cluster.sh status      what runs, and where
#   hack/cluster.sh vhost NAME  create a RabbitMQ vhost (for tests) and print its AMQP URL
#   hack/cluster.sh rabbitmq-up|rabbitmq-down   just the broker
#   hack/cluster.sh postgres-up|postgres-down   just the order history database (`make up` starts it)
#   hack/cluster.sh psql        a psql shell on the order history database
#   hack/cluster.sh stop NAME   stop one daemon this script started (etcd, kube-apiserver, ...) by its pidfile
#   hack/cluster.sh clean       down, then delete all local state (.dev/)
#
# State lives in .dev/ (kubeconfig, certificates, etcd data, logs, pids).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEV="${DISHPATCH_DEV_DIR:-$ROOT/.dev}"
PKI="$DEV/pki"
LOGS="$DEV/logs"
RUN="$DEV/run"
ETCD_PORT="${DISHPATCH_ETCD_PORT:-23790}"
ETCD_PEER_PORT="${DISHPATCH_ETCD_PEER_PORT:-23800}"
APISERVER_PORT="${DISHPATCH_APISERVER_PORT:-16443}"
AMQP_PORT="${DISHPATCH_AMQP_PORT:-5672}"
PG_PORT="${DISHPATCH_PG_PORT:-15432}"
PG_DIR="$DEV/postgres"
KUBECONFIG_PATH="$DEV/kubeconfig"
RABBIT_BIN=/usr/lib/rabbitmq/bin
BIN_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dishpatch/target}/debug"
SERVICE_CIDR="10.96.0.0/16"

log() { echo "cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

running() { # running NAME: its recorded pid is alive
  local pidfile="$RUN/$1.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start() { # start NAME CMD...: detached, logging to .dev/logs/NAME.log
  local name=$1; shift
  if running "$name"; then log "$name already running (pid $(cat "$RUN/$name.pid"))"; return 0; fi
  mkdir -p "$LOGS" "$RUN"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  printf '%s\n' "$*" >"$RUN/$name.args"
  log "started $name (pid $!, log $LOGS/$name.log)"
}

restart_if_changed() { # restart_if_changed NAME CMD...: a daemon started with other flags (an older checkout) is stopped
  local name=$1; shift
  running "$name" || return 0
  if [ "$(cat "$RUN/$name.args" 2>/dev/null)" != "$*" ]; then
    log "$name runs with other flags; restarting it"
    stop "$name"
  fi
}

wait_for() { # wait_for WHAT SECONDS CMD...
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then die "$what not ready after ${limit}s; see $LOGS/"; fi
    sleep 0.5
  done
}

pki() {
  [ -f "$PKI/admin.crt" ] && return 0
  log "creating certificates in $PKI"
  mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=dishpatch-local-ca" -keyout ca.key -out ca.crt 2>/dev/null
    issue() { # issue NAME SUBJECT [SAN]
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$2" \
        -keyout "$1.key" -out "$1.csr" 2>/dev/null
      local ext="$1.ext"
      if [ -n "${3:-}" ]; then
        printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$3" >"$ext"
      else
        printf 'extendedKeyUsage=clientAuth\n' >"$ext"
      fi
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$ext"
    }
    issue apiserver "/CN=kube-apiserver" \
      "IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.96.0.1"
    # system:masters gives the admin identity cluster-admin through RBAC.
    issue admin "/O=system:masters/CN=dishpatch-admin"
    issue controller-manager "/CN=system:kube-controller-manager"
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  )
}

# Certificates added after .dev/ was first made: issued when missing.
pki_extra() {
  [ -f "$PKI/apiserver-kubelet-client.crt" ] && return 0
  (
    cd "$PKI"
    # The apiserver's identity towards kubelets (logs, exec): authorized by
    # the kubelet's webhook like any other user.
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
      -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
      -keyout apiserver-kubelet-client.key -out apiserver-kubelet-client.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >apiserver-kubelet-client.ext
    openssl x509 -req -in apiserver-kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver-kubelet-client.ext -out apiserver-kubelet-client.crt 2>/dev/null
    rm -f apiserver-kubelet-client.csr apiserver-kubelet-client.ext
  )
}

write_kubeconfig() { # write_kubeconfig FILE CERTNAME USER
  local b64="base64 -w0"
  cat >"$1.tmp" <<KC
apiVersion: v1
kind: Config
clusters:
- name: dishpatch-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority-data: $($b64 <"$PKI/ca.crt")
users:
- name: $3
  user:
    client-certificate-data: $($b64 <"$PKI/$2.crt")
    client-key-data: $($b64 <"$PKI/$2.key")
contexts:
- name: dishpatch-local
  context:
    cluster: dishpatch-local
    user: $3
    namespace: default
current-context: dishpatch-local
KC
  chmod 600 "$1.tmp"
  mv "$1.tmp" "$1"
}

apiserver_ready() {
  curl -fsS --max-time 2 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz" | grep '^ok$' >/dev/null
}

control_plane() {
  command -v kubectl >/dev/null || die "kubectl is required"
  "$ROOT/hack/tools.sh" all
  local etcd apiserver kcm
  etcd=$("$ROOT/hack/tools.sh" path etcd)
  apiserver=$("$ROOT/hack/tools.sh" path kube-apiserver)
  kcm=$("$ROOT/hack/tools.sh" path kube-controller-manager)
  pki
  pki_extra
  mkdir -p "$DEV/etcd" "$LOGS" "$RUN"

  if ! running etcd; then
    port_busy "$ETCD_PORT" && die "port $ETCD_PORT is taken by another process (set DISHPATCH_ETCD_PORT)"
    start etcd "$etcd" --name dishpatch --data-dir "$DEV/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "dishpatch=http://127.0.0.1:$ETCD_PEER_PORT" \
      --listen-metrics-urls "" --log-level warn
  fi
  wait_for etcd 30 curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"

  # No endpoint reconciler: the "kubernetes" Service can't point at loopback;
  # hack/node.sh points it at the node's bridge address when a node runs.
  # Node authorization and NodeRestriction confine a kubelet to its own node;
  # the apiserver reaches kubelets (logs, exec) with its own client
  # certificate and checks theirs against the cluster CA. Privileged pods are
  # allowed as in any cluster; Pod Security admission refuses them in
  # namespaces that enforce baseline or restricted.
  local apiserver_args=(
      --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT"
      --etcd-servers "http://127.0.0.1:$ETCD_PORT"
      --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key"
      --client-ca-file "$PKI/ca.crt" --anonymous-auth=false
      --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction
      --allow-privileged=true
      --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt"
      --kubelet-client-key "$PKI/apiserver-kubelet-client.key"
      --kubelet-certificate-authority "$PKI/ca.crt"
      --kubelet-preferred-address-types InternalIP
      --service-account-issuer https://kubernetes.default.svc.cluster.local
      --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key"
      --service-cluster-ip-range "$SERVICE_CIDR"
      --cert-dir "$DEV/apiserver-certs"
      --endpoint-reconciler-type none
      --profiling=false --v=1
  )
  restart_if_changed kube-apiserver "$apiserver" "${apiserver_args[@]}"
  if ! running kube-apiserver; then
    wait_for "port $APISERVER_PORT to be free" 30 bash -c "! (exec 3<>/dev/tcp/127.0.0.1/$APISERVER_PORT)"
    start kube-apiserver "$apiserver" "${apiserver_args[@]}"
  fi
  wait_for kube-apiserver 90 apiserver_ready

  write_kubeconfig "$KUBECONFIG_PATH" admin dishpatch-admin
  write_kubeconfig "$DEV/controller-manager.kubeconfig" controller-manager system:kube-controller-manager

  # Every default controller (deployments, replicasets, statefulsets,
  # endpoints and endpoint slices, service accounts, node lifecycle, garbage
  # collection, namespaces, ...) so a node (hack/node.sh) runs real workloads.
  # Each controller acts as its own service account, as in a real cluster.
  local kcm_args=(
      --kubeconfig "$DEV/controller-manager.kubeconfig"
      --controllers '*'
      --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt"
      --use-service-account-credentials
      --leader-elect=false --secure-port 0 --v=1
  )
  restart_if_changed kube-controller-manager "$kcm" "${kcm_args[@]}"
  if ! running kube-controller-manager; then
    start kube-controller-manager "$kcm" "${kcm_args[@]}"
  fi

  export KUBECONFIG="$KUBECONFIG_PATH"
  kubectl apply --server-side --force-conflicts --field-manager dishpatch-crds -f "$ROOT/crds/" >/dev/null
  kubectl wait --for condition=established --timeout 60s -f "$ROOT/crds/" >/dev/null
}

up() {
  control_plane
  rabbitmq_up
  export KUBECONFIG="$KUBECONFIG_PATH"
  log "control plane ready: Kubernetes $(kubectl version -o json | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1) at https://127.0.0.1:$APISERVER_PORT"
}

# RabbitMQ from the distribution's package, run as this user with its state in
# .dev/, listening on loopback only (AMQP, Erlang distribution and epmd).
rabbit_env() {
  export RABBITMQ_NODENAME="dishpatch-$AMQP_PORT@localhost"
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT="$AMQP_PORT"
  export RABBITMQ_DIST_PORT=$((AMQP_PORT + 20000))
  export RABBITMQ_MNESIA_BASE="$DEV/rabbitmq/mnesia"
  export RABBITMQ_LOG_BASE="$LOGS/rabbitmq"
  export RABBITMQ_PID_FILE="$RUN/rabbitmq.pid"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$DEV/rabbitmq/enabled_plugins"
  export RABBITMQ_CONFIG_FILE="$DEV/rabbitmq/rabbitmq"
  export ERL_EPMD_ADDRESS=127.0.0.1
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

rabbitmqctl_() { (rabbit_env; "$RABBIT_BIN/rabbitmqctl" "$@"); }

rabbitmq_up() {
  [ -x "$RABBIT_BIN/rabbitmq-server" ] || die "rabbitmq-server is not installed (hack/deps.sh installs it)"
  if rabbitmqctl_ -q status >/dev/null 2>&1; then log "rabbitmq already running"; return 0; fi
  port_busy "$AMQP_PORT" && die "port $AMQP_PORT is taken by another process (set DISHPATCH_AMQP_PORT)"
  mkdir -p "$DEV/rabbitmq" "$LOGS/rabbitmq" "$RUN"
  echo "[]." >"$DEV/rabbitmq/enabled_plugins"
  # guest may log in over loopback only (RabbitMQ's default, said out loud).
  printf 'loopback_users.guest = true\nlog.console = false\n' >"$DEV/rabbitmq/rabbitmq.conf"
  (rabbit_env; "$RABBIT_BIN/rabbitmq-server" -detached >>"$LOGS/rabbitmq-start.log" 2>&1)
  # await_startup fails at once until the node has registered; poll it.
  wait_for rabbitmq 90 rabbitmqctl_ -q await_startup --timeout 5
  log "started rabbitmq (amqp://127.0.0.1:$AMQP_PORT)"
}

rabbitmq_down() {
  if rabbitmqctl_ -q status >/dev/null 2>&1; then
    rabbitmqctl_ -q stop >/dev/null 2>&1 || true
    log "stopped rabbitmq"
  fi
}

vhost() { # vhost NAME: an isolated vhost for one test, printed as an AMQP URL
  rabbitmqctl_ -q add_vhost "$1" >/dev/null 2>&1 || true
  rabbitmqctl_ -q set_permissions -p "$1" guest ".*" ".*" ".*" >/dev/null
  echo "amqp://guest:guest@127.0.0.1:$AMQP_PORT/$1"
}

# PostgreSQL from the distribution's package holds the order history: data in
# .dev/postgres, TCP on loopback only, password authentication. PostgreSQL
# refuses to run as root, so as root it runs as the package's `postgres` user.
pg_bin() {
  local d; d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$d" ] && [ -x "$d/initdb" ] || die "PostgreSQL is not installed (hack/deps.sh installs it)"
  echo "$d"
}

as_pg() { # as_pg CMD...: as postgres when root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_url() { echo "postgres://dishpatch:$(cat "$PG_DIR/password")@127.0.0.1:$PG_PORT/dishpatch"; }

postgres_up() {
  local bin; bin=$(pg_bin)
  mkdir -p "$PG_DIR/run"
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "creating the order history database in $PG_DIR"
    [ -f "$PG_DIR/password" ] || (umask 077 && openssl rand -hex 16 >"$PG_DIR/password")
    [ "$(id -u)" = 0 ] && chown -R postgres: "$PG_DIR"
    as_pg "$bin/initdb" -D "$PG_DIR/data" -U dishpatch --auth-local=trust --auth-host=scram-sha-256 \
      --pwfile="$PG_DIR/password" -E UTF8 >"$LOGS/postgres-initdb.log" 2>&1 \
      || die "initdb failed; see $LOGS/postgres-initdb.log"
  fi
  [ "$(id -u)" = 0 ] && chown -R postgres: "$PG_DIR"
  if as_pg "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then log "postgres already running"; return 0; fi
  port_busy "$PG_PORT" && die "port $PG_PORT is taken by another process (set DISHPATCH_PG_PORT)"
  as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -w -t 60 -l "$PG_DIR/server.log" \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR/run" start >/dev/null \
    || die "postgres did not start; see $PG_DIR/server.log"
  as_pg "$bin/psql" -h "$PG_DIR/run" -p "$PG_PORT" -U dishpatch -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'dishpatch'" | grep -q 1 \
    || as_pg "$bin/createdb" -h "$PG_DIR/run" -p "$PG_PORT" -U dishpatch dishpatch
  log "started postgres (127.0.0.1:$PG_PORT, database dishpatch)"
}

postgres_down() {
  [ -f "$PG_DIR/data/PG_VERSION" ] || return 0
  local bin; bin=$(pg_bin)
  if as_pg "$bin/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null && log "stopped postgres"
  fi
}

# The dishpatch components, as `make up` runs them: built binaries, logs in
# .dev/logs, admin endpoints on loopback.
platform() {
  [ -x "$BIN_DIR/dishpatch-operator" ] || die "build first: cargo build --workspace --bins"
  export KUBECONFIG="$KUBECONFIG_PATH"
  local amqp="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
  local ns="${DISHPATCH_NAMESPACE:-default}" scale="${DISHPATCH_TIME_SCALE:-0.01}"
  local logfmt="${LOG_FORMAT:-json}"
  # Jaeger receives every component's spans (OTLP/HTTP) and shows them at :16686.
  local jaeger; jaeger=$("$ROOT/hack/tools.sh" path jaeger)
  local otel=()
  if [ -x "$jaeger" ]; then
    start jaeger "$jaeger" --config "file:$ROOT/hack/jaeger.yaml"
    otel=(OTEL_EXPORTER_OTLP_ENDPOINT="${OTEL_EXPORTER_OTLP_ENDPOINT:-http://127.0.0.1:4318}")
  fi
  # Terminal orders go to the history in PostgreSQL before their delete.
  postgres_up
  local history; history=$(pg_url)
  start dishpatch-operator env LOG_FORMAT="$logfmt" "${otel[@]}" DISHPATCH_ARCHIVE_URL="$history" \
    "$BIN_DIR/dishpatch-operator" run --namespace "$ns" --amqp-url "$amqp" --admin-addr 127.0.0.1:9090
  start dishpatch-payment env LOG_FORMAT="$logfmt" "${otel[@]}" "$BIN_DIR/dishpatch-payment" run \
    --amqp-url "$amqp" --admin-addr 127.0.0.1:9091 --gateway simulated --ledger "$DEV/payment-ledger.jsonl"
  start dishpatch-kitchen env LOG_FORMAT="$logfmt" "${otel[@]}" "$BIN_DIR/dishpatch-kitchen" run \
    --namespace "$ns" --amqp-url "$amqp" --admin-addr 127.0.0.1:9092 --time-scale "$scale"
  start dishpatch-delivery env LOG_FORMAT="$logfmt" "${otel[@]}" "$BIN_DIR/dishpatch-delivery" run \
    --namespace "$ns" --amqp-url "$amqp" --admin-addr 127.0.0.1:9093 --time-scale "$scale" --auto-accept
  # A real SMTP server that keeps every e-mail in .dev/mail (a Maildir).
  local venv="${DISHPATCH_CACHE:-$HOME/.cache/dishpatch}/venv"
  if [ -x "$venv/bin/python" ]; then
    mkdir -p "$DEV/mail/tmp" "$DEV/mail/new" "$DEV/mail/cur"
    start smtp-sink "$venv/bin/python" -m aiosmtpd -n -l 127.0.0.1:2525 -c aiosmtpd.handlers.Mailbox "$DEV/mail"
  fi
  start dishpatch-notification env LOG_FORMAT="$logfmt" "${otel[@]}" "$BIN_DIR/dishpatch-notification" run \
    --amqp-url "$amqp" --admin-addr 127.0.0.1:9094 --smtp-host 127.0.0.1 --smtp-port 2525
  [ -f "$DEV/facade-jwt.key" ] || (umask 077 && openssl rand -hex 32 >"$DEV/facade-jwt.key")
  start dishpatch-facade env LOG_FORMAT="$logfmt" "${otel[@]}" DISHPATCH_ARCHIVE_URL="$history" \
    "$BIN_DIR/dishpatch-facade" run \
    --listen 127.0.0.1:8080 --namespace "$ns" --jwt-key-file "$DEV/facade-jwt.key" --dev-login
}

PLATFORM=(dishpatch-facade dishpatch-notification smtp-sink dishpatch-delivery dishpatch-kitchen dishpatch-payment dishpatch-operator jaeger)

platform_down() {
  local name
  for name in "${PLATFORM[@]}"; do stop "$name"; done
}

stop() { # stop NAME: TERM, then KILL after 10s
  local pidfile="$RUN/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    log "stopped $1"
  fi
  rm -f "$pidfile"
}

down() {
  platform_down
  postgres_down
  rabbitmq_down
  stop kube-controller-manager
  stop kube-apiserver
  stop etcd
}

status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager "${PLATFORM[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; fi
  done
  if rabbitmqctl_ -q status >/dev/null 2>&1; then echo "rabbitmq: running (amqp://127.0.0.1:$AMQP_PORT)"; else echo "rabbitmq: stopped"; fi
  if [ -f "$PG_DIR/data/postmaster.pid" ]; then echo "postgres: running (127.0.0.1:$PG_PORT, hack/cluster.sh psql)"; else echo "postgres: stopped"; fi
  echo "kubeconfig: $KUBECONFIG_PATH"
}

case "${1:-}" in
  up) up ;;
  control-plane) control_plane ;;
  stop) stop "${2:?daemon name}" ;;
  platform) platform ;;
  vhost) vhost "${2:?vhost name}" ;;
  rabbitmq-up) rabbitmq_up ;;     # just the broker (with DISHPATCH_DEV_DIR/DISHPATCH_AMQP_PORT: a second one)
  rabbitmq-down) rabbitmq_down ;;
  postgres-up) postgres_up ;;
  postgres-down) postgres_down ;;
  psql) exec env PGPASSWORD="$(cat "$PG_DIR/password")" "$(pg_bin)/psql" -h 127.0.0.1 -p "$PG_PORT" -U dishpatch dishpatch ;;
  down) down ;;
  status) status ;;
  clean) down; rm -rf "$DEV" ;;
  *) echo "usage: $0 up|control-plane|platform|down|status|vhost NAME|stop NAME|clean" >&2; exit 2 ;;
esac
