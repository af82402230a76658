#!/usr/bin/env bash
# Builds the b2p guest image: vmlinuz64 + vmlinux + boot2podman.gz + manifest.
#
#   guest-image/build.sh [--force] [--update] [--out DIR] [--verify-reproducible]
#
# Outputs go to $B2P_CACHE/image (B2P_CACHE defaults to ~/.cache/b2p); the
# Debian trixie .debs are kept in $B2P_CACHE/debs together with the resolved
# set (debs/SET). A build with unchanged inputs (.deb set, recipe files under
# guest-image/ except agent/, agent binary) does nothing. Same .debs, same bytes.
#
#   --update               re-resolve the package set against the mirror
#   --force                rebuild even when the inputs are unchanged
#   --out DIR              write the outputs to DIR instead of $B2P_CACHE/image
#   --verify-reproducible  rebuild into a temporary dir from the cached .debs
#                          and compare sha256 with the existing outputs
# Environment: B2P_CACHE, B2P_DEBIAN_MIRROR, B2P_SECURITY_MIRROR,
#   B2P_AGENT (path of a b2p-agent binary; "none" to leave it out),
#   SOURCE_DATE_EPOCH (default: fixed, see below), B2P_GZIP_LEVEL (default 9).
set -euo pipefail
umask 022
export LC_ALL=C.UTF-8 TZ=UTC
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${B2P_CACHE:-$HOME/.cache/b2p}
DEBS=$CACHE/debs
OUT=$CACHE/image
. "$HERE/mirror.sh"
. "$HERE/apt.sh"
SUITE=trixie
# Fixed timestamp for every file in the outputs (2025-08-09, trixie's release).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1754697600}
GZIP_LEVEL=${B2P_GZIP_LEVEL:-9}
FORCE=0 UPDATE=0 VERIFY=0
while (($#)); do
  case $1 in
    --force) FORCE=1 ;;
    --update) UPDATE=1 ;;
    --out) OUT=$2; shift ;;
    --verify-reproducible) VERIFY=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

T0=$(date +%s%N)
el() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '%d.%01ds' $((ms/1000)) $(((ms%1000)/100)); }
STEP=0; NSTEPS=8
step() { STEP=$((STEP+1)); printf '==> [%d/%d] %s (at %s)\n' "$STEP" "$NSTEPS" "$*" "$(el)"; }
info() { echo "    $*"; }
die() { echo "build.sh: error: $*" >&2; exit 1; }
human() { numfmt --to=iec-i --suffix=B "$1"; }

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap runs maintainer scripts in a chroot)"
for t in mmdebstrap apt-get dpkg-deb cpio gzip lz4 sha256sum numfmt; do
  command -v "$t" >/dev/null || die "$t missing: run guest-image/install-deps.sh"
done

if ((VERIFY)); then
  # Rebuild from the cached .debs into a temporary dir with the same agent
  # binary; compare with $OUT when its inputs match, else with a second build.
  tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/b2p-repro.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  agent=${B2P_AGENT:-${CARGO_TARGET_DIR:-$ROOT/target}/release/b2p-agent}
  if [ "$agent" != none ] && [ -x "$agent" ]; then cp "$agent" "$tmp/b2p-agent"; agent=$tmp/b2p-agent; else agent=none; fi
  B2P_AGENT=$agent "$0" --force --out "$tmp/a"
  ref=$OUT
  if ! cmp -s "$tmp/a/inputs" "$OUT/inputs" 2>/dev/null; then
    echo "==> $OUT was built from other inputs: second build for the comparison"
    B2P_AGENT=$agent "$0" --force --out "$tmp/b"; ref=$tmp/b
  fi
  ok=1
  for f in vmlinuz64 vmlinux boot2podman.gz boot2podman.lz4; do
    a=$(sha256sum <"$tmp/a/$f" | cut -d' ' -f1); b=$(sha256sum <"$ref/$f" | cut -d' ' -f1)
    if [ "$a" = "$b" ]; then echo "reproducible: $f $a"; else echo "NOT reproducible: $f $a != $b"; ok=0; fi
  done
  ((ok)) || exit 1
  exit 0
fi

mkdir -p "$DEBS" "$OUT"
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mapfile -t PKGS < <(sed -e 's/#.*//' -e '/^\s*$/d' "$HERE/packages.list")

