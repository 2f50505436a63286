"""Loop helpers shared by the CPU and CUDA rules."""

from tvm.s_tir import Schedule


def top_level_blocks(sch: Schedule):
    return sch.get_child_blocks(sch.get_sblock("root"))


def leading_spatial_loops(sch: Schedule, block):
    """The outer loops of ``block`` that bind only its spatial (data-parallel) iterators."""
    sblock = sch.get(block)
    loops = sch.get_loops(block)
    count = 0
    for iter_var in sblock.iter_vars:
        if iter_var.iter_type != 0:  # 0 = data parallel
            break
        count += 1
    return loops[: min(count, len(loops))]


def inner_blocks(sch: Schedule, block):
    """All blocks nested anywhere below ``block``."""
    found = []
    for child in sch.get_child_blocks(block):
        found.append(child)
        found.extend(inner_blocks(sch, child))
    return found
