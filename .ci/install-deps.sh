#!/usr/bin/env bash
# Installs what b2p's build and `cargo test --workspace` need on a fresh
# Debian 12 machine: the guest image's build deps (guest-image/install-deps.sh),
# the peers the tests drive (QEMU, Podman, passt, socat, iproute2, ssh and
# ssh-keygen for the manager), the Python varlink
# client, vhost-device-vsock (the vsock peer of tests/agent_vsock.rs), virtiofsd
# (the virtio-fs backend of tests/virtio_fs.rs) and
# cargo-fuzz (CI builds the fuzz targets with the nightly toolchain).
# Idempotent: a machine that has everything installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash guest-image/install-deps.sh

APT_PKGS=(qemu-system-x86 qemu-utils podman crun conmon busybox-static
          iproute2 socat util-linux strace gcc binutils python3 openssh-client
          passt)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

if ! python3 -c 'import varlink' 2>/dev/null; then
  echo "installing: python varlink"
  python3 -m pip install -q varlink 2>/dev/null \
    || python3 -m pip install -q --break-system-packages varlink \
    || { apt-get install -y -q python3-pip && python3 -m pip install -q --break-system-packages varlink; }
fi

if ! command -v vhost-device-vsock >/dev/null && [ ! -x "$HOME/.cargo/bin/vhost-device-vsock" ]; then
  echo "installing: vhost-device-vsock (cargo install, a few minutes)"
  cargo install --locked vhost-device-vsock
fi

if ! command -v cargo-fuzz >/dev/null && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
  echo "installing: cargo-fuzz (cargo install, a few minutes)"
  cargo install --locked cargo-fuzz
fi

# virtiofsd (tests/virtio_fs.rs, b2p-vmm --fs): Debian 13 ships it as
# /usr/libexec/virtiofsd; on Debian 12 it comes from crates.io, built
# against libseccomp and libcap-ng.
if [ ! -x /usr/libexec/virtiofsd ] && ! command -v virtiofsd >/dev/null \
    && [ ! -x "$HOME/.cargo/bin/virtiofsd" ]; then
  for p in libseccomp-dev libcap-ng-dev pkg-config; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$p"; }
  done
  echo "installing: virtiofsd (cargo install, a few minutes)"
  cargo install --locked virtiofsd
fi

# tests/net_pull.rs and tests/docker_cli.rs: a DNS server, a registry and
# skopeo to seed it, an HTTP proxy, and Debian's docker client
# (/usr/bin/docker). The tests run their own instances: no service may start
# during the install (a policy-rc.d that answers 101 while it runs).
NET_PKGS=(dnsmasq-base docker-registry skopeo tinyproxy docker.io)
missing=()
for p in "${NET_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]} (no services started)"
  policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    policy=/usr/sbin/policy-rc.d
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
