#!/usr/bin/env bash
# Builds the ramster image with no registry: a static binary copied into a
# FROM scratch image (no base image to pull). The binary is built here, on
# this machine's toolchain; docker only assembles the layers.
#
#   docker/build-image.sh            # tags ramster:dev
#   RAMSTER_IMAGE=ramster:test docker/build-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."

image=${RAMSTER_IMAGE:-ramster:dev}
target=x86_64-unknown-linux-gnu
target_dir=${CARGO_TARGET_DIR:-$PWD/target}

echo "== static binary ($target)"
# --target keeps RUSTFLAGS off build scripts and proc macros, which must
# stay dynamic to be loaded by the compiler.
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release --locked --target "$target" -p ramster-node --bin ramster
bin="$target_dir/$target/release/ramster"
if readelf -l "$bin" | grep -q 'program interpreter'; then
  echo "$bin is dynamically linked; a scratch image cannot run it" >&2
  exit 1
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# The release profile keeps line tables for profiling; the image does not
# need them.
if command -v strip >/dev/null 2>&1; then
  strip -o "$ctx/ramster" "$bin"
else
  cp "$bin" "$ctx/ramster"
fi
# Mount points the node's user owns: a fresh named volume takes the
# ownership of the directory it is mounted on.
mkdir -p "$ctx/owned/data" "$ctx/owned/certs" "$ctx/owned/ca" "$ctx/etc"
printf 'root:x:0:0:root:/:/sbin/nologin\nramster:x:65532:65532:ramster:/data:/sbin/nologin\n' >"$ctx/etc/passwd"
printf 'root:x:0:\nramster:x:65532:\n' >"$ctx/etc/group"
cp docker/Dockerfile.scratch "$ctx/Dockerfile"

echo "== image $image"
docker build --quiet -t "$image" "$ctx" >/dev/null
docker image ls "$image" --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}'
