"""FlashQ stage 1 on CUDA: every quantization of a CUDA build (the prefill's, in the layouts its tensor-core
kernel reads; the KV cache's), with the math of quantize.py.

One CTA quantizes one 64-token block of one (batch, head): 128 threads read it coalesced, reduce
|x'| (x' per mode, as in quantize.py) to the block's absmax (warp shuffles, then 4 warp results
through shared memory) and write the INT8 codes. ``transposed`` writes V as v8t [B, H, D, blocks * 64]
with each tile's keys in the P-fragment order of ``prefill_tc.key_position`` (zeros past the last token).
``channel_smoothing`` reduces K's channels (mean, balance factor) for the smoothed and balanced modes.
"""

from tvm.script import tirx as T

from ..algorithm import INT8_MAX, QUANT_BLOCK
from .quantize import QUANTIZE_MODES, balance_factor, int8_level

BLK = QUANT_BLOCK
THREADS = 128


def key_at(p):
    """Inverse of prefill_tc.key_position: the key (0..63) stored at column p of a v8t tile."""
    word, e = p // 4, p % 4
    j = word % 2 * 4 + word // 4  # A-fragment word of the 32-key step
    ks = word % 4 // 2
    return ks * 32 + j // 4 * 16 + e // 2 * 8 + j % 4 * 2 + e % 2


