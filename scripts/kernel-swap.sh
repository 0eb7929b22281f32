#!/usr/bin/env bash
# A real Linux kernel swapping into the cluster.
#
# Starts four nodes on loopback under a fresh CA (mutual TLS between them):
# an owner serving an NBD export, with a store far smaller than the swap
# traffic, and three donors (memory servers) that take its cold pages, two
# copies of each. Then boots Debian's packaged kernel in qemu (TCG) with a
# small initramfs built here (busybox, nbd-client, nbd.ko, the NIC driver,
# the workload of tools/swap-workload). The guest connects to the export
# through qemu's user network (10.0.2.2 is the host's loopback), runs
# mkswap and swapon (with discard), and the workload touches twice the
# guest's RAM in pages of mixed content (zero, one repeated word,
# compressible, random), verifying every page over several passes and
# rewriting some. Once the guest reports pass KILL_AFTER_PASS, the donor
# holding the most pages is SIGKILLed. Then swapoff must succeed and the
# guest prints /proc/vmstat's pswpin and pswpout.
#
# Fails on: a page that reads back wrong, the workload exiting non-zero, a
# swap read or write error, any I/O error, oops or hung task in the guest
# console, swapoff failing, pswpin or pswpout below the traffic the
# workload must cause, the owner not loading pages from donors (before and
# after the kill), a lost page, an NBD error, no TRIM reaching the export,
# a panic in a node's log, or the guest not powering off within TIMEOUT
# seconds.
#
#   scripts/kernel-swap.sh
#
# Environment: BIN (a ramster binary; default: build this checkout's
# release), GUEST_MIB (160: guest RAM), WORK_MIB (2 x GUEST_MIB: memory the
# workload touches), PASSES (3 verify passes), SEED (1), CAPACITY (the
# owner's store, 16MiB), EXPORT_MIB (512), KILL_AFTER_PASS (1), TIMEOUT (420:
# seconds the guest may run), PORT_BASE (28900: peers on PORT_BASE..+3
# UDP, admin endpoints on PORT_BASE+10..+13, NBD on PORT_BASE+20), OUT
# (a temp dir for logs and the initramfs), KERNEL (a /boot/vmlinuz-*;
# default: the newest installed), CORRUPT_AFTER_PASS (makes the workload
# flip a bit after that pass: the run must then fail).
#
# Needs: qemu-system-x86, linux-image-amd64, busybox-static, nbd-client,
# cpio, kmod, curl (.ci/run installs them). Every process it starts is
# stopped by its PID on exit; every wait is bounded.

set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
guest_mib="${GUEST_MIB:-160}"
work_mib="${WORK_MIB:-$((2 * guest_mib))}"
passes="${PASSES:-3}"
seed="${SEED:-1}"
capacity="${CAPACITY:-16MiB}"
export_mib="${EXPORT_MIB:-512}"
kill_after_pass="${KILL_AFTER_PASS:-1}"
timeout_s="${TIMEOUT:-420}"
base="${PORT_BASE:-28900}"
nbd_port=$((base + 20))
owner_admin="127.0.0.1:$((base + 10))"
out="${OUT:-$(mktemp -d /tmp/ramster-kernel-swap.XXXXXX)}"
mkdir -p "$out"
# A scratch dir: what an earlier run left there goes.
rm -rf "$out/ca" "$out/rootfs" "$out"/{owner,donor1,donor2,donor3} "$out"/*.log
started=$(date +%s)

# shellcheck source=lib/processes.sh
source "$root/scripts/lib/processes.sh"

fail() {
    echo "kernel-swap FAILED: $*" >&2
    echo "console: $out/console.log; node logs: $out/*.log" >&2
    if [[ -f "$out/console.log" ]]; then
        echo "--- last lines of the guest console" >&2
        tail -n 40 "$out/console.log" >&2
    fi
    if [[ -f "$out/progress.log" ]]; then
        echo "--- the owner's counters, last samples" >&2
        tail -n 5 "$out/progress.log" >&2
    fi
    exit 1
}

for tool in qemu-system-x86_64 nbd-client cpio gzip modinfo curl ldd; do
    command -v "$tool" >/dev/null || fail "missing $tool (apt-get install qemu-system-x86 nbd-client cpio kmod curl)"
done
# Whether a binary runs without shared libraries.
is_static() {
    local said
    said="$(ldd "$1" 2>&1 || true)"
    [[ "$said" == *"not a dynamic"* || "$said" == *"statically linked"* ]]
}
busybox=/bin/busybox
[[ -x "$busybox" ]] && is_static "$busybox" ||
    fail "no static $busybox (apt-get install busybox-static)"

# --- the guest kernel: Debian's, as installed (not the host's running one)
kernel="${KERNEL:-$(find /boot -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n 1)}"
[[ -f "$kernel" ]] || fail "no kernel in /boot (apt-get install linux-image-amd64)"
kver="${kernel##*/vmlinuz-}"
moddir="/lib/modules/$kver"
[[ -d "$moddir" ]] || fail "no modules for $kver in $moddir"
say "guest kernel $kver"

