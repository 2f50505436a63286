"""Schedules: how each unscheduled kernel (turbotvm.kernels) maps onto a target.

``schedule_for(target)`` picks the rule set by target kind; rules never change the math.
"""

from .cpu import schedule_cpu
from .cuda import schedule_cuda


def schedule_for(target):
    """The schedule function for a tvm.target.Target (kind 'llvm' or 'cuda')."""
    kind = target.kind.name
    if kind == "llvm":
        return schedule_cpu
    if kind == "cuda":
        return schedule_cuda
    raise ValueError(f"target: expected kind 'llvm' or 'cuda', got {kind!r}")
