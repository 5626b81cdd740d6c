#!/usr/bin/env bash
# The Helm chart and kind-config.yaml, tested in layers (docs/helm.md):
#
#   e2e/helm/test.sh static   kind-config.yaml through kind's own loader; helm lint --strict;
#                             values the schema must refuse; CRDs rendered = crds/
#   e2e/helm/test.sh server   + helm template | kubectl apply --dry-run=server against the
#                             local apiserver (hack/cluster.sh up); helm install (no pods
#                             needed) and the RBAC table with kubectl auth can-i; uninstall
#                             leaves the CRDs
#   e2e/helm/test.sh node     on the real node (make node-up && make images && make node-load):
#                             install --wait under `restricted`, helm test, examples/ in another
#                             namespace, upgrade with 20 orders in flight, leader failover,
#                             uninstall keeps CRDs and Orders
#   e2e/helm/test.sh all      static, server, node (default: static server)
set -Eeuo pipefail
# a failing command anywhere (the sourced node.sh too) says where, not just an exit code
trap 'log "FAIL: exit $? at ${BASH_SOURCE[0]#"$ROOT"/}:$LINENO: $BASH_COMMAND"' ERR
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
export KUBECONFIG="${KUBECONFIG:-$ROOT/.dev/kubeconfig}"
CHART="$ROOT/helm/dishpatch"
KUBE_VERSION=$(sed -n 's/^KUBE_VERSION="\${KUBE_VERSION:-\(v[0-9.]*\)}"/\1/p' hack/tools.sh)
NODE_PORT=$(sed -n 's/^    nodePort: \([0-9]*\)$/\1/p' "$CHART/values.yaml")
T0=$SECONDS
pass=0
log() { printf '[helm-test %4ds] %s\n' $((SECONDS - T0)) "$*" >&2; }
ok() { pass=$((pass + 1)); log "ok: $*"; }
die() { log "FAIL: $*"; exit 1; }

hack/helm-tools.sh helm >/dev/null
HELM=$(hack/helm-tools.sh path helm)
helm() { "$HELM" "$@"; }