# ---------------------------------------------------------------- resolve
# Resolves the package set with a private apt (empty dpkg status, trixie +
# updates + security) and downloads it into $DEBS. Only on the first build or
# with --update; later builds reuse debs/SET offline.
resolve() {
  local A=$WORK/apt
  private_apt "$A" "$DEBS" || die "no private apt"
  export APT_CONFIG=$A/apt.conf
  info "apt-get update ($MIRROR $SUITE, -updates, -security)"
  apt-get -q update >"$WORK/apt-update.log" 2>&1 || { cat "$WORK/apt-update.log"; die "apt-get update failed"; }
  # The rootfs set: Essential packages + packages.list, dependencies resolved.
  apt-get -s -q install '?essential' "${PKGS[@]}" >"$WORK/sim.txt" || die "resolution failed"
  # The kernel source (built by kernel/build.sh, never installed).
  local kver
  kver=$(apt-cache policy linux-source-6.12 | awk '/Candidate:/ {print $2}')
  [ -n "$kver" ] && [ "$kver" != "(none)" ] || die "cannot resolve linux-source-6.12"
  { awk '/^Inst / {gsub(/[()]/,""); print $2, $3}' "$WORK/sim.txt"
    echo "linux-source-6.12 $kver"; } | sort -u >"$WORK/want"
  info "$(wc -l <"$WORK/want") packages resolved; downloading what is not cached"
  (cd "$DEBS" && awk '{print $1"="$2}' "$WORK/want" | xargs apt-get -q download) \
    >"$WORK/download.log" 2>&1 || { tail -20 "$WORK/download.log"; die "download failed"; }
  # SET: one line per .deb: file name and sha256.
  : >"$WORK/SET"
  while read -r name ver; do
    local f; f=$(ls "$DEBS/${name}_${ver//:/%3a}_"*.deb 2>/dev/null | sed -n 1p)
    [ -n "$f" ] || die "downloaded file for $name $ver not found"
    echo "$(basename "$f") $(sha256sum <"$f" | cut -d' ' -f1)"
  done <"$WORK/want" | sort >"$WORK/SET"
  printf '%s\n' "${PKGS[@]}" | sort >"$WORK/SET.packages"
  mv "$WORK/SET" "$DEBS/SET"; mv "$WORK/SET.packages" "$DEBS/SET.packages"
  unset APT_CONFIG
}

step "package set"
if ((UPDATE)) || [ ! -f "$DEBS/SET" ] || ! printf '%s\n' "${PKGS[@]}" | sort | cmp -s - "$DEBS/SET.packages"; then
  resolve
else
  info "using the cached set $DEBS/SET (guest-image/build.sh --update re-resolves)"
fi
while read -r f sum; do
  [ -f "$DEBS/$f" ] || die "$DEBS/$f missing: run with --update"
done <"$DEBS/SET"
info "$(wc -l <"$DEBS/SET") .debs, $(du -shc $(awk -v d="$DEBS" '{print d"/"$1}' "$DEBS/SET") | tail -1 | cut -f1) in $DEBS"

# ---------------------------------------------------------------- agent
AGENT=${B2P_AGENT:-}
if [ -z "$AGENT" ]; then
  tdir=${CARGO_TARGET_DIR:-$ROOT/target}
  if command -v cargo >/dev/null && [ -f "$ROOT/guest-image/agent/Cargo.toml" ]; then
    info "cargo build --release -p b2p-agent"
    if (cd "$ROOT" && nice cargo build -q --release -p b2p-agent) >"$WORK/agent.log" 2>&1; then
      AGENT=$tdir/release/b2p-agent
    else
      echo "WARNING: b2p-agent does not build; the image will have no agent:" >&2
      tail -5 "$WORK/agent.log" >&2
    fi
  fi
  [ -n "$AGENT" ] || { [ -x "$tdir/release/b2p-agent" ] && AGENT=$tdir/release/b2p-agent; } || true
fi
[ "$AGENT" = none ] && AGENT=
if [ -n "$AGENT" ] && [ ! -x "$AGENT" ]; then echo "WARNING: $AGENT not found; no agent" >&2; AGENT=; fi
AGENT_SUM=none
[ -n "$AGENT" ] && AGENT_SUM=$(sha256sum <"$AGENT" | cut -d' ' -f1)

# ---------------------------------------------------------------- inputs
INPUTS=$( { cat "$DEBS/SET"; echo "agent $AGENT_SUM"; echo "sde $SOURCE_DATE_EPOCH gzip $GZIP_LEVEL mirror $MIRROR $SECMIRROR";
  cd "$HERE" && find . -path ./agent -prune -o -type f -print | LC_ALL=C sort | xargs sha256sum; } | sha256sum | cut -d' ' -f1)
