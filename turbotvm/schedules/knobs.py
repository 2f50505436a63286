"""Decision points of the schedule rules, so that tuning can replace the hand choices by sampled ones.

A rule calls its ``Knobs`` wherever it picks a number (threads per block, vector width, parallel
granularity, unroll depth). ``HandKnobs`` makes the hand schedule's fixed choices, so a rule called
without knobs is exactly the untuned schedule; ``turbotvm.tuning.space`` passes knobs that draw the
same choices from ``sch.sample_*`` instructions, which meta-schedule's search then varies.
"""

from __future__ import annotations

from tvm.s_tir import Schedule


class HandKnobs:
    """The hand schedule: no split of the parallel loop, whole-loop vectors, no unroll pragma."""

    #: CUDA SIMT rule: threads per CTA of the one-thread-per-tile mapping.
    threads_per_block_default = 64

    def parallel(self, sch: Schedule, loop):
        """Run the fused spatial loop ``loop`` of a tile on all cores; returns the parallel loop."""
        sch.parallel(loop)
        return loop

    def vectorize(self, sch: Schedule, block, loop) -> None:
        """Vectorize the innermost element-wise ``loop`` of ``block`` (may raise ScheduleError)."""
        sch.vectorize(loop)

    def unroll(self, sch: Schedule, loop) -> None:
        """Unroll pragma over the body of the parallel ``loop``; the hand schedule leaves it to LLVM."""

    def threads_per_block(self, sch: Schedule, loop):
        """Threads per CTA when ``loop`` (the fused tile loop) is split into blockIdx x threadIdx."""
        return self.threads_per_block_default


HAND = HandKnobs()
