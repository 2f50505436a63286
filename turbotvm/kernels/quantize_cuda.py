"""FlashQ stage 1 on CUDA, in the layouts the tensor-core prefill reads (same math as quantize.py).

One CTA quantizes one 64-token block of one (batch, head): 128 threads read it coalesced, reduce
|x'| (x' per mode, as in quantize.py) to the block's absmax (warp shuffles, then 4 warp results
through shared memory) and write the INT8 codes. ``transposed`` writes V as v8t [B, H, D, blocks * 64]
with each tile's keys in the P-fragment order of ``prefill_tc.key_position`` (zeros past the last token).
"""

from tvm.script import tirx as T

from ..algorithm import INT8_MAX, QUANT_BLOCK
from .quantize import QUANTIZE_MODES

BLK = QUANT_BLOCK
THREADS = 128


def key_at(p):
    """Inverse of prefill_tc.key_position: the key (0..63) stored at column p of a v8t tile."""
    word, e = p // 4, p % 4
    j = word % 2 * 4 + word // 4  # A-fragment word of the 32-key step
    ks = word % 4 // 2
    return ks * 32 + j // 4 * 16 + e // 2 * 8 + j % 4 * 2 + e % 2


def quantize_rows(in_dtype: str, head_dim: int, mode: str, transposed: bool):
    if mode not in QUANTIZE_MODES or (transposed and mode != "plain"):
        raise ValueError(f"mode: expected one of {QUANTIZE_MODES} ('plain' when transposed), got {mode!r}")
    D = head_dim
    PER_THREAD = BLK * D // THREADS
    assert THREADS % D == 0  # row-major: element i of thread tx is channel tx % D, whatever i

    def prepared(value, offset, factor):
        """x' of one element: (x - offset) / factor (K), x * factor (Q) or x (V); offset, factor: the thread's."""
        if mode == "smoothed":
            return (value - offset[0]) / factor[0]
        if mode == "balanced":
            return value * factor[0]
        return value

    def code(value, inv):
        return T.Cast("int8", T.min(T.max(T.nearbyint(value * inv), T.float32(-INT8_MAX)), T.float32(INT8_MAX)))

    @T.macro
    def body(x, mean, factor, codes, scale, B, H, N, NB, NC, group):
        for blk in T.thread_binding(NB, thread="blockIdx.x"):
            for bh in T.thread_binding(B * H, thread="blockIdx.y"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    with T.sblock("quantize_block"):
                        T.reads(x[bh // H, bh % H, blk * BLK:blk * BLK + BLK, 0:D])
                        T.writes(codes[bh // H, bh % H, 0:D, 0:NC] if transposed
                                 else codes[bh // H, bh % H, blk * BLK:blk * BLK + BLK, 0:D], scale[bh // H, bh % H, blk])
                        warp_max = T.sblock_alloc_buffer((THREADS // 32,), "float32", scope="shared")
                        absmax = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        inv = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        # the thread's channel offset and factor, loaded once (index math per element is
                        # slow: a runtime division each for the KV head of Q)
                        offset = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        channel_factor = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        b: T.let[T.int32] = bh // H
                        h: T.let[T.int32] = bh % H
                        if mode == "smoothed":
                            offset[0] = mean[b, h, tx % D]
                            channel_factor[0] = factor[b, h, tx % D]
                        if mode == "balanced":
                            channel_factor[0] = factor[b, h // group, tx % D]
                        absmax[0] = T.float32(0)
                        for i in T.unroll(PER_THREAD):
                            if blk * BLK + (i * THREADS + tx) // D < N:
                                absmax[0] = T.max(absmax[0], T.abs(prepared(
                                    T.Cast("float32", x[b, h, blk * BLK + (i * THREADS + tx) // D, tx % D]),
                                    offset, channel_factor)))
                        absmax[0] = T.cuda.warp_reduce(absmax[0], "max", 32)
                        if tx % 32 == 0:
                            warp_max[tx // 32] = absmax[0]
                        T.tvm_storage_sync("shared")
                        absmax[0] = T.max(T.max(warp_max[0], warp_max[1]), T.max(warp_max[2], warp_max[3]))
                        absmax[0] = T.Select(absmax[0] > T.float32(0), absmax[0], T.float32(1))
                        inv[0] = T.float32(INT8_MAX) / absmax[0]
                        if tx == 0:
                            scale[b, h, blk] = absmax[0] / T.float32(INT8_MAX)
                        if transposed:
                            # element e = (d, column p): consecutive threads write consecutive columns
                            for i in T.unroll(PER_THREAD):
                                codes[b, h, (i * THREADS + tx) // BLK, blk * BLK + (i * THREADS + tx) % BLK] = T.if_then_else(
                                    blk * BLK + key_at((i * THREADS + tx) % BLK) < N,
                                    code(T.Cast("float32", x[b, h, blk * BLK + key_at((i * THREADS + tx) % BLK),
                                                             (i * THREADS + tx) // BLK]), inv[0]),
                                    T.int8(0))
                        else:
                            for i in T.unroll(PER_THREAD):
                                if blk * BLK + (i * THREADS + tx) // D < N:
                                    codes[b, h, blk * BLK + (i * THREADS + tx) // D, tx % D] = code(prepared(
                                        T.Cast("float32", x[b, h, blk * BLK + (i * THREADS + tx) // D, tx % D]),
                                        offset, channel_factor), inv[0])

    def codes_shape(B, H, N, NC):
        return (B, H, D, NC) if transposed else (B, H, N, D)

    if mode == "smoothed":

        @T.prim_func(s_tir=True)
        def quantize_rows_smoothed(x_h: T.handle, mean_h: T.handle, factor_h: T.handle, codes_h: T.handle,
                                   scale_h: T.handle):
            B, H, N, NB, NC = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
            mean = T.match_buffer(mean_h, (B, H, D), "float32")
            factor = T.match_buffer(factor_h, (B, H, D), "float32")
            codes = T.match_buffer(codes_h, codes_shape(B, H, N, NC), "int8")
            scale = T.match_buffer(scale_h, (B, H, NB), "float32")
            body(x, mean, factor, codes, scale, B, H, N, NB, NC, 1)

        return quantize_rows_smoothed

    if mode == "balanced":

        @T.prim_func(s_tir=True)
        def quantize_rows_balanced(x_h: T.handle, factor_h: T.handle, codes_h: T.handle, scale_h: T.handle):
            B, H, HKV, N, NB, NC = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
            x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
            factor = T.match_buffer(factor_h, (B, HKV, D), "float32")
            codes = T.match_buffer(codes_h, codes_shape(B, H, N, NC), "int8")
            scale = T.match_buffer(scale_h, (B, H, NB), "float32")
            body(x, None, factor, codes, scale, B, H, N, NB, NC, H // HKV)

        return quantize_rows_balanced

    @T.prim_func(s_tir=True)
    def quantize_rows_plain(x_h: T.handle, codes_h: T.handle, scale_h: T.handle):
        B, H, N, NB, NC = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
        codes = T.match_buffer(codes_h, codes_shape(B, H, N, NC), "int8")
        scale = T.match_buffer(scale_h, (B, H, NB), "float32")
        body(x, None, None, codes, scale, B, H, N, NB, NC, 1)

    return quantize_rows_plain
