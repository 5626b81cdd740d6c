#!/usr/bin/env bash
# The node test: from a clone, `make node-up`, the images, `make node-load`,
# then a pod from each image in a namespace that enforces the `restricted`
# Pod Security level: each runs as 65532 with a read-only root and passes its
# /readyz probe, talking to the apiserver (in-cluster config, through the
# `kubernetes` Service) and to a RabbitMQ pod through a ClusterIP Service by
# DNS name. Also: a privileged pod is refused, `kubectl logs` and
# `kubectl exec` work, and a pod reaches another by Service DNS name.
# Prints one line: "node test: PASS ..." or "node test: FAIL: ...".
#
# Images: the debug build `make test` already made (stripped), unless
# DISHPATCH_IMAGE_PROFILE=release; a release build is a second cold cargo
# build (~20 min here), which is what `make images` does for users.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dishpatch/target}"
export KUBECONFIG="$ROOT/.dev/kubeconfig"
export DISHPATCH_IMAGE_PROFILE="${DISHPATCH_IMAGE_PROFILE:-debug}"
# One tag for the whole run, even if HEAD moves meanwhile.
export DISHPATCH_IMAGE_TAG="${DISHPATCH_IMAGE_TAG:-$(hack/images.sh tag)}"
NS=dp-node-test
COMPONENTS=(operator payment kitchen delivery notification facade)
step=setup
t0=$SECONDS

log() { echo "node test: $*" >&2; }
diagnostics() {
  kubectl get nodes -o wide 2>&1 || true
  kubectl -n "$NS" get pods -o wide 2>&1 || true
  kubectl -n "$NS" get events --sort-by=.lastTimestamp 2>&1 | tail -20 || true
  local p
  for p in $(kubectl -n "$NS" get pods -o name 2>/dev/null); do
    echo "--- $p"; kubectl -n "$NS" logs "$p" --tail 15 2>&1 || true
  done
}
trap 'rc=$?; if [ $rc -ne 0 ]; then diagnostics >&2; echo "node test: FAIL at step \"$step\" after $((SECONDS - t0))s"; fi' EXIT

step="make node-up"
s=$SECONDS
make --no-print-directory node-up
node_up_s=$((SECONDS - s))

step="images"
s=$SECONDS
cargo build --workspace --bins
if [ "$DISHPATCH_IMAGE_PROFILE" = release ]; then make --no-print-directory images; else hack/images.sh build; fi
# The broker image the chart's node test uses too: Debian's rabbitmq-server, from this host's packages.
hack/images.sh docker-up >/dev/null
rabbit=$(helm/images/build.sh tags | sed -n 1p) # not head: no SIGPIPE under pipefail
docker image inspect "$rabbit" >/dev/null 2>&1 || helm/images/build.sh rabbitmq
images_s=$((SECONDS - s))

step="make node-load"
s=$SECONDS
make --no-print-directory node-load
docker save "$rabbit" | ctr --address "$ROOT/.dev/node/containerd.sock" -n k8s.io images import - >/dev/null
load_s=$((SECONDS - s))
tag=$DISHPATCH_IMAGE_TAG

step="namespace (restricted)"
kubectl delete namespace "$NS" --ignore-not-found --wait=true --timeout 120s >/dev/null
kubectl create namespace "$NS" >/dev/null
kubectl label namespace "$NS" pod-security.kubernetes.io/enforce=restricted \
  pod-security.kubernetes.io/enforce-version=latest >/dev/null

step="a privileged pod is refused"
if out=$(kubectl -n "$NS" run privileged --image "$rabbit" --image-pull-policy Never --restart Never \
  --overrides '{"spec":{"containers":[{"name":"privileged","image":"'"$rabbit"'","securityContext":{"privileged":true}}]}}' 2>&1); then
  echo "$out"; false
fi
grep -q 'violates PodSecurity "restricted' <<<"$out" || { echo "$out"; false; }

step="pods"
restricted='
        securityContext:
          allowPrivilegeEscalation: false
          readOnlyRootFilesystem: true
          capabilities: {drop: [ALL]}'
pod_security='
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        fsGroup: 65532
        seccompProfile: {type: RuntimeDefault}'
