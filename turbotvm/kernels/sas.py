"""SAS exponent as a TIR expression (docs/algorithm.md, "SAS")."""

from tvm import tirx
from tvm.script import tirx as T

from ..algorithm import SAS_LUT, SAS_MAX_INT, SAS_POLY

#: Stand-in for -inf in running maxima: finite, so differences never become NaN.
NEG_BIG = -1.0e30


def _lut(n):
    """LUT[n] for integer-valued float n in 0..SAS_MAX_INT, as a select chain (small table)."""
    value = tirx.const(SAS_LUT[SAS_MAX_INT], "float32")
    for i in range(SAS_MAX_INT - 1, -1, -1):
        value = T.Select(n == T.float32(i), tirx.const(SAS_LUT[i], "float32"), value)
    return value


def sas_exp(x):
    """e^x for x <= 0: LUT[floor(-x)] * cubic(frac), exactly 0 below -(SAS_MAX_INT + 1)."""
    t = T.min(T.max(-x, T.float32(0)), T.float32(SAS_MAX_INT + 1))
    n = T.floor(t)
    y = n - t
    c3, c2, c1, c0 = (tirx.const(c, "float32") for c in SAS_POLY)
    poly = ((c3 * y + c2) * y + c1) * y + c0
    return T.Select(n <= T.float32(SAS_MAX_INT), _lut(n) * poly, T.float32(0))


#: The table as kernels hold it in shared memory: LUT[0..SAS_MAX_INT], then 0 (the sparsity).
SAS_TABLE = tuple(SAS_LUT) + (0.0,)


def sas_exp_from_table(x, table):
    """sas_exp with the integer part looked up in ``table`` (SAS_TABLE in a buffer): no select chain.

    floor(-x) is clamped to SAS_MAX_INT + 1, whose entry is 0, so the threshold costs nothing.
    """
    t = T.min(T.max(-x, T.float32(0)), T.float32(SAS_MAX_INT + 1))
    n = T.floor(t)
    y = n - t
    c3, c2, c1, c0 = (tirx.const(c, "float32") for c in SAS_POLY)
    return table[T.Cast("int32", n)] * (((c3 * y + c2) * y + c1) * y + c0)


def sas_table_entry(i):
    """SAS_TABLE[i] for an int32 expression i (a select chain: used once per thread to fill the table)."""
    value = tirx.const(SAS_TABLE[-1], "float32")
    for j in range(len(SAS_TABLE) - 2, -1, -1):
        value = T.Select(i == j, tirx.const(SAS_TABLE[j], "float32"), value)
    return value
