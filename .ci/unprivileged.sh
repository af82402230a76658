#!/usr/bin/env bash
# Runs the probe-guest tests on real KVM once as an unprivileged user, to
# show that b2p-vmm (and the manager's VM process) needs no root: only rw on
# /dev/kvm, given here the way Debian's udev rules give it (group kvm, 0660).
# Root-only parts (a TAP in a network namespace, a second local user) skip;
# nothing else may (B2P_REQUIRE=kvm,tools).
#
# Run as root, after `cargo test --workspace` built the tests. The user
# (b2p-ci) is created if missing; /dev/kvm's group and mode are put back on
# exit. The test binaries and b2p-vmm come from target/ when the user can
# reach it, else they are built into a world-readable directory (a checkout
# under a private home).
set -euo pipefail
cd "$(dirname "$0")/.."

user=b2p-ci
tests=(boot_probe virtio_probe seccomp manager)

if [ "$(id -u)" != 0 ]; then
  echo "unprivileged.sh: run as root (it creates $user and grants it /dev/kvm)" >&2
  exit 1
fi
id -u "$user" >/dev/null 2>&1 \
  || useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user"
getent group kvm >/dev/null || groupadd --system kvm
usermod -a -G kvm "$user"

kvm_owner=$(stat -c '%g' /dev/kvm)
kvm_mode=$(stat -c '%a' /dev/kvm)
restore() { chgrp "$kvm_owner" /dev/kvm; chmod "$kvm_mode" /dev/kvm; }
trap restore EXIT
chgrp kvm /dev/kvm
chmod g+rw /dev/kvm

as_user() { runuser -u "$user" -- "$@"; }

target=${B2P_UNPRIVILEGED_TARGET:-$PWD/target}
if ! as_user test -r "$target/debug/b2p-vmm" 2>/dev/null; then
  target=/var/tmp/b2p-unprivileged-target
  echo "target/ is out of $user's reach: building into $target"
fi
install -d -m 0755 "$target"
export CARGO_TARGET_DIR=$target
cargo build -q -p b2p-vmm --bin b2p-vmm
test_args=()
for t in "${tests[@]}"; do test_args+=(--test "$t"); done
mapfile -t bins < <(cargo test -q -p b2p --no-run "${test_args[@]}" --message-format=json \
  | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["executable"])')
if [ "${#bins[@]}" != "${#tests[@]}" ]; then
  echo "unprivileged.sh: expected ${#tests[@]} test binaries, got ${#bins[@]}: ${bins[*]}" >&2
  exit 1
fi

failed=0
for bin in "${bins[@]}"; do
  echo "== as $user (uid $(id -u "$user"), groups $(id -Gn "$user")): $(basename "$bin")"
  # A clean environment: no root's HOME, no cargo; B2P_REQUIRE=kvm,tools
  # makes a test that cannot open /dev/kvm (or lacks a tool) fail.
  (cd /tmp && as_user env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin TMPDIR=/tmp HOME=/nonexistent \
      B2P_VMM="$target/debug/b2p-vmm" B2P_REQUIRE=kvm,tools "$bin" --test-threads=2) || failed=1
done
exit "$failed"
