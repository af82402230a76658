#!/usr/bin/env python3
"""Boot-time figures for the guest image under QEMU TCG (no KVM needed).

  guest-image/measure.py boot  [--runs N]    QEMU start -> kernel milestones -> "b2p: userspace ready"
  guest-image/measure.py unpack [--runs N]   initrd unpack time: gzip vs zstd vs lz4 (legacy -l)
                                             vs the uncompressed cpio
  guest-image/measure.py compare --old DIR [--new DIR]... [--runs N]
                                             images, interleaved: QEMU start -> "Run /init"
                                             -> "b2p: userspace ready" -> the agent answers
                                             io.podman.GetVersion over vsock; each new image
                                             with its bzImage and, when present, its vmlinux (PVH)

Both boot vmlinuz64 from $B2P_CACHE/image (default ~/.cache/b2p/image) with
`qemu-system-x86_64 -M microvm -accel tcg`, timestamp each console line on
the host, and print min/median/max. `unpack` recompresses the initrd's cpio
and reads the kernel's own timestamps from "Trying to unpack rootfs image"
(or "Unpacking initramfs") to "Freeing initrd memory" (the guest is stopped
right after). `compare` boots each image's default initrd, as the monitors
do: boot2podman.lz4, else .gz.
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
    markers = ["Linux version", "Trying to unpack rootfs", "Unpacking initramfs", "Freeing initrd memory",
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
            "none (boot2podman.cpio)": cpio,
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
                a = seen.get("Trying to unpack rootfs") or seen.get("Unpacking initramfs")
                b = seen.get("Freeing initrd memory")
                if a and b and a[1] is not None and b[1] is not None:
                    ks.append(b[1] - a[1])
                    hs.append(b[0])
            size = os.path.getsize(path) / 2**20
            if ks:
                print(f"  {name:26s} {size:6.1f} MiB  unpack (kernel clock) {stats(ks)};"
                      f" QEMU start -> initrd freed median {statistics.median(hs):.2f}s", flush=True)
            else:
                print(f"  {name:26s} {size:6.1f} MiB  unpack: markers not seen (kernel lacks this decompressor?)")


def which(name):
    for d in os.environ.get("PATH", "").split(":") + [os.path.expanduser("~/.cargo/bin")]:
        if d and os.path.isfile(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


def getversion(uds, timeout):
    """One io.podman.GetVersion through vhost-device-vsock's hybrid socket; the version or None."""
    import json, socket
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(uds)
        s.sendall(b"CONNECT 1024\n")
        buf = b""
        while b"\n" not in buf:
            c = s.recv(64)
            if not c:
                return None
            buf += c
        if not buf.startswith(b"OK "):
            return None
        s.sendall(json.dumps({"method": "io.podman.GetVersion", "parameters": {}}).encode() + b"\0")
        buf = buf[buf.index(b"\n") + 1:]
        while not buf.endswith(b"\0"):
            c = s.recv(4096)
            if not c:
                return None
            buf += c
        v = json.loads(buf[:-1])
        if not isinstance(v, dict) or "error" in v:
            return None
        ver = (v.get("parameters") or {}).get("version")
        return (ver.get("version") if isinstance(ver, dict) else ver) or "?"
    except (OSError, ValueError):
        return None
    finally:
        s.close()


