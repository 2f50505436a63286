"""``turbotvm tune``: arguments, a progress bar per kernel and the summary table."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

from rich.table import Table
from tqdm import tqdm


def add_arguments(p) -> None:
    p.add_argument("--target", default="llvm", help="'llvm', 'cuda', a TVM tag or a JSON dict")
    p.add_argument("--kernels", default="prefill,decode",
                   help="comma list of families: quantize, prefill, decode, compress")
    p.add_argument("--only", default=None, help="comma list of kernel names within those families")
    p.add_argument("--head-dims", default="64,128", help="comma list from 64,128")
    p.add_argument("--dtypes", default="float16", help="comma list from float32,float16,bfloat16")
    p.add_argument("--trials", type=int, default=64, help="trials per kernel, counting those already in --out")
    p.add_argument("--out", default=None, help="log directory (default tuning_logs/<arch>; re-running resumes it)")
    p.add_argument("--rpc", default=None, help="host:port:key of a TVM RPC tracker to measure on (default: here)")
    p.add_argument("--workers", type=int, default=1, help="parallel builders/RPC sessions (default 1)")
    p.add_argument("--seq-len", type=int, default=1024, help="shape bucket: sequence length measured at")
    p.add_argument("--batch", type=int, default=1, help="shape bucket: batch")
    p.add_argument("--heads", type=int, default=8, help="shape bucket: query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="shape bucket: KV heads")
    p.add_argument("--splits", type=int, default=4,
                   help="shape bucket: decode KV splits per head (the runtime uses about 8 CTAs per SM)")
    p.add_argument("--population", type=int, default=128, help="evolutionary search population (default 128)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prune-stale", action="store_true",
                   help="afterwards drop --out's workloads tuned for older code of these kernels (lookup ignores them)")


@contextmanager
def _bar(kernel: str, total: int):
    with tqdm(total=total, desc=kernel, unit="trial", dynamic_ncols=True) as bar:
        def on_batch(done: int, best: float):
            bar.update(done)
            bar.set_postfix_str(f"best {best * 1e6:.1f} us" if math.isfinite(best) else "best -")

        yield on_batch


def _us(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def run(args, console) -> int:
    from ..codegen.build import make_target
    from ..kernel_set import KernelSetConfig
    from .tuner import tune
    from .workload import ShapeBucket, arch_name

    target = make_target(args.target)
    config = KernelSetConfig(tuple(int(d) for d in args.head_dims.split(",")), tuple(args.dtypes.split(",")))
    bucket = ShapeBucket(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, seq_len=args.seq_len,
                         splits=args.splits)
    out = Path(args.out) if args.out else Path("tuning_logs") / arch_name(target)
    families = [f.strip() for f in args.kernels.split(",") if f.strip()]
    only = [k.strip() for k in args.only.split(",")] if args.only else None
    console.print(f"tuning {', '.join(families)} for {target} into {out} "
                  f"({args.trials} trials per kernel, {'RPC ' + args.rpc if args.rpc else 'measured here'})")
    results = tune(target, config, families, args.trials, out, bucket, rpc=args.rpc, max_workers=args.workers,
                   population=args.population, seed=args.seed, progress=_bar, kernels=only)
    table = Table(title=f"tuning log {out}")
    for column in ("kernel", "trials (new)", "hand schedule us", "best us", "speedup"):
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for r in results:
        speedup = f"{r.baseline_seconds / r.best_seconds:.2f}x" if r.baseline_seconds and r.best_seconds else "-"
        table.add_row(r.kernel, f"{r.trials} ({r.new_trials})", _us(r.baseline_seconds), _us(r.best_seconds), speedup)
    console.print(table)
    if args.prune_stale:
        from ..kernel_set import kernel_set_for
        from .lookup import prune_stale

        dropped = prune_stale(out, kernel_set_for(config, target).funcs, target)
        console.print(f"pruned {dropped} workload(s) tuned for older kernel code from {out}")
    console.print(f"use it: turbotvm.codegen.build(..., tuning_log={str(out)!r}) or TurboAttention.build(..., "
                  f"tuning_log=...)")
    return 0
