#!/usr/bin/env bash
# Builds the b2p guest kernel from Debian trixie's linux-source-6.12 with our
# config (guest-image/kernel/b2p.config over `make allnoconfig`; no modules)
# and our patches (guest-image/kernel/patches/*.patch, applied in name order).
#
#   guest-image/kernel/build.sh [--deb PATH] [--out DIR] [--force]
#
# Interface (guest-image/build.sh relies on it):
#   - the last line on stdout is the output directory, and nothing else goes
#     to stdout; progress and errors go to stderr;
#   - that directory holds vmlinuz64 (the bzImage), vmlinux (the ELF with the
#     PVH entry note, debug info stripped), config (the full .config), version
#     (the kernel release, e.g. 6.12.118-b2p) and key (the cache key's inputs).
#
#   --deb PATH  the linux-source-6.12_*.deb to build (default: download the
#               current one from trixie with a private apt into
#               $B2P_CACHE/kernel/debs)
#   --out DIR   also copy the outputs to DIR and print DIR (default: print the
#               cache directory $B2P_CACHE/kernel/<key>)
#   --force     rebuild even when the cache has this key
# The key is the sha256 of: the .deb's sha256, b2p.config's sha256, the
# patches' sha256, the base config (allnoconfig), the gcc and make versions
# and this recipe's version.
# Same key: nothing is built (it says so). The unpacked source tree is kept in
# $B2P_CACHE/kernel/tree for incremental rebuilds from the same .deb and
# patches.
# Environment: B2P_CACHE (~/.cache/b2p), B2P_DEBIAN_MIRROR, B2P_SECURITY_MIRROR,
#   B2P_KERNEL_JOBS (default: nproc).
set -euo pipefail
umask 022
export LC_ALL=C.UTF-8 TZ=UTC
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${B2P_CACHE:-$HOME/.cache/b2p}
KCACHE=$CACHE/kernel
FRAGMENT=$HERE/b2p.config
PATCHES=$HERE/patches
BASE=allnoconfig
RECIPE=1 # bump when this script changes what it produces
. "$HERE/../mirror.sh"
. "$HERE/../apt.sh"
SUITE=trixie
JOBS=${B2P_KERNEL_JOBS:-$(nproc)}
DEB= OUTDIR= FORCE=0
die() { echo "kernel/build.sh: error: $*" >&2; exit 1; }
while (($#)); do
  case $1 in
    --deb) [ $# -ge 2 ] || die "--deb needs a path"; DEB=$2; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUTDIR=$2; shift ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,28p' "$0" >&2; exit 0 ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done

T0=$(date +%s)
STEP=0; NSTEPS=5
step() { STEP=$((STEP+1)); printf '==> kernel [%d/%d] %s (at %ds)\n' "$STEP" "$NSTEPS" "$*" $(($(date +%s) - T0)) >&2; }
info() { echo "    $*" >&2; }

for t in gcc make bc bison flex xz tar dpkg-deb sha256sum objcopy readelf lz4 perl patch; do
  command -v "$t" >/dev/null || die "$t missing: run guest-image/install-deps.sh"
done
[ -f /usr/include/libelf.h ] || die "libelf-dev missing: run guest-image/install-deps.sh"

# ---------------------------------------------------------------- source .deb
step "source package"
if [ -z "$DEB" ]; then
  # guest-image/apt.sh's private apt; only linux-source-6.12 is downloaded.
  A=$KCACHE/apt
  private_apt "$A" "$KCACHE/debs" || die "no private apt"
  ver=
  if APT_CONFIG=$A/apt.conf apt-get -q update >"$A/update.log" 2>&1; then
    ver=$(APT_CONFIG=$A/apt.conf apt-cache policy linux-source-6.12 | awk '/Candidate:/ {print $2}')
  fi
  if [ -n "$ver" ] && [ "$ver" != "(none)" ]; then
    DEB=$KCACHE/debs/linux-source-6.12_${ver//:/%3a}_all.deb
    if [ ! -f "$DEB" ]; then
      info "downloading linux-source-6.12 $ver ($SUITE)"
      (cd "$KCACHE/debs" && APT_CONFIG=$A/apt.conf apt-get -q download "linux-source-6.12=$ver" >"$A/download.log" 2>&1) \
        || { tail -5 "$A/download.log" >&2; die "download of linux-source-6.12 failed"; }
    fi
  else
    # Offline: the newest cached one.
    DEB=$(ls -t "$KCACHE"/debs/linux-source-6.12_*_all.deb 2>/dev/null | sed -n 1p || true)
    [ -n "$DEB" ] || { tail -5 "$A/update.log" >&2; die "apt-get update failed and no cached linux-source-6.12 .deb"; }
    info "mirror unreachable: using the cached $(basename "$DEB")"
  fi
fi
[ -f "$DEB" ] || die "no such file: $DEB"
DEB_SHA=$(sha256sum <"$DEB" | cut -d' ' -f1)
info "$(basename "$DEB") sha256 $DEB_SHA"

PATCH_SHA=$(cd "$PATCHES" && find . -name '*.patch' | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1)
KEYTEXT=$(printf 'deb %s\nfragment %s\npatches %s\nbase %s\ngcc %s\nmake %s\nrecipe %s\n' \
  "$DEB_SHA" "$(sha256sum <"$FRAGMENT" | cut -d' ' -f1)" "$PATCH_SHA" "$BASE" \
  "$(gcc --version | sed -n 1p)" "$(make --version | sed -n 1p)" "$RECIPE")
KEY=$(printf '%s\n' "$KEYTEXT" | sha256sum | cut -d' ' -f1 | cut -c1-16)
DEST=$KCACHE/$KEY
publish() {
  if [ -n "$OUTDIR" ]; then
    mkdir -p "$OUTDIR"
    for f in vmlinuz64 vmlinux config version key; do cp "$DEST/$f" "$OUTDIR/$f.tmp" && mv "$OUTDIR/$f.tmp" "$OUTDIR/$f"; done
    echo "$(cd "$OUTDIR" && pwd)"
  else
    echo "$DEST"
  fi
}
if ((!FORCE)) && [ -f "$DEST/key" ] && [ "$(cat "$DEST/key")" = "$KEYTEXT" ]; then
  info "kernel $(cat "$DEST/version") is cached under key $KEY: nothing to build"
  publish
  exit 0
fi

# ---------------------------------------------------------------- unpack
step "unpack the source"
TREE=$KCACHE/tree
if [ -f "$TREE/.b2p-deb" ] && [ "$(cat "$TREE/.b2p-deb")" = "$DEB_SHA $PATCH_SHA" ] && [ -f "$TREE/Makefile" ]; then
  info "reusing the unpacked tree $TREE (incremental build)"
else
  rm -rf "$TREE" "$TREE.new"; mkdir -p "$TREE.new"
  tarball=$(dpkg-deb -c "$DEB" | awk '{print $NF}' | grep -E '^\./usr/src/linux-source-6\.12\.tar\.xz$' || true)
  [ -n "$tarball" ] || die "$(basename "$DEB") holds no usr/src/linux-source-6.12.tar.xz"
  dpkg-deb --fsys-tarfile "$DEB" | tar -xO "$tarball" | tar -xJ -C "$TREE.new" --strip-components=1 \
    || die "cannot unpack $(basename "$DEB")"
  # The build date inside the kernel: the tarball's date in the .deb.
  dpkg-deb -c "$DEB" | awk -v t="$tarball" '$NF == t {print $4}' >"$TREE.new/.b2p-date"
  for p in $(cd "$PATCHES" && find . -name '*.patch' | LC_ALL=C sort); do
    info "patch ${p#./}"
    patch -d "$TREE.new" -p1 -s --no-backup-if-mismatch <"$PATCHES/$p" || die "patch $p does not apply"
  done
  echo "$DEB_SHA $PATCH_SHA" >"$TREE.new/.b2p-deb"
  mv "$TREE.new" "$TREE"
fi

# ---------------------------------------------------------------- configure
step "configure ($BASE + $(basename "$FRAGMENT"))"
cd "$TREE"
# Reproducible bytes: no host, user or date in the image.
export KBUILD_BUILD_TIMESTAMP="$(cat .b2p-date)" \
  KBUILD_BUILD_USER=b2p KBUILD_BUILD_HOST=b2p KBUILD_BUILD_VERSION=1 ARCH=x86_64
rm -f .config
scripts/kconfig/merge_config.sh -n "$FRAGMENT" >"$KCACHE/merge.log" 2>&1 || { tail -20 "$KCACHE/merge.log" >&2; die "merge_config.sh failed"; }
make -s olddefconfig >>"$KCACHE/merge.log" 2>&1 || { tail -20 "$KCACHE/merge.log" >&2; die "make olddefconfig failed"; }
# Every line of the fragment must survive: `CONFIG_X=v` as is, `# CONFIG_X is
# not set` as not set or absent.
bad=$(awk '
  NR == FNR { have[$0] = 1; if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) set[substr($0, 1, RLENGTH - 1)] = 1; next }
  /^CONFIG_/ { if (!($0 in have)) print "wanted " $0; next }
  /^# CONFIG_.* is not set$/ { if ($2 in set) print "wanted " $0 }
' .config "$FRAGMENT")
if [ -n "$bad" ]; then
  echo "$bad" | while read -r l; do
    opt=$(echo "$l" | grep -oE 'CONFIG_[A-Za-z0-9_]+' | sed -n 1p)
    echo "    $l, got: $(grep -E "^(# )?$opt[= ]" .config || echo 'absent (unmet dependency or no such option)')" >&2
  done
  die "$(basename "$FRAGMENT") does not apply cleanly to this source"
fi
info "$(grep -c '=y$' .config) options on; CONFIG_MODULES $(grep -q '^CONFIG_MODULES=y' .config && echo on || echo off)"

# ---------------------------------------------------------------- compile
step "compile bzImage + vmlinux (make -j$JOBS)"
LOG=$KCACHE/make.log
: >"$LOG"
make -j"$JOBS" bzImage >"$LOG" 2>&1 &
mk=$!
trap 'kill "$mk" 2>/dev/null || true' EXIT
while kill -0 "$mk" 2>/dev/null; do
  for _ in $(seq 30); do kill -0 "$mk" 2>/dev/null || break; sleep 1; done
  kill -0 "$mk" 2>/dev/null || break
  info "$(grep -cE '^  (CC|AS|AR|LD)' "$LOG") objects built so far ($(($(date +%s) - T0))s, load $(cut -d' ' -f1-3 /proc/loadavg))"
done
wait "$mk" || { grep -E 'error|Error' "$LOG" | head -20 >&2; tail -20 "$LOG" >&2; die "make failed (full log: $LOG)"; }
trap - EXIT
info "$(grep -cE '^  (CC|AS|AR|LD)' "$LOG") objects in $(($(date +%s) - T0))s"

# ---------------------------------------------------------------- outputs
step "outputs"
readelf -n vmlinux | grep -q 'Xen.*0x00000012' || readelf -n vmlinux | grep -qi 'PHYS32_ENTRY\|Unknown note type: (0x00000012)' \
  || die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
rm -rf "$DEST.new"; mkdir -p "$DEST.new"
cp arch/x86/boot/bzImage "$DEST.new/vmlinuz64"
objcopy --strip-debug vmlinux "$DEST.new/vmlinux"
cp .config "$DEST.new/config"
make -s kernelrelease >"$DEST.new/version"
printf '%s\n' "$KEYTEXT" >"$DEST.new/key"
rm -rf "$DEST"; mv "$DEST.new" "$DEST"
info "kernel $(cat "$DEST/version"): vmlinuz64 $(stat -c %s "$DEST/vmlinuz64") bytes, vmlinux $(stat -c %s "$DEST/vmlinux") bytes, in $(($(date +%s) - T0))s"
publish
