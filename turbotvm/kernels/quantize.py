"""FlashQ stage 1: block-wise symmetric INT8 quantization of Q, K or V (docs/algorithm.md §1).

Three forms of the same kernel, by what is applied per channel before the block absmax:
``plain`` (V), ``smoothed`` ((K - mean) / factor) and ``balanced`` (Q · factor of its KV head).
"""

from tvm.script import tirx as T

from ..algorithm import INT8_MAX, K_BALANCE_EXPONENT, QUANT_BLOCK

BLK = QUANT_BLOCK
#: What a quantize kernel applies per channel: nothing, K's smoothing, or Q's balance.
QUANTIZE_MODES = ("plain", "smoothed", "balanced")


def balance_factor(mean, lo, hi):
    """K's balance factor of a channel from its mean, min and max: max_t |x_t - mean| ** K_BALANCE_EXPONENT,
    with max_t |x_t - mean| = max(hi - mean, mean - lo), > 0 unless the channel is constant (factor 1)."""
    return T.Select(hi > lo, T.pow(T.max(hi - mean, mean - lo), T.float32(K_BALANCE_EXPONENT)), T.float32(1))


def channel_smoothing(in_dtype: str):
    """K's smoothing per (b, h, d) over tokens: mean, and factor = max|x - mean| ** K_BALANCE_EXPONENT (1 if 0)."""

    @T.prim_func(s_tir=True)
    def channel_smoothing_func(x_h: T.handle, mean_h: T.handle, factor_h: T.handle):
        B, H, N, D = T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
        mean = T.match_buffer(mean_h, (B, H, D), "float32")
        factor = T.match_buffer(factor_h, (B, H, D), "float32")
        for b, h, d in T.grid(B, H, D):
            with T.sblock("channel"):
                vb, vh, vd = T.axis.remap("SSS", [b, h, d])
                T.reads(x[vb, vh, 0:N, vd])
                T.writes(mean[vb, vh, vd], factor[vb, vh, vd])
                total = T.sblock_alloc_buffer((1,), "float32")
                lo = T.sblock_alloc_buffer((1,), "float32")
                hi = T.sblock_alloc_buffer((1,), "float32")
                for t in range(N):
                    with T.sblock("sum"):
                        vt = T.axis.remap("R", [t])
                        with T.init():
                            total[0] = T.float32(0)
                            lo[0] = T.float32(3.4e38)
                            hi[0] = T.float32(-3.4e38)
                        total[0] = total[0] + T.Cast("float32", x[vb, vh, vt, vd])
                        lo[0] = T.min(lo[0], T.Cast("float32", x[vb, vh, vt, vd]))
                        hi[0] = T.max(hi[0], T.Cast("float32", x[vb, vh, vt, vd]))
                with T.sblock("mean_factor"):
                    mean[vb, vh, vd] = total[0] / T.Cast("float32", N)
                    factor[vb, vh, vd] = balance_factor(mean[vb, vh, vd], lo[0], hi[0])

    return channel_smoothing_func


def int8_level(value, inv):
    """FlashQ's INT8 level of x' (times 1 / scale), as float32: round half even, clipped to ±127. Every
    kernel that quantizes to INT8 rounds through this, so their codes agree bit for bit."""
    return T.min(T.max(T.nearbyint(value * inv), T.float32(-INT8_MAX)), T.float32(INT8_MAX))


