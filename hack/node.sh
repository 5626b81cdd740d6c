#!/usr/bin/env bash
# A real single node joined to the control plane `hack/cluster.sh up` runs:
# kubelet, kube-scheduler and kube-proxy built from the same Kubernetes pin
# (hack/tools.sh), containerd + runc + CNI plugins from Debian (a containerd of
# its own, socket and state under .dev/node), a locally built pause image, and
# CoreDNS (built from its Go module) as a Deployment in kube-system.
#
#   hack/node.sh up      start the node and wait until it is Ready (idempotent)
#   hack/node.sh load    import the `make images` images into the node's containerd
#   hack/node.sh down    stop it and remove what it set up: iptables chains, the bridge, mounts
#   hack/node.sh status  what runs
#
# Network: pods live on 10.244.0.0/24 behind the bridge dishpatch0 (created
# here, gateway 10.244.0.1); Services on 10.96.0.0/16; cluster DNS 10.96.0.10.
# Nothing listens on any other interface: the kubelet serves on the bridge
# address, and pods reach the apiserver (which stays on 127.0.0.1) through a
# forwarder on 10.244.0.1:16443 that the `kubernetes` Service points at.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEV="${DISHPATCH_DEV_DIR:-$ROOT/.dev}"
PKI="$DEV/pki"
LOGS="$DEV/logs"
RUN="$DEV/run"
NODE="$DEV/node"
APISERVER_PORT="${DISHPATCH_APISERVER_PORT:-16443}"
NODE_NAME="${DISHPATCH_NODE_NAME:-dishpatch-node}"
BRIDGE=dishpatch0
POD_CIDR=10.244.0.0/24
NODE_IP=10.244.0.1
CLUSTER_DNS=10.96.0.10
PAUSE_IMAGE="docker.io/dishpatch/pause:3.10"
COREDNS_IMAGE="docker.io/dishpatch/coredns"
CTR_SOCK="$NODE/containerd.sock"
export KUBECONFIG="$DEV/kubeconfig"

log() { echo "node: $*" >&2; }
die() { log "error: $*"; exit 1; }

running() { local f="$RUN/$1.pid"; [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

start() { # start NAME CMD...: detached; the recorded pid is the daemon's own (setsid execs it)
  local name=$1; shift
  if running "$name"; then return 0; fi
  mkdir -p "$LOGS" "$RUN"
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN/$name.pid"
  log "started $name (pid $!, log $LOGS/$name.log)"
}

stop() {
  local pidfile="$RUN/$1.pid"
  [ -f "$pidfile" ] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    log "stopped $1"
  fi
  rm -f "$pidfile"
}

wait_for() { # wait_for WHAT SECONDS CMD...
  local what=$1 limit=$2; shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what not ready after ${limit}s; see $LOGS/"
    sleep 1
  done
}

packages() {
  local missing=() p
  for p in containerd runc containernetworking-plugins iptables conntrack socat gcc libc6-dev; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Certificates for the node's components, from the cluster CA (hack/cluster.sh pki).
issue() { # issue NAME SUBJECT [SAN]: a CA-signed key pair, once
  [ -f "$PKI/$1.crt" ] && return 0
  (
    cd "$PKI"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "$2" \
      -keyout "$1.key" -out "$1.csr" 2>/dev/null
    if [ -n "${3:-}" ]; then
      printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$3" >"$1.ext"
    else
      printf 'extendedKeyUsage=clientAuth\n' >"$1.ext"
    fi
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
  )
}

kubeconfig() { # kubeconfig FILE CERTNAME
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
- name: $2
  user:
    client-certificate-data: $($b64 <"$PKI/$2.crt")
    client-key-data: $($b64 <"$PKI/$2.key")
contexts:
- name: default
  context: {cluster: dishpatch-local, user: $2}
current-context: default
KC
  chmod 600 "$1.tmp"
  mv "$1.tmp" "$1"
}

bridge() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
  fi
  ip addr show dev "$BRIDGE" | grep "inet $NODE_IP/" >/dev/null || ip addr add "$NODE_IP/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Routed pod traffic (pod -> Service -> pod) and bridged replies must pass
  # through iptables for kube-proxy's NAT to be undone.
  modprobe br_netfilter 2>/dev/null || true
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 net.ipv4.ip_forward=1
}

configs() {
  mkdir -p "$NODE/cni" "$NODE/containerd" "$NODE/kubelet" "$NODE/ipam"
  cat >"$NODE/containerd/config.toml" <<EOF
version = 2
root = "$NODE/containerd/root"
state = "$NODE/containerd/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$CTR_SOCK"
[ttrpc]
  address = "$CTR_SOCK.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE/cni"
  netns_mounts_under_state_dir = true
EOF
  # bridge -> portmap -> firewall: the firewall plugin accepts pod traffic in
  # FORWARD, whose policy dockerd may have set to DROP.
  cat >"$NODE/cni/10-dishpatch.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "dishpatch",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$NODE/ipam",
              "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "firewall"}
  ]
}
EOF
  cat >"$NODE/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$CTR_SOCK
clusterDNS: [$CLUSTER_DNS]
clusterDomain: cluster.local
podCIDR: $POD_CIDR
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
maxPods: 60
EOF
}

