"""Build the kernels for this CPU, export them as a deployable module, then load and call that module in a
fresh Python process that builds nothing (the manifest's SHA-256, TVM version and format are checked first).

    python examples/tune_export_load.py --out turbotvm-module
    python examples/tune_export_load.py --load turbotvm-module      # the second half alone

Tuning: the meta-schedule tuner (turbotvm/tuning) is being written; until it lands this example builds with
the hand schedule rules (``TurboAttention.build``), which is what a tuned build falls back to.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def build_and_export(out: Path, head_dim: int) -> None:
    from turbotvm import TurboAttention
    from turbotvm.codegen import export

    start = time.perf_counter()
    turbo = TurboAttention.build("llvm", head_dims=(head_dim,), dtypes=("float32",))
    export(turbo.kernels, out)
    print(f"built and exported {len(turbo.kernels.names)} kernels to {out} in {time.perf_counter() - start:.1f} s")


def load_and_call(module_dir: Path, head_dim: int) -> float:
    """Load the exported module (no build) and check a GQA causal prefill against torch SDPA."""
    from turbotvm import TurboAttention
    from turbotvm.testing import cosine

    start = time.perf_counter()
    turbo = TurboAttention.load(module_dir)
    loaded = time.perf_counter() - start
    q, k, v = torch.randn(1, 8, 200, head_dim), torch.randn(1, 2, 200, head_dim), torch.randn(1, 2, 200, head_dim)
    out = turbo.prefill(q, k, v, causal=True)
    cos = cosine(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    print(f"loaded {module_dir} in {loaded * 1e3:.0f} ms; prefill [1, 8, 200, {head_dim}] cos vs SDPA = {cos:.5f}")
    if cos < 0.999:
        raise SystemExit(f"cosine {cos:.5f} < 0.999")
    return cos


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("turbotvm-module"))
    parser.add_argument("--head-dim", type=int, choices=(64, 128), default=64)
    parser.add_argument("--load", type=Path, help="only load and call this exported module")
    args = parser.parse_args(argv)
    if args.load:
        return load_and_call(args.load, args.head_dim)
    build_and_export(args.out, args.head_dim)
    fresh = [sys.executable, str(Path(__file__).resolve()), "--load", str(args.out), "--head-dim", str(args.head_dim)]
    subprocess.run(fresh, check=True)  # a new interpreter: nothing built or cached in memory


if __name__ == "__main__":
    main()
