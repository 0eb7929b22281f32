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
refuse "a misspelt key (peers.capacty)" --set peers.capacty=1Gi
refuse "a misspelt top-level key" --set monitor.serviceMonitor.enabled=true
refuse "a misspelt nested key (tls.certManager.issuer)" --set tls.certManager.issuer.name=x

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

# Prometheus scrapes each Service the ServiceMonitor selects: two would
# scrape every pod twice.
python3 - "$out/cert-manager-values.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
services = [d for d in docs if d["kind"] == "Service"]
monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
assert monitors, "no ServiceMonitor rendered"
for m in monitors:
    want = m["spec"]["selector"]["matchLabels"]
    hit = [s["metadata"]["name"] for s in services
           if all(s["metadata"].get("labels", {}).get(k) == v for k, v in want.items())]
    assert len(hit) == 1, f"ServiceMonitor {m['metadata']['name']} selects {hit}"
    svc = next(s for s in services if s["metadata"]["name"] == hit[0])
    # The headless Service: every pod, ready or not, by its own address.
    assert svc["spec"].get("clusterIP") == "None", f"{hit[0]} is not the headless Service"
    ports = [p["name"] for p in svc["spec"]["ports"]]
    for ep in m["spec"]["endpoints"]:
        assert ep["port"] in ports, f"{hit[0]} has no port {ep['port']}"
    print(f"ok   ServiceMonitor selects one Service: {hit[0]}")
PY

# The image sets RAMSTER_* variables for docker; the environment wins over
# the chart's config file, so the chart must set each of them itself.
render admin-port --set ports.admin=9901 --set memoryServers.enabled=true
python3 - "$out/admin-port.yaml" docker/Dockerfile docker/Dockerfile.scratch <<'PY'
import re, sys, yaml
image_env = set()
for path in sys.argv[2:]:
    text = open(path).read().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("ENV "):
            image_env |= set(re.findall(r"(RAMSTER_[A-Z_]+)=", line))
assert "RAMSTER_ADMIN_LISTEN" in image_env, image_env
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc["kind"] != "StatefulSet":
        continue
    name = doc["metadata"]["name"]
    c = doc["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    missing = image_env - set(env)
    assert not missing, f"{name}: the image's {sorted(missing)} would win over the chart"
    assert env["RAMSTER_ADMIN_LISTEN"].endswith(":9901"), env["RAMSTER_ADMIN_LISTEN"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["admin"] == 9901, ports
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 9901, f"{name} {probe} on {port}"
    print(f"ok   {name}: listens and is probed on the admin port 9901")
PY

# Both copies of a page should not share a host: peers and memory servers
# spread over hosts unless the values say otherwise.
python3 - "$out/memory-servers-values.yaml" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc["kind"] != "StatefulSet":
        continue
    pod = doc["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spread = [t for t in pod["spec"].get("topologySpreadConstraints", [])
              if t["topologyKey"] == "kubernetes.io/hostname"]
    assert spread, f"{doc['metadata']['name']} has no spread over hosts"
    for t in spread:
        assert t["whenUnsatisfiable"] == "ScheduleAnyway", t
        sel = t["labelSelector"]["matchLabels"]
        assert all(labels.get(k) == v for k, v in sel.items()), (sel, labels)
    print(f"ok   {doc['metadata']['name']}: spread over hosts by default")
PY
render spread-given --set-json 'peers.topologySpreadConstraints=[{"maxSkew":1,"topologyKey":"topology.kubernetes.io/zone","whenUnsatisfiable":"DoNotSchedule","labelSelector":{"matchLabels":{"a":"b"}}}]'
python3 - "$out/spread-given.yaml" <<'PY'
import sys, yaml
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc["kind"] == "StatefulSet":
        spread = doc["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert [t["topologyKey"] for t in spread] == ["topology.kubernetes.io/zone"], spread
print("ok   topologySpreadConstraints given replace the default")
PY

# Pods reach each other by DNS names under the cluster's domain.
render domain --set clusterDomain=example.internal --set memoryServers.enabled=true
if grep -n 'cluster\.local' "$out/domain.yaml"; then
  echo "FAIL: cluster.local rendered with clusterDomain=example.internal"
  exit 1
fi
grep -q 'svc\.example\.internal:7800' "$out/domain.yaml" || {
  echo "FAIL: no name under example.internal rendered"
  exit 1
}
echo "ok   clusterDomain=example.internal: every name under it"

# A stopping pod drains first: SIGKILL must not come before the drain and
# the NBD grace are over, and the node must be told the same drain time.
for drain in 60 0 300; do
  render "stop-drain-$drain" --set cluster.stopDrainSeconds=$drain --set memoryServers.enabled=true
  python3 - "$out/stop-drain-$drain.yaml" "$drain" <<'PY'
import sys, yaml
drain = int(sys.argv[2])
sets = 0
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc and doc["kind"] == "StatefulSet":
        grace = doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace == drain + 45, (doc["metadata"]["name"], grace)
        sets += 1
    if doc and doc["kind"] == "ConfigMap" and "node.toml" in doc["data"]:
        assert f"stop-drain = {drain}\n" in doc["data"]["node.toml"], doc["data"]["node.toml"]
assert sets == 2, sets
PY
  echo "ok   stopDrainSeconds=$drain: the node drains $drain s, the pods get $((drain + 45)) s"
done

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
