#!/usr/bin/env python3
"""Reads a timeline written by scripts/kernel-trace.c and says where the device's time goes.

    python3 scripts/kernel-trace.py trace.bin [--steps 3] [--top 25] [--gaps 10]

A step runs from one optimizer launch (`adamw_multi`) to the next; in a trace without one, steps are the stretches
of device work between idle gaps of more than --split-ms (a step ends in a synchronisation). Of the last --steps of them it prints the span, the time some
kernel ran (busy), the idle time between kernels by gap size, the kernels grouped by name, and, when the trace
has driver-call records (KTRACE_DRIVER=1), how far ahead of the device the host was when it launched each
kernel: a launch that returns after the device has gone idle means the host, not the device, set the pace.
"""
import argparse
import collections
import struct
import sys

import numpy as np


def read(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"KTR1", f"{path}: not a kernel-trace file"
    (n,) = struct.unpack_from("<I", data, 4)
    dt = np.dtype([("start", "<u8"), ("end", "<u8"), ("name", "<u4"), ("corr", "<u4"), ("kind", "<u4"), ("cbid", "<u4")])
    recs = np.frombuffer(data, dtype=dt, count=n, offset=8)
    off = 8 + n * dt.itemsize
    (m,) = struct.unpack_from("<I", data, off)
    off += 4
    names = []
    for _ in range(m):
        (ln,) = struct.unpack_from("<I", data, off)
        off += 4
        names.append(data[off:off + ln].decode("utf-8", "replace"))
        off += ln
    return recs, names


def group(name):
    """A short label for a kernel name: the families a step is made of."""
    n = name.lower()
    for key, label in [("flash_bwd_dq", "flash dQ"), ("flash_bwd", "flash dK/dV"), ("flash_fwd", "flash forward"),
                       ("gemm", "GEMM"), ("xmma", "GEMM"), ("cutlass", "GEMM"), ("nvjet", "GEMM"),
                       ("rmsnorm", "RMSNorm"), ("swiglu", "SwiGLU"), ("lora", "LoRA kernels"), ("dropout", "dropout"),
                       ("qkv", "qkv split/RoPE"), ("heads", "heads split/merge"), ("rope", "qkv split/RoPE"),
                       ("adam", "optimizer"), ("norm", "norms other"), ("loss", "loss"), ("xent", "loss"),
                       ("cross", "loss"), ("softmax", "loss"), ("reduce", "reductions"), ("sum", "reductions"),
                       ("copy", "copies"), ("cast", "casts"), ("affine", "elementwise (candle)"),
                       ("binary", "elementwise (candle)"), ("unary", "elementwise (candle)"),
                       ("fill", "fills"), ("[memcpy]", "memcpy"), ("[memset]", "memset")]:
        if key in n:
            return label
    return name[:60]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--split-ms", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gaps", type=int, default=0, help="list the N longest idle gaps of the last step, with the kernels around them")
    a = ap.parse_args()
    recs, names = read(a.trace)
    dev = recs[recs["kind"] != 3]
    drv = recs[recs["kind"] == 3]
    dev = dev[np.argsort(dev["start"], kind="stable")]
    start = dev["start"].astype(np.int64)
    end = dev["end"].astype(np.int64)
    # Running maximum of the ends: the device is busy until then (kernels of one stream do not overlap, but copies
    # on other streams may).
    reach = np.maximum.accumulate(end)
    gaps = np.maximum(start[1:] - reach[:-1], 0)
    # A step ends with the optimizer's one launch (lorahost's `adamw_multi`): steps run from one to the next. Without
    # it, steps are the longer stretches between idle gaps of more than --split-ms (at least half the longest).
    opt = [i for i, n in enumerate(dev["name"]) if names[n] == "adamw_multi"]
    lead = 0  # 1: a step's span starts where the previous optimizer ended (the gap after it is the step's)
    if len(opt) >= 2:
        segs = [(opt[i] + 1, opt[i + 1] + 1) for i in range(len(opt) - 1)]
        steps = segs[-a.steps:]
        how = f"{len(opt)} optimizer launches"
        lead = 1
    else:
        cut = np.nonzero(gaps > a.split_ms * 1e6)[0]
        bounds = [0] + list(cut + 1) + [len(dev)]
        segs = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
        spans = [int(reach[e - 1] - start[s]) for s, e in segs]
        longest = max(spans)
        steps = [seg for seg, sp in zip(segs, spans) if sp > longest / 2][-a.steps:]
        how = f"{len(segs)} stretches between idle gaps"
    print(f"{a.trace}: {len(dev)} device records, {len(drv)} driver calls, {how}; last {len(steps)} steps:")
    by_group = collections.Counter()
    by_name = collections.Counter()
    count_name = collections.Counter()
    tot_span = tot_busy = 0
    gap_hist = collections.Counter()
    for s, e in steps:
        span = int(reach[e - 1] - (reach[s - 1] if lead else start[s]))
        busy = int((end[s:e] - start[s:e]).sum())
        g = gaps[s - lead:e - 1]
        tot_span += span
        tot_busy += busy
        for lo, hi, lab in [(0, 2e3, "<2us"), (2e3, 5e3, "2-5us"), (5e3, 20e3, "5-20us"), (20e3, 100e3, "20-100us"), (100e3, 1e12, ">100us")]:
            sel = (g >= lo) & (g < hi)
            gap_hist[lab] += int(g[sel].sum())
            gap_hist[lab + " n"] += int(sel.sum())
        for i in range(s, e):
            nm = names[dev["name"][i]]
            d = int(end[i] - start[i])
            by_group[group(nm)] += d
            by_name[nm] += d
            count_name[nm] += 1
        print(f"  step: span {span / 1e6:.1f} ms, kernels {busy / 1e6:.1f} ms ({100 * busy / span:.1f}%), {e - s} launches, idle {(span - busy) / 1e6:.1f} ms")
    k = len(steps)
    print(f"per step: span {tot_span / k / 1e6:.1f} ms, kernels {tot_busy / k / 1e6:.1f} ms, idle {(tot_span - tot_busy) / k / 1e6:.1f} ms")
    print("idle between kernels, per step, by gap size:")
    for lab in ["<2us", "2-5us", "5-20us", "20-100us", ">100us"]:
        print(f"  {lab:>9}: {gap_hist[lab] / k / 1e6:7.2f} ms in {gap_hist[lab + ' n'] / k:7.0f} gaps")
    print("kernel time per step by family:")
    for lab, d in by_group.most_common():
        print(f"  {d / k / 1e6:8.2f} ms  {lab}")
    print(f"top {a.top} kernels per step:")
    for nm, d in by_name.most_common(a.top):
        print(f"  {d / k / 1e6:8.2f} ms  {count_name[nm] / k:6.0f}x  {nm[:110]}")
    if a.gaps and steps:
        # Where the device waited longest in the last step (a host stall shows up as one long gap: e.g. a value read
        # back to the host, then the host's own work before the next launch).
        s, e = steps[-1]
        lo = max(s - lead, 0)
        order = sorted(range(lo, e - 1), key=lambda i: -gaps[i])[:a.gaps]
        print(f"longest gaps of the last step:")
        for i in sorted(order):
            print(f"  {gaps[i] / 1e3:9.1f} us after launch {i - s:5d}: {names[dev['name'][i]][:50]} -> {names[dev['name'][i + 1]][:50]}")
    if len(drv):
        # For each kernel of the steps: the device start minus the end of the call that launched it. Near zero (or
        # the device idle just before) = the device waited for the host.
        launch_end = dict(zip(drv["corr"].tolist(), drv["end"].astype(np.int64).tolist()))
        lead = []
        for s, e in steps:
            for i in range(s, e):
                c = int(dev["corr"][i])
                if c in launch_end:
                    lead.append(start[i] - launch_end[c])
        lead = np.array(lead)
        if len(lead):
            print(f"host lead (device start - launch return) over {len(lead)} kernels: "
                  f"p10 {np.percentile(lead, 10) / 1e3:.0f} us, median {np.median(lead) / 1e3:.0f} us, "
                  f"p90 {np.percentile(lead, 90) / 1e3:.0f} us; under 20 us: {100 * (lead < 20e3).mean():.1f}%")


if __name__ == "__main__":
    sys.exit(main())
