#!/usr/bin/env bash
# Early boot of the Debian cloud kernel (linux-image-cloud-amd64) under
# `b2p-vmm run` (issue 2, must-show 2): proves Linux accepts our boot tables.
# With B2P_LINUX_SOURCE=b2p, our own kernel (guest-image/kernel/build.sh,
# every driver built in) with a data disk, passt networking, vsock and rng
# (issue 12, must-show 4): its drivers probe our devices before any init.
#
# On a PVM host (DESIGN.md §8) the unmodified kernel runs ~100x slower in
# KVM's instruction emulator, so only its first lines are reachable: the E820
# map, the ACPI tables (RSDP/XSDT/FACP/APIC/DSDT), "smpboot: Allowing 2 CPUs".
# The script stops the VM as soon as all of them are in the log, or after
# B2P_LINUX_TIMEOUT seconds (default 240), and reports how far it got.
#
# By default it boots the package's kernel as the ELF vmlinux inside its
# vmlinuz (decompressed here with lz4/xz/zstd/gzip; b2p-vmm takes the PVH
# entry from its Xen ELF note): the bzImage's own decompressor, run by the
# emulator, prints nothing for minutes on a PVM host. B2P_LINUX_KERNEL=bzimage
# boots the vmlinuz as is (the 64-bit boot-protocol path; use on VMX/SVM).
#
# Our kernel (B2P_LINUX_SOURCE=b2p) is taken from B2P_KERNEL_DIR, else from
# guest-image/kernel/build.sh (cached; a cold build takes tens of minutes).
# It boots with a 300 MiB sparse data disk, `--net passt` and `ip=dhcp`,
# `--vsock`, `--virtio-rng` and `initcall_debug` (the vsock and rng drivers
# print nothing of their own: the log shows the device probed inside their
# init call). The command line also avoids what this PVM's emulator lacks
# and the kernel can do without: `clearcpuid=` (SMAP's clac/stac, popcnt,
# cmpxchg16b, rdtscp, rdrand/rdseed, fsgsbase, pcid/invpcid, rdpid, xsave
# with xrstor/xgetbv, and aperfmperf: the perf MSR driver's rdmsr of APERF
# never returns here), `b2p.no_int3_selftest` (our kernel patch,
# guest-image/kernel/patches/), and the KVM hypercall (vmcall), on which
# this emulator spins: `initcall_blacklist=ptp_kvm_init` (the PTP clock's
# clock-pairing call) and `maxcpus=1` (PV IPIs, TLB flushes and spinlock
# kicks are hypercalls; the MADT still lists 2 CPUs). The run stops when every line is
# found (B2P_LINUX_FULL=1: at the timeout) and reports the last lines and
# b2p-vmm's exit message (RIP and instruction bytes of an emulation failure).
#
# usage: tests/linux-early-boot.sh [path/to/b2p-vmm]
# env:   B2P_LINUX_TIMEOUT (s; default 240, b2p 600), B2P_LINUX_LOG (log path),
#        B2P_CACHE (~/.cache/b2p), B2P_LINUX_SOURCE=debian|b2p (default debian),
#        B2P_KERNEL_DIR (b2p: a guest-image/kernel/build.sh output directory),
#        B2P_LINUX_KERNEL=elf|bzimage (default elf),
#        B2P_LINUX_CMDLINE_EXTRA (appended to the command line),
#        B2P_LINUX_INIT=busybox (an initramfs with a static busybox /init),
#        B2P_LINUX_VMM_ARGS (more b2p-vmm run arguments, e.g. --virtio-mmio-cmdline),
#        B2P_LINUX_FULL=1 (keep running to the timeout, to see how far it gets)
# exit:  0 all lines found, 1 some missing, 2 setup failed (message says why)
set -euo pipefail
cd "$(dirname "$0")/.."

