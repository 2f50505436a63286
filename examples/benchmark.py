"""TurboAttention next to PyTorch SDPA on this machine: prefill (causal, GQA) and one decode step over the
compressed 4-bit cache, with the accuracy of each against exact attention. On a GPU, `turbotvm bench` is the
full benchmark (CUDA events, several SDPA backends); this is the quick look, on the CPU too.

    python examples/benchmark.py                       # N = 1024, 4096
    python examples/benchmark.py --lengths 256 --repeats 2
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(n: int, heads: int, kv_heads: int, head_dim: int, repeats: int, device: str) -> dict:
    from turbotvm import TurboKVCache, turbo_attention, turbo_decode
    from turbotvm.testing import cosine

    dtype = torch.float16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(1, h, n, head_dim, device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads))
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    turbo = lambda: turbo_attention(q, k, v, causal=True)  # noqa: E731
    row = {"n": n, "prefill_sdpa_ms": timed(sdpa, repeats) * 1e3, "prefill_turbo_ms": timed(turbo, repeats) * 1e3,
           "prefill_cos": cosine(turbo().float(), sdpa().float())}
    cache = TurboKVCache(share_2bit=0.0)
    cache.append(k, v)
    q1 = torch.randn(1, heads, 1, head_dim, device=device, dtype=dtype)
    sdpa1 = lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True)  # noqa: E731
    turbo1 = lambda: turbo_decode(q1, cache)  # noqa: E731
    row.update(decode_sdpa_ms=timed(sdpa1, repeats) * 1e3, decode_turbo_ms=timed(turbo1, repeats) * 1e3,
               decode_cos=cosine(turbo1().float(), sdpa1().float()),
               kv_bytes_vs_fp16=cache.nbytes() / cache.fp16_nbytes())
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, choices=(64, 128), default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{device}: B=1, H={args.heads}, H_kv={args.kv_heads}, D={args.head_dim}, causal prefill; decode: one token "
          "over the 4-bit cache; median ms")
    print(f"{'N':>6} {'prefill SDPA':>12} {'turbo':>8} {'cos':>8} | {'decode SDPA':>11} {'turbo':>8} {'cos':>8} {'KV/fp16':>8}")
    rows = []
    for n in args.lengths:
        r = compare(n, args.heads, args.kv_heads, args.head_dim, args.repeats, device)
        rows.append(r)
        print(f"{n:>6} {r['prefill_sdpa_ms']:>12.2f} {r['prefill_turbo_ms']:>8.2f} {r['prefill_cos']:>8.5f} | "
              f"{r['decode_sdpa_ms']:>11.3f} {r['decode_turbo_ms']:>8.3f} {r['decode_cos']:>8.5f} "
              f"{r['kv_bytes_vs_fp16']:>8.3f}")
    return rows


if __name__ == "__main__":
    main()
