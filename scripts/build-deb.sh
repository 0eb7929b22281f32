#!/usr/bin/env bash
# Builds target/debian/ramster_VERSION-1_ARCH.deb: the release binary, its
# man pages and bash/zsh/fish completions (written by the binary itself,
# so they match its flags), the systemd units and the docs. See
# [package.metadata.deb] in node/Cargo.toml for what goes where.
# Prints the path of the .deb last.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: the metadata's keys and what they mean move between releases.
CARGO_DEB_VERSION=3.8.0
if [[ "$(cargo deb --version 2>/dev/null || true)" != *"$CARGO_DEB_VERSION"* ]]; then
    echo "== installing cargo-deb $CARGO_DEB_VERSION"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked
fi

echo "== release binary"
cargo build --release -p ramster-node --bin ramster

target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
ramster="$target_dir/release/ramster"
# cargo-deb reads `target/release/` in asset paths as the real target dir.
assets="$target_dir/release/deb-assets"

echo "== man pages and completions from $ramster"
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$ramster" man --out-dir "$assets/man" >/dev/null
# Debian ships man pages gzipped; cargo-deb compresses only assets it does
# not take for build products, and everything under target/release/ is one.
# -n: no name or time stamp, so the same pages make the same bytes.
gzip -9n "$assets"/man/*.1
"$ramster" completions bash >"$assets/completions/ramster.bash"
"$ramster" completions zsh >"$assets/completions/_ramster"
"$ramster" completions fish >"$assets/completions/ramster.fish"
echo "$(find "$assets/man" -name '*.1.gz' | wc -l) man pages, 3 completion scripts"

echo "== cargo deb"
# Stripped: the release profile keeps line tables for profiling, which
# would make the installed binary six times larger.
deb="$(cargo deb -p ramster-node --no-build --strip)"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
echo "$(du -k "$deb" | cut -f1) KiB, $(dpkg-deb --contents "$deb" | wc -l) entries"
echo "$deb"
