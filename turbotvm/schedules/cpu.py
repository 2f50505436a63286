"""CPU (LLVM) rule: parallel over each kernel's independent tiles, vectorized inner loops.

Tiles (batch, head, query tile / split) run on separate cores; inside a tile, every innermost
loop that runs over a spatial axis is vectorized. The kernels write their INT8 products as
rank-1 updates (reduction outside, a contiguous row of keys or channels innermost), so this
covers Q·Kᵀ and P·V too; LLVM lowers the vectors to the target's (``mcpu``) SIMD width.
"""

from tvm.s_tir import Schedule
from tvm.s_tir.schedule import ScheduleError

from .common import inner_blocks, leading_spatial_loops, top_level_blocks
from .knobs import HAND, HandKnobs

#: Widest loop that is turned into one vector op (LLVM splits it into machine vectors).
MAX_VECTOR = 128


def schedule_cpu(sch: Schedule, func_name: str, target, knobs: HandKnobs = HAND) -> None:
    """``knobs``: the choices of the rule (default: the hand schedule's; tuning passes sampled ones)."""
    del target
    sch.work_on(func_name)
    for block in top_level_blocks(sch):
        loops = leading_spatial_loops(sch, block)
        if loops:
            knobs.unroll(sch, knobs.parallel(sch, sch.fuse(*loops) if len(loops) > 1 else loops[0]))
        for inner in inner_blocks(sch, block):
            _vectorize_innermost(sch, inner, knobs)


def _vectorize_innermost(sch: Schedule, block, knobs: HandKnobs) -> None:
    sblock = sch.get(block)
    if not sblock.iter_vars or sblock.iter_vars[-1].iter_type != 0 or sch.get_child_blocks(block):
        return
    loop = sch.get_loops(block)[-1]
    extent = sch.get(loop).extent
    if getattr(extent, "value", MAX_VECTOR + 1) > MAX_VECTOR:
        return
    try:
        knobs.vectorize(sch, block, loop)
    except ScheduleError:
        pass  # a block whose innermost loop cannot be vectorized stays scalar
