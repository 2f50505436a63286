"""Eager generation's other per-token cost: appending one token to a layer's KV cache, on the GPU.

    python benchmarks/cache_append.py [--out benchmarks/results]

TurboKVCache.append (quantize the open block; every 64th token also compress the closed block) side by
side with what an fp16 cache does per token (transformers' DynamicCache.update: a torch.cat of K and V),
B = 1 and 8, H_kv = 8, D = 128, after a 4099-token prompt. Each append is timed alone (host and GPU,
synchronized: what a token waits for) over 128 appends (two block closings), and 128 appends are timed
back to back without synchronizing (the host's share when the GPU keeps up). Writes JSON and a PNG.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from turbotvm import TurboKVCache
from turbotvm.bench import finish_plot, package_version, result_stem, start_gpu_script

SHAPES = [(1, 8, 4096 + 3, 128), (8, 8, 4096 + 3, 128)]
APPENDS = 128


def fp16_append(k, v):
    """An fp16 cache's append: transformers' DynamicCache when installed, else its torch.cat."""
    try:
        from transformers import DynamicCache

        cache = DynamicCache()
        cache.update(k, v, 0)
        return lambda k1, v1: cache.update(k1, v1, 0), "DynamicCache.update"
    except ImportError:
        held = [k, v]

        def cat(k1, v1):
            held[0], held[1] = torch.cat((held[0], k1), 2), torch.cat((held[1], v1), 2)

        return cat, "torch.cat (fp16)"


def time_appends(append, new) -> dict:
    for _ in range(8):
        append(*new)
    alone = []
    for _ in range(APPENDS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        append(*new)
        torch.cuda.synchronize()
        alone.append((time.perf_counter() - start) * 1e6)
    start = time.perf_counter()
    for _ in range(APPENDS):
        append(*new)
    host = (time.perf_counter() - start) / APPENDS * 1e6
    torch.cuda.synchronize()
    queued = (time.perf_counter() - start) / APPENDS * 1e6
    return {"median_us": statistics.median(alone), "max_us": max(alone), "mean_us": statistics.mean(alone),
            "host_us_queued": host, "mean_us_queued": queued}


def main(argv=None):
    args, gpu, turbo = start_gpu_script("cache_append", __doc__, argv, head_dims=(128,))
    rows = []
    for b, hkv, prompt, d in SHAPES:
        torch.manual_seed(0)
        k, v = (torch.randn(b, hkv, prompt, d, device="cuda", dtype=torch.float16) for _ in range(2))
        new = tuple(torch.randn(b, hkv, 1, d, device="cuda", dtype=torch.float16) for _ in range(2))
        cache = TurboKVCache(head_bits=[4] * hkv, runtime=turbo)
        cache.append(k, v)
        baseline, baseline_name = fp16_append(k, v)
        row = {"B": b, "H_kv": hkv, "prompt": prompt, "D": d, "turbotvm": time_appends(cache.append, new),
               "fp16": time_appends(baseline, new), "fp16_name": baseline_name}
        rows.append(row)
        t, f = row["turbotvm"], row["fp16"]
        print(f"B={b} H_kv={hkv} D={d}: TurboKVCache.append median {t['median_us']:.0f} us (max {t['max_us']:.0f}, "
              f"mean {t['mean_us']:.0f}; queued: host {t['host_us_queued']:.0f}, all {t['mean_us_queued']:.0f}) | "
              f"{baseline_name} median {f['median_us']:.0f} us (queued {f['mean_us_queued']:.0f})", flush=True)
    stem = result_stem(args.out, "cache_append", gpu)
    stem.with_suffix(".json").write_text(json.dumps(
        {"gpu": gpu, "versions": {p: package_version(p) for p in ("torch", "apache-tvm", "transformers")},
         "appends": APPENDS, "rows": rows}, indent=1))
    plot(rows, stem.with_suffix(".png"), gpu)
    print(f"wrote {stem}.json and .png")


def plot(rows, path, gpu):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"B={r['B']}" for r in rows]
    keys = (("turbotvm", "median_us", "TurboKVCache, alone"), ("turbotvm", "mean_us_queued", "TurboKVCache, queued"),
            ("fp16", "median_us", "fp16 cache, alone"), ("fp16", "mean_us_queued", "fp16 cache, queued"))
    width = 0.8 / len(keys)
    for i, (who, key, label) in enumerate(keys):
        ax.bar([x + i * width for x in range(len(rows))], [r[who][key] for r in rows], width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], labels)
    finish_plot(fig, ax, "us per one-token append", f"KV cache append, H_kv=8 D=128 ({gpu})", path)


if __name__ == "__main__":
    main()
