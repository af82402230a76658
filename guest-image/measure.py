#!/usr/bin/env python3
"""Boot-time figures for the guest image under QEMU TCG (no KVM needed).

  guest-image/measure.py boot  [--runs N]    QEMU start -> kernel milestones -> "b2p: userspace ready"
  guest-image/measure.py unpack [--runs N]   initrd unpack time: gzip vs zstd vs lz4 (legacy -l)

Both boot vmlinuz64 from $B2P_CACHE/image (default ~/.cache/b2p/image) with
`qemu-system-x86_64 -M microvm -accel tcg`, timestamp each console line on
the host, and print min/median/max. `unpack` recompresses the initrd's cpio
and reads the kernel's own timestamps from "Trying to unpack rootfs image"
to "Freeing initrd memory" (the guest is stopped right after).
"""
import argparse, os, statistics, subprocess, sys, tempfile, time

CACHE = os.environ.get("B2P_CACHE", os.path.expanduser("~/.cache/b2p"))
IMG = os.path.join(CACHE, "image")


def host_khz():
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    return 2000000


def qemu(initrd, cmdline, stop_at, timeout=300):
    """Boots; returns {marker: (host seconds since QEMU start, kernel timestamp or None)}."""
    args = ["qemu-system-x86_64", "-M", "microvm", "-accel", "tcg", "-cpu", "max", "-m", "2048",
            "-smp", "2", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-global", "virtio-mmio.force-legacy=false", "-serial", "stdio", "-monitor", "none",
            "-display", "none", "-kernel", os.path.join(IMG, "vmlinuz64"), "-initrd", initrd,
            "-append", f"console=ttyS0 tsc_early_khz={host_khz()} panic=-1 {cmdline}",
            "-device", "virtio-rng-device"]
    markers = ["Linux version", "Trying to unpack rootfs", "Freeing initrd memory",
               "Run /init", "b2p: stage 2", "b2p: userspace ready"]
    seen = {}
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace")
            now = time.monotonic() - t0
            for m in markers:
                if m in line and m not in seen:
                    kts = None
                    if line.startswith("[") and "]" in line:
                        try:
                            kts = float(line[1:line.index("]")])
                        except ValueError:
                            pass
                    seen[m] = (now, kts)
            if stop_at in seen or now > timeout or "Kernel panic" in line:
                break
    finally:
        p.kill()
        p.wait()
    return seen


def stats(xs):
    return f"min {min(xs):6.2f}  median {statistics.median(xs):6.2f}  max {max(xs):6.2f}  (n={len(xs)})"


def boot(runs):
    initrd = os.path.join(IMG, "boot2podman.gz")
    res = {}
    for i in range(runs):
        seen = qemu(initrd, "b2p.agent=0", "b2p: userspace ready")
        for m, (h, _) in seen.items():
            res.setdefault(m, []).append(h)
        print(f"run {i + 1}: " + ", ".join(f"{m} {h:.2f}s" for m, (h, _) in seen.items()), flush=True)
    print("host seconds from QEMU start (TCG, no disk, first boot loads the busybox image into RAM):")
    for m, xs in res.items():
        print(f"  {m:28s} {stats(xs)}")


def unpack(runs):
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        cpio = os.path.join(d, "b2p.cpio")
        subprocess.run(f"gzip -dc '{IMG}/boot2podman.gz' > '{cpio}'", shell=True, check=True)
        variants = {
            "gzip -9 (boot2podman.gz)": os.path.join(IMG, "boot2podman.gz"),
            "zstd -19": (f"zstd -q -19 -T0 -c '{cpio}'", "b2p.zst"),
            "lz4 -l -9 (legacy)": (f"lz4 -q -l -9 -c '{cpio}'", "b2p.lz4"),
        }
        for name, v in variants.items():
            if isinstance(v, tuple):
                path = os.path.join(d, v[1])
                t = time.monotonic()
                subprocess.run(f"nice {v[0]} > '{path}'", shell=True, check=True)
                print(f"{name}: compressed in {time.monotonic() - t:.1f}s", flush=True)
                variants[name] = path
        print(f"uncompressed cpio: {os.path.getsize(cpio) / 2**20:.1f} MiB")
        for name, path in variants.items():
            ks, hs = [], []
            for _ in range(runs):
                seen = qemu(path, "rdinit=/bin/true", "Freeing initrd memory")
                a, b = seen.get("Trying to unpack rootfs"), seen.get("Freeing initrd memory")
                if a and b and a[1] is not None and b[1] is not None:
                    ks.append(b[1] - a[1])
                    hs.append(b[0])
            size = os.path.getsize(path) / 2**20
            if ks:
                print(f"  {name:26s} {size:6.1f} MiB  unpack (kernel clock) {stats(ks)};"
                      f" QEMU start -> initrd freed median {statistics.median(hs):.2f}s", flush=True)
            else:
                print(f"  {name:26s} {size:6.1f} MiB  unpack: markers not seen (kernel lacks this decompressor?)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["boot", "unpack"])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    for f in ("vmlinuz64", "boot2podman.gz"):
        if not os.path.isfile(os.path.join(IMG, f)):
            sys.exit(f"{IMG}/{f} missing: run guest-image/build.sh")
    boot(a.runs) if a.what == "boot" else unpack(a.runs)


if __name__ == "__main__":
    main()