amqp_password=$(openssl rand -hex 16)
amqp="amqp://dishpatch:$amqp_password@rabbitmq.$NS.svc.cluster.local:5672/%2f"
deployment() { # deployment NAME IMAGE PORT ARGS-JSON PROBE-YAML [extra volume yaml]
  cat <<EOF
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: $1, namespace: $NS}
spec:
  replicas: 1
  selector: {matchLabels: {app: $1}}
  template:
    metadata: {labels: {app: $1}}
    spec:
      serviceAccountName: dishpatch
      enableServiceLinks: false$pod_security
      containers:
      - name: $1
        image: $2
        imagePullPolicy: Never
        args: $4
        env: [{name: LOG_FORMAT, value: json}]
        ports: [{containerPort: $3}]$restricted
        readinessProbe:
$5
          periodSeconds: 2
        volumeMounts:
        - {name: data, mountPath: /data}
        - {name: tmp, mountPath: /tmp}
        - {name: jwt, mountPath: /etc/dishpatch, readOnly: true}
      volumes:
      - {name: data, emptyDir: {}}
      - {name: tmp, emptyDir: {}}
      - {name: jwt, secret: {secretName: facade-jwt}}
---
apiVersion: v1
kind: Service
metadata: {name: $1, namespace: $NS}
spec:
  selector: {app: $1}
  ports: [{port: $3, targetPort: $3}]
EOF
}
rabbitmq() { # rabbitmq IMAGE: one broker with a user of its own (guest may log in only from loopback)
  cat <<EOF
---
apiVersion: v1
kind: ConfigMap
metadata: {name: rabbitmq, namespace: $NS}
data:
  rabbitmq.conf: |
    listeners.tcp.default = 5672
  enabled_plugins: |
    [].
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: rabbitmq, namespace: $NS}
spec:
  replicas: 1
  selector: {matchLabels: {app: rabbitmq}}
  template:
    metadata: {labels: {app: rabbitmq}}
    spec:
      automountServiceAccountToken: false
      enableServiceLinks: false$pod_security
      containers:
      - name: rabbitmq
        image: $1
        imagePullPolicy: Never
        env:
        - {name: RABBITMQ_NODENAME, value: rabbit@localhost}
        - {name: RABBITMQ_CONFIG_FILE, value: /etc/rabbitmq/rabbitmq}
        - {name: RABBITMQ_ENABLED_PLUGINS_FILE, value: /etc/rabbitmq/enabled_plugins}
        - {name: HOME, value: /var/lib/rabbitmq}
        - {name: RABBITMQ_LOG_BASE, value: /var/lib/rabbitmq/log}
        - {name: RABBITMQ_LOGS, value: "-"}
        - {name: RABBITMQ_DEFAULT_USER, value: dishpatch}
        - {name: RABBITMQ_DEFAULT_PASS, value: "$amqp_password"}
        ports: [{containerPort: 5672}]$restricted
        readinessProbe:
          tcpSocket: {port: 5672}
          periodSeconds: 2
        volumeMounts:
        - {name: data, mountPath: /var/lib/rabbitmq}
        - {name: config, mountPath: /etc/rabbitmq}
        - {name: tmp, mountPath: /tmp}
      volumes:
      - {name: data, emptyDir: {}}
      - {name: config, configMap: {name: rabbitmq}}
      - {name: tmp, emptyDir: {}}
---
apiVersion: v1
kind: Service
metadata: {name: rabbitmq, namespace: $NS}
spec:
  selector: {app: rabbitmq}
  ports: [{port: 5672, targetPort: 5672}]