if ((!FORCE)) && [ -f "$OUT/inputs" ] && [ "$(cat "$OUT/inputs")" = "$INPUTS" ] \
   && [ -f "$OUT/vmlinuz64" ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/boot2podman.gz" ] && [ -f "$OUT/boot2podman.lz4" ]; then
  echo "up to date: $OUT (inputs $INPUTS)"
  ls -l "$OUT"
  exit 0
fi

# ---------------------------------------------------------------- rootfs
step "local repository from the cached .debs"
REPO=$WORK/repo
mkdir -p "$REPO"
while read -r f sum; do
  ln -s "$DEBS/$f" "$REPO/$f"
  { dpkg-deb -f "$DEBS/$f"; echo "Filename: ./$f"; echo "Size: $(stat -c %s "$DEBS/$f")"; echo "SHA256: $sum"; echo; }
done <"$DEBS/SET" >"$REPO/Packages"
# A Release naming the suite: mmdebstrap selects the Essential set by ?archive/?codename.
{ echo "Origin: Debian"; echo "Label: b2p cached debs"; echo "Suite: $SUITE"; echo "Codename: $SUITE"
  echo "Architectures: amd64"; echo "Components: main"
  echo "Date: $(date -u -R -d "@$SOURCE_DATE_EPOCH")"; echo "SHA256:"
  echo " $(sha256sum <"$REPO/Packages" | cut -d' ' -f1) $(stat -c %s "$REPO/Packages") Packages"; } >"$REPO/Release"

step "mmdebstrap (essential + $(echo "${PKGS[@]}" | wc -w) packages, maintainer scripts run)"
RFS=$WORK/rootfs
INC=$(IFS=,; echo "${PKGS[*]}")
nice mmdebstrap --variant=essential --include="$INC" --mode=root \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --aptopt='Acquire::Languages "none"' --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' --dpkgopt='path-exclude=/usr/share/zsh/*' \
  --dpkgopt='path-exclude=/usr/share/bash-completion/*' --dpkgopt='path-exclude=/usr/share/fish/*' \
  --dpkgopt='path-exclude=/usr/libexec/podman/podman-testing' --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/*.a' \
  --dpkgopt='path-exclude=/usr/libexec/podman/quadlet' --dpkgopt='path-exclude=/usr/lib/systemd/*' \
  $SUITE "$RFS" "deb [trusted=yes] copy://$REPO ./" 2>&1 | sed -u 's/^/    /'
[ -x "$RFS/usr/bin/podman" ] || die "mmdebstrap did not install podman"

step "kernel (guest-image/kernel/build.sh from linux-source-6.12; no modules)"
KDEB=$(awk '{print $1}' "$DEBS/SET" | grep -E '^linux-source-6\.12_' | sed -n 1p)
[ -n "$KDEB" ] || die "no linux-source-6.12 deb in SET: run with --update"
# Its progress goes to stderr; the last stdout line is its output directory
# (cached there by .deb sha256, config and toolchain).
KDIR=$(B2P_CACHE=$CACHE bash "$HERE/kernel/build.sh" --deb "$DEBS/$KDEB" | tail -1) || die "kernel build failed"
for f in vmlinuz64 vmlinux config version; do [ -f "$KDIR/$f" ] || die "kernel/build.sh left no $f in $KDIR"; done
KVER=$(cat "$KDIR/version")
mkdir -p "$WORK/out"
cp "$KDIR/vmlinuz64" "$KDIR/vmlinux" "$WORK/out/"
KCONFIG_SUM=$(sha256sum <"$KDIR/config" | cut -d' ' -f1)
# Everything is built in: the image carries no modules.
rm -rf "$RFS/usr/lib/modules"
info "kernel $KVER (config sha256 $KCONFIG_SUM)"

step "configuration, init, busybox OCI image, agent"
# Recipe files (init, containers configs, ...) over the rootfs.
cp -a --no-preserve=ownership "$HERE/rootfs/." "$RFS/"
chmod 0755 "$RFS/init" "$RFS/usr/lib/b2p/"* "$RFS/etc/b2p/agent.sh"
# The user that boot2podman's userdata.tar (authorized_keys) is extracted for.
grep -q '^tc:' "$RFS/etc/passwd" || {
  echo 'tc:x:1000:1000:boot2podman:/home/tc:/bin/sh' >>"$RFS/etc/passwd"
  echo 'tc:x:1000:' >>"$RFS/etc/group"
  echo 'tc:*:19518:0:99999:7:::' >>"$RFS/etc/shadow"
  echo 'tc:1000000:65536' >>"$RFS/etc/subuid"; echo 'tc:1000000:65536' >>"$RFS/etc/subgid"
}
# busybox applets the image has no other provider for: system tools in
# /usr/sbin, the ones a user (tc's PATH has no sbin) types in /usr/bin.
for a in ip udhcpc devmem poweroff reboot halt usleep; do
  [ -e "$RFS/usr/sbin/$a" ] || [ -e "$RFS/usr/bin/$a" ] || ln -s ../bin/busybox "$RFS/usr/sbin/$a"
done
for a in ps top less vi; do
  [ -e "$RFS/usr/sbin/$a" ] || [ -e "$RFS/usr/bin/$a" ] || ln -s busybox "$RFS/usr/bin/$a"
done
# tc may use sudo without a password, as boot2podman's tc could.
chmod 0440 "$RFS/etc/sudoers.d/tc"
[ -c "$RFS/dev/console" ] || mknod -m 600 "$RFS/dev/console" c 5 1
[ -c "$RFS/dev/null" ] || mknod -m 666 "$RFS/dev/null" c 1 3
echo "boot2podman" >"$RFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$RFS/etc/hosts"
: >"$RFS/etc/resolv.conf"
"$HERE/mkoci.sh" "$RFS/usr/bin/busybox" "$RFS/usr/share/b2p/busybox-image.tar" "$WORK/oci"
if [ -n "$AGENT" ]; then
  install -m 0755 "$AGENT" "$RFS/usr/bin/b2p-agent"; info "agent: $AGENT ($AGENT_SUM)"
else
  echo "WARNING: no b2p-agent binary: the image has no agent (cargo build --release -p b2p-agent)" >&2
fi

step "trim"
# mmdebstrap wrote the temporary local repository into sources.list.
printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
  "$MIRROR" $SUITE "$MIRROR" $SUITE "$SECMIRROR" $SUITE >"$RFS/etc/apt/sources.list"
PKGLIST=$(chroot "$RFS" dpkg-query -W -f '${Package} ${Version} ${Architecture}\n' | sort)
rm -rf "$RFS"/usr/share/{man,info,locale,lintian,linda,bash-completion,zsh,fish,gtk-doc} \
  "$RFS"/var/cache/* "$RFS"/var/lib/apt/lists/* "$RFS"/var/log/* \
  "$RFS"/usr/share/doc "$RFS"/usr/share/common-licenses "$RFS"/boot \
  "$RFS"/var/cache/ldconfig/aux-cache "$RFS"/etc/machine-id
find "$RFS" -name '*.pyc' -delete
# Everything the kernel's initramfs unpacker gets: fixed mtime, root-owned.
find "$RFS" -depth -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +

step "boot2podman.gz (cpio newc, sorted, gzip -n -$GZIP_LEVEL)"
(cd "$RFS" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
  | cpio --quiet -o -H newc -0 --reproducible -R 0:0) >"$WORK/out/boot2podman.cpio"
USIZE=$(stat -c %s "$WORK/out/boot2podman.cpio")
info "uncompressed cpio $(human "$USIZE")"
nice gzip -n -"$GZIP_LEVEL" <"$WORK/out/boot2podman.cpio" >"$WORK/out/boot2podman.gz"
# The same cpio as legacy lz4 (the kernel's unpacker takes both; lz4 unpacks
# in about half the time of gzip, see README "Figures").
nice lz4 -q -l -9 <"$WORK/out/boot2podman.cpio" >"$WORK/out/boot2podman.lz4"
rm -f "$WORK/out/boot2podman.cpio"
touch -d "@$SOURCE_DATE_EPOCH" "$WORK/out/"*

step "manifest"
{
  echo "# b2p guest image manifest"
  echo "inputs $INPUTS"
  echo "source-date-epoch $SOURCE_DATE_EPOCH"
  echo "kernel $KVER"
  echo "kernel-config $KCONFIG_SUM"
  echo "agent $AGENT_SUM"
  echo "uncompressed boot2podman.cpio $USIZE"
  for f in vmlinuz64 vmlinux boot2podman.gz boot2podman.lz4; do
    echo "output $f $(stat -c %s "$WORK/out/$f") $(sha256sum <"$WORK/out/$f" | cut -d' ' -f1)"
  done
  echo "$PKGLIST" | sed 's/^/package /'
  echo "source $(dpkg-deb -f "$DEBS/$KDEB" Package Version Architecture | awk -F': ' '{printf "%s ", $2}' | sed 's/ $//')"
  sed 's/^/deb /' "$DEBS/SET"
} >"$WORK/out/manifest"
echo "$INPUTS" >"$WORK/out/inputs"
for f in vmlinuz64 vmlinux boot2podman.gz boot2podman.lz4 manifest inputs; do mv -f "$WORK/out/$f" "$OUT/$f"; done

echo "==> done in $(el): $OUT"
for f in vmlinuz64 vmlinux; do
  printf '    %-16s %10s  %s\n' $f "$(human "$(stat -c %s "$OUT/$f")")" "$(sha256sum <"$OUT/$f" | cut -c1-16)"
done
printf '    %-16s %10s  %s (uncompressed %s)\n' boot2podman.gz "$(human "$(stat -c %s "$OUT/boot2podman.gz")")" \
  "$(sha256sum <"$OUT/boot2podman.gz" | cut -c1-16)" "$(human "$USIZE")"
printf '    %-16s %10s  %s\n' boot2podman.lz4 "$(human "$(stat -c %s "$OUT/boot2podman.lz4")")" "$(sha256sum <"$OUT/boot2podman.lz4" | cut -c1-16)"
