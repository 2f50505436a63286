"""Float64 oracle: TurboAttention exactly as docs/algorithm.md states it, plus exact attention.

Written for reading, not speed, and independent of TVM: numpy only. Every array is
[batch, heads, tokens, head_dim]; K/V may have fewer heads than Q (grouped-query attention).
Integer steps (INT8 codes, INT4/INT2 codes, integer scales) are computed exactly as the
kernels define them, so a kernel and this file agree to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .algorithm import (CACHE_GROUP, CACHE_K_OUTLIERS, INT8_MAX, K_BALANCE_EXPONENT, QUANT_BLOCK, SAS_LUT, SAS_MAX_INT,
                        SAS_POLY)

# ----------------------------------------------------------------------------- exact


def exact_attention(q, k, v, causal=False, scale=None):
    """softmax(q kᵀ · scale) v in float64; causal masks are aligned bottom-right (j <= i + M - N).

    Rows with no visible key (only when N > M and causal) are zero.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    n, m, d = q.shape[2], k.shape[2], q.shape[3]
    k, v = _expand_kv_heads(k, q.shape[1]), _expand_kv_heads(v, q.shape[1])
    s = np.einsum("bhid,bhjd->bhij", q, k) * (scale if scale is not None else d**-0.5)
    visible = _visible(n, m, causal)
    s = np.where(visible, s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.where(visible, np.exp(s - row_max), 0.0)
    denom = p.sum(-1, keepdims=True)
    out = np.einsum("bhij,bhjd->bhid", p, v)
    return np.divide(out, denom, out=np.zeros_like(out), where=denom > 0)


def _expand_kv_heads(x, num_q_heads):
    return np.repeat(x, num_q_heads // x.shape[1], axis=1)


def _visible(n, m, causal):
    if not causal:
        return np.ones((n, m), bool)
    return np.arange(m)[None, :] <= np.arange(n)[:, None] + (m - n)


# ----------------------------------------------------------------------------- FlashQ stage 1


def smoothing(k):
    """K's channel offset and balance factor, per (batch, kv head, channel) over the tokens.

    mean_c = mean_t K_tc; f_c = (max_t |K_tc - mean_c|) ** K_BALANCE_EXPONENT (1 where that is 0).
    """
    k = np.asarray(k, np.float64)
    mean = k.mean(axis=2)
    absmax = np.abs(k - mean[:, :, None, :]).max(axis=2)
    return mean, np.where(absmax > 0, absmax, 1.0) ** K_BALANCE_EXPONENT


def smooth_k(k, mean, factor):
    """(K - mean) / f: the offset cancels in softmax (every score of a row moves by q·mean), f against balance_q."""
    k = np.asarray(k, np.float64)
    return (k - np.asarray(mean, np.float64)[:, :, None, :]) / np.asarray(factor, np.float64)[:, :, None, :]


def balance_q(q, factor):
    """Q · f per channel, f of the query head's KV head: (Q·f)·((K - mean)/f)ᵀ = Q·(K - mean)ᵀ."""
    q, factor = np.asarray(q, np.float64), np.asarray(factor, np.float64)
    return q * np.repeat(factor, q.shape[1] // factor.shape[1], axis=1)[:, :, None, :]


def quantize_int8(x):
    """Block-wise symmetric INT8: one scale per (batch, head, QUANT_BLOCK tokens).

    Returns (codes int8 [B,H,N,D], scales [B,H,ceil(N/QUANT_BLOCK)]); x ≈ codes * scale.
    """
    x = np.asarray(x, np.float64)
    b, h, n, d = x.shape
    nblk = -(-n // QUANT_BLOCK)
    padded = np.zeros((b, h, nblk * QUANT_BLOCK, d))
    padded[:, :, :n] = x
    blocks = padded.reshape(b, h, nblk, QUANT_BLOCK * d)
    absmax = np.abs(blocks).max(-1)
    scale = np.where(absmax > 0, absmax, 1.0) / INT8_MAX
    codes = np.clip(np.rint(blocks / scale[..., None]), -INT8_MAX, INT8_MAX)
    codes = codes.reshape(b, h, nblk * QUANT_BLOCK, d)[:, :, :n].astype(np.int8)
    return codes, scale


# ----------------------------------------------------------------------------- SAS


def sas_exp(x):
    """e^x for x <= 0 as LUT[floor(-x)] * cubic(-frac); exactly 0 below -(SAS_MAX_INT + 1)."""
    x = np.minimum(np.asarray(x, np.float64), 0.0)
    t = -x
    n = np.floor(np.minimum(t, SAS_MAX_INT + 1.0))
    f = np.minimum(t, SAS_MAX_INT + 1.0) - n
    y = -f
    poly = ((SAS_POLY[0] * y + SAS_POLY[1]) * y + SAS_POLY[2]) * y + SAS_POLY[3]
    lut = np.asarray(SAS_LUT + (0.0,))[n.astype(np.int64)]
    return np.where(n <= SAS_MAX_INT, lut * poly, 0.0)


# ----------------------------------------------------------------------------- online softmax


class _OnlineSoftmax:
    """FlashAttention-2 state for a set of rows: running max m, running sum l, accumulator acc."""

    def __init__(self, rows_shape, d):
        self.m = np.full(rows_shape, -np.inf)
        self.l = np.zeros(rows_shape)
        self.acc = np.zeros(rows_shape + (d,))

    def update(self, s, visible, v_codes, v_scale):
        """s [..., rows, j] scores, visible mask, v_codes [..., j, D] int8, v_scale [...]."""
        s = np.where(visible, s, -np.inf)
        tile_max = s.max(-1)
        m_new = np.maximum(self.m, tile_max)
        corr = _sas_of_difference(self.m, m_new)
        p = np.where(visible, sas_exp(s - _finite(m_new)[..., None]), 0.0)
        # P -> INT8 with one scale per row of the tile: the tile's largest p maps to 127.
        p_scale = _sas_of_difference(tile_max, m_new) / INT8_MAX
        safe = np.where(p_scale > 0, p_scale, 1.0)
        p_codes = np.where(p_scale[..., None] > 0, np.clip(np.rint(p / safe[..., None]), 0, INT8_MAX), 0)
        pv = np.einsum("...ij,...jd->...id", p_codes, v_codes.astype(np.float64))
        self.l = self.l * corr + p_scale * p_codes.sum(-1)
        self.acc = self.acc * corr[..., None] + (p_scale * v_scale)[..., None] * pv
        self.m = m_new

    def output(self):
        return np.divide(self.acc, self.l[..., None], out=np.zeros_like(self.acc), where=self.l[..., None] > 0)


def _finite(m):
    return np.where(np.isfinite(m), m, 0.0)


def _sas_of_difference(a, b):
    """SAS(a - b) with -inf handled: -inf - finite -> 0, -inf - -inf -> SAS(0) (nothing seen yet)."""
    both_empty = np.isneginf(a) & np.isneginf(b)
    diff = np.where(both_empty, 0.0, np.where(np.isneginf(a), -np.inf, a - _finite(b)))
    return np.where(np.isneginf(diff), 0.0, sas_exp(np.where(np.isneginf(diff), 0.0, diff)))


# ----------------------------------------------------------------------------- prefill


def turbo_prefill(q, k, v, causal=False, scale=None):
    """TurboAttention prefill: INT8 Q·Kᵀ (K smoothed and balanced), SAS online softmax over 64-token
    KV tiles, INT8 P·V."""
    q = np.asarray(q, np.float64)
    b, h, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    scale = scale if scale is not None else d**-0.5
    k_mean, k_factor = smoothing(k)
    q8, qs = quantize_int8(balance_q(q, k_factor))
    k8, ks = quantize_int8(smooth_k(k, k_mean, k_factor))
    v8, vs = quantize_int8(v)
    group = h // hkv
    k8, ks, v8, vs = (np.repeat(a, group, axis=1) for a in (k8, ks, v8, vs))
    row_scale = np.repeat(qs, QUANT_BLOCK, axis=2)[:, :, :n] * scale  # [B,H,N]
    visible = _visible(n, m, causal)
    state = _OnlineSoftmax((b, h, n), d)
    for t in range(-(-m // QUANT_BLOCK)):
        cols = slice(t * QUANT_BLOCK, min(m, (t + 1) * QUANT_BLOCK))
        s_int = np.einsum("bhid,bhjd->bhij", q8.astype(np.float64), k8[:, :, cols].astype(np.float64))
        s = s_int * (row_scale * ks[:, :, t, None])[..., None]
        state.update(s, visible[:, cols], v8[:, :, cols], vs[:, :, t, None])
    return state.output()


# ----------------------------------------------------------------------------- KV compression


def compress_int8(codes8, bits, outliers=0):
    """INT8 -> INT{bits} codes, integer step and zero point per (batch, head, CACHE_GROUP tokens, channel).

    Step and zero minimise the group's squared error (``fit_step_zero``); codes are
    round_half_even((x - zero) / step) clamped to [0, 2^bits - 1], in integers. Per 64-token block,
    the ``outliers`` channels of widest range (max - min; ties to the lower channel) are kept verbatim:
    their step is 0, their zero is the slot of ``kept`` that holds them, their codes are 0.
    Returns (code [B,H,L,D] uint8 unpacked, step [B,H,L/64,G,D] uint8, zero [B,H,L/64,G,D] int8,
    kept [B,H,L,outliers] int8), G = 64 / CACHE_GROUP groups per block.
    """
    x = np.asarray(codes8, np.int64)
    b, h, length, d = x.shape
    assert length % QUANT_BLOCK == 0
    nblk, per_block = length // QUANT_BLOCK, QUANT_BLOCK // CACHE_GROUP
    levels = 2**bits - 1
    groups = x.reshape(b, h, nblk, per_block, CACHE_GROUP, d)
    step, zero = fit_step_zero(groups, levels)
    code = _encode(groups, step[..., None, :], zero[..., None, :], levels)
    blocks = x.reshape(b, h, nblk, QUANT_BLOCK, d)
    width = blocks.max(3) - blocks.min(3)
    slot_channel = np.argsort(-width, axis=-1, kind="stable")[..., :outliers]  # [B,H,NB,outliers]
    kept = np.take_along_axis(blocks, slot_channel[:, :, :, None, :], axis=-1).reshape(b, h, length, outliers)
    for slot in range(outliers):
        at = np.broadcast_to(slot_channel[:, :, :, None, None, slot], (b, h, nblk, per_block, 1))
        np.put_along_axis(step, at, 0, axis=-1)
        np.put_along_axis(zero, at, slot, axis=-1)
        np.put_along_axis(code, at[:, :, :, :, None], 0, axis=-1)
    code = code.reshape(b, h, length, d)
    return code.astype(np.uint8), step.astype(np.uint8), zero.astype(np.int8), kept.astype(np.int8)


def fit_step_zero(groups, levels):
    """Integer (step, zero) per group [..., tokens, channels] with the least squared error.

    The widest step, ceil((max - min) / levels), covers the group. Steps down to half of it are
    tried too: each clips the group's two tails equally, and the one with the least error wins
    (ties: the wider step). For INT2 the best clips about a quarter of the range; for INT4 it
    rarely clips. The zero is lowered where needed so the top code expands to at most 127.
    """
    lo, hi = groups.min(-2), groups.max(-2)
    widest = np.maximum(1, -(-(hi - lo) // levels))
    best_step, best_err = widest, np.full(widest.shape, np.inf)
    for narrower in range(int((widest // 2).max()) + 1):
        step = np.maximum(widest - narrower, 1)  # below 1: a repeat of step 1, never better
        zero = _zero_point(lo, hi, step, levels)
        back = _encode(groups, step[..., None, :], zero[..., None, :], levels) * step[..., None, :] + zero[..., None, :]
        err = ((back - groups) ** 2).sum(-2)
        better = (2 * step >= widest) & (err < best_err)
        best_step, best_err = np.where(better, step, best_step), np.where(better, err, best_err)
    return best_step, _zero_point(lo, hi, best_step, levels)


def _zero_point(lo, hi, step, levels):
    """Centre the grid on a clipped range; never let the top code expand above 127.

    (levels * step <= 255 and the grid starts at or below the minimum, so zero fits int8.)
    """
    return np.minimum(lo + np.maximum(0, hi - lo - levels * step) // 2, INT8_MAX - levels * step)


def _encode(x, step, zero, levels):
    """clamp(round_half_even((x - zero) / step), 0, levels) in integers; step >= 1."""
    quot, rem = (x - zero) // step, (x - zero) % step
    round_up = (2 * rem > step) | ((2 * rem == step) & (quot % 2 == 1))
    return np.clip(quot + round_up, 0, levels)


def decompress_int8(code, step, zero, kept=None):
    """INT{bits} -> INT8: code * step + zero (linear: never above 127), or kept[zero] where step == 0."""
    b, h, length, d = code.shape
    nblk, per_block = length // QUANT_BLOCK, QUANT_BLOCK // CACHE_GROUP
    step, zero = step.astype(np.int64)[..., None, :], zero.astype(np.int64)[..., None, :]
    x = code.reshape(b, h, nblk, per_block, CACHE_GROUP, d).astype(np.int64) * step + zero
    if kept is not None and kept.shape[-1]:
        kept = kept.reshape(b, h, nblk, per_block, CACHE_GROUP, -1).astype(np.int64)
        slot = np.broadcast_to(np.clip(zero, 0, kept.shape[-1] - 1), x.shape)
        x = np.where(step == 0, np.take_along_axis(kept, slot, axis=-1), x)
    return x.reshape(b, h, length, d).astype(np.int8)


# ----------------------------------------------------------------------------- decode


@dataclass
class ReferenceCache:
    """A compressed cache as the reference sees it: INT8 views after stage-2 round trip.

    Tokens [0, sink_len) are the INT8 sink block (never compressed), [sink_len, compressed_len) went
    through INT4/INT2 and back, [compressed_len, L) are the INT8 buffer.
    """

    k8: np.ndarray  # [B,Hkv,L,D] int8, already decompressed for [sink_len, compressed_len)
    ks: np.ndarray  # [B,Hkv,ceil(L/64)]
    v8: np.ndarray
    vs: np.ndarray
    k_factor: np.ndarray  # [B,Hkv,D]: K's balance factor, which the query takes on (balance_q)
    compressed_len: int  # tokens before the INT8 buffer (multiple of 64): the sink block + the INT4/INT2 blocks
    sink_len: int = 0  # tokens of the INT8 sink block: 0 or 64


def build_cache(k, v, head_bits, k_smoothing=None, sink=True):
    """Quantize K (smoothed and balanced), V to INT8; keep the first full 64-token block at INT8 (the
    sink block) and compress every later full block per its head's bits.

    ``k_smoothing`` (mean, factor), each [B, Hkv, D]; default: ``smoothing`` of all tokens (a cache
    compressed in one go). A cache grown by appends fixes it from its first append instead.
    ``sink=False`` compresses block 0 too (the layout before the sink block; for comparisons only,
    the kernels have no such mode).
    """
    k_mean, k_factor = smoothing(k) if k_smoothing is None else k_smoothing
    k8, ks = quantize_int8(smooth_k(k, k_mean, k_factor))
    v8, vs = quantize_int8(v)
    length = k8.shape[2]
    compressed_len = (length // QUANT_BLOCK) * QUANT_BLOCK
    sink_len = QUANT_BLOCK if sink and compressed_len else 0
    for x8, outliers in ((k8, CACHE_K_OUTLIERS), (v8, 0)):
        for head, bits in enumerate(head_bits):
            part = x8[:, head : head + 1, sink_len:compressed_len]
            if compressed_len > sink_len:
                x8[:, head : head + 1, sink_len:compressed_len] = decompress_int8(*compress_int8(part, int(bits), outliers))
    return ReferenceCache(k8, ks, v8, vs, np.asarray(k_factor, np.float64), compressed_len, sink_len)


def decode_partition(num_blocks, num_splits):
    """Blocks of split s: [s * per, min((s + 1) * per, num_blocks)) with per = ceil(blocks / splits)."""
    per = -(-num_blocks // num_splits) if num_blocks else 0
    return [(min(s * per, num_blocks), min((s + 1) * per, num_blocks)) for s in range(num_splits)]


def turbo_decode(q, cache: ReferenceCache, scale=None, num_splits=4):
    """One query token per head over the cache: split-KV partial states, merged with SAS weights.

    Splits cover the INT4/INT2 blocks [sink_len, compressed_len); the INT8 sink block is one more
    partial state, the INT8 buffer another (merged in that order, as the kernels' slots).
    q: [B,H,1,D].
    """
    q = np.asarray(q, np.float64)
    b, h, _, d = q.shape
    group = h // cache.k8.shape[1]
    scale = scale if scale is not None else d**-0.5
    q8, qs = quantize_int8(balance_q(q, cache.k_factor))
    k8, ks, v8, vs = (np.repeat(a, group, axis=1) for a in (cache.k8, cache.ks, cache.v8, cache.vs))
    row_scale = qs[:, :, :1] * scale  # [B,H,1]
    length = k8.shape[2]
    first = cache.sink_len // QUANT_BLOCK  # the first INT4/INT2 block
    ranges = decode_partition(cache.compressed_len // QUANT_BLOCK - first, num_splits)
    sink_blocks = [range(0, first)] if first else []
    tail_blocks = range(cache.compressed_len // QUANT_BLOCK, -(-length // QUANT_BLOCK))
    partials = []
    for blocks in [range(first + lo, first + hi) for lo, hi in ranges] + sink_blocks + [tail_blocks]:
        state = _OnlineSoftmax((b, h, 1), d)
        for t in blocks:
            cols = slice(t * QUANT_BLOCK, min(length, (t + 1) * QUANT_BLOCK))
            s_int = np.einsum("bhid,bhjd->bhij", q8.astype(np.float64), k8[:, :, cols].astype(np.float64))
            s = s_int * (row_scale * ks[:, :, t, None])[..., None]
            state.update(s, np.ones(s.shape[-2:], bool), v8[:, :, cols], vs[:, :, t, None])
        partials.append(state)
    return merge_states([p.acc for p in partials], [p.m for p in partials], [p.l for p in partials])


def merge_states(accs, maxes, sums):
    """Combine partial (acc, m, l) states: weights SAS(m_s - max_s m_s)."""
    m_all = np.max(np.stack(maxes), axis=0)
    acc = sum(_sas_of_difference(m, m_all)[..., None] * a for a, m in zip(accs, maxes))
    l = sum(_sas_of_difference(m, m_all) * s for s, m in zip(sums, maxes))
    return np.divide(acc, l[..., None], out=np.zeros_like(acc), where=l[..., None] > 0)