static() {
  hack/helm-tools.sh kindcheck >/dev/null
  "$(hack/helm-tools.sh path kindcheck)" -kube-version "$KUBE_VERSION" -node-port "$NODE_PORT" -host-port 8080 kind-config.yaml >/dev/null \
    || die "kind-config.yaml"
  ok "kind-config.yaml loads and validates with kind's loader (1 control-plane + 1 worker, $NODE_PORT -> 8080, Kubernetes ${KUBE_VERSION%.*})"

  helm lint --strict "$CHART" >/dev/null || { helm lint --strict "$CHART"; die "helm lint --strict"; }
  helm lint --strict "$CHART" --set payment.gateway=stripe --set payment.stripe.apiKey=sk_test_x \
    --set rabbitmq.external.enabled=true --set rabbitmq.external.existingSecret=amqp \
    --set-json 'watchNamespaces=["shop"]' --set facade.ingress.enabled=true \
    --set notification.webhook.url=https://hooks.example.com/x >/dev/null || die "helm lint --strict (stripe, external broker, one namespace, ingress, webhook)"
  ok "helm lint --strict (defaults, and stripe + external broker + one namespace + ingress + webhook)"

  # values the schema (or a template check) must refuse, with the message that names the problem
  refuse() { # <what it must say> <helm args...>
    local want=$1; shift
    local out
    if out=$(helm template t "$CHART" "$@" 2>&1); then die "accepted: $*"; fi
    grep -qF -- "$want" <<<"$out" || die "refused $*, but without '$want': $out"
  }
  refuse "additional properties 'replicaCount' not allowed" --set replicaCount=3
  refuse "additional properties 'bogus' not allowed" --set operator.bogus=1
  refuse "at '/operator/replicas': got string, want integer" --set operator.replicas=two
  refuse "at '/payment/gateway': value must be one of 'simulated', 'stripe'" --set payment.gateway=paypal
  refuse "at '/payment/replicas': maximum: got 2, want 1" --set payment.replicas=2
  refuse "at '/kitchen/replicas': maximum: got 51, want 50" --set kitchen.replicas=51
  refuse "at '/kitchen/adoptAfter': 'soon' does not match pattern" --set kitchen.adoptAfter=soon
  refuse "at '/payment/ledger/persistence/enabled'" --set payment.ledger.persistence.enabled=sometimes
  refuse "additional properties 'enable' not allowed" --set networkPolicy.enable=false
  refuse "must not be guest" --set rabbitmq.password=guest
  refuse "must not be guest" --set rabbitmq.username=guest
  refuse "at '/facade/service/nodePort'" --set facade.service.nodePort=8080
  refuse "at '/watchNamespaces': maxItems: got 2, want 1" --set-json 'watchNamespaces=["a","b"]'
  refuse "at '/operator/leaseDuration': 'fifteen' does not match pattern" --set operator.leaseDuration=fifteen
  # one number and unit: what the façade's --jwt-key-grace parses
  refuse "at '/facade/jwt/keyGrace': '1h30m' does not match pattern" --set facade.jwt.keyGrace=1h30m
  refuse "at '/notification/claimTimeout': 'soon' does not match pattern" --set notification.claimTimeout=soon
  refuse "at '/notification/emailEvents/0': value must be one of" --set-json 'notification.emailEvents=["kitchen.done"]'
  refuse "payment.stripe.apiKey or payment.stripe.existingSecret is required" --set payment.gateway=stripe
  refuse "at '/monitoring/podMonitor/interval': 'often' does not match pattern" --set monitoring.podMonitor.interval=often
  refuse "at '/otel/endpoint': 'jaeger:4318' does not match pattern" --set otel.endpoint=jaeger:4318
  ok "the schema refuses unknown keys, wrong types, guest/guest, 2 simulated payment replicas, 51 kitchens, unknown e-mail events, bad enums, durations and OTLP endpoints"

  # otel.endpoint reaches every component, and nothing is exported without it
  local otlp n
  otlp=$(helm template t "$CHART" --set otel.endpoint=http://jaeger-collector.tracing:4318 --show-only templates/deployments.yaml)
  n=$(grep -c 'value: "http://jaeger-collector.tracing:4318"' <<<"$otlp" || true)
  [ "$n" = 6 ] || die "otel.endpoint reached $n of 6 Deployments"
  ! helm template t "$CHART" --show-only templates/deployments.yaml | grep -q OTEL_EXPORTER_OTLP_ENDPOINT ||
    die "OTEL_EXPORTER_OTLP_ENDPOINT is set with no otel.endpoint"
  ok "otel.endpoint sets OTEL_EXPORTER_OTLP_ENDPOINT in all 6 Deployments, and none without it"

  # archive.existingSecret gives the operator and the façade (only) the history database's URL
  local history
  history=$(helm template t "$CHART" --set archive.existingSecret=dishpatch-history --show-only templates/deployments.yaml)
  n=$(grep -c 'name: DISHPATCH_ARCHIVE_URL' <<<"$history" || true)
  [ "$n" = 2 ] || die "archive.existingSecret reached $n Deployments, want 2 (operator, façade)"
  grep -A4 'name: DISHPATCH_ARCHIVE_URL' <<<"$history" | grep -q 'name: dishpatch-history' ||
    die "DISHPATCH_ARCHIVE_URL does not come from the archive Secret"
  ! helm template t "$CHART" --show-only templates/deployments.yaml | grep -q DISHPATCH_ARCHIVE_URL ||
    die "DISHPATCH_ARCHIVE_URL is set with no archive.existingSecret"
  refuse "at '/archive/existingSecret'" --set archive.existingSecret=Not_A_Name
  ok "archive.existingSecret reaches the operator and the façade only, from the Secret, and none without it"

  # Stripe webhooks: the listener, its Secret key, Service, Ingress path and NetworkPolicy port, all or nothing
  local hooks=(--set payment.gateway=stripe --set payment.stripe.apiKey=sk_test_x --set payment.stripe.webhook.enabled=true
    --set payment.stripe.webhook.webhookSecret=whsec_test --set facade.ingress.enabled=true --set facade.ingress.host=shop.example)
  local rendered_hooks; rendered_hooks=$(helm template t "$CHART" "${hooks[@]}")
  for want in '--stripe-webhook-listen=0.0.0.0:8081' 'webhook-secret:' 'name: t-dishpatch-payment-webhooks' \
    'path: /webhooks/stripe' 'port: webhooks'; do
    grep -qF -- "$want" <<<"$rendered_hooks" || die "payment.stripe.webhook.enabled renders no '$want'"
  done
  ! helm template t "$CHART" --set payment.gateway=stripe --set payment.stripe.apiKey=sk_test_x | grep -qE 'stripe-webhook|payment-webhooks|webhook-secret' ||
    die "webhook objects rendered without payment.stripe.webhook.enabled"
  refuse "payment.stripe.webhook.webhookSecret" --set payment.gateway=stripe --set payment.stripe.apiKey=sk_test_x --set payment.stripe.webhook.enabled=true
  refuse "at '/payment/stripe/webhook/webhookSecret'" --set payment.stripe.webhook.webhookSecret=secret
  ok "payment.stripe.webhook.enabled renders the listener, Secret key, Service, Ingress path and NetworkPolicy port, and nothing without it"

  # CRDs come from crds/ (a symlink, no copy): what the chart renders is what crds/ holds, plus keep
  local rendered; rendered=$(mktemp)
  helm template t "$CHART" --show-only templates/crds.yaml >"$rendered"
  python3 - "$rendered" crds/*.yaml <<'PY' || die "rendered CRDs differ from crds/"
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
rendered = {d["metadata"]["name"]: d for d in docs}
for path in sys.argv[2:]:
    want = yaml.safe_load(open(path))
    got = rendered.pop(want["metadata"]["name"])
    assert got["metadata"]["annotations"].pop("helm.sh/resource-policy") == "keep", path
    if not got["metadata"]["annotations"]: del got["metadata"]["annotations"]
    got["metadata"]["labels"].pop("app.kubernetes.io/part-of")
    if not got["metadata"]["labels"]: del got["metadata"]["labels"]
    assert got == want, f"{path} differs once rendered"
assert not rendered, rendered.keys()
PY
  rm -f "$rendered"
  ok "rendered CRDs equal crds/*.yaml (plus helm.sh/resource-policy: keep)"
  monitoring_static
}

# the alerts, their unit tests, the dashboard's queries, and what the chart renders of them
monitoring_static() {
  local alerts=$CHART/files/alerts.yaml dashboard=$CHART/files/dashboard.json out
  out=$(promtool check rules "$alerts" 2>&1) || die "promtool check rules $alerts: $out"
  out=$(promtool test rules e2e/helm/alerts.test.yaml 2>&1) || die "promtool test rules: $out"
  # every panel's query is PromQL that parses: as recording rules, through promtool
  local queries; queries=$(mktemp)
  python3 - "$dashboard" >"$queries" <<'PY' || die "dashboard.json"
import json, sys, yaml
d = json.load(open(sys.argv[1]))
ids = [p["id"] for p in d["panels"]]
assert len(ids) == len(set(ids)), "panel ids repeat"
assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "namespace"}
rules = []
for p in d["panels"]:
    assert p["datasource"]["uid"] == "${datasource}", p["title"]
    for t in p["targets"]:
        rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}",
                      "expr": t["expr"].replace("$namespace", "x")})
print(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
PY
  out=$(promtool check rules "$queries" 2>&1) || die "a dashboard query does not parse: $out"
  local n_queries; n_queries=$(grep -c 'record:' "$queries")
  rm -f "$queries"
  # rendered: the PrometheusRule is alerts.yaml, the ConfigMap holds dashboard.json, one
  # PodMonitor per component set (and one for the in-chart broker)
  local on=(--set monitoring.podMonitor.enabled=true --set monitoring.prometheusRule.enabled=true --set monitoring.dashboard.enabled=true
    --set-json 'monitoring.prometheusRule.labels={"release":"prom"}')
  rendered=$(mktemp)
  helm template t "$CHART" "${on[@]}" --show-only templates/monitoring.yaml >"$rendered" || die "monitoring templates"
  python3 - "$rendered" "$alerts" "$dashboard" <<'PY' || die "rendered monitoring objects"
import json, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kinds = sorted(d["kind"] for d in docs)
assert kinds == ["ConfigMap", "PodMonitor", "PodMonitor", "PrometheusRule"], kinds
rule = next(d for d in docs if d["kind"] == "PrometheusRule")
assert rule["spec"] == yaml.safe_load(open(sys.argv[2])), "PrometheusRule spec differs from alerts.yaml"
assert rule["metadata"]["labels"]["release"] == "prom"
cm = next(d for d in docs if d["kind"] == "ConfigMap")
assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
assert json.loads(cm["data"]["dishpatch.json"]) == json.load(open(sys.argv[3])), "dashboard differs"
broker = next(d for d in docs if d["kind"] == "PodMonitor" and d["metadata"]["name"].endswith("-rabbitmq"))
assert broker["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
PY
  [ -z "$(helm template t "$CHART" --show-only templates/monitoring.yaml 2>/dev/null)" ] || die "monitoring objects rendered by default"
  [ "$(helm template t "$CHART" "${on[@]}" --set rabbitmq.external.enabled=true --set rabbitmq.external.existingSecret=amqp \
    --show-only templates/monitoring.yaml | grep -c '^kind: PodMonitor')" = 1 ] || die "a broker PodMonitor with an external broker"
  rm -f "$rendered"
  ok "monitoring: promtool check rules and test rules ($(grep -c 'alert:' "$alerts") alerts), $n_queries dashboard queries parse, rendered PrometheusRule = alerts.yaml, ConfigMap = dashboard.json; nothing by default"
}

cluster_up() {
  hack/cluster.sh up >/dev/null
  kubectl get --raw /readyz >/dev/null || die "apiserver not ready"
  kubectl apply --server-side -f crds/ >/dev/null
}

# prometheus-operator's PodMonitor and PrometheusRule CRDs (no operator runs:
# the objects are only stored), so the chart's monitoring objects meet a real schema
monitoring_crds_up() {
  local crd
  for crd in $(hack/helm-tools.sh monitoring-crds); do
    kubectl apply --server-side -f "$crd" >/dev/null || die "applying $crd"
  done
  kubectl wait --for condition=Established --timeout=60s \
    crd/podmonitors.monitoring.coreos.com crd/prometheusrules.monitoring.coreos.com >/dev/null || die "monitoring CRDs"
}

new_ns() { # <name> [restricted]
  # Orders keep a finalizer only a running operator removes: a left-over
  # namespace from an earlier run would never finish deleting
  local o
  for o in $(kubectl -n "$1" get orders -o name 2>/dev/null); do
    kubectl -n "$1" patch "$o" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
  done
  kubectl delete namespace "$1" --ignore-not-found --wait=true --timeout=120s >/dev/null
  kubectl create namespace "$1" >/dev/null
  kubectl label namespace "$1" dishpatch.dev/test=true >/dev/null
  if [ "${2:-}" = restricted ]; then
    kubectl label namespace "$1" pod-security.kubernetes.io/enforce=restricted \
      pod-security.kubernetes.io/enforce-version=latest >/dev/null
  fi
}

rbac_table() { # <release namespace> <release name> <other namespace>
  local ns=$1 rel=$2 other=$3 fn
  fn="$rel-dishpatch"; [[ "$rel" == *dishpatch* ]] && fn=$rel
  local fails=0 n=0
  while read -r sa verb res want scope; do
    [ -z "$sa" ] || [[ "$sa" == \#* ]] && continue
    res=${res//@LEASE@/$fn-operator}
    local where=$ns; [ "$scope" = other ] && where=$other
    local got sub=()
    if [[ "$res" == *:* ]]; then sub=(--subresource "${res#*:}"); res=${res%%:*}; fi
    got=$(kubectl auth can-i "$verb" "$res" "${sub[@]}" -n "$where" --as "system:serviceaccount:$ns:$fn-$sa" 2>/dev/null || true)
    n=$((n + 1))
    if [ "$got" != "$want" ]; then
      log "rbac: $sa $verb $res in $where: want $want, got $got"; fails=$((fails + 1))
    fi
  done <e2e/helm/rbac.table
  [ $fails -eq 0 ] || die "RBAC table: $fails of $n lines wrong"
  ok "RBAC table: $n lines (allowed and denied) hold for the installed chart"
}

server() {
  cluster_up
  # everything the chart renders, hooks included, accepted by the real apiserver
  # (no fixed NodePort: a real install may hold 30080)
  local np=(--set facade.service.nodePort=null)
  new_ns dishpatch-helm-dry restricted
  helm template dishpatch "$CHART" -n dishpatch-helm-dry --set crds.install=false "${np[@]}" |
    kubectl apply --dry-run=server -n dishpatch-helm-dry -f - >/dev/null || die "kubectl apply --dry-run=server"
  helm template dishpatch "$CHART" -n dishpatch-helm-dry --show-only templates/crds.yaml |
    kubectl apply --server-side --force-conflicts --dry-run=server -f - >/dev/null || die "CRDs --dry-run=server"
  helm template dishpatch "$CHART" -n dishpatch-helm-dry --set payment.gateway=stripe --set payment.stripe.apiKey=sk_test_x \
    --set facade.ingress.enabled=true --set-json 'watchNamespaces=["dishpatch-helm-dry"]' --set crds.install=false "${np[@]}" |
    kubectl apply --dry-run=server -n dishpatch-helm-dry -f - >/dev/null || die "kubectl apply --dry-run=server (variants)"
  monitoring_crds_up
  helm template dishpatch "$CHART" -n dishpatch-helm-dry --set crds.install=false "${np[@]}" --set monitoring.podMonitor.enabled=true \
    --set monitoring.prometheusRule.enabled=true --set monitoring.dashboard.enabled=true --show-only templates/monitoring.yaml |
    kubectl apply --dry-run=server -n dishpatch-helm-dry -f - >/dev/null || die "kubectl apply --dry-run=server (monitoring)"
  kubectl delete namespace dishpatch-helm-dry --wait=false >/dev/null
  ok "helm template | kubectl apply --dry-run=server is clean (defaults, variants, and the monitoring objects against prometheus-operator $(grep -m1 '^PROMOP_VERSION=' hack/helm-tools.sh | cut -d= -f2)'s CRDs), under restricted"

  # install without pods (RBAC, Secrets, lookup) and check the RBAC table
  local ns=dishpatch-helm-rbac other=dishpatch-helm-other
  new_ns $ns; new_ns $other
  helm uninstall rbac -n $ns >/dev/null 2>&1 || true
  trap 'helm uninstall rbac -n dishpatch-helm-rbac >/dev/null 2>&1 || true' EXIT
  helm install rbac "$CHART" -n $ns --set crds.install=false "${np[@]}" >/dev/null || die "helm install"
  local key1 key2
  key1=$(kubectl -n $ns get secret rbac-dishpatch-jwt -o jsonpath='{.data.key}')
  amqp1=$(kubectl -n $ns get secret rbac-dishpatch-amqp -o jsonpath='{.data.password}')
  [ "$(echo "$amqp1" | base64 -d)" != guest ] || die "broker password is guest"
  local gens1 gens2
  generations() { kubectl -n $ns get statefulset/rbac-dishpatch-rabbitmq deploy/rbac-dishpatch-operator deploy/rbac-dishpatch-facade -o jsonpath='{.items[*].metadata.generation}'; }
  gens1=$(generations)
  helm upgrade rbac "$CHART" -n $ns --set crds.install=false "${np[@]}" --set timeScale=0.5 >/dev/null || die "helm upgrade"
  # timeScale is not theirs: the broker, operator and façade templates stay as they were
  gens2=$(generations)
  [ "$gens1" = "$gens2" ] || die "an upgrade that changed nothing of theirs rolled the broker, operator or façade (generations $gens1 -> $gens2)"
  key2=$(kubectl -n $ns get secret rbac-dishpatch-jwt -o jsonpath='{.data.key}')
  [ -n "$key1" ] && [ "$key1" = "$key2" ] || die "the JWT key changed across helm upgrade"
  [ "$amqp1" = "$(kubectl -n $ns get secret rbac-dishpatch-amqp -o jsonpath='{.data.password}')" ] || die "broker password changed across upgrade"
  ok "generated JWT key and broker password survive helm upgrade (lookup); broker, operator and façade not rolled by it"
  rbac_table $ns rbac $other
  helm uninstall rbac -n $ns >/dev/null
  kubectl delete namespace $ns $other --wait=false >/dev/null
}

node_ready() {
  kubectl get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -x True >/dev/null
}

node() {
  node_ready || die "no Ready node: run make node-up && make images && make node-load first"
  monitoring_crds_up
  . "$ROOT/e2e/helm/node.sh"
  node_tests
}

what=${1:-default}
case "$what" in
  static) static ;;
  server) static; server ;;
  node) node ;;
  default) static; server ;;
  all) static; server; node ;;
  *) echo "usage: $0 [static|server|node|all]" >&2; exit 2 ;;
esac
log "all $pass checks passed in $((SECONDS - T0))s"