pause_image() {
  ctr_ images ls -q 2>/dev/null | grep -x "$PAUSE_IMAGE" >/dev/null && return 0
  "$ROOT/hack/images.sh" docker-up
  local ctx src
  ctx=$(mktemp -d)
  src="$(go env GOMODCACHE)/k8s.io/kubernetes@$("$ROOT/hack/tools.sh" version kube)/build/pause/linux/pause.c"
  [ -f "$src" ] || (cd "$ROOT" && go mod download "k8s.io/kubernetes@$("$ROOT/hack/tools.sh" version kube)" 2>/dev/null) || true
  [ -f "$src" ] || die "no pause.c at $src"
  gcc -Os -static -DVERSION=3.10 -o "$ctx/pause" "$src"
  strip "$ctx/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$ctx/Dockerfile"
  docker build -q -t "${PAUSE_IMAGE#docker.io/}" "$ctx" >/dev/null 2>&1
  docker save "${PAUSE_IMAGE#docker.io/}" | ctr_ images import - >/dev/null
  rm -rf "$ctx"
  log "built and imported $PAUSE_IMAGE"
}

coredns_image() {
  local bin version
  "$ROOT/hack/tools.sh" coredns
  bin=$("$ROOT/hack/tools.sh" path coredns)
  version=$("$ROOT/hack/tools.sh" version coredns)
  ctr_ images ls -q 2>/dev/null | grep -x "$COREDNS_IMAGE:$version" >/dev/null && return 0
  "$ROOT/hack/images.sh" docker-up
  local ctx; ctx=$(mktemp -d)
  cp "$bin" "$ctx/coredns"
  printf 'FROM scratch\nCOPY coredns /coredns\nUSER 65532:65532\nENTRYPOINT ["/coredns"]\n' >"$ctx/Dockerfile"
  docker build -q -t "${COREDNS_IMAGE#docker.io/}:$version" "$ctx" >/dev/null 2>&1
  docker save "${COREDNS_IMAGE#docker.io/}:$version" | ctr_ images import - >/dev/null
  rm -rf "$ctx"
  log "built and imported $COREDNS_IMAGE:$version"
}

ctr_() { ctr --address "$CTR_SOCK" -n k8s.io "$@"; }

node_ready() {
  kubectl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -x True >/dev/null
}

