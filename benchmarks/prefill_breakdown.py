"""Where the time of one CUDA prefill goes: K's smoothing, the three quantize kernels, the tensor-core kernel.

    python benchmarks/prefill_breakdown.py [B H N D] [--causal]

Times each kernel of ``TurboAttention._prefill_tensor_cores`` alone (CUDA events, median of 30),
so a schedule change can be judged on the kernel it touches.
"""

from __future__ import annotations

import argparse

import torch

from turbotvm import TurboAttention
from turbotvm import kernel_set as names
from turbotvm.algorithm import QUANT_BLOCK

from turbotvm.bench import median_ms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="*", type=int, default=[1, 32, 16384, 128], help="B H N D")
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args(argv)
    b, h, n, d = args.shape
    turbo = TurboAttention.build({"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()},
                                 head_dims=(d,), dtypes=("float16",))
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    nb = -(-n // QUANT_BLOCK)
    q8, k8 = torch.empty_like(q, dtype=torch.int8), torch.empty_like(k, dtype=torch.int8)
    v8t = torch.empty((b, h, d, nb * QUANT_BLOCK), dtype=torch.int8, device="cuda")
    scales = [torch.empty((b, h, nb), dtype=torch.float32, device="cuda") for _ in range(3)]
    out = torch.empty_like(q)
    k_mean, k_factor = turbo.smoothing(k, "float16")
    kern = turbo.kernels
    steps = {
        "k smoothing": lambda: turbo.smoothing(k, "float16"),
        "quantize q (balanced)": lambda: kern[names.quantize_rows_name("float16", d, "balanced")](
            q, k_factor, q8, scales[0]),
        "quantize k (smoothed)": lambda: kern[names.quantize_rows_name("float16", d, "smoothed")](
            k, k_mean, k_factor, k8, scales[1]),
        "quantize v (transposed)": lambda: kern[names.quantize_vt_name("float16", d)](v, v8t, scales[2]),
        "prefill_tc": lambda: kern[names.prefill_tc_name(d, args.causal, "float16")](
            q8, scales[0], k8, scales[1], v8t, scales[2], out, d**-0.5),
        "end to end": lambda: turbo.prefill(q, k, v, causal=args.causal),
    }
    flops = 4 * b * h * n * n * d / (2 if args.causal else 1)
    for name, fn in steps.items():
        ms = median_ms(fn)
        extra = f"  {flops / ms / 1e9:.0f} effective TOPS" if name in ("prefill_tc", "end to end") else ""
        print(f"{name:26s} {ms:9.3f} ms{extra}")


if __name__ == "__main__":
    main()
