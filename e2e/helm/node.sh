# Sourced by e2e/helm/test.sh: the chart on the real node (make node-up && make images && make node-load).
NS=dishpatch-helm            # release namespace, enforcing restricted
EXNS=dishpatch-helm-examples # another namespace: the operator is cluster-wide
REL=dishpatch
# sed, not head/tail: it reads all, so the writer gets no SIGPIPE under pipefail
RMQ_IMAGE=$(helm/images/build.sh tags | sed -n 1p)
TEST_IMAGE=$(helm/images/build.sh tags | sed -n 2p)
CTR_SOCK="$ROOT/.dev/node/containerd.sock"

PV_DIR="$ROOT/.dev/node/pv"

local_storage() { # a StorageClass with no provisioner and two local PVs on the node, fresh each run
  local node i
  node=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
  kubectl delete pv dishpatch-helm-0 dishpatch-helm-1 --ignore-not-found --wait=true --timeout=60s >/dev/null
  rm -rf "$PV_DIR"
  for i in 0 1; do mkdir -p "$PV_DIR/$i"; chown 65532:65532 "$PV_DIR/$i"; done
  {
    cat <<EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: dishpatch-local}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
EOF
    for i in 0 1; do
      cat <<EOF
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: dishpatch-helm-$i}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: dishpatch-local
  local: {path: $PV_DIR/$i}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [$node]}]
EOF
    done
  } | kubectl apply -f - >/dev/null
}

ledger_charges() { # <ns> <order names...>: "<name> <succeeded charges in the payment ledger>" per order
  local ns=$1; shift
  local pv path
  pv=$(kubectl -n $NS get pvc $REL-payment-ledger -o jsonpath='{.spec.volumeName}')
  path=$(kubectl get pv "$pv" -o jsonpath='{.spec.local.path}')
  kubectl -n "$ns" get orders "$@" -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.metadata.uid}{"\n"}{end}' |
    python3 -c '
import json, sys
charges = {}
for line in open(sys.argv[1]):
    if line.strip():
        e = json.loads(line)
        if e["kind"] == "charge" and e["result"] == "succeeded":
            charges[e["orderUid"]] = charges.get(e["orderUid"], 0) + 1
for line in sys.stdin:
    name, uid = line.split()
    print(name, charges.get(uid, 0))
' "$path/ledger.jsonl"
}

# The images of this tree (hack/images.sh tag) in the node's containerd, and
# a second tag of the same images for the upgrade to roll to.
IMAGE_TAG=${DISHPATCH_IMAGE_TAG:-$(hack/images.sh tag)}

load_chart_images() {
  hack/images.sh docker-up >/dev/null
  local ref c
  for ref in $RMQ_IMAGE $TEST_IMAGE; do
    docker image inspect "$ref" >/dev/null 2>&1 || helm/images/build.sh all
    docker save "$ref" | ctr --address "$CTR_SOCK" -n k8s.io images import - >/dev/null
  done
  for c in operator payment kitchen delivery notification facade; do
    ctr --address "$CTR_SOCK" -n k8s.io images ls -q | grep -x "docker.io/dishpatch/$c:$IMAGE_TAG" >/dev/null ||
      die "dishpatch/$c:$IMAGE_TAG is not on the node: make images && make node-load (or e2e/node/test.sh) first"
    ctr --address "$CTR_SOCK" -n k8s.io images tag --force "docker.io/dishpatch/$c:$IMAGE_TAG" \
      "docker.io/dishpatch/$c:$IMAGE_TAG-upgrade" >/dev/null
  done
}

values() { # <tag>
  # --set-string: a tag of digits only (a short commit hash such as 2257074) is still a string
  echo --set-string image.tag="$1" --set rabbitmq.image.repository="${RMQ_IMAGE%:*}" --set-string rabbitmq.image.tag="${RMQ_IMAGE##*:}" \
    --set tests.image="$TEST_IMAGE" --set timeScale=0.01 --set operator.stageDeadline=20s --set kitchen.replicas=2 \
    --set payment.ledger.persistence.storageClass=dishpatch-local --set rabbitmq.persistence.storageClass=dishpatch-local \
    --set monitoring.podMonitor.enabled=true --set monitoring.prometheusRule.enabled=true --set monitoring.dashboard.enabled=true
}

