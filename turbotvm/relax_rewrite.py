"""Relax pass: scaled-dot-product attention -> the TurboAttention CPU pipeline as ``R.call_tir``.

Matched (Q, K, V 4-D [B, H, N, D] / [B, H_kv, M, D], batch and heads not broadcast)::

    MatMul(Q [* c], Kᵀ [* c]) [* c | / c] [+ mask | Where(cond, fill, ·)] -> Softmax(-1) -> MatMul(·, V)

which covers torch's explicit ``q @ k.transpose(-2, -1) * scale`` code and the TorchScript exporter's
decomposition of ``F.scaled_dot_product_attention`` (scale split as sqrt(scale) on Q and Kᵀ; with a
boolean mask, a ``Where(IsNaN(p), 0, p)`` guard after the softmax).
The scale is the product of the scalar constants. Only a constant mask that is all-visible or the
bottom-right causal mask (every row sees a key) is accepted; anything the kernels cannot reproduce
(other masks, head dims, dtypes, shapes) is left as exact attention with the reason in the report.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import tvm
import tvm.sym
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from . import kernel_set as names
from .algorithm import QUANT_BLOCK, SUPPORTED_HEAD_DIMS
from .kernel_set import SUPPORTED_DTYPES
from .kernels import prefill, quantize

#: Attribute naming the turbotvm kernel behind a prim_func of a rewritten module (what to schedule).
KERNEL_ATTR = "turbotvm.kernel"

#: An additive mask entry at or below this hides its key: e^-1e4 is 0 in every float type.
MASKED = -1e4


@dataclass(frozen=True)
class MatchedAttention:
    """What a replaced attention became: prefill kernel parameters read from the graph."""

    head_dim: int
    causal: bool
    dtype: str
    scale: float


@dataclass
class RewriteReport:
    replaced: list = field(default_factory=list)  # MatchedAttention per replaced attention
    left_exact: list = field(default_factory=list)  # one reason per attention left exact

    def __str__(self):
        why = "".join(f"\n  left exact: {r}" for r in self.left_exact)
        return f"{len(self.replaced)} attention(s) replaced by TurboAttention, {len(self.left_exact)} left exact{why}"


class _Unsupported(Exception):
    """An attention the kernels cannot compute as written; the message says why."""


class _Pattern:
    """The attention pattern; every optional part is its own sub-pattern so the match says which was taken."""

    def __init__(self):
        self.q, self.kt, self.v = wildcard(), wildcard(), wildcard()
        self.q_scale, self.k_scale, self.s_mul, self.s_div = is_const(), is_const(), is_const(), is_const()
        mul = is_op("relax.multiply")
        qk = is_op("relax.matmul")(mul(self.q, self.q_scale) | self.q, mul(self.kt, self.k_scale) | self.kt)
        scaled = mul(qk, self.s_mul) | is_op("relax.divide")(qk, self.s_div) | qk
        self.add_mask = wildcard()
        self.cond_hides, self.fill_hides, self.cond_shows, self.fill_shows = (wildcard() for _ in range(4))
        where = is_op("relax.where")
        masked = (is_op("relax.add")(scaled, self.add_mask) | where(self.cond_hides, self.fill_hides, scaled)
                  | where(self.cond_shows, scaled, self.fill_shows) | scaled)
        self.softmax = is_op("relax.nn.softmax")(masked)
        # SDPA with a boolean mask: rows of NaN (all keys masked) -> 0; a no-op for the masks accepted
        self.nan_fill = is_const()
        probs = where(is_op("relax.isnan")(self.softmax), self.nan_fill, self.softmax) | self.softmax
        self.out = is_op("relax.matmul")(probs, self.v)


# ----------------------------------------------------------------------------- analysis


def _shape(expr, what):
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.ndim != 4 or ty.shape is None:
        raise _Unsupported(f"{what} is not a 4-D tensor of known rank ({ty})")
    return list(ty.shape.values)


def _int(x):
    return int(x) if isinstance(x, tvm.tirx.IntImm) else None


def _dims(shape) -> list:
    """A shape for messages: ints where static, names where symbolic."""
    return [str(x) if _int(x) is None else _int(x) for x in shape]


def _const(expr, what) -> np.ndarray:
    if not isinstance(expr, tvm.ir.GenericConst):
        raise _Unsupported(f"{what} is not a constant")
    return expr.value.numpy()


def _scalar(expr, what) -> float:
    value = _const(expr, what)
    if value.size != 1:
        raise _Unsupported(f"{what} is not a scalar (shape {value.shape})")
    return float(value.reshape(()))


def _scale(p: _Pattern, m) -> float:
    scale = 1.0
    for pattern in (p.q_scale, p.k_scale, p.s_mul):
        if pattern in m:
            scale *= _scalar(m[pattern], "the attention scale")
    if p.s_div in m:
        scale /= _scalar(m[p.s_div], "the attention scale")
    if not np.isfinite(scale) or scale <= 0:
        raise _Unsupported(f"the attention scale {scale} is not finite and positive")
    return scale


def _visible(p: _Pattern, m):
    """Which keys each query sees, from the matched mask (None: no mask)."""
    if p.add_mask in m:
        values = _const(m[p.add_mask], "the additive mask")
        if not np.all((values == 0) | (values <= MASKED)):
            raise _Unsupported(f"the additive mask has entries other than 0 and <= {MASKED:g} (not a 0/-inf mask)")
        return values == 0
    for cond, fill, shows in ((p.cond_hides, p.fill_hides, False), (p.cond_shows, p.fill_shows, True)):
        if cond in m:
            if _scalar(m[fill], "the masked fill value") > MASKED:
                raise _Unsupported(f"the masked fill value is above {MASKED:g} (masked keys would still count)")
            hide = _const(m[cond], "the mask condition").astype(bool)
            return hide if shows else ~hide
    return None


def _causal(p: _Pattern, m, n, kv_len) -> bool:
    """True for the bottom-right causal mask, False for no mask; any other mask is unsupported."""
    visible = _visible(p, m)
    if visible is None:
        return False
    if n is None or kv_len is None:
        raise _Unsupported("a constant mask over a symbolic sequence length")
    try:
        rows = np.broadcast_to(visible, visible.shape[:-2] + (n, kv_len)).reshape(-1, n, kv_len)
    except ValueError:
        raise _Unsupported(f"the mask's shape {visible.shape} does not broadcast to [{n}, {kv_len}]") from None
    if not np.all(rows == rows[:1]):
        raise _Unsupported("the mask differs between batches or heads")
    if rows[0].all():
        return False
    if n <= kv_len and np.array_equal(rows[0], np.tri(n, kv_len, kv_len - n, dtype=bool)):
        return True
    raise _Unsupported("the mask is neither causal nor all-visible (arbitrary masks stay exact)")


def _analyse(p: _Pattern, m) -> MatchedAttention:
    """The kernel parameters of a matched attention, or _Unsupported with the reason."""
    q, kt, v = m[p.q], m[p.kt], m[p.v]
    (b, h, n, d), (bk, hkv, dk, kv_len), (bv, hv, mv, dv) = _shape(q, "Q"), _shape(kt, "Kᵀ"), _shape(v, "V")
    dtype = q.ty.dtype
    if dtype not in SUPPORTED_DTYPES or kt.ty.dtype != dtype or v.ty.dtype != dtype:
        raise _Unsupported(f"dtypes Q {dtype}, K {kt.ty.dtype}, V {v.ty.dtype}: expected one of {SUPPORTED_DTYPES}")
    if p.nan_fill in m and _scalar(m[p.nan_fill], "the NaN guard's fill") != 0:
        raise _Unsupported("the softmax's NaN guard fills a value other than 0")
    if m[p.softmax].attrs.axis not in (-1, 3):
        raise _Unsupported(f"softmax over axis {m[p.softmax].attrs.axis}, not the keys (-1)")
    head_dim = _int(d)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise _Unsupported(f"head dim {_dims([d])[0]} is not supported (kernels for {SUPPORTED_HEAD_DIMS})")
    ana = tvm.sym.Analyzer()
    same = all(ana.can_prove_equal(x, y) for x, y in ((b, bk), (b, bv), (hkv, hv), (d, dk), (d, dv), (kv_len, mv)))
    heads, kv_heads = _int(h), _int(hkv)
    if not same or heads is None or kv_heads is None or heads % kv_heads:
        raise _Unsupported(f"shapes Q {_dims([b, h, n, d])}, Kᵀ {_dims([bk, hkv, dk, kv_len])}, "
                           f"V {_dims([bv, hv, mv, dv])} are not [B,H,N,D], [B,H_kv,D,M], [B,H_kv,M,D] "
                           "with H_kv dividing H")
    return MatchedAttention(head_dim, _causal(p, m, _int(n), _int(kv_len)), dtype, _scale(p, m))


# ----------------------------------------------------------------------------- replacement


def _kernel(bb: relax.BlockBuilder, name: str, func) -> tvm.ir.GlobalVar:
    """Add an (unscheduled) kernel once, private (specialized copies share the factory's symbol);
    ``KERNEL_ATTR`` marks it for ``build_relax``'s schedule."""
    return bb.add_func(func.without_attr("global_symbol").with_attr(KERNEL_ATTR, name), name)


def _quantized(bb, x, shape, dtype, mode="plain", per_channel=()):
    """(INT8 codes, per-64-token scales) of x [B, H, N, D] as a call_tir tuple; ``per_channel``: the
    mode's [B, H(_kv), D] arguments (kernels/quantize.py)."""
    b, h, n, _ = shape
    gv = _kernel(bb, names.quantize_name(dtype, mode), quantize.quantize_int8(dtype, mode))
    out = [relax.TensorType(shape, "int8"), relax.TensorType([b, h, (n + QUANT_BLOCK - 1) // QUANT_BLOCK], "float32")]
    call = relax.call_tir(gv, [x, *per_channel], out)
    return relax.TupleGetItem(call, 0), relax.TupleGetItem(call, 1)


def _turbo(bb, att: MatchedAttention, q, kt, v):
    """The CPU prefill pipeline of turbotvm.attention: K's smoothing, balanced Q / smoothed K / V to INT8, prefill."""
    b, hkv, d, kv_len = kt.ty.shape.values
    k_shape = [b, hkv, kv_len, d]
    k = relax.op.permute_dims(kt, [0, 1, 3, 2])
    smoothing_gv = _kernel(bb, names.channel_smoothing_name(att.dtype), quantize.channel_smoothing(att.dtype))
    per_channel = relax.TensorType([b, hkv, d], "float32")
    smoothing = relax.call_tir(smoothing_gv, [k], [per_channel, per_channel])
    mean, factor = relax.TupleGetItem(smoothing, 0), relax.TupleGetItem(smoothing, 1)
    q8 = _quantized(bb, q, list(q.ty.shape.values), att.dtype, "balanced", [factor])
    k8 = _quantized(bb, k, k_shape, att.dtype, "smoothed", [mean, factor])
    v8 = _quantized(bb, v, k_shape, att.dtype)
    name = names.prefill_name(att.head_dim, att.causal, att.dtype)
    kernel = prefill.prefill(att.head_dim, att.causal, att.dtype)
    kernel = kernel.specialize({kernel.params[-1]: tvm.tirx.const(att.scale, "float32")})  # sm_scale fixed
    out = relax.TensorType(q.ty.shape, att.dtype)
    return relax.call_tir(_kernel(bb, name, kernel), [*q8, *k8, *v8], out)


# ----------------------------------------------------------------------------- pass


def rewrite_attention(mod: tvm.IRModule) -> tuple[tvm.IRModule, RewriteReport]:
    """Replace every supported attention of ``mod``'s Relax functions; returns (module, report).

    Constants are folded first, so mask and scale subgraphs over constants become constants.
    With nothing replaced, ``mod`` itself comes back, with a warning (no attention / why each stayed exact).
    """
    folded = relax.transform.FoldConstant()(mod)
    pattern, bb = _Pattern(), relax.BlockBuilder(folded)
    replaced, left_exact = {}, {}  # by matched call: the rewriter may see a call more than once

    def rewriter(orig, matches):
        try:
            att = _analyse(pattern, matches)
        except _Unsupported as why:
            left_exact[orig] = str(why)
            return orig
        replaced[orig] = att
        return _turbo(bb, att, matches[pattern.q], matches[pattern.kt], matches[pattern.v])

    for gv, func in folded.functions_items():
        if isinstance(func, relax.Function):
            new = rewrite_call(pattern.out, rewriter, func)
            if not new.same_as(func):
                bb.update_func(gv, new)
    report = RewriteReport(list(replaced.values()), list(left_exact.values()))
    for reason in report.left_exact:
        warnings.warn(f"attention left exact: {reason}", stacklevel=2)
    if not replaced:
        if not left_exact:
            warnings.warn("no attention pattern (MatMul-Softmax-MatMul) found: module unchanged", stacklevel=2)
        return mod, report
    return relax.transform.DeadCodeElimination()(bb.get()), report
