"""Where a decode step's time goes: a timestamp of every CTA at five points of the step kernel.

    python benchmarks/decode_timeline.py [--out benchmarks/results] [--source other/decode_cuda.py]

The step kernel of this tree (``turbotvm/kernels/decode_cuda.py``) is built once more with TVM's timer
intrinsics (``%globaltimer``, ns) written by thread 0 of each CTA to an extra argument: e0 its start, e1 q
quantized, e2 its tiles done, e3 its state published (after the fence and the atomic count), e4 its end (after
the merge, for a head's last CTA). Three launches back to back; the middle one is reported, as percentiles over
the CTAs in us from its first CTA's start, with the gaps to its neighbours. The instrumented kernel is timed
next to the plain one (CUDA events): the stamps cost ~1-3 us. ``--source``: instrument another decode_cuda.py
(a variant under test) instead. Writes JSON and a PNG (when CTAs finish).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import tvm

from turbotvm.attention import step_kernel_args
from turbotvm.bench import finish_plot, median_ms, package_version, result_stem, start_gpu_script
from turbotvm.kernels import decode_cuda

SHAPES = [(1, 32768, 128, 4), (1, 32768, 128, 2), (1, 131072, 128, 4), (16, 32768, 128, 4), (1, 8192, 128, 4)]
HEADS = 32
EVENTS = ("start", "q quantized", "tiles done", "published", "end")
PERCENTILES = (0, 10, 50, 90, 100)


def instrumented_source(source: Path) -> str:
    """A decode_cuda.py with the five stamps: text edits at lines that name each point (an edit that finds no
    line, or two, is an error: the kernel changed and this script with it)."""
    src = source.read_text()
    pad = " " * 24

    def stamp(k):
        return (f"{pad}T.cuda.timer_start(Event.e{k}, prof.data, ptag.data, poff.data, "
                f"(num_splits + 1) * B * HG * group_size, tx == 0)\n")

    def at(line):
        return f"{pad}{line}\n"

    edits = [
        ("length: T.int32, sink_len: T.int32, open_len: T.int32):",
         "length: T.int32, sink_len: T.int32, open_len: T.int32, prof_h: T.handle):"),
        ("        out = T.match_buffer(out_h, (B, H, 1, D), in_dtype)\n",
         "        out = T.match_buffer(out_h, (B, H, 1, D), in_dtype)\n        NPROF = T.int32()\n"
         "        prof = T.match_buffer(prof_h, (NPROF,), \"uint64\")\n"),
        (at('mine = T.sblock_alloc_buffer((8,), "int32", scope="local")  # thread 0: ids, below'),
         at('mine = T.sblock_alloc_buffer((8,), "int32", scope="local")  # thread 0: ids, below')
         + at('ptag = T.sblock_alloc_buffer((1,), "uint64", scope="local", align=8)')
         + at('poff = T.sblock_alloc_buffer((1,), "uint32", scope="local", align=8)')
         + at("T.cuda.timer_init(prof.data, ptag.data, poff.data, 1, 0)") + stamp(0)),
        (at("# ======== split `cta` of the packed 2/4-bit tokens (an INT8 CTA has no tiles)"),
         stamp(1) + at("# ======== split `cta` of the packed 2/4-bit tokens (an INT8 CTA has no tiles)")),
        (at("# ======== this CTA's state to slot `cta`; the head's last CTA merges every slot"),
         stamp(2) + at("# ======== this CTA's state to slot `cta`; the head's last CTA merges every slot")),
        (at("arrived[0] = ids[8]  # through a register: a branch may not test shared memory here"),
         at("arrived[0] = ids[8]  # through a register: a branch may not test shared memory here") + stamp(3)),
        ("                                counters[b, hq] = 0  # for the next step\n",
         "                                counters[b, hq] = 0  # for the next step\n" + stamp(4)),
    ]
    for old, new in edits:
        if src.count(old) != 1:
            raise SystemExit(f"decode_timeline: decode_cuda.py has {src.count(old)} lines {old.strip()[:70]!r} "
                             "(expected one): update instrumented_source")
        src = src.replace(old, new)
    return "import enum\n" + src.replace("import re\n", "import re\n\n" + _EVENT_SOURCE, 1)


# the timer intrinsics take an enum member, whose value tags the record
_EVENT_SOURCE = "class Event(enum.Enum):\n    e0, e1, e2, e3, e4 = range(5)\n"


def load_as_kernel_module(path: Path, name: str):
    """A decode_cuda.py from ``path`` as a module inside turbotvm.kernels (its relative imports resolve)."""
    spec = importlib.util.spec_from_file_location(f"turbotvm.kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def instrumented_module(source: Path):
    path = Path(tempfile.mkdtemp()) / "decode_cuda_timeline.py"
    path.write_text(instrumented_source(source))
    return load_as_kernel_module(path, "_decode_cuda_timeline")


def raw_stamps(prof: torch.Tensor, ctas: int) -> np.ndarray:
    """[event, CTA] stamps, ns: the high word of each record (%globaltimer's low word, which wraps every 4.3 s)."""
    return (prof.view(torch.int64).cpu().numpy()[1:].reshape(len(EVENTS), ctas) >> 32) & 0xFFFFFFFF


def percentiles(x) -> list:
    return [float(np.percentile(x, p)) for p in PERCENTILES]


def main(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--source", type=Path, default=Path(decode_cuda.__file__))
    known, rest = pre.parse_known_args(argv)
    args, gpu, turbo = start_gpu_script("decode_timeline", __doc__, rest, head_dims=(128,))
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()})
    timeline = instrumented_module(known.source)
    plain = load_as_kernel_module(known.source, "_decode_cuda_plain")
    rows = []
    for b, length, d, bits in SHAPES:
        torch.manual_seed(0)
        k, v = (torch.randn(b, HEADS, length + 17, d, device="cuda", dtype=torch.float16) for _ in range(2))
        q = torch.randn(b, HEADS, 1, d, device="cuda", dtype=torch.float16)
        cache = turbo.compress_kv(k, v, [bits] * HEADS)
        del k, v
        splits = turbo._auto_splits(q, cache.packed_len)
        out = torch.empty_like(q)
        kargs = step_kernel_args(q, cache, cache.groups[0], cache.int8_regions(),
                                 turbo._decode_workspace(q, splits + 1), out, d**-0.5, 1, splits)
        kernels = {}
        for name, module in (("instrumented", timeline), ("plain", plain)):
            func = module.decode_step_cuda(d, bits, "float16").with_attr("global_symbol", "step")
            kernels[name] = tvm.compile(tvm.IRModule({"step": func}), target=target)["step"]
        ctas = (splits + 1) * b * HEADS
        profs = [torch.zeros(1 + len(EVENTS) * ctas, dtype=torch.uint64, device="cuda") for _ in range(3)]
        plain_us = median_ms(lambda: kernels["plain"](*kargs)) * 1e3
        instrumented_us = median_ms(lambda: kernels["instrumented"](*kargs, profs[0])) * 1e3
        for prof in profs:  # three back to back
            kernels["instrumented"](*kargs, prof)
        torch.cuda.synchronize()
        raws = [raw_stamps(p, ctas) for p in profs]
        since = raws[0][0, 0] - (1 << 24)  # 16 ms before a stamp of the first launch: no wrap in between
        before, this, after = ((r - since) & 0xFFFFFFFF for r in raws)
        t0 = this[0].min()
        s = (this - t0) / 1e3
        split = np.arange(ctas) % (splits + 1) < splits
        merged = s[4] - s[3] > 0.5  # a head's last CTA (the others end right after publishing)
        row = {"B": b, "H": HEADS, "L": length + 17, "D": d, "bits": bits, "splits": splits, "ctas": ctas,
               "mb": cache.nbytes() / 1e6, "plain_us": plain_us, "instrumented_us": instrumented_us,
               "percentiles": list(PERCENTILES),
               "start": percentiles(s[0]), "q_quantized": percentiles(s[1]),
               "split_tiles_done": percentiles(s[2][split]), "int8_tiles_done": percentiles(s[2][~split]),
               "published": percentiles(s[3]), "prologue": percentiles(s[1] - s[0]),
               "publish": percentiles(s[3] - s[2]), "merge": percentiles((s[4] - s[3])[merged]),
               "span_us": float(s[4].max()), "gap_before_us": float((t0 - before[4].max()) / 1e3),
               "gap_after_us": float((after[0].min() - this[4].max()) / 1e3),
               "split_done_cdf_us": sorted(s[2][split].tolist())}
        rows.append(row)
        print(f"\nB={b} H={HEADS} L={row['L']} D={d} {bits}-bit, {splits} splits, {ctas} CTAs, {row['mb']:.1f} MB; "
              f"CUDA events: plain {plain_us:.1f} us, instrumented {instrumented_us:.1f} us; span {row['span_us']:.1f} "
              f"us, gaps {row['gap_before_us']:.2f} / {row['gap_after_us']:.2f} us")
        print("  us from the first CTA's start, percentiles " + "/".join(map(str, PERCENTILES)) + " over CTAs:")
        for key in ("start", "q_quantized", "split_tiles_done", "int8_tiles_done", "published", "prologue",
                    "publish", "merge"):
            print(f"  {key:17s} " + " ".join(f"{x:7.2f}" for x in row[key]))
        del cache
    stem = result_stem(args.out, "decode_timeline", gpu)
    stem.with_suffix(".json").write_text(json.dumps(
        {"gpu": gpu, "versions": {p: package_version(p) for p in ("torch", "apache-tvm", "apache-tvm-ffi")},
         "source": str(known.source), "events": EVENTS, "rows": rows}, indent=1))
    plot(rows, gpu, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")


def plot(rows, gpu, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["B"] == 1:
            done = row["split_done_cdf_us"]
            ax.plot(done, np.arange(1, len(done) + 1) / len(done),
                    label=f"L={row['L']} {row['bits']}-bit (span {row['span_us']:.0f} us)")
    ax.set_xlabel("us from the step's first CTA")
    finish_plot(fig, ax, "share of split CTAs done", f"decode step, B=1 H=32 D=128 ({gpu})", path)


if __name__ == "__main__":
    main()
