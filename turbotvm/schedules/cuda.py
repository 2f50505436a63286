"""CUDA baseline rule (SIMT): one thread per independent tile, tile state in registers/local memory.

This is the portable, always-valid mapping used when no tensor-core schedule applies; it keeps
the math of the unscheduled kernel unchanged, so its CUDA source is what CI compiles with nvcc.
"""

from tvm.s_tir import Schedule

from ..kernel_set import HAND_MAPPED
from .common import inner_blocks, leading_spatial_loops, top_level_blocks
from .knobs import HAND, HandKnobs

THREADS_PER_BLOCK = HandKnobs.threads_per_block_default


def schedule_cuda(sch: Schedule, func_name: str, target, knobs: HandKnobs = HAND) -> None:
    """``knobs``: the choices of the rule (default: the hand schedule's; tuning passes sampled ones)."""
    del target
    if sch.mod[func_name].attrs.get(HAND_MAPPED):
        return  # the kernel is its own mapping (tensor-core kernels)
    sch.work_on(func_name)
    for block in top_level_blocks(sch):
        loops = leading_spatial_loops(sch, block)
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        ctas, threads = sch.split(fused, factors=[None, knobs.threads_per_block(sch, fused)])
        sch.bind(ctas, "blockIdx.x")
        sch.bind(threads, "threadIdx.x")
        _tile_state_to_local(sch, block)


def _tile_state_to_local(sch: Schedule, tile) -> None:
    """Buffers a tile allocates live in the thread's registers or local memory."""
    allocated = list(sch.get(tile).alloc_buffers)
    for inner in inner_blocks(sch, tile):
        for index, region in enumerate(sch.get(inner).writes):
            if any(region.source.same_as(buf) for buf in allocated):
                sch.set_scope(inner, index, "local")
                allocated = [buf for buf in allocated if not region.source.same_as(buf)]