scrape_check() { # every pod's /metrics through promtool's lint; every series the alerts and dashboard read is served
  local dir; dir=$(mktemp -d)
  local pod c ip port n=0 out
  while read -r pod c ip port; do
    [ -n "$port" ] || continue
    curl -sSf "http://$ip:$port/metrics" -o "$dir/$pod.prom" || die "scraping $pod ($c) at $ip:$port"
    out=$(promtool check metrics <"$dir/$pod.prom" 2>&1) || die "promtool check metrics, $pod ($c): $out"
    n=$((n + 1))
  done < <(kubectl -n $NS get pods -l app.kubernetes.io/instance=$REL -o jsonpath='{range .items[*]}{.metadata.name} {.metadata.labels.app\.kubernetes\.io/component} {.status.podIP} {.spec.containers[0].ports[?(@.name=="admin")].containerPort}{"\n"}{end}')
  [ "$n" -ge 6 ] || die "scraped only $n component pods"
  # the broker's per-queue metrics, as the PodMonitor asks for them
  ip=$(kubectl -n $NS get pod $REL-rabbitmq-0 -o jsonpath='{.status.podIP}')
  curl -sSf "http://$ip:15692/metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count" -o "$dir/rabbitmq.prom" ||
    die "scraping the broker's queue metrics"
  out=$(promtool check metrics <"$dir/rabbitmq.prom" 2>&1) || die "promtool check metrics, broker: $out"
  grep -q '^rabbitmq_detailed_queue_messages{.*queue="dishpatch.payment.dead-letter"' "$dir/rabbitmq.prom" || die "no depth of the payment dead-letter queue"
  local names
  names=$(python3 e2e/helm/metrics_served.py "$CHART/files/alerts.yaml" "$CHART/files/dashboard.json" "$dir") ||
    die "a metric the alerts or dashboard read is not served: $names"
  rm -rf "$dir"
  ok "promtool check metrics passes on all $n component pods' /metrics and the broker's queue metrics; all $names metrics the alerts and dashboard read are served"
}

mint() { # <jwt key> <sub>: an HS256 customer token, as the façade's login would mint it
  local now; now=$(date +%s)
  b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
  local u; u="$(printf '{"alg":"HS256","typ":"JWT"}' | b64url).$(printf '{"sub":"%s","role":"customer","exp":%d,"email":"%s@example.com"}' "$2" $((now + 900)) "$2" | b64url)"
  echo "$u.$(printf '%s' "$u" | openssl dgst -sha256 -hmac "$1" -binary | b64url)"
}

wait_phase() { # <ns> <order> <phase> <seconds>
  local deadline=$((SECONDS + $4)) p=""
  while [ $SECONDS -lt $deadline ]; do
    p=$(kubectl -n "$1" get order "$2" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [ "$p" = "$3" ] && return 0
    case "$p" in Rejected|Cancelled) [ "$3" = "$p" ] || { log "order $1/$2 ended $p"; diagnose "$1" "$2"; return 1; } ;; esac
    sleep 1
  done
  log "order $1/$2 is '$p' after $4s, want $3"; diagnose "$1" "$2"; return 1
}

diagnose() { # <ns> <order>: what a stuck order and the components say, for the CI log
  {
    echo "--- order $1/$2 status"
    kubectl -n "$1" get order "$2" -o yaml 2>&1 | sed -n '/^status:/,$p'
    echo "--- its events"
    kubectl -n "$1" get events --field-selector "involvedObject.name=$2" 2>&1 | tail -20
    echo "--- lease"; kubectl -n $NS get lease $REL-operator -o yaml 2>&1 | sed -n '/^spec:/,$p'
    local pod
    for pod in $(kubectl -n $NS get pods -o name 2>/dev/null); do
      echo "--- $pod (last 40 lines)"; kubectl -n $NS logs "$pod" --tail=40 2>&1
    done
  } | sed 's/^/  | /' >&2
}

memory_report() { # <when>: each pod's memory (working set) and CPU from the kubelet's summary API
  local node
  node=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
  kubectl get --raw "/api/v1/nodes/$node/proxy/stats/summary" | python3 -c '
import json, sys
ns, when = sys.argv[1], sys.argv[2]
for p in sorted(json.load(sys.stdin).get("pods", []), key=lambda p: p["podRef"]["name"]):
    if p["podRef"]["namespace"] != ns:
        continue
    cs = p.get("containers", [])
    ws = sum(c.get("memory", {}).get("workingSetBytes", 0) for c in cs)
    cpu = sum(c.get("cpu", {}).get("usageNanoCores", 0) for c in cs)
    name = p["podRef"]["name"]
    print(f"resources {when}: {name}: memory working set {ws / 2**20:.1f} MiB, cpu {cpu / 1e6:.0f}m")
' "$NS" "$1" | while read -r line; do log "$line"; done
}

