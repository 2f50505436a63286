"""Whole CUDA decode steps, eager and replayed from a CUDA graph, of whichever turbotvm is importable:
an A/B of two trees whose decode kernels differ in kind (one launch vs three), where decode_ab.py
cannot put their kernels side by side.

    git archive main turbotvm | tar -x -C /tmp/main_tree
    PYTHONPATH=/tmp/main_tree python benchmarks/decode_steps.py main --out /tmp/ab
    python benchmarks/decode_steps.py branch --out /tmp/ab
    python benchmarks/decode_steps.py --compare /tmp/ab main branch

Each run writes <out>/<label>.json (median of CUDA-event timings per shape and split count) and each
step's output, so that --compare reports the times side by side and how far the outputs differ. The
caches are the same in every run (seeded torch.randn, 17 tokens past whole blocks: the open block
is present, as in most steps). Run both trees in one device session: timings compare on one GPU only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

# (B, H, L, bits (24: heads 4, 4, 4, 2, ...)), split counts (0: the tree's own choice)
SHAPES = [((1, 32, 32768, 4), (0, 31)), ((16, 32, 32768, 4), (0, 1, 2)), ((4, 32, 8192, 24), (0,)),
          ((1, 32, 131072, 4), (0,))]
HEAD_DIM = 128


def step_key(b, h, length, bits, splits) -> str:
    return f"B{b}_H{h}_L{length}_bits{bits}_splits{splits}"


def time_steps(label: str, out: Path, module_dir: Path | None):
    import turbotvm
    from turbotvm import TurboAttention
    from turbotvm.bench import median_ms

    arch = {"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()}
    turbo = (TurboAttention.load(module_dir) if module_dir else
             TurboAttention.build(arch, head_dims=(HEAD_DIM,), dtypes=("float16",)))
    results = {"gpu": torch.cuda.get_device_name(), "turbotvm": turbotvm.__file__, "steps": {}}
    out.mkdir(parents=True, exist_ok=True)
    for (b, h, length, bits), split_counts in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(1)
        k, v = (torch.randn(b, h, length + 17, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
                for _ in range(2))
        q = torch.randn(b, h, 1, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
        cache = turbo.compress_kv(k, v, [bits] * h if bits != 24 else [4, 4, 4, 2] * (h // 4))
        del k, v
        for splits in split_counts:
            eager_out = turbo.decode(q, cache, num_splits=splits)
            eager = median_ms(lambda: turbo.decode(q, cache, num_splits=splits), iters=200)
            side = torch.cuda.Stream()  # warm up on a side stream before capture, as torch asks
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                turbo.decode(q, cache, num_splits=splits)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                graph_out = turbo.decode(q, cache, num_splits=splits)
            graphed = median_ms(graph.replay, iters=200)
            key = step_key(b, h, length, bits, splits)
            results["steps"][key] = {"eager_us": eager * 1e3, "graphed_us": graphed * 1e3,
                                     "graph_equals_eager": bool(torch.equal(graph_out, eager_out)),
                                     "cache_GBps_graphed": cache.nbytes() / graphed / 1e6}
            torch.save(eager_out.cpu(), out / f"{label}_{key}.pt")
            print(key, json.dumps(results["steps"][key]), flush=True)
        del cache
    (out / f"{label}.json").write_text(json.dumps(results, indent=1) + "\n")


def compare(out: Path, labels: list[str]):
    runs = {label: json.loads((out / f"{label}.json").read_text()) for label in labels}
    base = labels[0]
    print("graphed (eager) us; output vs", base, "as max abs diff; GPU:", runs[base]["gpu"])
    for key in runs[base]["steps"]:
        cells = []
        for label, run in runs.items():
            step = run["steps"].get(key)
            if step is None:
                cells.append(f"{label} -")
                continue
            diff = (torch.load(out / f"{label}_{key}.pt").float()
                    - torch.load(out / f"{base}_{key}.pt").float()).abs().max().item()
            cells.append(f"{label} {step['graphed_us']:7.1f} ({step['eager_us']:7.1f}) {diff:.1e}"
                         + ("" if step["graph_equals_eager"] else " GRAPH DIFFERS"))
        print(f"{key:34s} " + " | ".join(cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("label", nargs="?", help="name of this run (its files: <out>/<label>*)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_steps"))
    parser.add_argument("--module-dir", type=Path, help="an exported kernel set to load instead of building")
    parser.add_argument("--compare", nargs="+", metavar="OUT LABEL", help="OUT then labels: print a table")
    args = parser.parse_args(argv)
    if args.compare:
        if len(args.compare) < 3:
            parser.error("--compare: expected OUT and at least two labels")
        compare(Path(args.compare[0]), args.compare[1:])
    elif args.label:
        time_steps(args.label, args.out, args.module_dir)
    else:
        parser.error("label: expected a run name (or --compare)")


if __name__ == "__main__":
    main()
