"""A CUDA decode step's fixed cost and streaming bandwidth: steps over caches of growing length, fitted.

    python benchmarks/decode_scan.py [--out benchmarks/results]

B=1, H=32, D=128, 4-bit, L = 8K-128K (+17 tokens: the open block is present), and B=4/16 at 32K. Each step
is timed eagerly, replayed alone from a CUDA graph, and ten to a graph (the replay's launch shared). A line
through the ten-per-graph times of B=1 against the bytes read gives the fixed cost per step (launch gaps,
the kernel's ramp and tail) and the bandwidth the kernel streams at, next to the measured copy bandwidth.
Writes JSON and a PNG.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from turbotvm.bench import (capture, copy_bandwidth_gbs, finish_plot, graphed_ms, median_ms, package_version,
                            result_stem, start_gpu_script)

SHAPES = [(1, 8192), (1, 16384), (1, 32768), (1, 65536), (1, 131072), (4, 32768), (16, 32768)]
HEADS, HEAD_DIM, STEPS_PER_GRAPH = 32, 128, 10


def main(argv=None):
    args, gpu, turbo = start_gpu_script("decode_scan", __doc__, argv, head_dims=(HEAD_DIM,))
    copy_gbs = copy_bandwidth_gbs()
    print(f"{gpu}: copy bandwidth {copy_gbs:.0f} GB/s")
    rows = []
    for b, length in SHAPES:
        torch.manual_seed(0)
        k = torch.randn(b, HEADS, length + 17, HEAD_DIM, device="cuda", dtype=torch.float16)
        cache = turbo.compress_kv(k, k, [4] * HEADS)
        del k
        q = torch.randn(b, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
        step = lambda: turbo.decode(q, cache)  # noqa: E731
        graph, _ = capture(lambda: [step() for _ in range(STEPS_PER_GRAPH)][-1])
        row = {"B": b, "L": length + 17, "mb": cache.nbytes() / 1e6, "eager_us": median_ms(step, iters=200) * 1e3,
               "graphed_us": graphed_ms(step, iters=200)[0] * 1e3,
               "per_step_us": median_ms(graph.replay, iters=100) * 1e3 / STEPS_PER_GRAPH}
        rows.append(row)
        print(f"B={b} L={row['L']}: {row['mb']:.1f} MB, eager {row['eager_us']:.1f} us, graphed "
              f"{row['graphed_us']:.1f} us, {STEPS_PER_GRAPH} per graph {row['per_step_us']:.1f} us/step "
              f"({row['mb'] / row['per_step_us'] * 1e3:.0f} GB/s)", flush=True)
        del cache
    ones = [r for r in rows if r["B"] == 1]
    slope, fixed = np.polyfit([r["mb"] for r in ones], [r["per_step_us"] for r in ones], 1)
    fit = {"fixed_us": fixed, "streaming_gbs": 1e3 / slope}
    print(f"B=1 fit: {fixed:.1f} us per step + the bytes at {1e3 / slope:.0f} GB/s")
    stem = result_stem(args.out, "decode_scan", gpu)
    stem.with_suffix(".json").write_text(json.dumps(
        {"gpu": gpu, "versions": {p: package_version(p) for p in ("torch", "apache-tvm", "apache-tvm-ffi")},
         "copy_bandwidth_gbs": copy_gbs, "heads": HEADS, "head_dim": HEAD_DIM, "bits": 4, "rows": rows,
         "b1_fit": fit}, indent=1))
    plot(rows, fit, copy_gbs, gpu, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")


def plot(rows, fit, copy_gbs, gpu, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ones = [r for r in rows if r["B"] == 1]
    mb = np.array([r["mb"] for r in ones])
    for key, label in (("eager_us", "eager"), ("graphed_us", "one step per graph"),
                       ("per_step_us", f"{STEPS_PER_GRAPH} steps per graph")):
        ax.plot(mb, [r[key] for r in ones], "o-", label=label)
    ax.plot(mb, fit["fixed_us"] + mb * 1e3 / fit["streaming_gbs"], "k--", lw=0.8,
            label=f"fit: {fit['fixed_us']:.1f} us + bytes at {fit['streaming_gbs']:.0f} GB/s")
    ax.plot(mb, mb * 1e3 / copy_gbs, "k:", lw=0.8, label=f"bytes at copy bandwidth ({copy_gbs:.0f} GB/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cache MB read per step (B=1, H=32, D=128, 4-bit)")
    finish_plot(fig, ax, "us per step", f"decode step vs cache size ({gpu})", path)


if __name__ == "__main__":
    main()