@T.macro
def block_absmax(absmax, warp_max, inv, tx):
    """The CTA's absmax of its threads' ``absmax`` (warp shuffles, then the warps' through shared memory;
    1 if all are 0) into every thread's absmax, and 127 / absmax into inv."""
    absmax[0] = T.cuda.warp_reduce(absmax[0], "max", 32)
    if tx % 32 == 0:
        warp_max[tx // 32] = absmax[0]
    T.tvm_storage_sync("shared")
    absmax[0] = T.max(T.max(warp_max[0], warp_max[1]), T.max(warp_max[2], warp_max[3]))
    absmax[0] = T.Select(absmax[0] > T.float32(0), absmax[0], T.float32(1))
    inv[0] = T.float32(INT8_MAX) / absmax[0]


def _prepared(value, offset, factor, mode):
    """x' of one element: (x - offset) / factor (K), x * factor (Q) or x (V); offset, factor: the thread's."""
    if mode == "smoothed":
        return (value - offset[0]) / factor[0]
    if mode == "balanced":
        return value * factor[0]
    return value


def _code(value, inv):
    return T.Cast("int8", int8_level(value, inv))


def quantize_rows(in_dtype: str, head_dim: int, mode: str, transposed: bool):
    if mode not in QUANTIZE_MODES or (transposed and mode != "plain"):
        raise ValueError(f"mode: expected one of {QUANTIZE_MODES} ('plain' when transposed), got {mode!r}")
    D = head_dim
    PER_THREAD = BLK * D // THREADS
    assert THREADS % D == 0  # row-major: element i of thread tx is channel tx % D, whatever i

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
                                absmax[0] = T.max(absmax[0], T.abs(_prepared(
                                    T.Cast("float32", x[b, h, blk * BLK + (i * THREADS + tx) // D, tx % D]),
                                    offset, channel_factor, mode)))
                        block_absmax(absmax, warp_max, inv, tx)
                        if tx == 0:
                            scale[b, h, blk] = absmax[0] / T.float32(INT8_MAX)
                        if transposed:
                            # element e = (d, column p): consecutive threads write consecutive columns
                            for i in T.unroll(PER_THREAD):
                                codes[b, h, (i * THREADS + tx) // BLK, blk * BLK + (i * THREADS + tx) % BLK] = T.if_then_else(
                                    blk * BLK + key_at((i * THREADS + tx) % BLK) < N,
                                    _code(T.Cast("float32", x[b, h, blk * BLK + key_at((i * THREADS + tx) % BLK),
                                                             (i * THREADS + tx) // BLK]), inv[0]),
                                    T.int8(0))
                        else:
                            for i in T.unroll(PER_THREAD):
                                if blk * BLK + (i * THREADS + tx) // D < N:
                                    codes[b, h, blk * BLK + (i * THREADS + tx) // D, tx % D] = _code(_prepared(
                                        T.Cast("float32", x[b, h, blk * BLK + (i * THREADS + tx) // D, tx % D]),
                                        offset, channel_factor, mode), inv[0])

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


def append_open_block(in_dtype: str, head_dim: int):
    """quantize.append_open_block in one launch: CTA (b·h, 0) takes K, CTA (b·h, 1) V, 128 threads each.

    A cache append of one token used two concatenations and two quantize_rows launches with four
    allocations, all host work. The element mapping is quantize_rows' (thread tx: channel tx % D of rows
    (i·128 + tx) / D), so each thread re-reads only the rows it stored itself.
    """
    D = head_dim
    PER_THREAD = BLK * D // THREADS
    assert THREADS % D == 0

    @T.macro
    def requantize(new, x_open, codes, scale, mean, factor, offset, channel_factor, warp_max, absmax, inv,
                   b, h, tx, open_len, N, mode):
        if mode == "smoothed":
            offset[0] = mean[b, h, tx % D]
            channel_factor[0] = factor[b, h, tx % D]
        absmax[0] = T.float32(0)
        for i in T.unroll(PER_THREAD):
            if (i * THREADS + tx) // D < open_len + N:
                if (i * THREADS + tx) // D >= open_len:
                    x_open[b, h, (i * THREADS + tx) // D, tx % D] = new[b, h, (i * THREADS + tx) // D - open_len, tx % D]
                absmax[0] = T.max(absmax[0], T.abs(_prepared(
                    T.Cast("float32", x_open[b, h, (i * THREADS + tx) // D, tx % D]), offset, channel_factor, mode)))
        block_absmax(absmax, warp_max, inv, tx)
        if tx == 0:
            scale[b, h, 0] = absmax[0] / T.float32(INT8_MAX)
        for i in T.unroll(PER_THREAD):
            if (i * THREADS + tx) // D < open_len + N:
                codes[b, h, (i * THREADS + tx) // D, tx % D] = _code(_prepared(
                    T.Cast("float32", x_open[b, h, (i * THREADS + tx) // D, tx % D]), offset, channel_factor, mode),
                    inv[0])

    @T.prim_func(s_tir=True)
    def append_open_block_func(k_new_h: T.handle, v_new_h: T.handle, mean_h: T.handle, factor_h: T.handle,
                               k_open_h: T.handle, v_open_h: T.handle, k8_h: T.handle, k_scale_h: T.handle,
                               v8_h: T.handle, v_scale_h: T.handle, open_len: T.int32):
        B, H, N = T.int32(), T.int32(), T.int32()
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
        for bh in T.thread_binding(B * H, thread="blockIdx.x"):  # (x: gridDim.y stops at 65535)
            for kv in T.thread_binding(2, thread="blockIdx.y"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    with T.sblock("open_block"):
                        T.reads(k_new[bh // H, bh % H, 0:N, 0:D], v_new[bh // H, bh % H, 0:N, 0:D],
                                mean[bh // H, bh % H, 0:D], factor[bh // H, bh % H, 0:D],
                                k_open[bh // H, bh % H, 0:BLK, 0:D], v_open[bh // H, bh % H, 0:BLK, 0:D])
                        T.writes(k_open[bh // H, bh % H, 0:BLK, 0:D], v_open[bh // H, bh % H, 0:BLK, 0:D],
                                 k8[bh // H, bh % H, 0:BLK, 0:D], k_scale[bh // H, bh % H, 0],
                                 v8[bh // H, bh % H, 0:BLK, 0:D], v_scale[bh // H, bh % H, 0])
                        warp_max = T.sblock_alloc_buffer((THREADS // 32,), "float32", scope="shared")
                        absmax = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        inv = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        offset = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        channel_factor = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        b: T.let[T.int32] = bh // H
                        h: T.let[T.int32] = bh % H
                        if kv == 0:
                            requantize(k_new, k_open, k8, k_scale, mean, factor, offset, channel_factor, warp_max,
                                       absmax, inv, b, h, tx, open_len, N, "smoothed")
                        else:
                            requantize(v_new, v_open, v8, v_scale, mean, factor, offset, channel_factor, warp_max,
                                       absmax, inv, b, h, tx, open_len, N, "plain")

    return append_open_block_func


SMOOTH_CHANNELS = 64  # channels per CTA: one 128-byte line of an fp16 row (head dims are multiples of 64)
SMOOTH_THREADS = 512


def channel_smoothing(in_dtype: str):
    """K's channel mean and balance factor (the math of quantize.channel_smoothing) in one launch.

    A CTA owns 64 channels of one (batch, KV head). Each thread loads 16 bytes of a row at a time and
    keeps a sum, min and max per channel over every LANES-th token; lanes of a warp combine by
    shuffles, warps through shared memory. torch's reductions took ~10 launches, ~0.16 ms of host
    time per prefill at any length.
    """
    vec = 16 // (4 if in_dtype == "float32" else 2)  # channels per 16-byte load
    chunks = SMOOTH_CHANNELS // vec  # threads per 64-channel piece of a row
    lanes = SMOOTH_THREADS // chunks  # tokens read at once
    warps = SMOOTH_THREADS // 32
    shuffles = (32 // chunks).bit_length() - 1  # xor masks chunks, 2 chunks, ...: the warp's lanes of a channel

    @T.prim_func(s_tir=True)
    def channel_smoothing_func(x_h: T.handle, mean_h: T.handle, factor_h: T.handle):
        B, H, N, D = T.int32(), T.int32(), T.int32(), T.int32()
        x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
        mean = T.match_buffer(mean_h, (B, H, D), "float32")
        factor = T.match_buffer(factor_h, (B, H, D), "float32")
        # rows as 16-byte pieces: a constant innermost extent makes each load one vector access
        x_v = T.decl_buffer((B, H, N, D // vec, vec), in_dtype, data=x.data)
        for cg in T.thread_binding(D // SMOOTH_CHANNELS, thread="blockIdx.x"):
            for bh in T.thread_binding(B * H, thread="blockIdx.y"):
                for tx in T.thread_binding(SMOOTH_THREADS, thread="threadIdx.x"):
                    with T.sblock("channel_group"):
                        T.reads(x_v[bh // H, bh % H, 0:N, cg * chunks:cg * chunks + chunks, 0:vec])
                        T.writes(mean[bh // H, bh % H, cg * SMOOTH_CHANNELS:cg * SMOOTH_CHANNELS + SMOOTH_CHANNELS],
                                 factor[bh // H, bh % H, cg * SMOOTH_CHANNELS:cg * SMOOTH_CHANNELS + SMOOTH_CHANNELS])
                        # per warp and channel of the group: sum, min, max
                        warp_stats = T.sblock_alloc_buffer((3 * warps * SMOOTH_CHANNELS,), "float32", scope="shared")
                        row = T.sblock_alloc_buffer((vec,), in_dtype, scope="local")
                        total = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                        lo = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                        hi = T.sblock_alloc_buffer((vec,), "float32", scope="local")
                        stat = T.sblock_alloc_buffer((3,), "float32", scope="local")
                        b: T.let[T.int32] = bh // H
                        h: T.let[T.int32] = bh % H
                        chunk: T.let[T.int32] = tx % chunks
                        lane: T.let[T.int32] = tx // chunks
                        for w in T.unroll(vec):
                            total[w] = T.float32(0)
                            lo[w] = T.float32(3.4e38)
                            hi[w] = T.float32(-3.4e38)
                        for i in T.serial(T.ceildiv(N - lane, lanes)):
                            for w in T.vectorized(vec):
                                row[w] = x_v[b, h, lane + i * lanes, cg * chunks + chunk, w]
                            for w in T.unroll(vec):
                                total[w] = total[w] + T.Cast("float32", row[w])
                                lo[w] = T.min(lo[w], T.Cast("float32", row[w]))
                                hi[w] = T.max(hi[w], T.Cast("float32", row[w]))
                        for w in T.unroll(vec):
                            for j in T.unroll(shuffles):
                                total[w] = total[w] + T.tvm_warp_shuffle_xor(
                                    T.uint32(0xFFFFFFFF), total[w], chunks << j, 32, 32)
                                lo[w] = T.min(lo[w], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), lo[w], chunks << j, 32, 32))
                                hi[w] = T.max(hi[w], T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), hi[w], chunks << j, 32, 32))
                            if tx % 32 < chunks:
                                warp_stats[(tx // 32) * SMOOTH_CHANNELS + chunk * vec + w] = total[w]
                                warp_stats[(warps + tx // 32) * SMOOTH_CHANNELS + chunk * vec + w] = lo[w]
                                warp_stats[(2 * warps + tx // 32) * SMOOTH_CHANNELS + chunk * vec + w] = hi[w]
                        T.tvm_storage_sync("shared")
                        if tx < SMOOTH_CHANNELS:
                            stat[0] = T.float32(0)
                            stat[1] = T.float32(3.4e38)
                            stat[2] = T.float32(-3.4e38)
                            for p in T.unroll(warps):
                                stat[0] = stat[0] + warp_stats[p * SMOOTH_CHANNELS + tx]
                                stat[1] = T.min(stat[1], warp_stats[(warps + p) * SMOOTH_CHANNELS + tx])
                                stat[2] = T.max(stat[2], warp_stats[(2 * warps + p) * SMOOTH_CHANNELS + tx])
                            stat[0] = stat[0] / T.Cast("float32", N)
                            mean[b, h, cg * SMOOTH_CHANNELS + tx] = stat[0]
                            factor[b, h, cg * SMOOTH_CHANNELS + tx] = balance_factor(stat[0], stat[1], stat[2])

    return channel_smoothing_func
