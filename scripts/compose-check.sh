#!/usr/bin/env bash
# Checks the compose files under docker/ as docker-compose reads them
# (`docker-compose config`, no engine needed): every service running the
# ramster image has a read-only root file system with its data dir on a
# volume, no capabilities beyond IPC_LOCK (for --mlock, and only where a
# node is given --mlock), and cannot gain privileges.
#
#   scripts/compose-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker-compose >/dev/null 2>&1; then
  echo "docker-compose not available: compose files not checked"
  exit 0
fi

# The image every ramster service names; the compose files default to it.
export RAMSTER_IMAGE=ramster:compose-check
config=$(mktemp)
trap 'rm -f "$config"' EXIT
for file in docker/compose*.yaml; do
  docker-compose -f "$file" config >"$config" || {
    echo "FAIL: docker-compose cannot read $file"
    exit 1
  }
  python3 - "$file" "$RAMSTER_IMAGE" "$config" <<'PY'
import sys, yaml
path, image = sys.argv[1], sys.argv[2]
config = yaml.safe_load(open(sys.argv[3]))
checked = 0
for name, svc in config["services"].items():
    if svc.get("image") != image:
        continue
    where = f"{path}: {name}"
    assert svc.get("read_only") is True, f"{where}: root file system writable"
    assert svc.get("cap_drop") == ["ALL"], f"{where}: cap_drop is {svc.get('cap_drop')}"
    cmd = svc.get("command") or []
    added = set(svc.get("cap_add") or [])
    assert added <= {"IPC_LOCK"}, f"{where}: adds {sorted(added)}"
    if added:
        assert "--mlock" in cmd or svc.get("environment", {}).get("RAMSTER_MLOCK"), \
            f"{where}: IPC_LOCK without --mlock"
    assert "no-new-privileges:true" in (svc.get("security_opt") or []), \
        f"{where}: may gain privileges"
    if cmd[:1] == ["node"]:
        # The image's data dir unless the service moves it.
        data = svc.get("environment", {}).get("RAMSTER_DATA_DIR", "/data")
        targets = [v["target"] if isinstance(v, dict) else v.split(":")[1]
                   for v in svc.get("volumes", [])]
        targets += list(svc.get("tmpfs") or [])
        assert data in targets, f"{where}: data dir {data} not on a volume"
    checked += 1
assert checked, f"{path}: no service runs {image}"
print(f"ok   {path}: {checked} ramster services read-only, no capabilities, no new privileges")
PY
done