source=${B2P_LINUX_SOURCE:-debian}
case $source in debian) dflt_timeout=240 ;; b2p) dflt_timeout=600 ;; *) echo "linux-early-boot: B2P_LINUX_SOURCE must be debian or b2p, not $source" >&2; exit 2 ;; esac
timeout_s=${B2P_LINUX_TIMEOUT:-$dflt_timeout}
cache=${B2P_CACHE:-$HOME/.cache/b2p}
debs=$cache/debs
work=$(mktemp -d /tmp/b2p-linux-early.XXXXXX)
log=${B2P_LINUX_LOG:-$work/console.log}
vmm_pid=
cleanup() {
	if [ -n "$vmm_pid" ] && kill -0 "$vmm_pid" 2>/dev/null; then
		kill "$vmm_pid" 2>/dev/null || true
		wait "$vmm_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT
die() { echo "linux-early-boot: $*" >&2; exit 2; }

[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "SKIP: /dev/kvm is not usable" >&2; exit 0; }

# --- the monitor
vmm=${1:-}
if [ -z "$vmm" ]; then
	cargo build --release --quiet -p b2p-vmm --bin b2p-vmm || die "cannot build b2p-vmm"
	vmm=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/b2p-vmm
fi
[ -x "$vmm" ] || die "no b2p-vmm at $vmm"

# --- the kernel
if [ "$source" = b2p ]; then
	kdir=${B2P_KERNEL_DIR:-}
	if [ -z "$kdir" ]; then
		kdir=$(bash guest-image/kernel/build.sh | tail -n 1) || die "guest-image/kernel/build.sh failed"
	fi
	[ -f "$kdir/vmlinux" ] && [ -f "$kdir/vmlinuz64" ] || die "no vmlinux/vmlinuz64 in $kdir"
	if [ "${B2P_LINUX_KERNEL:-elf}" = elf ]; then kernel=$kdir/vmlinux; else kernel=$kdir/vmlinuz64; fi
	echo "linux-early-boot: our kernel $(cat "$kdir/version" 2>/dev/null) from $kdir: $(basename "$kernel"), $(stat -c %s "$kernel") bytes"
fi

# linux-image-cloud-amd64 is a metapackage; fetch what it depends on
if [ "$source" = debian ]; then
mkdir -p "$debs"
deb=$(ls -t "$debs"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | grep -v -- '-dbg' | sed -n 1p || true)
if [ -z "$deb" ]; then
	command -v apt-get >/dev/null || die "no cached kernel .deb in $debs and no apt-get"
	pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
	[ -n "$pkg" ] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
	echo "linux-early-boot: downloading $pkg into $debs"
	(cd "$debs" && apt-get download "$pkg" >/dev/null) || die "apt-get download $pkg failed"
	deb=$(ls -t "$debs"/"$pkg"_*.deb | sed -n 1p)
fi
echo "linux-early-boot: kernel package $(basename "$deb")"
dpkg-deb -x "$deb" "$work/pkg" || die "cannot unpack $deb"
kernel=$(ls "$work"/pkg/boot/vmlinuz-* | sed -n 1p)
[ -f "$kernel" ] || die "no vmlinuz in $deb"

if [ "${B2P_LINUX_KERNEL:-elf}" = elf ]; then
	# The payload of a bzImage: (setup_sects + 1) * 512 + payload_offset, payload_length bytes.
	python3 - "$kernel" "$work/payload" <<'PY' || die "cannot find the payload in $kernel"
import struct, sys
d = open(sys.argv[1], "rb").read()
if d[0x202:0x206] != b"HdrS":
    sys.exit("not a bzImage")
setup = (d[0x1f1] or 4) + 1
off, length = struct.unpack_from("<II", d, 0x248)
start = setup * 512 + off
open(sys.argv[2], "wb").write(d[start:start + length])
PY
	magic=$(head -c 6 "$work/payload" | od -An -tx1 | tr -d ' \n')
	case "$magic" in
	02214c18*) decomp="lz4 -d -c" ;;
	fd377a585a00*) decomp="xz -d -c" ;;
	28b52ffd*) decomp="zstd -d -c" ;;
	1f8b*) decomp="gzip -d -c" ;;
	425a68*) decomp="bzip2 -d -c" ;;
	5d0000*) decomp="xz --format=lzma -d -c" ;;
	*) die "unknown kernel compression (magic $magic)" ;;
	esac
	command -v "${decomp%% *}" >/dev/null || die "need ${decomp%% *} to unpack the kernel"
	$decomp "$work/payload" >"$work/vmlinux" 2>/dev/null || true
	head -c 4 "$work/vmlinux" | grep -q ELF || die "unpacking with $decomp gave no ELF"
	kernel=$work/vmlinux
	echo "linux-early-boot: booting the ELF vmlinux from the vmlinuz ($decomp, $(stat -c %s "$kernel") bytes)"
else
	echo "linux-early-boot: booting the bzImage as is"
fi
fi # debian

# --- a valid, empty initramfs (newc trailer only)
python3 - "$work/initrd.cpio" <<'PY'
import sys
name = b"TRAILER!!!\0"
hdr = b"070701" + b"".join(b"%08X" % v for v in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(name), 0))
entry = hdr + name
entry += b"\0" * (-len(entry) % 4)
entry += b"\0" * (-len(entry) % 512)
open(sys.argv[1], "wb").write(entry)
PY
# B2P_LINUX_INIT=busybox: instead, an initramfs whose /init (the host's
# static busybox) says so on the console and powers off: how far userspace
# gets.
if [ "${B2P_LINUX_INIT:-}" = busybox ]; then
	bb=$(command -v busybox || true)
	[ -n "$bb" ] && file -L "$bb" 2>/dev/null | grep -q 'statically linked' || die "B2P_LINUX_INIT=busybox needs a static busybox (busybox-static)"
	mkdir -p "$work/ird/bin" "$work/ird/dev"
	cp "$bb" "$work/ird/bin/busybox"
	printf '#!/bin/busybox sh\n/bin/busybox echo "b2p-early: userspace runs: $(/bin/busybox uname -r)"\n/bin/busybox poweroff -f\n' >"$work/ird/init"
	chmod 755 "$work/ird/init"
	(cd "$work/ird" && find . | cpio -o -H newc --quiet >"$work/initrd.cpio") || die "cannot make the busybox initramfs"