def _prepared(x, mean, factor, b, h, t, d, group):
    """x[b, h, t, d] as the mode wants it: (x - mean) / factor, x * factor[KV head], or x."""
    value = T.Cast("float32", x[b, h, t, d])
    if mean is not None:
        return (value - mean[b, h, d]) / factor[b, h, d]
    if factor is not None:
        return value * factor[b, h // group, d]
    return value


def _quantize_blocks_macro():
    """A new macro object per kernel: TVMScript numbers the blocks of every expansion of one macro object
    (block, block_1, ...) for the life of the process, and tuning records find blocks by name."""

    @T.macro
    def _quantize_blocks(x, mean, factor, codes, scale, B, H, N, D, NB, group, name="block"):
        """codes and scale of x's 64-token blocks [0, NB), rows t < N only; mean/factor None per mode."""
        for b, h, blk in T.grid(B, H, NB):
            with T.sblock(name):
                vb, vh, vblk = T.axis.remap("SSS", [b, h, blk])
                if mean is not None:
                    T.reads(x[vb, vh, vblk * BLK:vblk * BLK + BLK, 0:D], mean[vb, vh, 0:D], factor[vb, vh, 0:D])
                elif factor is not None:
                    T.reads(x[vb, vh, vblk * BLK:vblk * BLK + BLK, 0:D], factor[vb, vh // group, 0:D])
                else:
                    T.reads(x[vb, vh, vblk * BLK:vblk * BLK + BLK, 0:D])
                T.writes(codes[vb, vh, vblk * BLK:vblk * BLK + BLK, 0:D], scale[vb, vh, vblk])
                absmax = T.sblock_alloc_buffer((1,), "float32")
                inv = T.sblock_alloc_buffer((1,), "float32")
                for t, d in T.grid(BLK, D):
                    with T.sblock("absmax"):
                        vt, vd = T.axis.remap("RR", [t, d])
                        T.where(vblk * BLK + t < N)
                        with T.init():
                            absmax[0] = T.float32(0)
                        absmax[0] = T.max(absmax[0], T.abs(
                            _prepared(x, mean, factor, vb, vh, vblk * BLK + vt, vd, group)))
                with T.sblock("scale"):
                    scale[vb, vh, vblk] = T.Select(absmax[0] > T.float32(0), absmax[0], T.float32(1)) / T.float32(INT8_MAX)
                    inv[0] = T.float32(INT8_MAX) / T.Select(absmax[0] > T.float32(0), absmax[0], T.float32(1))
                for t, d in T.grid(BLK, D):
                    with T.sblock("round"):
                        vt, vd = T.axis.remap("SS", [t, d])
                        T.where(vblk * BLK + t < N)
                        codes[vb, vh, vblk * BLK + vt, vd] = T.Cast("int8", int8_level(
                            _prepared(x, mean, factor, vb, vh, vblk * BLK + vt, vd, group), inv[0]))

    return _quantize_blocks


def quantize_int8(in_dtype: str, mode: str = "plain"):
    """codes = clip(rint(x' / s), ±127), s = absmax(x') / 127 per (b, h, 64-token block), x' per ``mode``."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"mode: expected one of {QUANTIZE_MODES}, got {mode!r}")
    _quantize_blocks = _quantize_blocks_macro()

    if mode == "smoothed":

        @T.prim_func(s_tir=True)
        def quantize_smoothed(x_h: T.handle, mean_h: T.handle, factor_h: T.handle, codes_h: T.handle,
                              scale_h: T.handle):
            B, H, N, D, NB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
            mean = T.match_buffer(mean_h, (B, H, D), "float32")
            factor = T.match_buffer(factor_h, (B, H, D), "float32")
            codes = T.match_buffer(codes_h, (B, H, N, D), "int8")
            scale = T.match_buffer(scale_h, (B, H, NB), "float32")
            _quantize_blocks(x, mean, factor, codes, scale, B, H, N, D, NB, 1)

        return quantize_smoothed

    if mode == "balanced":

        @T.prim_func(s_tir=True)
        def quantize_balanced(x_h: T.handle, factor_h: T.handle, codes_h: T.handle, scale_h: T.handle):
            B, H, HKV, N, D, NB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
            factor = T.match_buffer(factor_h, (B, HKV, D), "float32")
            codes = T.match_buffer(codes_h, (B, H, N, D), "int8")
            scale = T.match_buffer(scale_h, (B, H, NB), "float32")
            _quantize_blocks(x, None, factor, codes, scale, B, H, N, D, NB, H // HKV)

        return quantize_balanced

    @T.prim_func(s_tir=True)
    def quantize(x_h: T.handle, codes_h: T.handle, scale_h: T.handle):
        B, H, N, D, NB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
        codes = T.match_buffer(codes_h, (B, H, N, D), "int8")
        scale = T.match_buffer(scale_h, (B, H, NB), "float32")
        _quantize_blocks(x, None, None, codes, scale, B, H, N, D, NB, 1)

    return quantize


def append_open_block(in_dtype: str):
    """One append to a KV cache's open block, in one call: the new tokens k_new, v_new [B, H, N, D] stored
    at rows [open_len, open_len + N) of k_open, v_open [B, H, 64, D] (the block's tokens in the input
    dtype), then the block's rows [0, open_len + N) re-quantized (K smoothed, V plain) into k8, v8
    [B, H, 64, D] and k_scale, v_scale [B, H, 1]. Rows past open_len + N are left as they are.

    FlashQ gives a block one scale, the absmax of all its tokens, so a new token re-quantizes the block
    from the exact values (re-quantizing INT8 codes would round twice).
    """
    _quantize_blocks = _quantize_blocks_macro()

    @T.prim_func(s_tir=True)
    def append_open_block_func(k_new_h: T.handle, v_new_h: T.handle, mean_h: T.handle, factor_h: T.handle,
                               k_open_h: T.handle, v_open_h: T.handle, k8_h: T.handle, k_scale_h: T.handle,
                               v8_h: T.handle, v_scale_h: T.handle, open_len: T.int64):
        B, H, N, D = T.int64(), T.int64(), T.int64(), T.int64()
        k_new = T.match_buffer(k_new_h, (B, H, N, D), in_dtype)
        v_new = T.match_buffer(v_new_h, (B, H, N, D), in_dtype)
        mean = T.match_buffer(mean_h, (B, H, D), "float32")
        factor = T.match_buffer(factor_h, (B, H, D), "float32")
        k_open = T.match_buffer(k_open_h, (B, H, BLK, D), in_dtype)
        v_open = T.match_buffer(v_open_h, (B, H, BLK, D), in_dtype)
        k8 = T.match_buffer(k8_h, (B, H, BLK, D), "int8")
        k_scale = T.match_buffer(k_scale_h, (B, H, 1), "float32")
        v8 = T.match_buffer(v8_h, (B, H, BLK, D), "int8")
        v_scale = T.match_buffer(v_scale_h, (B, H, 1), "float32")
        for b, h, t, d in T.grid(B, H, N, D):
            with T.sblock("store_new_tokens"):
                vb, vh, vt, vd = T.axis.remap("SSSS", [b, h, t, d])
                k_open[vb, vh, open_len + vt, vd] = k_new[vb, vh, vt, vd]
                v_open[vb, vh, open_len + vt, vd] = v_new[vb, vh, vt, vd]
        _quantize_blocks(k_open, mean, factor, k8, k_scale, B, H, open_len + N, D, T.int64(1), 1, "quantize_k")
        _quantize_blocks(v_open, None, None, v8, v_scale, B, H, open_len + N, D, T.int64(1), 1, "quantize_v")

    return append_open_block_func
