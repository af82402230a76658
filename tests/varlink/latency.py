#!/usr/bin/env python3
"""GetVersion round-trip latency over one varlink connection.

Usage: latency.py ADDRESS [N]   (N calls, default 1000)
Prints "GetVersion N calls: p50 X ms, p99 Y ms, max Z ms".
"""
import sys
import time

import varlink

address = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
with varlink.Client(address=address) as c, c.open("io.podman") as p:
    p.GetVersion()  # warm up (starts podman's service if needed)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        p.GetVersion()
        samples.append(time.perf_counter() - t0)
samples.sort()
pct = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1e3  # noqa: E731
print(f"GetVersion {n} calls: p50 {pct(0.50):.3f} ms, p99 {pct(0.99):.3f} ms, max {samples[-1] * 1e3:.3f} ms")