up() {
  [ "$(id -u)" = 0 ] || die "the node needs root (containerd, iptables, mounts)"
  packages
  "$ROOT/hack/tools.sh" kubelet
  "$ROOT/hack/tools.sh" kube-scheduler
  "$ROOT/hack/tools.sh" kube-proxy
  "$ROOT/hack/cluster.sh" up
  local started=$SECONDS
  local kubelet scheduler proxy
  kubelet=$("$ROOT/hack/tools.sh" path kubelet)
  scheduler=$("$ROOT/hack/tools.sh" path kube-scheduler)
  proxy=$("$ROOT/hack/tools.sh" path kube-proxy)

  issue "node-$NODE_NAME" "/O=system:nodes/CN=system:node:$NODE_NAME"
  issue kubelet-serving "/CN=system:node:$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
  issue scheduler "/CN=system:kube-scheduler"
  issue kube-proxy "/CN=system:kube-proxy"
  mkdir -p "$NODE"
  kubeconfig "$NODE/kubelet.kubeconfig" "node-$NODE_NAME"
  kubeconfig "$NODE/scheduler.kubeconfig" scheduler
  kubeconfig "$NODE/kube-proxy.kubeconfig" kube-proxy
  bridge
  configs

  start node-containerd containerd --config "$NODE/containerd/config.toml"
  wait_for containerd 30 ctr --address "$CTR_SOCK" version
  pause_image

  # Pods reach the apiserver (on loopback) through the bridge address.
  start node-apiserver-forward socat "TCP-LISTEN:$APISERVER_PORT,bind=$NODE_IP,fork,reuseaddr" "TCP:127.0.0.1:$APISERVER_PORT"
  kubectl apply -f - >/dev/null <<EOF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: dishpatch-node}
addressType: IPv4
endpoints: [{addresses: [$NODE_IP], conditions: {ready: true}}]
ports: [{name: https, port: $APISERVER_PORT, protocol: TCP}]
EOF

  start kube-scheduler "$scheduler" --kubeconfig "$NODE/scheduler.kubeconfig" \
    --authentication-kubeconfig "$NODE/scheduler.kubeconfig" --authorization-kubeconfig "$NODE/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port 10259 --leader-elect=false --v=1
  start kube-proxy "$proxy" --kubeconfig "$NODE/kube-proxy.kubeconfig" --hostname-override "$NODE_NAME" \
    --proxy-mode iptables --cluster-cidr "$POD_CIDR" \
    --conntrack-max-per-core 0 --conntrack-tcp-timeout-established 0 --conntrack-tcp-timeout-close-wait 0 \
    --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 --v=1
  start kubelet "$kubelet" --config "$NODE/kubelet/config.yaml" --kubeconfig "$NODE/kubelet.kubeconfig" \
    --root-dir "$NODE/kubelet/root" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v=1
  wait_for "node $NODE_NAME" 180 node_ready
  log "node $NODE_NAME Ready ($((SECONDS - started))s after the control plane)"

  coredns_image
  coredns
  kubectl -n kube-system rollout status deploy/coredns --timeout 120s >/dev/null
  log "CoreDNS ready at $CLUSTER_DNS ($((SECONDS - started))s)"
}

coredns() {
  local version; version=$("$ROOT/hack/tools.sh" version coredns)
  kubectl apply --server-side --force-conflicts --field-manager dishpatch-node -f - >/dev/null <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: dishpatch:coredns}
rules:
- apiGroups: [""]
  resources: [endpoints, services, pods, namespaces]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: dishpatch:coredns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: dishpatch:coredns}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:1053 {
        errors
        health :8080
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
        }
        cache 30
        reload
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      dnsPolicy: Default
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: coredns
        image: $COREDNS_IMAGE:$version
        imagePullPolicy: Never
        args: [-conf, /etc/coredns/Corefile]
        ports:
        - {name: dns, containerPort: 1053, protocol: UDP}
        - {name: dns-tcp, containerPort: 1053, protocol: TCP}
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}
        readinessProbe:
          httpGet: {path: /ready, port: 8181}
          periodSeconds: 2
        livenessProbe:
          httpGet: {path: /health, port: 8080}
        resources:
          requests: {cpu: 10m, memory: 30Mi}
          limits: {memory: 100Mi}
        volumeMounts: [{name: config, mountPath: /etc/coredns, readOnly: true}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  clusterIP: $CLUSTER_DNS
  selector: {k8s-app: kube-dns}
  ports:
  - {name: dns, port: 53, targetPort: 1053, protocol: UDP}
  - {name: dns-tcp, port: 53, targetPort: 1053, protocol: TCP}
EOF
}