# --- binaries
target_dir="${CARGO_TARGET_DIR:-target}"
[[ "$target_dir" == /* ]] || target_dir="$root/$target_dir"
if [[ -n "${BIN:-}" ]]; then
    ramster="$BIN"
else
    say "building the node (release)"
    (cd "$root" && cargo build --release -q -p ramster-node --bin ramster) >&2
    ramster="$target_dir/release/ramster"
fi
say "building the workload (static)"
(cd "$root" && RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' \
    cargo build --release -q -p ramster-swap-workload --target x86_64-unknown-linux-gnu) >&2
workload="$target_dir/x86_64-unknown-linux-gnu/release/swap-workload"
is_static "$workload" || fail "$workload is not static"

# --- the initramfs
rootfs="$out/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"/{bin,dev,proc,sys,tmp,modules}
cp "$busybox" "$rootfs/bin/busybox"
cp "$workload" "$rootfs/bin/swap-workload"
# nbd-client and the shared libraries it loads, at the same paths.
nbd_client="$(command -v nbd-client)"
copy_with_parents() { mkdir -p "$rootfs$(dirname "$1")" && cp -L "$1" "$rootfs$1"; }
copy_with_parents "$nbd_client"
while read -r lib; do
    copy_with_parents "$lib"
done < <(ldd "$nbd_client" | grep -o '/[^ ]*' | sort -u)

# Kernel modules of the guest kernel, each after what it depends on.
modules_order=()
add_module() {
    local name="$1" dep file
    for done_name in "${modules_order[@]}"; do
        if [[ "$done_name" == "$name" ]]; then return 0; fi
    done
    for dep in $(modinfo -k "$kver" -F depends "$name" | tr ',' ' '); do
        add_module "$dep"
    done
    file="$(modinfo -k "$kver" -F filename "$name")"
    case "$file" in
        '(builtin)') modules_order+=("$name"); return 0 ;;
        *.ko) cp "$file" "$rootfs/modules/$name.ko" ;;
        *.ko.xz) xz -dc "$file" >"$rootfs/modules/$name.ko" ;;
        *.ko.zst) zstd -qdc "$file" >"$rootfs/modules/$name.ko" ;;
        *.ko.gz) gzip -dc "$file" >"$rootfs/modules/$name.ko" ;;
        *) fail "module $name of $kver: no file ($file)" ;;
    esac
    modules_order+=("$name")
}
for m in virtio_pci virtio_net nbd; do add_module "$m"; done
say "guest modules: ${modules_order[*]}"
loadable=()
for m in "${modules_order[@]}"; do
    if [[ -f "$rootfs/modules/$m.ko" ]]; then loadable+=("$m"); fi
done

corrupt=()
[[ -n "${CORRUPT_AFTER_PASS:-}" ]] && corrupt=(--corrupt-after-pass "$CORRUPT_AFTER_PASS")
# The guest's init. Lines starting "KSWAP:" are read by this script.
cat >"$rootfs/init" <<EOF
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin:/usr/sbin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
# Seconds since boot, for the console's timeline.
up() { cut -d' ' -f1 /proc/uptime; }
end() { echo "KSWAP: \$* (\$(up) s)"; sync; poweroff -f; }
for m in ${loadable[*]}; do
    insmod /modules/\$m.ko || end "FAILED: insmod \$m"
done
ip link set lo up
ip addr add 10.0.2.15/24 dev eth0 || end "FAILED: no eth0"
ip link set eth0 up
ip route add default via 10.0.2.2
# Swapping over the network needs memory to swap: the NIC's receive
# buffers, TCP's. The default reserve of a small machine (about 1.3 MiB
# here) can run dry under swap pressure: the NBD connection then stalls.
echo 16384 >/proc/sys/vm/min_free_kbytes
echo "KSWAP: network up; RAM \$(grep MemTotal /proc/meminfo)"
# The export is a swap device: 4 KiB blocks, nbd-client locked in memory.
nbd-client 10.0.2.2 $nbd_port /dev/nbd0 -N swap0 -b 4096 -swap || end "FAILED: nbd-client"
mkswap /dev/nbd0 || end "FAILED: mkswap"
# With discard, swap slots the kernel frees reach the export as TRIMs,
# which drop the pages from the cluster.
swapon -d /dev/nbd0 || end "FAILED: swapon"
echo "KSWAP: swapon ok (\$(up) s): \$(tail -n 1 /proc/swaps)"
swap-workload --mib $work_mib --passes $passes --seed $seed ${corrupt[*]}
echo "KSWAP: workload exit \$? (\$(up) s)"
if swapoff /dev/nbd0; then echo "KSWAP: swapoff ok (\$(up) s)"; else echo "KSWAP: swapoff FAILED"; fi
grep -E '^pswp(in|out) ' /proc/vmstat | sed 's/^/KSWAP: vmstat /'
nbd-client -d /dev/nbd0
end "done"
EOF
chmod +x "$rootfs/init"
initrd="$out/initramfs.cpio.gz"
(cd "$rootfs" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd"
say "initramfs: $(du -k "$initrd" | cut -f1) KiB"

# --- the cluster: an owner with the export, three donors
"$ramster" cert create-ca --certs-dir "$out/ca" >/dev/null
seeds="127.0.0.1:$base,127.0.0.1:$((base + 1)),127.0.0.1:$((base + 2)),127.0.0.1:$((base + 3))"
names=(owner donor1 donor2 donor3)
declare -A pid_of
i=0
for name in "${names[@]}"; do
    "$ramster" cert create-node "$name" --certs-dir "$out/ca" >/dev/null
    extra=(--role memory-server --capacity 256MiB)
    [[ "$name" == owner ]] && extra=(--capacity "$capacity" --replicas 2
        --nbd-export "swap0:${export_mib}MiB" --nbd-listen "127.0.0.1:$nbd_port")
    RUST_LOG=info "$ramster" node --name "$name" --data-dir "$out/$name" \
        --certs-dir "$out/ca/$name" --listen "127.0.0.1:$((base + i))" --join "$seeds" \
        --admin-listen "127.0.0.1:$((base + 10 + i))" "${extra[@]}" \
        >"$out/$name.log" 2>&1 &
    pids+=($!)
    pid_of[$name]=$!
    i=$((i + 1))
done
say "waiting for the cluster"
wait_cluster "$owner_admin" 4 || fail "cluster did not form"
wait_port "$nbd_port" owner "${pid_of[owner]}" || fail "no NBD server"

# The owner's counter of one metric (summed over its labels).
metric() {
    local text
    text="$(curl -fsS "http://$owner_admin/metrics")" || fail "the owner's /metrics did not answer"
    awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d\n", s }' <<<"$text"
}

# --- the guest
console="$out/console.log"
: >"$console"
say "booting the guest ($guest_mib MiB RAM, workload $work_mib MiB, $passes passes)"
qemu-system-x86_64 -accel tcg -m "$guest_mib" -smp 1 -nodefaults -display none \
    -no-reboot -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet zswap.enabled=0" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -serial "file:$console" >"$out/qemu.log" 2>&1 &
qemu_pid=$!
pids+=("$qemu_pid")
guest_started=$(date +%s)

victim=""
killed_at=""
loads_at_kill=0
# The donor holding the most pages for others (only the owner stores):
# "NAME PAGES", from the owner's view of the cluster.
fullest_donor() {
    "$ramster" status --endpoint "$owner_admin" -o json | python3 -c '
import json, sys
nodes = [n for n in json.load(sys.stdin)["nodes"] if n["name"] != "owner"]
n = max(nodes, key=lambda n: n["held_for_others_pages"])
print(n["name"], n["held_for_others_pages"])'
}
# The owner's counters every 10 s, to see where a slow or failed run spent
# its time.
progress() {
    local text
    text="$(curl -fsS "http://$owner_admin/metrics" 2>/dev/null)" || return 0
    awk -v t="$(($(date +%s) - guest_started))" '
        /^ramster_nbd_reads_total/ { r += $2 } /^ramster_nbd_writes_total/ { w += $2 }
        /^ramster_remote_loads_total/ { l += $2 } /^ramster_remotified_pages_total/ { m += $2 }
        /^ramster_suctioned_pages_total/ { s += $2 } /^ramster_store_throttles_total/ { th += $2 }
        /^ramster_store_remote_pages/ { rp += $2 } /^ramster_store_pages/ { sp += $2 }
        /^ramster_nbd_trims_total/ { tr += $2 }
        END { printf "%4d s: nbd reads %d writes %d trims %d; remote loads %d; remotified %d suctioned %d; throttles %d; store pages %d (remote %d)\n", t, r, w, tr, l, m, s, th, sp, rp }
    ' <<<"$text" >>"$out/progress.log"
}
tick=0
for _ in $(seq 1 "$timeout_s"); do
    kill -0 "$qemu_pid" 2>/dev/null || break
    tick=$((tick + 1))
    if ((tick % 10 == 0)); then progress; fi
    if [[ -z "$killed_at" ]] && grep -q "^swap-workload: pass $kill_after_pass:" "$console"; then
        loads_at_kill="$(metric ramster_remote_loads_total)"
        read -r victim victim_pages < <(fullest_donor) || fail "no cluster status from the owner"
        [[ "$victim_pages" -gt 0 ]] || fail "no donor holds pages after pass $kill_after_pass"
        kill -9 "${pid_of[$victim]}"
        wait "${pid_of[$victim]}" 2>/dev/null || true
        killed_at=$(($(date +%s) - guest_started))
        say "killed $victim (SIGKILL; it held $victim_pages pages) after pass $kill_after_pass, ${killed_at} s into the guest's run; $loads_at_kill remote loads so far"
    fi
    sleep 1
done
if kill -0 "$qemu_pid" 2>/dev/null; then
    kill -9 "$qemu_pid"
    wait "$qemu_pid" 2>/dev/null || true
    fail "the guest did not power off within $timeout_s s"
fi
wait "$qemu_pid" || fail "qemu exited with status $? (see $out/qemu.log)"
guest_secs=$(($(date +%s) - guest_started))
say "guest done in $guest_secs s"

# --- the verdict
grep '^swap-workload:\|^KSWAP:' "$console" | tr -d '\r' >&2 || true
bad="$(grep -Ei 'read-error on swap|write-error on swap|i/o error|blk_update_request|kernel panic|oops|BUG:|call trace|segfault|out of memory|killed process|blocked for more than' "$console" || true)"
[[ -z "$bad" ]] || fail "errors in the guest console: $bad"
grep -q '^KSWAP: done' "$console" || fail "the guest did not finish its script"
grep -q '^KSWAP: swapon ok' "$console" || fail "swapon did not happen"
grep -q '^swap-workload: OK:' "$console" || fail "the workload did not verify every page"
grep -q '^KSWAP: workload exit 0' "$console" || fail "the workload exited non-zero"
grep -q '^KSWAP: swapoff ok' "$console" || fail "swapoff failed"
[[ -n "$killed_at" ]] || fail "no donor was killed (no pass $kill_after_pass reported)"
pswpin="$(tr -d '\r' <"$console" | awk '$1 == "KSWAP:" && $3 == "pswpin" { print $4 }')"
pswpout="$(tr -d '\r' <"$console" | awk '$1 == "KSWAP:" && $3 == "pswpout" { print $4 }')"
# Each verify pass reads every page, and at most the guest's RAM can be
# resident: at least the excess comes back from swap, once per pass, and
# went out at least once.
excess_pages=$(((work_mib - guest_mib) * 256))
[[ "${pswpin:-0}" -ge $((passes * excess_pages)) ]] ||
    fail "pswpin ${pswpin:-none} < $((passes * excess_pages)) (passes x pages beyond RAM)"
[[ "${pswpout:-0}" -ge "$excess_pages" ]] ||
    fail "pswpout ${pswpout:-none} < $excess_pages (pages beyond RAM)"

panics="$(grep -l 'panicked' "$out"/{owner,donor1,donor2,donor3}.log || true)"
[[ -z "$panics" ]] || fail "a node panicked: $panics"
kill -0 "${pid_of[owner]}" 2>/dev/null || fail "the owner died"
remote_loads="$(metric ramster_remote_loads_total)"
remotified="$(metric ramster_remotified_pages_total)"
lost="$(metric ramster_lost_pages_total)"
nbd_errors="$(metric ramster_nbd_errors_total)"
load_errors="$(metric ramster_remote_load_errors_total)"
repaired="$(metric ramster_repaired_pages_total)"
trims="$(metric ramster_nbd_trims_total)"
curl -fsS "http://$owner_admin/metrics" >"$out/owner.metrics" || true
[[ "$remotified" -gt 0 ]] || fail "the owner shipped no page to donors"
[[ "$loads_at_kill" -gt 0 ]] || fail "no page was loaded from a donor before the kill"
[[ "$remote_loads" -gt "$loads_at_kill" ]] ||
    fail "no page was loaded from a donor after $victim died ($remote_loads loads in all)"
[[ "$lost" -eq 0 ]] || fail "the owner lost $lost pages"
[[ "$nbd_errors" -eq 0 ]] || fail "$nbd_errors NBD errors"
[[ "$trims" -gt 0 ]] || fail "no TRIM reached the export (swapon -d)"

cat >&2 <<EOF
== kernel-swap passed in $(($(date +%s) - started)) s (guest $guest_secs s, kernel $kver)
   workload: $(grep -o 'OK: .*' "$console" | tr -d '\r')
   guest vmstat: pswpin $pswpin, pswpout $pswpout
   owner: $trims TRIMs, $remotified pages remotified, $remote_loads remote loads ($loads_at_kill before $victim, holding $victim_pages pages, was killed ${killed_at} s in, after pass $kill_after_pass), $load_errors remote load errors, $repaired repaired, 0 lost
   logs: $out
EOF
