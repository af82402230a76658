#!/usr/bin/env bash
# Early boot of the Debian cloud kernel (linux-image-cloud-amd64) under
# `b2p-vmm run` (issue 2, must-show 2): proves Linux accepts our boot tables.
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
# usage: tests/linux-early-boot.sh [path/to/b2p-vmm]
# env:   B2P_LINUX_TIMEOUT (s), B2P_LINUX_LOG (log path), B2P_CACHE (~/.cache/b2p),
#        B2P_LINUX_KERNEL=elf|bzimage (default elf),
#        B2P_LINUX_FULL=1 (keep running to the timeout, to see how far it gets)
# exit:  0 all lines found, 1 some missing, 2 setup failed (message says why)
set -euo pipefail
cd "$(dirname "$0")/.."

timeout_s=${B2P_LINUX_TIMEOUT:-240}
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

# --- the kernel: linux-image-cloud-amd64 is a metapackage; fetch what it depends on
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

cmdline="console=ttyS0 earlyprintk=serial,ttyS0,115200 loglevel=8 panic=-1"
patterns=(
	"BIOS-e820: \[mem 0x0000000000000000-"
	"ACPI: RSDP 0x"
	"ACPI: XSDT 0x"
	"ACPI: FACP 0x"
	"ACPI: APIC 0x"
	"ACPI: DSDT 0x"
	"smpboot: Allowing 2 CPUs"
)

echo "linux-early-boot: $vmm run --kernel $(basename "$kernel") --cpus 2 --memory 512 (up to ${timeout_s}s)"
start=$(date +%s.%N)
"$vmm" run --kernel "$kernel" --initrd "$work/initrd.cpio" --cpus 2 --memory 512 \
	--cmdline "$cmdline" --console "file:$log" 2>"$work/vmm.stderr" &
vmm_pid=$!

found_all=0
found_at=
while kill -0 "$vmm_pid" 2>/dev/null; do
	missing=0
	for p in "${patterns[@]}"; do
		grep -q -- "$p" "$log" 2>/dev/null || { missing=1; break; }
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

echo "linux-early-boot: ${elapsed}s, $exited, $(wc -l <"$log" 2>/dev/null || echo 0) log lines${found_at:+; all lines found after ${found_at}s}"
status=0
for p in "${patterns[@]}"; do
	line=$(grep -m1 -- "$p" "$log" 2>/dev/null || true)
	if [ -n "$line" ]; then
		echo "  found:   $line"
	else
		echo "  MISSING: $p"
		status=1
	fi
done
echo "linux-early-boot: last log lines:"
tail -n 5 "$log" 2>/dev/null | sed 's/^/  | /'
if [ -s "$work/vmm.stderr" ]; then
	echo "linux-early-boot: b2p-vmm stderr:"
	tail -n 5 "$work/vmm.stderr" | sed 's/^/  ! /'
fi
exit $status
