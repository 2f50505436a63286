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