node_tests() {
  load_chart_images
  local t1=$IMAGE_TAG t2=$IMAGE_TAG-upgrade
  helm uninstall $REL -n $NS --wait >/dev/null 2>&1 || true
  new_ns $NS restricted; new_ns $EXNS restricted
  local_storage
  # CRDs applied by hand (make up) are adopted by the release that installs them
  for crd in $(kubectl get crd -o name | grep dishpatch.dev); do
    kubectl label "$crd" app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
    kubectl annotate "$crd" meta.helm.sh/release-name=$REL meta.helm.sh/release-namespace=$NS --overwrite >/dev/null
  done

  local t0=$SECONDS
  # shellcheck disable=SC2046
  helm install $REL "$CHART" -n $NS $(values "$t1") --wait --timeout 5m >/dev/null || {
    kubectl -n $NS get pods -o wide; die "helm install --wait"; }
  local install_s=$((SECONDS - t0))
  local notready
  notready=$(kubectl -n $NS get pods -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -v ' True$' || true)
  [ -z "$notready" ] || die "pods not Ready: $notready"
  ok "helm install --wait under restricted: every pod Ready in ${install_s}s ($(kubectl -n $NS get pods --no-headers | wc -l) pods, images $t1)"

  # memory of each component, as the kubelet reports it (stats/summary: working set and RSS per pod)
  memory_report "after install"
  local policies
  policies=$(kubectl -n $NS get networkpolicy -o name | wc -l)
  [ "$policies" = 7 ] || die "want 7 NetworkPolicies (6 components + broker), got $policies"

  t0=$SECONDS
  helm test $REL -n $NS --timeout 5m >/dev/null || { kubectl -n $NS logs $REL-test-order 2>/dev/null | tail -20; die "helm test"; }
  ok "helm test: an order through the façade Service reached Delivered ($((SECONDS - t0))s)"

  kubectl -n $EXNS apply -f examples/ >/dev/null
  wait_phase $EXNS first-order Delivered 180 || die "examples/ in $EXNS"
  ok "kubectl apply -f examples/ in $EXNS: first-order Delivered (cluster-wide operator)"

  # a customer through the façade Service (its ClusterIP, from this host)
  kubectl -n $NS apply -f examples/restaurant.yaml -f examples/couriers.yaml >/dev/null
  local ip key tok url id
  ip=$(kubectl -n $NS get svc $REL-facade -o jsonpath='{.spec.clusterIP}')
  url="http://$ip:8080"
  key=$(kubectl -n $NS get secret $REL-jwt -o jsonpath='{.data.key}' | base64 -d)
  tok=$(mint "$key" cust-helm)
  local body='{"restaurant":"trattoria-roma","items":[{"menuItem":"espresso","quantity":1}],"contact":{"email":"jane@example.com"},"deliveryAddress":{"street":"Torstraße 1","city":"Berlin","postalCode":"10119","country":"DE"},"payment":{"token":"tok_visa"}}'
  local deadline=$((SECONDS + 60)) resp=""
  until resp=$(curl -sS -f "$url/api/v1/orders" -H "Authorization: Bearer $tok" -H 'Content-Type: application/json' -H "Idempotency-Key: host-$RANDOM$RANDOM" -d "$body"); do
    [ $SECONDS -lt $deadline ] || die "placing an order through $url"; sleep 2
  done
  id=$(sed -n 's/.*"id":"\([^"]*\)".*/\1/p' <<<"$resp")
  # follow it live (server-sent events) until Delivered
  (set +o pipefail; timeout 120 curl -sN "$url/api/v1/orders/$id/events" -H "Authorization: Bearer $tok" | grep -m1 -q Delivered) ||
    die "order $id not Delivered on its live stream"
  wait_phase $NS "$id" Delivered 30 || die "order $id"
  ok "a customer placed $id through the façade Service ($url) and followed it live to Delivered"
  scrape_check
  kubectl -n $NS get configmap -l grafana_dashboard=1 -o name | grep -qx "configmap/$REL-dashboard" || die "no dashboard ConfigMap"
  [ "$(kubectl -n $NS get podmonitor,prometheusrule -o name | wc -l)" = 3 ] || die "want 2 PodMonitors and a PrometheusRule"

  # upgrade to another image tag with 20 orders in flight
  # espresso has no stock limit: all 20 must be accepted, paid and delivered
  local names=() i
  for i in $(seq 1 20); do names+=("inflight-$i"); done
  for i in "${names[@]}"; do
    sed -e "s/name: first-order/name: $i/" -e 's/menuItem: margherita/menuItem: espresso/' \
      -e '/menuItem: tiramisu/,/quantity: 1/d' -e '/notes: extra basil/d' examples/order.yaml
    echo ---
  done | kubectl -n $EXNS apply -f - >/dev/null
  [ "$(kubectl -n $EXNS get orders "${names[@]}" --no-headers | wc -l)" = 20 ] || die "20 in-flight orders not created"
  # the upgrade starts while they are on their way (the image tag change rolls every Deployment)
  local inflight
  inflight=$(kubectl -n $EXNS get orders "${names[@]}" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -cvx Delivered || true)
  t0=$SECONDS
  # shellcheck disable=SC2046
  helm upgrade $REL "$CHART" -n $NS $(values "$t2") --wait --timeout 5m >/dev/null || die "helm upgrade"
  local upgrade_s=$((SECONDS - t0))
  for d in $(kubectl -n $NS get deploy -o name); do
    kubectl -n $NS get "$d" -o jsonpath='{.spec.template.spec.containers[0].image}' | grep ":$t2\$" >/dev/null || die "$d not on $t2"
  done
  for n in "${names[@]}"; do wait_phase $EXNS "$n" Delivered 240 || die "in-flight order $n"; done
  local charges
  charges=$(kubectl -n $EXNS get orders "${names[@]}" -o jsonpath='{range .items[*]}{.status.payment.state}{" "}{.status.payment.paymentId}{"\n"}{end}')
  [ "$(grep -c '^Succeeded ' <<<"$charges")" = 20 ] || die "payments: $charges"
  [ "$(awk '{print $2}' <<<"$charges" | sort -u | wc -l)" = 20 ] || die "payment ids not one per order: $charges"
  # the ledger (on its PVC, across the payment pod's replacement) holds exactly one charge per order
  local ledger
  ledger=$(ledger_charges $EXNS "${names[@]}")
  [ "$(awk '$2 == 1' <<<"$ledger" | wc -l)" = 20 ] || die "ledger charges per order: $ledger"
  [ "$inflight" -ge 10 ] || die "only $inflight of 20 orders were still on their way when the upgrade began"
  ok "helm upgrade $t1 -> $t2 rolled every Deployment in ${upgrade_s}s with 20 orders placed ($inflight not yet Delivered as it began); all 20 Delivered, one charge each (status and the ledger on its PVC)"
  memory_report "after 20 orders and an upgrade"

  # leader failover
  local lease=$REL-operator leader
  leader=$(kubectl -n $NS get lease $lease -o jsonpath='{.spec.holderIdentity}')
  [ -n "$leader" ] || die "no operator leader"
  t0=$SECONDS
  kubectl -n $NS delete pod "$leader" --wait=false >/dev/null
  local now=""; deadline=$((SECONDS + 60))
  while [ $SECONDS -lt $deadline ]; do
    now=$(kubectl -n $NS get lease $lease -o jsonpath='{.spec.holderIdentity}')
    [ -n "$now" ] && [ "$now" != "$leader" ] && break
    sleep 0.5
  done
  [ -n "$now" ] && [ "$now" != "$leader" ] || die "no standby took over from $leader"
  local takeover_s=$((SECONDS - t0))
  sed "s/name: first-order/name: after-failover/" examples/order.yaml | kubectl -n $EXNS apply -f - >/dev/null
  wait_phase $EXNS after-failover Delivered 180 || die "order after failover"
  ok "leader $leader deleted: $now took over in ${takeover_s}s (lease duration $(kubectl -n $NS get lease $lease -o jsonpath='{.spec.leaseDurationSeconds}')s) and an order placed after it was Delivered"

  helm uninstall $REL -n $NS --wait >/dev/null || die "helm uninstall"
  kubectl get crd orders.dishpatch.dev restaurants.dishpatch.dev couriers.dishpatch.dev >/dev/null || die "CRDs gone after uninstall"
  [ "$(kubectl -n $EXNS get orders --no-headers | wc -l)" -ge 22 ] || die "orders gone after uninstall"
  ok "helm uninstall left the CRDs and the Orders"
  kubectl delete namespace $NS $EXNS --wait=false >/dev/null
}
