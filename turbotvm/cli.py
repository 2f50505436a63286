"""`turbotvm` command line: info, build, emit-cuda, demo, cache."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def _config(args):
    from .kernel_set import KernelSetConfig

    return KernelSetConfig(tuple(int(d) for d in args.head_dims.split(",")), tuple(args.dtypes.split(",")))


def cmd_info(args) -> int:
    from importlib.metadata import version

    import torch
    import tvm

    table = Table(title="turbotvm", show_header=False)
    table.add_row("turbotvm", version("turbotvm") if _installed() else "not installed (source tree)")
    table.add_row("TVM", tvm.__version__)
    table.add_row("tvm-ffi", version("apache-tvm-ffi"))
    table.add_row("torch", torch.__version__)
    table.add_row("targets", "llvm (CPU), cuda (e.g. {\"kind\":\"cuda\",\"arch\":\"sm_90\"})")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CUDA source can still be emitted)"
    table.add_row("GPU", gpu)
    table.add_row("TVM sees CUDA", str(bool(tvm.cuda().exist)))
    console.print(table)
    return 0


def _installed() -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("turbotvm")
        return True
    except PackageNotFoundError:
        return False


def cmd_build(args) -> int:
    from .codegen import build, export

    compiled = build(args.target, _config(args), progress=True, tuning_log=args.tuning_log)
    if compiled.target_kind == "cuda" and args.out is not None:
        import tvm

        if not tvm.cuda().exist:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "kernels.cu").write_text(compiled.cuda_source())
            console.print(f"no GPU here: wrote CUDA source to {out / 'kernels.cu'} (export needs a GPU)")
            return 0
    out = export(compiled, args.out)
    console.print(f"exported {len(compiled.names)} kernels for {compiled.target_kind} to {out}")
    return 0


def cmd_emit_cuda(args) -> int:
    from .codegen import emit_cuda_source

    source = emit_cuda_source(args.arch, _config(args), Path(args.out), progress=True)
    console.print(f"wrote {len(source.splitlines())} lines of CUDA for {args.arch} to {args.out}")
    return 0


def cmd_cache(args) -> int:
    from .codegen.module_cache import cache_entries, clear_cache, default_cache_dir

    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.action == "clear":
        removed, freed = clear_cache(cache_dir)
        console.print(f"removed {removed} entries ({freed / 2**20:.1f} MiB) from {cache_dir}")
        return 0
    entries = cache_entries(cache_dir)
    table = Table(title=f"module cache {cache_dir}")
    for column in ("entry (kind-arch-dims-dtypes-hash)", "built", "TVM", "MiB"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        key = entry["key"] if isinstance(entry["key"], dict) else {}
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["path"].stat().st_mtime))
        table.add_row(entry["path"].name, built, str(key.get("versions", {}).get("tvm", "?")),
                      f"{entry['size'] / 2**20:.1f}")
    console.print(table)
    console.print(f"{len(entries)} entries, {sum(e['size'] for e in entries) / 2**20:.1f} MiB")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(console, out_dir=Path(args.out), quick=args.quick)


def cmd_tune(args) -> int:
    from .tuning.cli import run

    return run(args, console)


def cmd_bench(args) -> int:
    from .bench import run

    run(args)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="turbotvm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, targets, GPU").set_defaults(func=cmd_info)

    def add_config(p, dtypes):
        p.add_argument("--head-dims", default="64,128", help="comma list from 64,128")
        p.add_argument("--dtypes", default=dtypes, help="comma list from float32,float16,bfloat16")

    p = sub.add_parser("build", help="build the kernel set for a target and export it")
    p.add_argument("--target", default="llvm", help="'llvm', 'cuda', a TVM tag or a JSON dict")
    p.add_argument("--out", required=True, help="output directory (kernels.so + manifest.json)")
    p.add_argument("--tuning-log", default=None, help="a turbotvm tune directory: its best records are applied")
    add_config(p, "float32")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("emit-cuda", help="write the CUDA source (works without a GPU)")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--out", default="turbotvm_kernels.cu")
    add_config(p, "float16")
    p.set_defaults(func=cmd_emit_cuda)

    p = sub.add_parser("demo", help="build for this machine, check against the reference, emit CUDA")
    p.add_argument("--out", default="turbotvm-demo", help="directory for the exported module and CUDA source")
    p.add_argument("--quick", action="store_true", help="smaller shapes")
    p.set_defaults(func=cmd_demo)

    from .bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="turbotvm vs PyTorch SDPA on this GPU: JSON + plot")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    from .tuning.cli import add_arguments as add_tune_arguments

    p = sub.add_parser("tune", help="meta-schedule tuning into a TVM JSON database (tuning_logs/<arch>/), resumable")
    add_tune_arguments(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("cache", help="list or clear the module cache (TurboAttention.cached, load_or_build)")
    p.add_argument("action", choices=("info", "clear"))
    p.add_argument("--cache-dir", default=None, help="default: $TURBOTVM_CACHE_DIR or ~/.cache/turbotvm")
    p.set_defaults(func=cmd_cache)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
