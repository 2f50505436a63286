"""turbotvm vs PyTorch SDPA (flash, cuDNN, efficient) on one GPU, side by side in one run.

Prefill: effective TOPS = 4·B·H·N·M·D / t (halved when causal), turbotvm timed end to end from fp16
tensors (quantization included). Decode: one query token over a cache of L tokens; turbotvm reads
its compressed cache, SDPA reads fp16 K/V; achieved bandwidth = bytes read / t, compared with the
measured device-to-device copy bandwidth; decode is also timed replayed from a CUDA graph (turbotvm and
SDPA alike), the device time without per-call host work, and decode's variants are timed in alternating
rounds. CUDA events, warm-up, median of many runs.

    turbotvm bench [--quick] [--out benchmarks/results]     (or python benchmarks/bench_attention.py)

Writes <out>/attention_<gpu>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention import TurboAttention

BASELINES = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
             "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}

# (B, H, N, D, causal): N = M
PREFILL_SHAPES = [(1, 32, n, 128, c) for n in (1024, 4096, 16384, 32768) for c in (False, True)] + [
    (4, 32, 2048, 64, False), (4, 32, 2048, 64, True)]
PREFILL_QUICK = [(1, 32, 4096, 128, False), (1, 32, 16384, 128, True), (4, 32, 2048, 64, True)]
# (B, H, L, D)
DECODE_SHAPES = [(1, 32, 4096, 128), (1, 32, 32768, 128), (1, 32, 131072, 128), (16, 32, 32768, 128),
                 (64, 32, 4096, 128)]
DECODE_QUICK = [(1, 32, 32768, 128), (16, 32, 32768, 128)]


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def median_ms(fn, warmup: int = 5, iters: int = 30) -> float:
    """Median of ``iters`` CUDA-event timings; calls slower than 50 ms get 5 timings (still a median)."""
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    if time.perf_counter() - start > 0.05:
        warmup, iters = 1, 5
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def capture(fn, warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``fn`` captured once in a CUDA graph, and the graph's output. Warm-up runs on a side stream
    first, as torch.cuda.graphs asks."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graphed_ms(fn, warmup: int = 3, iters: int = 30) -> tuple[float, torch.Tensor]:
    """``median_ms`` of ``fn``'s replays from a CUDA graph, and the graph's output.

    Device time without per-call host work (Python, checks, launches): how serving engines run a
    decode step."""
    graph, out = capture(fn, warmup)
    return median_ms(graph.replay, warmup, iters), out


def interleaved_ms(measures: dict, rounds: int = 5) -> dict:
    """Each measure (a function returning milliseconds, e.g. a ``median_ms``) taken in ``rounds``
    alternating rounds (a, b, c, a, b, c, ...), and its median over the rounds: clocks and temperature
    drift during a run, and timing one side after the other puts the drift into their ratio (the same
    decode step measured 621 and 676 us in two places of one run on the H200)."""
    per_round = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            per_round[name].append(measure())
    return {name: statistics.median(times) for name, times in per_round.items()}


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: read + write bytes per second (the bandwidth one can reach)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 3, 20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def cosine(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def run_baselines(q, k, v, causal):
    """Times (and outputs) of each SDPA backend."""
    times, outputs = {}, {}
    for name, backend in BASELINES.items():
        try:
            with sdpa_kernel([backend]):
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                outputs[name] = fn()
                times[name] = median_ms(fn)
        except RuntimeError as err:  # backend not available for this shape/dtype
            times[name] = None
            print(f"  {name}: unavailable ({str(err).splitlines()[0][:80]})")
    return times, outputs


def bench_prefill(turbo, shapes):
    rows = []
    for b, h, n, d, causal in shapes:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = 4 * b * h * n * n * d / (2 if causal else 1)
        times, outputs = run_baselines(q, k, v, causal)
        ours = turbo.prefill(q, k, v, causal=causal)
        times["turbotvm"] = median_ms(lambda: turbo.prefill(q, k, v, causal=causal))
        reference = next(o for o in outputs.values())
        best = min(t for name, t in times.items() if name != "turbotvm" and t)
        row = {"B": b, "H": h, "N": n, "M": n, "D": d, "causal": causal, "ms": times,
               "tops": {name: flops / (t * 1e-3) / 1e12 for name, t in times.items() if t},
               "speedup_vs_best_sdpa": best / times["turbotvm"], "cos_vs_sdpa": cosine(ours, reference)}
        rows.append(row)
        print(f"prefill B={b} H={h} N={n} D={d} causal={causal}: " + ", ".join(
            f"{k_}={v_:.0f}" for k_, v_ in row["tops"].items()) + f" TOPS; x{row['speedup_vs_best_sdpa']:.2f} "
            f"vs best SDPA; cos {row['cos_vs_sdpa']:.5f}")
        del q, k, v, outputs, ours
        torch.cuda.empty_cache()
    return rows


def in_backend(backend, measure):
    """``measure`` run with one SDPA backend selected (outside the timed calls)."""
    def run():
        with sdpa_kernel([backend]):
            return measure()
    return run


def bench_decode(turbo, shapes, copy_gbs, head_bits_of):
    """Each shape's SDPA backends and turbotvm's caches, timed eagerly and replayed from CUDA graphs, in
    alternating rounds (``interleaved_ms``)."""
    rows = []
    for b, h, length, d in shapes:
        k, v = (torch.randn(b, h, length, d, device="cuda", dtype=torch.float16) for _ in range(2))
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16)
        eager, graphed, outputs = {}, {}, {}  # measures (functions returning ms), by variant

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v)

        for name, backend in BASELINES.items():
            try:
                with sdpa_kernel([backend]):
                    outputs[name] = sdpa()
                    graph = capture(sdpa)[0]
            except RuntimeError as err:  # backend not available for this shape/dtype
                print(f"  {name}: unavailable ({str(err).splitlines()[0][:80]})")
                continue
            eager[name] = in_backend(backend, lambda: median_ms(sdpa))
            graphed[name] = lambda graph=graph: median_ms(graph.replay)
        caches = {label: turbo.compress_kv(k, v, bits) for label, bits in head_bits_of(h).items()}
        ours, graph_out = {}, {}
        for label, cache in caches.items():
            call = lambda cache=cache: turbo.decode(q, cache)  # noqa: E731
            ours[label] = call()
            graph, graph_out[label] = capture(call)
            eager[label] = lambda call=call: median_ms(call)
            graphed[label] = lambda graph=graph: median_ms(graph.replay)
        times, graphed = interleaved_ms(eager), interleaved_ms(graphed)
        sdpa_times = {name: times.get(name) for name in BASELINES}
        sdpa_graphed = {name: graphed.get(name) for name in BASELINES}
        best = min(t for t in sdpa_times.values() if t)
        best_graph = min(t for t in sdpa_graphed.values() if t)
        fp16_bytes = 2 * k.numel() * k.element_size()
        row = {"B": b, "H": h, "L": length, "D": d, "ms": sdpa_times, "ms_cuda_graph": sdpa_graphed,
               "fp16_bytes": fp16_bytes, "turbotvm": {}}
        for label, cache in caches.items():
            ms, ms_graph, read = times[label], graphed[label], cache.nbytes()
            row["turbotvm"][label] = {"ms": ms, "bytes": read, "bytes_vs_fp16": read / fp16_bytes,
                                      "bandwidth_gbs": read / (ms * 1e-3) / 1e9,
                                      "bandwidth_vs_copy": read / (ms * 1e-3) / 1e9 / copy_gbs,
                                      "speedup_vs_best_sdpa": best / ms,
                                      "ms_cuda_graph": ms_graph,
                                      "bandwidth_vs_copy_cuda_graph": read / (ms_graph * 1e-3) / 1e9 / copy_gbs,
                                      "speedup_vs_best_sdpa_cuda_graph": best_graph / ms_graph,
                                      "graph_equals_eager": bool(torch.equal(graph_out[label], ours[label])),
                                      "cos_vs_sdpa": cosine(ours[label], next(iter(outputs.values())))}
        row["sdpa_bandwidth_gbs"] = {n: fp16_bytes / (t * 1e-3) / 1e9 for n, t in sdpa_times.items() if t}
        rows.append(row)
        print(f"decode B={b} H={h} L={length}: SDPA " + ", ".join(f"{n}={t:.3f}" for n, t in sdpa_times.items() if t)
              + " ms; turbotvm " + ", ".join(f"{lb}={r['ms']:.3f} ms (x{r['speedup_vs_best_sdpa']:.2f}, "
                                             f"{r['bandwidth_vs_copy']:.0%} of copy bw)" for lb, r in row["turbotvm"].items())
              + "; CUDA graph: SDPA " + ", ".join(f"{n}={t:.3f}" for n, t in sdpa_graphed.items() if t)
              + " ms; turbotvm " + ", ".join(f"{lb}={r['ms_cuda_graph']:.3f} ms (x{r['speedup_vs_best_sdpa_cuda_graph']:.2f}, "
                                             f"{r['bandwidth_vs_copy_cuda_graph']:.0%} of copy bw)"
                                             for lb, r in row["turbotvm"].items()))
        del k, v, q, outputs, caches, eager, ours, graph_out
        torch.cuda.empty_cache()
    return rows


def start_gpu_script(name: str, doc: str, argv, head_dims) -> tuple:
    """A GPU benchmark script's start: its --out option, a GPU or exit, this GPU's fp16 build of head_dims.
    Returns (args, GPU name, TurboAttention)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"{name}: needs a CUDA GPU")
    turbo = TurboAttention.build({"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()},
                                 head_dims=tuple(head_dims), dtypes=("float16",))
    return args, torch.cuda.get_device_name(), turbo


def result_stem(out, name: str, gpu: str) -> Path:
    """<out>/<name>_<GPU name>: where a benchmark writes its .json and .png (out made if missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{name}_{gpu.replace(' ', '_').replace('/', '_')}"


def finish_plot(fig, ax, ylabel: str, title: str, path) -> None:
    """The benchmarks' plots end alike: y label, small title and legend, saved at 120 dpi."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_d) = plt.subplots(1, 2, figsize=(13, 5))
    prefill = [r for r in result["prefill"] if r["D"] == 128]
    for causal, style in ((False, "-"), (True, "--")):
        rows = [r for r in prefill if r["causal"] == causal]
        for name in ["turbotvm", *BASELINES]:
            pts = [(r["N"], r["tops"][name]) for r in rows if name in r["tops"]]
            if pts:
                ax_p.plot(*zip(*pts), style, marker="o", label=f"{name}{' causal' if causal else ''}")
    ax_p.set(xscale="log", xlabel="sequence length N (B=1, H=32, D=128)", ylabel="effective TOPS / TFLOPS",
             title="Prefill")
    ax_p.legend(fontsize=7)
    labels = [f"B{r['B']} L{r['L'] // 1024}K" for r in result["decode"]]
    x = range(len(labels))
    for name in BASELINES:
        ax_d.plot(x, [r["ms"].get(name) or float("nan") for r in result["decode"]], marker="o", label=name)
    for label in (result["decode"][0]["turbotvm"] if result["decode"] else {}):
        ax_d.plot(x, [r["turbotvm"][label]["ms"] for r in result["decode"]], marker="s", label=f"turbotvm {label}")
        ax_d.plot(x, [r["turbotvm"][label].get("ms_cuda_graph", float("nan")) for r in result["decode"]], "--",
                  marker="s", label=f"turbotvm {label}, CUDA graph")
    ax_d.plot(x, [min((t for t in r.get("ms_cuda_graph", {}).values() if t), default=float("nan"))
                  for r in result["decode"]], "--", marker="o", color="black", label="best SDPA, CUDA graph")
    ax_d.set(xticks=list(x), yscale="log", ylabel="ms (median)", title="Decode (one token, H=32, D=128)")
    ax_d.set_xticklabels(labels)
    ax_d.legend(fontsize=7)
    fig.suptitle(f"{result['gpu']}: turbotvm vs PyTorch SDPA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a few shapes only")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--tuning-log", default=None,
                        help="a turbotvm tune output (e.g. tuning_logs/sm_90): build with its best records")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> Path:
    """Benchmark on this GPU; returns the JSON path."""
    if not torch.cuda.is_available():
        raise SystemExit("bench: needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    start = time.time()
    turbo = TurboAttention.build({"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()},
                                 head_dims=(64, 128), dtypes=("float16",), tuning_log=args.tuning_log)
    print(f"built in {time.time() - start:.0f} s on {gpu}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"device copy bandwidth {copy_gbs:.0f} GB/s")

    def head_bits_of(h):
        mixed = [2 if i % 4 == 3 else 4 for i in range(h)]
        return {"4bit": [4] * h, "mixed_2_4": mixed}

    result = {"gpu": gpu, "versions": {p: package_version(p) for p in ("torch", "apache-tvm", "apache-tvm-ffi")},
              "python": platform.python_version(), "copy_bandwidth_gbs": copy_gbs, "tuning_log": args.tuning_log,
              "prefill": bench_prefill(turbo, PREFILL_QUICK if args.quick else PREFILL_SHAPES)}
    result["decode"] = [] if args.skip_decode else bench_decode(
        turbo, DECODE_QUICK if args.quick else DECODE_SHAPES, copy_gbs, head_bits_of)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attention_{gpu.replace(' ', '_').replace('/', '_')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return stem.with_suffix(".json")


if __name__ == "__main__":
    main()
