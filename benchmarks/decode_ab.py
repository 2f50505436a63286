"""The packed decode split kernel of another source file vs this tree's, side by side on the same caches.

    git show main:turbotvm/kernels/decode_cuda.py > /tmp/decode_cuda_main.py
    python benchmarks/decode_ab.py /tmp/decode_cuda_main.py

Both read the cache as this tree lays it out. Per shape and bit width: the split kernel alone (median of
CUDA-event timings), the GB/s of cache it reads, and whether its partial states equal this tree's bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import tvm

from turbotvm import TurboAttention
from turbotvm.bench import median_ms
from turbotvm.kernels import decode_cuda
from turbotvm.kernels.sas import NEG_BIG

SHAPES = [(1, 32, 32768, 128), (1, 32, 131072, 128), (16, 32, 32768, 128), (4, 32, 16384, 64)]


def load_module(path: Path):
    """A decode_cuda.py from elsewhere, imported inside turbotvm.kernels (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location(f"turbotvm.kernels._ab_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="another decode_cuda.py")
    parser.add_argument("--other-arg", type=int, default=0, help="the other kernel's third argument (a knob)")
    parser.add_argument("--this-args", default="0", help="this tree's kernel's third argument(s), comma-separated")
    args = parser.parse_args(argv)
    arch = {"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()}
    target = tvm.target.Target(arch)
    variants = {"other": (load_module(args.other), args.other_arg)}
    for arg in map(int, args.this_args.split(",")):
        variants[f"this({arg})"] = (decode_cuda, arg)
    turbo = TurboAttention.build(arch, head_dims=(64, 128), dtypes=("float16",))
    torch.manual_seed(0)
    for b, h, length, d in SHAPES:
        k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.float16) for _ in range(2))
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16)
        for bits in (4, 2):
            cache = turbo.compress_kv(k, v, [bits] * h)
            splits = turbo._auto_splits(q, cache.packed_len)
            q8, q_scale = turbo._quantize_query(q, "float16", cache.k_factor)
            group = cache.groups[0]
            line, states = f"B{b} H{h} L{length} D{d} {bits}-bit, {splits} splits:", {}
            for name, (module, arg) in variants.items():
                func = module.decode_split_packed(d, bits, arg).with_attr("global_symbol", "split")
                kernel = tvm.compile(tvm.IRModule({"split": func}), target=target)["split"]
                state = (torch.zeros((b, h, splits, d), device="cuda"), torch.full((b, h, splits), NEG_BIG, device="cuda"),
                         torch.zeros((b, h, splits), device="cuda"))
                ms = median_ms(lambda: kernel(q8, q_scale, group.heads, *group.tensors(), *state, d**-0.5, 1, splits, 0,
                                              cache.packed_len))
                states[name] = state
                line += f" | {name} {ms * 1000:.1f} us, {cache.nbytes() / ms / 1e6:.0f} GB/s"
            same = all(torch.equal(x, y) for name in states for x, y in zip(states["other"], states[name]))
            print(line + f" | states {'bitwise equal' if same else 'DIFFER'}", flush=True)
        del k, v


if __name__ == "__main__":
    main()