def boot_vsock(kernel, initrd, vhost_bin, timeout=240):
    """Boots with a vhost-user vsock (as tests/guest_image/vsock.rs); returns
    {"Run /init": s, "userspace ready": s, "GetVersion": s} in host seconds from QEMU start."""
    import threading
    with tempfile.TemporaryDirectory(prefix="b2p-measure.", dir="/var/tmp") as d:
        vs, uds = os.path.join(d, "vhost.sock"), os.path.join(d, "vsock.sock")
        vh = subprocess.Popen([vhost_bin, "--vm", f"guest-cid=3,socket={vs},uds-path={uds}"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            end = time.monotonic() + 20
            while not os.path.exists(vs) and time.monotonic() < end:
                time.sleep(0.02)
            args = ["qemu-system-x86_64", "-M", "microvm,memory-backend=mem0", "-accel", "tcg", "-cpu", "max",
                    "-m", "2048", "-smp", "2", "-object", "memory-backend-memfd,id=mem0,size=2048M,share=on",
                    "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
                    "-global", "virtio-mmio.force-legacy=false", "-serial", "stdio", "-monitor", "none",
                    "-display", "none", "-kernel", kernel, "-initrd", initrd,
                    "-append", f"console=ttyS0 tsc_early_khz={host_khz()} panic=-1",
                    "-device", "virtio-rng-device", "-chardev", f"socket,id=c0,path={vs}",
                    "-device", "vhost-user-vsock-device,chardev=c0"]
            seen, tail, stop = {}, [], []
            t0 = time.monotonic()
            p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

            def console():
                for raw in p.stdout:
                    line = raw.decode(errors="replace")
                    tail.append(line)
                    del tail[:-20]
                    for m in ("Run /init", "b2p: userspace ready"):
                        if m in line and m not in seen:
                            seen[m] = time.monotonic() - t0
                    if "Kernel panic" in line or "System halted" in line:
                        stop.append(line)
            th = threading.Thread(target=console, daemon=True)
            th.start()
            try:
                while time.monotonic() - t0 < timeout and p.poll() is None and not stop:
                    if getversion(uds, 5):
                        seen["GetVersion"] = time.monotonic() - t0
                        break
                    time.sleep(0.25)
            finally:
                p.kill()
                p.wait()
            th.join(5)
            if "GetVersion" not in seen:
                print("    no GetVersion answer; console tail:\n    " + "    ".join(tail[-8:]), flush=True)
            return {k.replace("b2p: ", ""): v for k, v in seen.items()}
        finally:
            vh.kill()
            vh.wait()


def compare(old, news, runs):
    vhost = which("vhost-device-vsock")
    if not vhost:
        sys.exit("vhost-device-vsock not found (cargo install vhost-device-vsock)")
    def initrd(d):  # what the monitors boot by default (vmm/src/image.rs)
        return os.path.join(d, "boot2podman.lz4" if os.path.isfile(os.path.join(d, "boot2podman.lz4")) else "boot2podman.gz")
    peers = [("old bzImage", os.path.join(old, "vmlinuz64"), initrd(old))]
    for n, new in enumerate(news):
        tag = f"new{n + 1 if len(news) > 1 else ''}"
        peers.append((f"{tag} bzImage", os.path.join(new, "vmlinuz64"), initrd(new)))
        if os.path.isfile(os.path.join(new, "vmlinux")):
            peers.append((f"{tag} vmlinux (PVH)", os.path.join(new, "vmlinux"), initrd(new)))
    for name, k, i in peers:
        print(f"{name}: {k} ({os.path.getsize(k) / 2**20:.1f} MiB), {i} ({os.path.getsize(i) / 2**20:.1f} MiB)", flush=True)
    marks = ["Run /init", "userspace ready", "GetVersion"]
    res = {name: {m: [] for m in marks} for name, _, _ in peers}
    for r in range(runs):
        for name, k, i in peers:  # interleaved: each round boots every peer once
            seen = boot_vsock(k, i, vhost)
            for m in marks:
                if m in seen:
                    res[name][m].append(seen[m])
            print(f"round {r + 1} {name}: " + ", ".join(f"{m} {seen[m]:.2f}s" for m in marks if m in seen), flush=True)
    print(f"host seconds from QEMU start, QEMU TCG, no disk, load average {os.getloadavg()[0]:.1f}:")
    base = {m: statistics.median(res["old bzImage"][m]) for m in marks if res["old bzImage"][m]}
    for name, _, _ in peers:
        for m in marks:
            xs = res[name][m]
            if not xs:
                print(f"  {name:20s} {m:16s} not reached")
                continue
            ratio = f"  ratio to old {statistics.median(xs) / base[m]:.2f}" if m in base else ""
            print(f"  {name:20s} {m:16s} {stats(xs)}{ratio}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["boot", "unpack", "compare"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--old", help="compare: the reference image directory")
    ap.add_argument("--new", action="append", help="compare: a new image directory (repeatable; default $B2P_CACHE/image)")
    a = ap.parse_args()
    if a.what == "compare":
        if not a.old:
            sys.exit("compare needs --old DIR")
        news = a.new or [IMG]
        for d in [a.old] + news:
            if not os.path.isfile(os.path.join(d, "vmlinuz64")):
                sys.exit(f"{d}/vmlinuz64 missing")
        return compare(a.old, news, a.runs)
    for f in ("vmlinuz64", "boot2podman.gz"):
        if not os.path.isfile(os.path.join(IMG, f)):
            sys.exit(f"{IMG}/{f} missing: run guest-image/build.sh")
    boot(a.runs) if a.what == "boot" else unpack(a.runs)


if __name__ == "__main__":
    main()
