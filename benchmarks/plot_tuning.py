"""Best time vs trials for every kernel of a tuning log, with the untuned (hand) schedule's time.

    python benchmarks/plot_tuning.py [tuning_logs/sm_90] [--out benchmarks/results/tuning_sm_90]

Writes <out>.json (per kernel and shape bucket: times in trial order, hand time, best, speedup)
and <out>.png. The first record of each workload is the default knob setting (tuning measures it
first), so "hand" is that record's time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from turbotvm.tuning.records import read_log  # noqa: E402


def summarize(log_dir) -> list[dict]:
    rows = []
    for workload in read_log(log_dir):
        times = [seconds * 1e6 for _, seconds, _ in sorted(workload.records)]
        if not times:
            continue
        bucket = workload.meta["bucket"]
        best_so_far = [min(times[: i + 1]) for i in range(len(times))]
        rows.append({"kernel": workload.meta["kernel"], "bucket": bucket, "times_us": times,
                     "best_so_far_us": best_so_far, "hand_us": times[0], "best_us": best_so_far[-1],
                     "speedup_vs_hand": times[0] / best_so_far[-1]})
    return rows


def plot(rows, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    for row in rows:
        b = row["bucket"]
        label = f"{row['kernel']} (B{b['batch']} L{b['seq_len'] // 1024}K)"
        ax.plot(range(1, len(row["best_so_far_us"]) + 1), [t / row["hand_us"] for t in row["best_so_far_us"]],
                marker="o", label=label)
    ax.set_xlabel("trials")
    ax.set_ylabel("best time / untuned time")
    ax.set_title("turbotvm tuning: best time vs trials")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log_dir", nargs="?", default="tuning_logs/sm_90")
    parser.add_argument("--out", default="benchmarks/results/tuning_sm_90")
    args = parser.parse_args(argv)
    rows = summarize(args.log_dir)
    if not rows:  # e.g. a shipped log pruned after a kernel change: keep the last results
        parser.error(f"log_dir: {args.log_dir} holds no measured record; nothing written to {args.out}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"log": args.log_dir, "kernels": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    for row in rows:
        print(f"{row['kernel']:34s} B{row['bucket']['batch']:<3d} L{row['bucket']['seq_len']:<6d} "
              f"hand {row['hand_us']:9.1f} us  best {row['best_us']:9.1f} us  x{row['speedup_vs_hand']:.2f}")


if __name__ == "__main__":
    main()
