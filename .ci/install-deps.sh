#!/usr/bin/env bash
# Installs the Debian and Python packages b2p's build and tests need.
set -euo pipefail
APT_PKGS=(qemu-system-x86 qemu-utils mmdebstrap podman crun conmon busybox-static
          cpio zstd lz4 fdisk e2fsprogs iproute2 socat util-linux)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
python3 -c 'import varlink' 2>/dev/null || python3 -m pip install -q varlink