load() {
  "$ROOT/hack/images.sh" docker-up
  running node-containerd || die "the node is not up (make node-up)"
  local ref
  for ref in $("$ROOT/hack/images.sh" list); do
    docker save "$ref" | ctr_ images import - >/dev/null
    log "loaded $ref"
  done
}

drop_chains() { # drop_chains PREFIX TABLE HOOK...: remove chains named PREFIX* and the jumps to them
  local prefix=$1 table=$2; shift 2
  local chains chain hook rule
  chains=$(iptables -t "$table" -S 2>/dev/null | sed -n "s/^-N \\($prefix[A-Za-z0-9_-]*\\)\$/\\1/p" || true)
  for chain in $chains; do
    for hook in "$@"; do
      while rule=$(iptables -t "$table" -S "$hook" 2>/dev/null | grep -m1 -- "-j $chain\( \|\$\)"); do
        eval "iptables -t $table ${rule/-A /-D }" || break
      done
    done
    iptables -t "$table" -F "$chain" 2>/dev/null || true
  done
  for chain in $chains; do iptables -t "$table" -X "$chain" 2>/dev/null || true; done
}

down() {
  stop kubelet
  stop kube-proxy
  stop kube-scheduler
  stop node-apiserver-forward
  if [ -S "$CTR_SOCK" ] && running node-containerd; then
    local t
    for t in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
  fi
  stop node-containerd
  local proxy; proxy=$("$ROOT/hack/tools.sh" path kube-proxy)
  [ -x "$proxy" ] && "$proxy" --cleanup >/dev/null 2>&1 || true
  # The CNI plugins' chains, and what kube-proxy --cleanup leaves of the
  # kubelet's and its own (canaries, KUBE-FIREWALL, KUBE-MARK-MASQ).
  local prefix
  for prefix in CNI- KUBE-; do
    drop_chains "$prefix" filter INPUT FORWARD OUTPUT
    drop_chains "$prefix" nat PREROUTING INPUT OUTPUT POSTROUTING
    drop_chains "$prefix" mangle PREROUTING INPUT FORWARD OUTPUT POSTROUTING
  done
  # Every mount under the node's directory, deepest first.
  if [ -d "$NODE" ]; then
    awk -v d="$NODE/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  local v
  for v in $(ip -o link show type veth 2>/dev/null | awk -F': ' '/master '"$BRIDGE"' / {print $2}' | cut -d@ -f1); do
    ip link delete "$v" 2>/dev/null || true
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE"; log "removed bridge $BRIDGE"; fi
  if [ -f "$KUBECONFIG" ] && kubectl get node "$NODE_NAME" >/dev/null 2>&1; then
    kubectl delete node "$NODE_NAME" --wait=false >/dev/null 2>&1 || true
  fi
  # The pods' cgroups the kubelet made (empty once their tasks are gone).
  find /sys/fs/cgroup -depth -type d -path '*/kubepods*' -exec rmdir {} \; 2>/dev/null || true
  rm -rf "$NODE/kubelet/root" "$NODE/ipam" "$NODE/containerd/state" || true
  # The kubelet keeps container logs in /var/log/pods (not configurable).
  rm -rf /var/log/pods /var/log/containers
  log "node down"
}

status() {
  local n
  for n in node-containerd node-apiserver-forward kube-scheduler kube-proxy kubelet; do
    if running "$n"; then echo "$n: running (pid $(cat "$RUN/$n.pid"))"; else echo "$n: stopped"; fi
  done
  kubectl get node "$NODE_NAME" 2>/dev/null || true
}

case "${1:-}" in
  up) up ;;
  load) load ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|load|down|status" >&2; exit 2 ;;
esac
