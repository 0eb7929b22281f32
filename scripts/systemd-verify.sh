#!/usr/bin/env bash
# Checks the systemd units in systemd/ with `systemd-analyze verify`, with
# the binary path pointed at a built ramster (verify insists that every
# command exists). Needs nbd-client installed for the swap unit.
set -euo pipefail
cd "$(dirname "$0")/.."
ramster="${RAMSTER_BIN:-$PWD/target/release/ramster}"
[[ -x "$ramster" ]] || { echo "no ramster binary at $ramster (cargo build --release)" >&2; exit 1; }
units="$(mktemp -d)"
trap 'rm -rf "$units"' EXIT
for u in systemd/*.service; do
    sed "s|/usr/bin/ramster|$ramster|" "$u" >"$units/$(basename "$u")"
done
# A template is verified through an instance of it.
ln -s 'ramster-swap@.service' "$units/ramster-swap@swap0.service"
# verify only warns about unknown keys and bad values: any word from it fails.
said="$(systemd-analyze verify "$units/ramster-node.service" "$units/ramster-swap@swap0.service" 2>&1)" || {
    echo "$said" >&2; exit 1; }
if [[ -n "$said" ]]; then
    echo "$said" >&2
    exit 1
fi
echo "systemd units verified"
