#!/usr/bin/env bash
# Tests the Helm chart with a real helm: lint --strict, render it with every
# values file in charts/ramster/ci/, and validate what it renders against
# the Kubernetes schemas (kubernetes-validate, from PyPI). Custom resources
# (cert-manager Certificate, ServiceMonitor, PrometheusRule) have no schema
# there; the alert rules they carry are checked by promtool when Debian's
# prometheus package can be installed, and by cluster-tests/tests/deploy.rs
# against a real node's metrics.
set -euo pipefail
cd "$(dirname "$0")/.."

chart=charts/ramster
kube_version=${KUBE_VERSION:-1.30.0}
helm=$(scripts/install-helm.sh)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

echo "== helm lint --strict"
"$helm" lint --strict "$chart"
for values in "$chart"/ci/*.yaml; do
  "$helm" lint --strict "$chart" -f "$values" >/dev/null
done

# Validates "$out/NAME.yaml" against the Kubernetes schemas.
validate() {
  local name=$1 kinds report
  kinds=$(grep -c '^kind:' "$out/$name.yaml")
  # --strict: unknown fields are errors. Kinds without a schema (the CRDs
  # above) are warnings; anything else that fails fails the run.
  report=$(kubernetes-validate --strict --quiet -k "$kube_version" "$out/$name.yaml" 2>&1) || {
    echo "$report"
    echo "FAIL $name"
    exit 1
  }
  if grep -v "Couldn't find schema for kind \(Certificate\|PrometheusRule\|ServiceMonitor\) " <<<"$report" | grep -q .; then
    echo "$report"
    echo "FAIL $name"
    exit 1
  fi
  echo "ok   $name: $kinds objects"
}

echo "== helm template + kubernetes-validate (Kubernetes $kube_version)"
for values in "$chart"/ci/*.yaml; do
  name=$(basename "$values" .yaml)
  "$helm" template ramster "$chart" -n swap -f "$values" >"$out/$name.yaml"
  validate "$name"
done

echo "== values the schema or the chart refuses"
refuse() {
  local why=$1
  shift
  if "$helm" template ramster "$chart" "$@" >/dev/null 2>&1; then
    echo "FAIL: rendered although $why"
    exit 1
  fi
  echo "ok   refused: $why"
}
refuse "capacity is not a size" --set peers.capacity=lots
refuse "replicas is above 3" --set cluster.replicas=4
refuse "two certificate sources" --set tls.existingSecret=x
refuse "auto capacity without a memory limit" --set peers.resources.limits=null
refuse "cert-manager without an issuer" --set tls.generate.enabled=false --set tls.certManager.enabled=true
refuse "a lowercase m (milli to Kubernetes) in a capacity" --set peers.capacity=512m
refuse "donate is not a size" --set peers.donate=half

echo "== values the chart takes"
# Renders with the values after the name into "$out/NAME.yaml", and
# validates that.
render() {
  local name=$1
  shift
  "$helm" template ramster "$chart" -n swap "$@" >"$out/$name.yaml" || {
    echo "FAIL: did not render with $*"
    exit 1
  }
  validate "$name"
}
# Kubernetes memory quantities, as a pod's resources write them.
render gi --set peers.capacity=2Gi --set peers.donate=512Mi \
  --set memoryServers.enabled=true --set memoryServers.capacity=1.5Gi
python3 - "$out/gi.yaml" <<'PY'
import sys, yaml
env = {}
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc["kind"] == "StatefulSet":
        for e in doc["spec"]["template"]["spec"]["containers"][0]["env"]:
            env[(doc["metadata"]["name"], e["name"])] = e.get("value")
assert env[("ramster", "RAMSTER_CAPACITY")] == "2Gi", env
assert env[("ramster", "RAMSTER_DONATE")] == "512Mi", env
assert env[("ramster-memory", "RAMSTER_CAPACITY")] == "1.5Gi", env
print("ok   capacity 2Gi, donate 512Mi, 1.5Gi reach the nodes as given")
PY

echo "== the pods as a restricted namespace wants them"
for name in default-values memory-servers-values; do
  python3 - "$out/$name.yaml" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc.get("kind") != "StatefulSet":
        continue
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["limits"]["memory"], "auto capacity needs a limit"
    assert doc["spec"]["podManagementPolicy"] == "Parallel"
    print(f"ok   {doc['metadata']['name']}: non-root, read-only root, no capabilities")
PY
done

echo "== alert rules"
promtool=$(command -v promtool || true)
if [ -z "$promtool" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # Debian's prometheus package carries promtool.
  (apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }) || true
  promtool=$(command -v promtool || true)
fi
if [ -n "$promtool" ]; then
  "$promtool" check rules "$chart/files/alerts.yaml"
  "$promtool" check config --syntax-only docker/monitoring/prometheus.yml
else
  echo "promtool not available: rules parsed by cluster-tests only"
fi
