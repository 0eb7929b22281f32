#!/usr/bin/env bash
# Installs the .deb into a clean Debian bookworm in a chroot and checks
# what an operator gets: `dpkg -i` with nothing else installed first,
# `ramster --version` from /usr/bin, the man pages through `man -w`, the
# bash completion completing, the zsh and fish ones in place, the systemd
# units (installed, not enabled) and the user they run as, the docs; then
# a reinstall, `dpkg -r` and `dpkg -P`, leaving no file behind.
#
# usage: scripts/deb-test.sh [DEB]   (default: the newest target/debian/ramster_*.deb)
#
# Needs root (chroot) and debootstrap. The system is debootstrap's minbase
# variant plus man-db, made once from the Debian archive (DEBIAN_MIRROR,
# default deb.debian.org) and kept as target/deb-test/bookworm-minbase.tar;
# every run unpacks a fresh copy. Nothing is mounted into the chroot.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $EUID -eq 0 ]] || { echo "deb-test: needs root (chroot, dpkg into a new root)" >&2; exit 1; }
started=$(date +%s)

deb="${1:-}"
if [[ -z "$deb" ]]; then
    # shellcheck disable=SC2012 # cargo-deb's names: no spaces, no newlines
    deb="$(ls -t target/debian/ramster_*.deb 2>/dev/null | head -n 1 || true)"
fi
[[ -f "$deb" ]] || { echo "deb-test: no .deb (scripts/build-deb.sh makes one)" >&2; exit 1; }
pkg="$(dpkg-deb --field "$deb" Package)"
version="$(dpkg-deb --field "$deb" Version)"
echo "== $deb: $pkg $version, Depends: $(dpkg-deb --field "$deb" Depends)"

