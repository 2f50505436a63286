"""Where the time of one CUDA decode step goes: each launch it makes, alone, and the step end to end.

    python benchmarks/decode_breakdown.py [B H L D] [--bits 4]

Each launch is timed twice: as one call (CUDA events around it, so with its host work when that is
longer than the kernel) and queued behind a 2 ms spin kernel (device time only: the launch's host work
overlaps the spin). The step's own launches are recorded from one ``decode`` call, so the list follows
the code.
"""

from __future__ import annotations

import argparse

import torch

from turbotvm import TurboAttention
from turbotvm.bench import median_ms

SPIN_CYCLES = 2_000_000  # about 1-2 ms: longer than any launch's host work


class RecordingKernels:
    """The kernel set, recording (name, function, arguments) of every call."""

    def __init__(self, kernels):
        self.kernels, self.calls = kernels, []

    def __getitem__(self, name):
        func = self.kernels[name]

        def record(*args):
            self.calls.append((name, func, args))
            return func(*args)

        return record

    def __getattr__(self, attr):
        return getattr(self.kernels, attr)


def device_ms(fn) -> float:
    """Device time of ``fn``'s launches: queued behind a spin, less the spin alone."""
    spin = median_ms(lambda: torch.cuda._sleep(SPIN_CYCLES), iters=20)

    def spun():
        torch.cuda._sleep(SPIN_CYCLES)
        fn()

    return median_ms(spun, iters=20) - spin


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs="*", type=int, default=[1, 32, 32768, 128], help="B H L D")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 4))
    args = parser.parse_args(argv)
    b, h, length, d = args.shape
    turbo = TurboAttention.build({"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()},
                                 head_dims=(d,), dtypes=("float16",))
    # 17 tokens past whole blocks: the open block is present, as in most steps
    k, v = (torch.randn(b, h, length + 17, d, device="cuda", dtype=torch.float16) for _ in range(2))
    q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16)
    cache = turbo.compress_kv(k, v, [args.bits] * h)
    kernels, turbo.kernels = turbo.kernels, RecordingKernels(turbo.kernels)
    turbo.decode(q, cache)
    calls, turbo.kernels = turbo.kernels.calls, kernels
    steps = {name: (lambda f=func, a=launch_args: f(*a)) for name, func, launch_args in calls}
    steps["decode end to end"] = lambda: turbo.decode(q, cache)
    read = cache.nbytes()
    print(f"B={b} H={h} L={length + 17} D={d} {args.bits}-bit: {read / 1e6:.1f} MB of cache")
    for name, fn in steps.items():
        call, device = median_ms(fn), device_ms(fn)
        extra = f"  {read / device / 1e6:.0f} GB/s of cache" if "step" in name or "end" in name else ""
        print(f"{name:28s} one call {call * 1e3:8.1f} us   device {device * 1e3:8.1f} us{extra}")


if __name__ == "__main__":
    main()