EOF
}
readyz() { printf '          httpGet: {path: /readyz, port: %s}' "$1"; }
admin='"--admin-addr", "0.0.0.0:9090"'
{
  cat <<EOF
apiVersion: v1
kind: ServiceAccount
metadata: {name: dishpatch, namespace: $NS}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: dishpatch-node-test}
rules:
- apiGroups: [dishpatch.dev]
  resources: ["*"]
  verbs: ["*"]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch, update, get, list, watch]
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: ["*"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: dishpatch-node-test}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: dishpatch-node-test}
subjects: [{kind: ServiceAccount, name: dishpatch, namespace: $NS}]
---
apiVersion: v1
kind: Secret
metadata: {name: facade-jwt, namespace: $NS}
stringData: {key: "$(openssl rand -hex 32)"}
EOF
  rabbitmq "docker.io/$rabbit"
  deployment operator "docker.io/dishpatch/operator:$tag" 9090 \
    "[\"run\", \"--namespace\", \"$NS\", \"--amqp-url\", \"$amqp\", $admin]" "$(readyz 9090)"
  deployment payment "docker.io/dishpatch/payment:$tag" 9090 \
    "[\"run\", \"--amqp-url\", \"$amqp\", $admin, \"--gateway\", \"simulated\", \"--ledger\", \"/data/ledger.jsonl\"]" "$(readyz 9090)"
  deployment kitchen "docker.io/dishpatch/kitchen:$tag" 9090 \
    "[\"run\", \"--namespace\", \"$NS\", \"--amqp-url\", \"$amqp\", $admin, \"--time-scale\", \"0.01\"]" "$(readyz 9090)"
  deployment delivery "docker.io/dishpatch/delivery:$tag" 9090 \
    "[\"run\", \"--namespace\", \"$NS\", \"--amqp-url\", \"$amqp\", $admin, \"--time-scale\", \"0.01\", \"--auto-accept\"]" "$(readyz 9090)"
  deployment notification "docker.io/dishpatch/notification:$tag" 9090 \
    "[\"run\", \"--amqp-url\", \"$amqp\", $admin, \"--smtp-host\", \"127.0.0.1\", \"--smtp-port\", \"2525\"]" "$(readyz 9090)"
  deployment facade "docker.io/dishpatch/facade:$tag" 8080 \
    "[\"run\", \"--listen\", \"0.0.0.0:8080\", \"--admin-addr\", \"0.0.0.0:9090\", \"--namespace\", \"$NS\", \"--jwt-key-file\", \"/etc/dishpatch/key\", \"--dev-login\"]" "$(readyz 9090)"
} >"$ROOT/.dev/node-test.yaml"
s=$SECONDS
kubectl apply -f "$ROOT/.dev/node-test.yaml" >/dev/null
kubectl -n "$NS" rollout status deploy/rabbitmq --timeout 180s >/dev/null
for c in "${COMPONENTS[@]}"; do
  step="pod $c ready"
  kubectl -n "$NS" rollout status "deploy/$c" --timeout 180s >/dev/null
done
ready_s=$((SECONDS - s))

step="non-root, read-only root"
for c in "${COMPONENTS[@]}"; do
  pod=$(kubectl -n "$NS" get pod -l "app=$c" -o jsonpath='{.items[0].metadata.name}')
  uid=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.spec.securityContext.runAsUser}')
  ro=$(kubectl -n "$NS" get pod "$pod" -o jsonpath='{.spec.containers[0].securityContext.readOnlyRootFilesystem}')
  [ "$uid" = 65532 ] && [ "$ro" = true ] || { echo "$pod: runAsUser=$uid readOnlyRootFilesystem=$ro"; false; }
done

step="kubectl logs"
kubectl -n "$NS" logs deploy/operator --tail 50 | grep . >/dev/null || { echo "no operator logs"; false; }

step="kubectl exec"
kubectl -n "$NS" exec deploy/payment -- /dishpatch --version | grep . >/dev/null || { echo "exec printed nothing"; false; }

step="a pod reaches another through a ClusterIP Service by DNS name"
# The operator's CLI, inside its pod, lists the dead-letter queues of the
# broker pod it finds as rabbitmq.$NS.svc.cluster.local.
kubectl -n "$NS" exec deploy/operator -- /dishpatch dead-letters --amqp-url "$amqp" list >/dev/null

step="done"
# Passed: free the node (a failed run keeps the namespace to look at).
kubectl delete namespace "$NS" --wait=false >/dev/null
echo "node test: PASS (node-up ${node_up_s}s, images ${images_s}s, load ${load_s}s, Deployments Ready ${ready_s}s; total $((SECONDS - t0))s)"
