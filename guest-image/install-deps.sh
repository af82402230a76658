#!/usr/bin/env bash
# Installs the Debian 12 packages that guest-image/build.sh, its tests
# (tests/guest_image*.rs), guest-image/kernel/build.sh and guest-image/measure.py
# need. Idempotent.
set -euo pipefail
PKGS=(
  mmdebstrap debian-archive-keyring apt dpkg   # build: resolve, download, install trixie debs
  cpio gzip lz4 tar coreutils findutils mount  # build: archive (gzip + legacy lz4), trim
  qemu-system-x86                              # tests: -M microvm -accel tcg boots
  e2fsprogs fdisk util-linux                   # tests: mkfs.ext4, sfdisk, blkid, unshare
  zstd python3                                 # measure.py unpack comparison
  gcc make bc bison flex libelf-dev xz-utils   # kernel/build.sh: build linux-source-6.12
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "guest-image: installing ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