cache=target/deb-test
rootfs="$cache/bookworm-minbase.tar"
mkdir -p "$cache"
if [[ ! -f "$rootfs" ]]; then
    command -v debootstrap >/dev/null || { echo "deb-test: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    echo "== debootstrap bookworm (minbase + man-db), once"
    boot="$cache/bootstrap"
    rm -rf "$boot"
    debootstrap --variant=minbase --include=man-db bookworm "$boot" \
        "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$cache/debootstrap.log" 2>&1 || {
        tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
    # The downloaded archives are not part of a clean system.
    rm -f "$boot"/var/cache/apt/archives/*.deb
    tar -C "$boot" -cf "$rootfs.part" . && mv "$rootfs.part" "$rootfs"
    rm -rf "$boot"
    echo "rootfs: $(du -m "$rootfs" | cut -f1) MiB, $(( $(date +%s) - started )) s"
fi

root="$(realpath -m "$cache/root")"
clean_root() {
    # Never delete through a mount; none is made, but a root left by an
    # interrupted run is removed the same way.
    if [[ -d "$root" ]] && awk -v r="$root" '$2 == r || index($2, r "/") == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        echo "deb-test: something is mounted under $root; not removing it" >&2
        return 1
    fi
    rm -rf "$root"
}
clean_root
trap clean_root EXIT
mkdir -p "$root"
tar -C "$root" -xf "$rootfs"
cp "$deb" "$root/tmp/ramster.deb"

# A fixed environment: the host's (LANG, PATH with /usr/local) must not leak in.
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C HOME=/root "$@"; }
fail() { echo "deb-test: FAIL: $*" >&2; exit 1; }

echo "== dpkg -i"
in_root dpkg -i /tmp/ramster.deb
# shellcheck disable=SC2016 # dpkg-query's own ${...} format
[[ "$(in_root dpkg-query -W -f '${Status}' "$pkg")" == 'install ok installed' ]] || fail "$pkg not installed"

echo "== ramster --version from the installed path"
[[ "$(in_root sh -c 'command -v ramster')" == /usr/bin/ramster ]] || fail "ramster is not /usr/bin/ramster"
said="$(in_root /usr/bin/ramster --version)"
echo "$said"
[[ "$said" == "ramster ${version%-*}" ]] || fail "ramster --version says '$said', the package is $version"
in_root ramster status --help >/dev/null || fail "ramster status --help"

echo "== man pages"
for page in ramster ramster-node ramster-status ramster-cluster-drain; do
    where="$(in_root man -w "$page")" || fail "man -w $page"
    [[ "$where" == "/usr/share/man/man1/$page.1.gz" ]] || fail "man -w $page: $where"
done
# Rendered by the system's man: the node's page documents its flags.
node_page="$(in_root man -P cat ramster-node 2>/dev/null)" || fail "man ramster-node"
grep -q -- '--capacity' <<<"$node_page" || fail "man ramster-node lacks --capacity"
echo "$(in_root sh -c 'ls /usr/share/man/man1/ramster*.1.gz | wc -l') pages, gzipped"

echo "== completions"
for f in /usr/share/bash-completion/completions/ramster \
         /usr/share/zsh/vendor-completions/_ramster \
         /usr/share/fish/vendor_completions.d/ramster.fish; do
    [[ -s "$root$f" ]] || fail "no $f"
done
# bash completes a subcommand and a flag of the node as it would at a prompt.
# shellcheck disable=SC2016 # expanded by the chroot's bash
offered="$(in_root bash -c '
    . /usr/share/bash-completion/completions/ramster
    COMP_WORDS=(ramster clu); COMP_CWORD=1; COMP_LINE="ramster clu"; COMP_POINT=${#COMP_LINE}
    _ramster ramster clu ramster; echo "${COMPREPLY[*]}"
    COMP_WORDS=(ramster node --capa); COMP_CWORD=2; COMP_LINE="ramster node --capa"; COMP_POINT=${#COMP_LINE}
    _ramster ramster --capa node; echo "${COMPREPLY[*]}"')"
echo "$offered"
grep -qx 'cluster' <<<"$(head -n 1 <<<"$offered")" || fail "bash does not complete 'ramster clu' to cluster"
grep -qw -- '--capacity' <<<"$(tail -n 1 <<<"$offered")" || fail "bash does not complete 'ramster node --capa'"

echo "== systemd units, the user, the docs"
units=/usr/lib/systemd/system
for u in ramster-node.service ramster-swap@.service; do
    cmp -s "systemd/$u" "$root$units/$u" || fail "$units/$u is not systemd/$u"
done
exec_start="$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$root$units/ramster-node.service")"
[[ "$exec_start" == /usr/bin/ramster && -x "$root$exec_start" ]] || fail "ramster-node.service runs '$exec_start'"
user="$(sed -n 's/^User=//p' "$root$units/ramster-node.service")"
[[ "$(in_root getent passwd "$user")" == *:/usr/sbin/nologin ]] || fail "no system user '$user'"
# Installed, not enabled: a node needs its node.toml first.
[[ -z "$(find "$root/etc/systemd/system" -name 'ramster*' 2>/dev/null)" ]] || fail "a ramster unit got enabled"
for f in README.md docs/operating.md docs/swap.md copyright; do
    [[ -s "$root/usr/share/doc/$pkg/$f" ]] || fail "no /usr/share/doc/$pkg/$f"
done

echo "== reinstall (the user exists already), remove, purge"
in_root dpkg -i /tmp/ramster.deb >/dev/null
in_root dpkg -r "$pkg" >/dev/null
[[ ! -e "$root/usr/bin/ramster" && ! -e "$root$units/ramster-node.service" ]] || fail "dpkg -r left the binary or a unit"
in_root dpkg -P "$pkg" >/dev/null
in_root dpkg-query -W "$pkg" >/dev/null 2>&1 && fail "$pkg still known to dpkg after purge"
left="$(find "$root/usr" "$root/etc" -name 'ramster*' -o -name '_ramster' | grep -v '^$' || true)"
[[ -z "$left" ]] || fail "left behind: $left"

echo "deb-test: ok in $(( $(date +%s) - started )) s"
