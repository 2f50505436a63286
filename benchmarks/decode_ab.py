"""The decode step kernels of other source files vs this tree's, side by side on the same caches.

    git show main:turbotvm/kernels/decode_cuda.py > /tmp/decode_cuda_main.py
    python benchmarks/decode_ab.py /tmp/decode_cuda_main.py [/tmp/another_variant.py ...]

Each reads the cache as this tree lays it out and must provide ``decode_step_cuda`` (one launch per
step). Per shape and bit width: each step kernel alone (median of CUDA-event timings), the GB/s of
cache it reads, and whether every output equals the first file's bit for bit.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
import tvm

from turbotvm import TurboAttention
from turbotvm.attention import step_kernel_args
from turbotvm.bench import median_ms
from turbotvm.kernels import decode_cuda

SHAPES = [(1, 32, 32768, 128), (1, 32, 131072, 128), (16, 32, 32768, 128), (4, 32, 16384, 64)]


def load_module(path: Path):
    """A decode_cuda.py from elsewhere, imported inside turbotvm.kernels (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location(f"turbotvm.kernels._ab_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("others", type=Path, nargs="+", help="other decode_cuda.py files")
    parser.add_argument("--other-arg", type=int, default=0, help="the other kernels' stages knob")
    parser.add_argument("--this-args", default="0", help="this tree's kernel's stages knob(s), comma-separated")
    args = parser.parse_args(argv)
    arch = {"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()}
    target = tvm.target.Target(arch)
    variants = {path.stem: (load_module(path), args.other_arg) for path in args.others}
    for arg in map(int, args.this_args.split(",")):
        variants[f"this({arg})"] = (decode_cuda, arg)
    turbo = TurboAttention.build(arch, head_dims=(64, 128), dtypes=("float16",))
    torch.manual_seed(0)
    for b, h, length, d in SHAPES:
        # 17 tokens past whole blocks: the open block is present, as in most steps
        k, v = (torch.randn(b, h, length + 17, d, device="cuda", dtype=torch.float16) for _ in range(2))
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16)
        for bits in (4, 2):
            cache = turbo.compress_kv(k, v, [bits] * h)
            splits = turbo._auto_splits(q, cache.packed_len)
            workspace = turbo._decode_workspace(q, splits + 1)
            group = cache.groups[0]
            line, outs = f"B{b} H{h} L{length + 17} D{d} {bits}-bit, {splits} splits:", {}
            for name, (module, arg) in variants.items():
                func = module.decode_step_cuda(d, bits, "float16", arg).with_attr("global_symbol", "step")
                kernel = tvm.compile(tvm.IRModule({"step": func}), target=target)["step"]
                out = torch.empty_like(q)
                args = step_kernel_args(q, cache, group, cache.int8_regions(), workspace, out, d**-0.5, 1, splits)
                ms = median_ms(lambda: kernel(*args))
                outs[name] = out
                line += f" | {name} {ms * 1000:.1f} us, {cache.nbytes() / ms / 1e6:.0f} GB/s"
            first = next(iter(outs.values()))
            same = all(torch.equal(first, out) for out in outs.values())
            print(line + f" | outputs {'bitwise equal' if same else 'DIFFER'}", flush=True)
        del k, v


if __name__ == "__main__":
    main()
