#!/usr/bin/env bash
# Builds a one-layer busybox container image (docker-archive, loadable by
# `podman load`) from the static busybox binary of the image's busybox-static
# package, so `podman run busybox` works with no registry. Deterministic:
# sorted tar entries, fixed mtimes (SOURCE_DATE_EPOCH), uid/gid 0.
#   mkoci.sh BUSYBOX OUT.tar WORKDIR
set -euo pipefail
BB=$1 OUTTAR=$2 W=$3
SDE=${SOURCE_DATE_EPOCH:?}
TAR=(tar --sort=name --mtime="@$SDE" --owner=0 --group=0 --numeric-owner --format=gnu)
rm -rf "$W"; mkdir -p "$W/layer/bin" "$W/img"
install -m 0755 "$BB" "$W/layer/bin/busybox"
# Every applet as a link to /bin/busybox (busybox --list-full names bin/sh, usr/bin/awk...).
"$BB" --list-full | while read -r a; do
  [ "$a" = bin/busybox ] && continue
  mkdir -p "$W/layer/$(dirname "$a")"
  ln -sf /bin/busybox "$W/layer/$a"
done
mkdir -p "$W/layer/etc" "$W/layer/tmp" "$W/layer/root" "$W/layer/home" "$W/layer/var"
chmod 1777 "$W/layer/tmp"; chmod 0700 "$W/layer/root"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n' >"$W/layer/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$W/layer/etc/group"
(cd "$W/layer" && "${TAR[@]}" -cf "$W/layer.tar" .)
LSUM=$(sha256sum <"$W/layer.tar" | cut -d' ' -f1)
mkdir -p "$W/img/$LSUM"; mv "$W/layer.tar" "$W/img/$LSUM/layer.tar"
CREATED=$(date -u -d "@$SDE" +%Y-%m-%dT%H:%M:%SZ)
VER=$("$BB" 2>&1 | awk 'NR==1{print $2}')
printf '{"architecture":"amd64","os":"linux","created":"%s","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["sh"],"Labels":{"org.opencontainers.image.description":"busybox %s from Debian busybox-static, built by b2p guest-image"}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"b2p guest-image/mkoci.sh"}]}' \
  "$CREATED" "$VER" "$LSUM" "$CREATED" >"$W/config.json"
CSUM=$(sha256sum <"$W/config.json" | cut -d' ' -f1)
mv "$W/config.json" "$W/img/$CSUM.json"
printf '[{"Config":"%s.json","RepoTags":["docker.io/library/busybox:latest"],"Layers":["%s/layer.tar"]}]' "$CSUM" "$LSUM" >"$W/img/manifest.json"
mkdir -p "$(dirname "$OUTTAR")"
(cd "$W/img" && "${TAR[@]}" -cf "$OUTTAR" .)
echo "    busybox image: $(du -h "$OUTTAR" | cut -f1) (layer sha256:${LSUM:0:12})"
