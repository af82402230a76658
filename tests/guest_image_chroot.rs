//! The unpacked boot2podman.gz as a chroot on this host, no VM: `podman
//! info` and `podman run` with the image's own podman, crun, conmon,
//! netavark and configs. Runs in fresh mount and network namespaces
//! (`unshare -m -n`) so nothing leaks onto the host. The host runs hybrid
//! cgroup v1 without systemd: the guest's cgroup v2 setup is tested under
//! QEMU (guest_image.rs), not here.

#[path = "guest_image/mod.rs"]
mod support;

use std::fs;
use std::process::Command;
use support::*;

fn unpack(initrd: &std::path::Path, dir: &std::path::Path) {
    sh(&format!(
        "cd '{}' && gzip -dc '{}' | cpio -idm --quiet --no-absolute-filenames",
        dir.display(),
        initrd.display()
    ));
}

#[test]
fn podman_info_and_run_in_a_chroot_of_the_image() {
    let Some((_kernel, initrd)) = image() else {
        return;
    };
    if !is_root() {
        skip("needs root (mknod while unpacking, chroot, mounts)");
        return;
    }
    for t in ["unshare", "cpio", "gzip", "chroot"] {
        if !have_tool(t) {
            skip(&format!("{t} not installed"));
            return;
        }
    }
    let dir = tempfile_dir("b2p-chroot");
    let root = dir.join("root");
    fs::create_dir_all(&root).unwrap();
    unpack(&initrd, &root);
    assert!(root.join("usr/bin/podman").is_file());
    assert!(root.join("usr/lib/b2p/init").is_file());
    assert!(root.join("init").is_file());

    let script = r#"
set -e
R=$1
mount --make-rprivate /
mount --bind "$R" "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
# This host is hybrid (v1 controllers + a cgroup2 holding hugetlb), which
# crun refuses: give the chroot the v1 hierarchies only.
if [ "$(stat -f -c %T /sys/fs/cgroup)" = tmpfs ]; then
  mount -t tmpfs -o mode=0755 cgroup "$R/sys/fs/cgroup"
  for c in /sys/fs/cgroup/*; do
    [ "$(stat -f -c %T "$c")" = cgroupfs ] || continue
    mkdir -p "$R$c"; mount --bind "$c" "$R$c"
  done
fi
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
chroot "$R" /bin/sh -c '
  set -e
  export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
  ip link set lo up
  echo "info: $(podman info --format "runtime={{.Host.OCIRuntime.Name}} manager={{.Host.CgroupManager}} driver={{.Store.GraphDriverName}} backend={{.Host.NetworkBackend}}")"
  podman load -q -i /usr/share/b2p/busybox-image.tar
  echo "images: $(podman images --format "{{.Repository}}:{{.Tag}}")"
  echo "run: $(podman run --rm busybox echo hello)"
  echo "net: $(podman run --rm busybox sh -c "ip -4 -o addr show eth0 | cut -d\" \" -f7")"
  podman rmi -a -f >/dev/null
'
"#;
    let out = Command::new("unshare")
        .args(["-m", "-n", "-p", "-f", "--", "sh", "-c", script, "sh"])
        .arg(&root)
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let all = format!(
        "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // Mounts lived in the namespace; the overlay layers are plain files now.
    let _ = fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{all}");
    assert!(
        stdout.contains("info: runtime=crun manager=cgroupfs driver=overlay backend=netavark"),
        "{all}"
    );
    assert!(
        stdout.contains("images: docker.io/library/busybox:latest"),
        "{all}"
    );
    assert!(stdout.contains("run: hello"), "{all}");
    assert!(stdout.contains("net: 10.88."), "{all}");
}
