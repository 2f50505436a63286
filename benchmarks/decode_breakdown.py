"""Where the time of one CUDA decode goes: query quantization, split kernel(s), merge, Python/launch overhead.

    python benchmarks/decode_breakdown.py [B H L D] [--bits 4]
"""

from __future__ import annotations

import argparse

import torch

from turbotvm import TurboAttention
from turbotvm import kernel_set as names
from turbotvm.kernels.sas import NEG_BIG

from turbotvm.bench import median_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="*", type=int, default=[1, 32, 32768, 128], help="B H L D")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 4))
    args = parser.parse_args(argv)
    b, h, length, d = args.shape
    turbo = TurboAttention.build({"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()},
                                 head_dims=(d,), dtypes=("float16",))
    k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.float16) for _ in range(2))
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16)
    cache = turbo.compress_kv(k, v, [args.bits] * h)
    splits = turbo._auto_splits(q, cache.packed_len)  # the packed groups hold tokens [64, compressed_len)
    q8, q_scale = turbo._quantize_query(q, "float16", cache.k_factor)
    o_part = torch.zeros((b, h, splits + 1, d), dtype=torch.float32, device="cuda")
    m_part = torch.full((b, h, splits + 1), NEG_BIG, dtype=torch.float32, device="cuda")
    l_part = torch.zeros((b, h, splits + 1), dtype=torch.float32, device="cuda")
    out = torch.empty_like(q)
    group = cache.groups[0]
    split_kernel = turbo.kernels[names.decode_split_name(d, args.bits)]
    merge_kernel = turbo.kernels[names.decode_merge_name(d, "float16")]
    steps = {
        "quantize q": lambda: turbo._quantize_query(q, "float16", cache.k_factor),
        f"split kernel ({splits} splits)": lambda: split_kernel(q8, q_scale, group.heads, *group.tensors(), o_part, m_part,
                                                               l_part, d**-0.5, 1, splits, 0, cache.packed_len),
        "merge kernel": lambda: merge_kernel(o_part, m_part, l_part, out),
        "decode end to end": lambda: turbo.decode(q, cache),
    }
    read = cache.nbytes()
    for name, fn in steps.items():
        ms = median_ms(fn)
        extra = f"  {read / ms / 1e6:.0f} GB/s of cache" if "split" in name or "end" in name else ""
        print(f"{name:28s} {ms:9.4f} ms{extra}")


if __name__ == "__main__":
    main()
