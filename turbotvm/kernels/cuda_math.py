"""CUDA device math the kernels call by name (the hand-mapped CUDA kernels only)."""

from tvm.script import tirx as T


def fast_reciprocal(x):
    """1 / x within 2 ulp for normal x (MUFU.RCP): CUDA's IEEE division adds a check and a slow path."""
    return T.call_pure_extern("float32", "__fdividef", T.float32(1), x)
