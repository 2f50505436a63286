"""`turbotvm demo`: build for the CPU, check accuracy against the float64 reference, export, emit CUDA;
on a GPU also the tensor-core build and a side-by-side benchmark against PyTorch SDPA."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from . import reference as ref
from .attention import TurboAttention
from .calibration import select_head_bits
from .codegen import emit_cuda_source
from .kernel_set import KernelSetConfig
from .runtimes import default_target
from .testing import cosine, max_abs_error, random_qkv, realistic_qkv


def _cases(quick: bool):
    long_len = 1024 if quick else 4096
    return [
        ("prefill random, GQA 8/2", "random", dict(batch=1, heads=8, kv_heads=2, q_len=512, kv_len=512, head_dim=128), False),
        ("prefill causal, D=64", "random", dict(batch=2, heads=4, kv_heads=4, q_len=300, kv_len=300, head_dim=64), True),
        ("prefill outlier K channels", "realistic", dict(batch=1, heads=4, kv_heads=2, q_len=512, kv_len=512, head_dim=128), False),
        (f"prefill causal, N={long_len}", "random", dict(batch=1, heads=2, kv_heads=1, q_len=long_len, kv_len=long_len, head_dim=64), True),
    ]


def run_demo(console, out_dir: Path, quick: bool = False) -> int:
    rng = np.random.default_rng(0)
    console.print("building TurboAttention kernels for this CPU (llvm) ...")
    start = time.perf_counter()
    turbo = TurboAttention.build("llvm", head_dims=(64, 128), progress=True)
    console.print(f"built {len(turbo.kernels.names)} kernels in {time.perf_counter() - start:.1f} s")

    table = Table(title="TurboAttention (CPU kernels) vs float64")
    for col in ("case", "cos vs reference", "max |err| vs reference", "cos vs exact", "kernel s"):
        table.add_column(col)
    for label, kind, shape, causal in _cases(quick):
        make = random_qkv if kind == "random" else realistic_qkv
        q, k, v = make(rng, **shape)
        start = time.perf_counter()
        out = turbo.prefill(q, k, v, causal=causal)
        elapsed = time.perf_counter() - start
        expected = ref.turbo_prefill(q, k, v, causal)
        table.add_row(label, f"{cosine(out, expected):.7f}", f"{max_abs_error(out, expected):.2e}",
                      f"{cosine(out, ref.exact_attention(q, k, v, causal)):.5f}", f"{elapsed:.3f}")
    for label, share in (("decode 4-bit cache, L=2048", 0.0), ("decode mixed 2/4-bit, L=2048", 0.25)):
        q, k, v = realistic_qkv(rng, batch=2, heads=8, kv_heads=4, q_len=1, kv_len=2048 + 17, head_dim=128)
        bits = select_head_bits(k, v, share)
        cache = turbo.compress_kv(k, v, bits)
        start = time.perf_counter()
        out = turbo.decode(q, cache)
        elapsed = time.perf_counter() - start
        expected = ref.turbo_decode(q, ref.build_cache(k, v, bits))
        label += f" ({cache.nbytes() / cache.fp16_nbytes():.2f}x fp16 bytes)"
        table.add_row(label, f"{cosine(out, expected):.7f}", f"{max_abs_error(out, expected):.2e}",
                      f"{cosine(out, ref.exact_attention(q, k, v)):.5f}", f"{elapsed:.3f}")
    console.print(table)

    out_dir.mkdir(parents=True, exist_ok=True)
    from .codegen import export

    export(turbo.kernels, out_dir / "cpu-module")
    console.print(f"exported the CPU module to {out_dir / 'cpu-module'} (kernels.so + manifest.json)")
    cuda_path = out_dir / "turbotvm_sm_90.cu"
    source = emit_cuda_source("sm_90", KernelSetConfig(dtypes=("float16",)), cuda_path, progress=True)
    console.print(f"emitted {len(source.splitlines())} lines of CUDA for sm_90 to {cuda_path}")
    if torch.cuda.is_available():
        _gpu_part(console, out_dir, quick)
    else:
        console.print("no CUDA GPU here: skipping the tensor-core build and the benchmark (`turbotvm bench` on a GPU)")
    return 0


def shipped_tuning_log(arch: str) -> Path | None:
    """The repository's tuning log for a CUDA arch (``tuning_logs/sm_90``), where the package runs from a
    checkout (``pip install -e .``); None elsewhere or for an arch with none."""
    log = Path(__file__).resolve().parents[1] / "tuning_logs" / arch
    return log if (log / "database_tuning_record.json").is_file() else None


def bench_args(out_dir: Path, quick: bool, tuning_log: Path | None):
    """The benchmark's options as its own parser fills them (a hand-made Namespace missed one it reads)."""
    import argparse

    from .bench import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--out", str(out_dir / "bench")] + ["--quick"] * quick
    return parser.parse_args(argv + (["--tuning-log", str(tuning_log)] if tuning_log else []))


def _gpu_part(console, out_dir: Path, quick: bool) -> None:
    """On a GPU: the CUDA build (cached; tuned by the shipped log for its arch, if any) checked against the
    reference, then turbotvm vs SDPA side by side."""
    from .bench import run

    rng = np.random.default_rng(1)
    target = default_target("cuda")
    tuning_log = shipped_tuning_log(target["arch"])
    console.print(f"CUDA build for {target['arch']}, tuning log: {tuning_log or 'none (hand schedules)'}")
    turbo = TurboAttention.cached(target, head_dims=(64, 128), dtypes=("float16",), progress=True,
                                  tuning_log=tuning_log)
    q, k, v = realistic_qkv(rng, batch=1, heads=8, kv_heads=2, q_len=777, kv_len=777, head_dim=128)
    out = turbo.prefill(*(torch.from_numpy(x).to("cuda", torch.float16) for x in (q, k, v)), causal=True)
    q, k, v = (torch.from_numpy(x).half().double().numpy() for x in (q, k, v))
    console.print(f"CUDA tensor-core prefill vs float64 reference: cos "
                  f"{cosine(out.float().cpu().numpy(), ref.turbo_prefill(q, k, v, True)):.6f}")
    run(bench_args(out_dir, quick, tuning_log))