fi

cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8 panic=-1"
patterns=(
	"BIOS-e820: \[mem 0x0000000000000000-"
	"ACPI: RSDP 0x"
	"ACPI: XSDT 0x"
	"ACPI: FACP 0x"
	"ACPI: APIC 0x"
	"ACPI: DSDT 0x"
	"Allowing 2 (present )?CPUs"
)
devices=()
if [ "$source" = b2p ]; then
	command -v passt >/dev/null || die "passt is not installed (apt-get install passt)"
	disk_mib=300
	truncate -s "${disk_mib}M" "$work/data.img"
	devices=(--disk "$work/data.img" --net passt --vsock "cid=3,uds=$work/vsock.sock" --virtio-rng)
	cmdline="$cmdline initcall_debug ip=dhcp b2p.no_int3_selftest clearcpuid=smap,popcnt,cx16,rdtscp,rdrand,rdseed,fsgsbase,pcid,invpcid,rdpid,aperfmperf,xsave maxcpus=1 initcall_blacklist=ptp_kvm_init"
	patterns+=(
		"virtio_blk virtio[0-9]+: \[vda\] $((disk_mib * 2048)) 512-byte logical blocks \(315 MB/300 MiB\)"
		"device=eth0,"
		"NET: Registered PF_VSOCK protocol family"
		"b2p-check: virtio_vsock_init probed virtio[0-9]+"
		"b2p-check: virtio_rng_driver_init probed virtio[0-9]+"
	)
fi
cmdline="$cmdline ${B2P_LINUX_CMDLINE_EXTRA:-}"
# shellcheck disable=SC2206 # split on purpose: a list of arguments
devices+=(${B2P_LINUX_VMM_ARGS:-})
# initcall_debug: the devices a driver's init call probed, as one line each
# ("b2p-check: INIT probed DEV") in $work/derived.log.
derive() {
	[ "$source" = b2p ] && [ -f "$log" ] || return 0
	python3 - "$log" >"$work/derived.log" <<'PY' || true
import re, sys
cur = None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"calling +(\w+)\+0x", line)
    if m:
        cur = m.group(1)
        continue
    m = re.search(r"probe of (virtio\d+) returned 0 after", line)
    if m and cur:
        print(f"b2p-check: {cur} probed {m.group(1)}")
    if re.search(r"initcall \w+\+0x\S+ returned", line):
        cur = None
PY
}
found() { grep -qE -- "$1" "$log" "$work/derived.log" 2>/dev/null; }

echo "linux-early-boot: $vmm run --kernel $(basename "$kernel") --cpus 2 --memory 512 ${devices[*]} (up to ${timeout_s}s)"
echo "linux-early-boot: command line: $cmdline"
start=$(date +%s.%N)
: >"$work/derived.log"
"$vmm" run --kernel "$kernel" --initrd "$work/initrd.cpio" --cpus 2 --memory 512 \
	"${devices[@]}" --cmdline "$cmdline" --console "file:$log" 2>"$work/vmm.stderr" &
vmm_pid=$!

found_all=0
found_at=
while kill -0 "$vmm_pid" 2>/dev/null; do
	missing=0
	derive
	for p in "${patterns[@]}"; do
		found "$p" || { missing=1; break; }
	done
	if [ $missing = 0 ]; then
		if [ $found_all = 0 ]; then
			found_all=1
			found_at=$(python3 -c "print('%.1f' % ($(date +%s.%N) - $start))")
		fi
		[ "${B2P_LINUX_FULL:-0}" = 1 ] || break
	fi
	now=$(date +%s.%N)
	if python3 -c "import sys; sys.exit(0 if $now - $start > $timeout_s else 1)"; then break; fi
	sleep 0.5
done
end=$(date +%s.%N)
elapsed=$(python3 -c "print('%.1f' % ($end - $start))")
if kill -0 "$vmm_pid" 2>/dev/null; then
	kill "$vmm_pid" 2>/dev/null || true
	wait "$vmm_pid" 2>/dev/null || true
	exited="stopped by this script"
else
	wait "$vmm_pid" && rc=0 || rc=$?
	exited="b2p-vmm exited by itself with status $rc"
fi
vmm_pid=

derive
echo "linux-early-boot: ${elapsed}s, $exited, $(wc -l <"$log" 2>/dev/null || echo 0) log lines${found_at:+; all lines found after ${found_at}s}"
status=0
for p in "${patterns[@]}"; do
	line=$(grep -h -m1 -E -- "$p" "$log" "$work/derived.log" 2>/dev/null | sed -n 1p || true)
	if [ -n "$line" ]; then
		echo "  found:   $line"
	else
		echo "  MISSING: $p"
		status=1
	fi
done
echo "linux-early-boot: last log lines:"
tail -n "${B2P_LINUX_TAIL:-5}" "$log" 2>/dev/null | sed 's/^/  | /'
if [ -s "$work/vmm.stderr" ]; then
	echo "linux-early-boot: b2p-vmm stderr:"
	tail -n 5 "$work/vmm.stderr" | sed 's/^/  ! /'
fi
exit $status
