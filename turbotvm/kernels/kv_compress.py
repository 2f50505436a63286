"""FlashQ stage 2: INT8 KV blocks <-> packed INT4/INT2 codes with integer step and zero point.

Per (batch, head, CACHE_GROUP tokens, channel) an integer step and zero point: of the steps from
ceil((max - min) / levels) down to half of it, the one with the least squared error; the zero
centres the grid on the clipped range and is lowered so the top code expands to at most 127.
code = clamp(round_half_even((x - zero) / step), 0, levels) in integers (docs/algorithm.md §2).

Per 64-token block, the ``n_out`` widest channels (K's outlier channels) are kept verbatim: their
step is 0 and their zero is a slot number; slot o of token t is byte ``D / per_byte + o`` of the
token's code row, holding x8 + 128. ``n_out`` is not a parameter: it is the width of K's code rows
beyond the packed codes (CACHE_K_OUTLIERS); V keeps none, and its kernel has no outlier blocks. The
channels are ranked by width in data-parallel blocks (one thread per channel), so a one-block
compression (a cache append) spreads over the GPU. K and V differ otherwise only in how codes are
laid out (``channel_major``), so one definition serves both.

Layouts: codes [B, HG, L, D / per_byte + n_out] uint8, low bits first; step, zero
[B, HG, L/64, 64/CACHE_GROUP, D]. K's codes are token-major: byte i of token t's row holds channels
i*k .. i*k+k-1 (k = 8/bits), then the kept bytes (Q·Kᵀ reads a token's row). V's codes are
channel-major within each 64-token block: the block's 64 rows hold its D runs of 64/k bytes, channel
after channel, byte j of a run holding tokens j*k .. j*k+k-1 (P·V reads a channel's 64 codes as one
vector and multiplies four tokens per dp4a). Both keep the token axis in 64-row blocks, so whole
blocks slice and copy alike. The kernels gather a group of heads (all heads of one bit width)
through ``heads``. Their scratch (``width``, ``rank`` [B, HG, L/64, D] int32) is the caller's: TVM's
own workspace pool knows no streams, so memory it hands out could still be in use on another stream.
"""

from tvm.script import tirx as T

from ..algorithm import CACHE_GROUP, INT8_MAX, QUANT_BLOCK, codes_per_byte

BLK = QUANT_BLOCK
GROUP = CACHE_GROUP
GROUPS_PER_BLOCK = QUANT_BLOCK // CACHE_GROUP
MAX_ERROR = 2**31 - 1
#: The byte that stores a kept INT8 value v is v + KEPT_BIAS (1..255: unsigned, portable).
KEPT_BIAS = 128


@T.macro
def _running_range(span, value):
    """span = (min, max) of the values a reduction block has seen."""
    with T.init():
        span[0] = INT8_MAX
        span[1] = -INT8_MAX
    span[0] = T.min(span[0], value)
    span[1] = T.max(span[1], value)


def _code(value, zero, step, levels):
    """clamp(round_half_even((value - zero) / step), 0, levels); all int32, step >= 1."""
    quot = T.floordiv(value - zero, step)
    rem = T.floormod(value - zero, step)
    up = T.Select(T.Or(rem * 2 > step, T.And(rem * 2 == step, T.floormod(quot, 2) == 1)), 1, 0)
    return T.max(T.min(quot + up, levels), 0)


def _zero_point(lo, hi, step, levels):
    """Centre the grid on a clipped range; the top code expands to at most 127 (fits int8)."""
    return T.min(lo + T.floordiv(T.max(0, hi - lo - levels * step), 2), INT8_MAX - levels * step)


def _squared_error(value, step, zero, levels):
    back = _code(value, zero, step, levels) * step + zero
    return (back - value) * (back - value)


def code_position(t, d, bits, head_dim, channel_major):
    """(row, byte, shift) of the code of token t, channel d in a codes tensor (see the layouts above)."""
    per_byte = codes_per_byte(bits)
    if not channel_major:
        return t, d // per_byte, T.floormod(d, per_byte) * bits
    run, width = BLK // per_byte, head_dim // per_byte
    index = d * run + T.floordiv(T.floormod(t, BLK), per_byte)  # byte of the block
    return t - T.floormod(t, BLK) + T.floordiv(index, width), T.floormod(index, width), T.floormod(t, per_byte) * bits


def source_token(row, byte, c, bits, head_dim, channel_major):
    """Token of the c-th code of byte ``byte`` of row ``row`` (code_position's inverse, with source_channel)."""
    per_byte = codes_per_byte(bits)
    if not channel_major:
        return row
    run, width = BLK // per_byte, head_dim // per_byte
    return row - T.floormod(row, BLK) + T.floormod(T.floormod(row, BLK) * width + byte, run) * per_byte + c


def source_channel(row, byte, c, bits, head_dim, channel_major):
    """Channel of the c-th code of byte ``byte`` of row ``row``."""
    per_byte = codes_per_byte(bits)
    if not channel_major:
        return byte * per_byte + c
    run, width = BLK // per_byte, head_dim // per_byte
    return T.floordiv(T.floormod(row, BLK) * width + byte, run)


def compress(bits: int, channel_major: bool):
    """``channel_major``: V's layout (no kept bytes); else K's token-major rows."""
    per_byte = codes_per_byte(bits)
    levels = 2**bits - 1
    # most steps a group tries: widest // 2 + 1 when its range is the full 254
    candidates = (INT8_MAX * 2 + levels - 1) // levels // 2 + 1
    keeps_outliers = not channel_major  # V's rows have no kept bytes: its n_out is 0

    @T.prim_func(s_tir=True)
    def compress_func(x8_h: T.handle, scale8_h: T.handle, heads_h: T.handle, codes_h: T.handle,
                      step_h: T.handle, zero_h: T.handle, scale_h: T.handle, width_h: T.handle, rank_h: T.handle):
        B, HKV, HG, L, D, NB, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x8 = T.match_buffer(x8_h, (B, HKV, L, D), "int8")
        scale8 = T.match_buffer(scale8_h, (B, HKV, NB), "float32")
        heads = T.match_buffer(heads_h, (HG,), "int32")
        codes = T.match_buffer(codes_h, (B, HG, L, W), "uint8")
        step = T.match_buffer(step_h, (B, HG, NB, GROUPS_PER_BLOCK, D), "uint8")
        zero = T.match_buffer(zero_h, (B, HG, NB, GROUPS_PER_BLOCK, D), "int8")
        scale = T.match_buffer(scale_h, (B, HG, NB), "float32")
        # scratch (V's kernel leaves them be): the channel's range over its 64-token block; the channels
        # wider than it (ties: lower index first)
        width = T.match_buffer(width_h, (B, HG, NB, D), "int32")
        rank = T.match_buffer(rank_h, (B, HG, NB, D), "int32")
        if keeps_outliers:  # K: rank the block's channels by width; the n_out widest are kept
            for b, g, blk, d in T.grid(B, HG, NB, D):
                with T.sblock("width"):
                    vb, vg, vblk, vd = T.axis.remap("SSSS", [b, g, blk, d])
                    T.reads(x8[vb, 0:HKV, vblk * BLK:vblk * BLK + BLK, vd], heads[vg])
                    T.writes(width[vb, vg, vblk, vd])
                    channel_span = T.sblock_alloc_buffer((2,), "int32")  # min, max
                    for t in range(BLK):
                        with T.sblock("block_range"):
                            vt = T.axis.remap("R", [t])
                            _running_range(channel_span, T.Cast("int32", x8[vb, heads[vg], vblk * BLK + vt, vd]))
                    with T.sblock("store_width"):
                        width[vb, vg, vblk, vd] = channel_span[1] - channel_span[0]
            for b, g, blk, d in T.grid(B, HG, NB, D):
                with T.sblock("rank"):
                    vb, vg, vblk, vd = T.axis.remap("SSSS", [b, g, blk, d])
                    T.reads(width[vb, vg, vblk, 0:D])
                    T.writes(rank[vb, vg, vblk, vd])
                    wider = T.sblock_alloc_buffer((1,), "int32")
                    for d2 in range(D):
                        with T.sblock("count_wider"):
                            vd2 = T.axis.remap("R", [d2])
                            with T.init():
                                wider[0] = 0
                            wider[0] = wider[0] + T.Select(T.Or(
                                width[vb, vg, vblk, vd2] > width[vb, vg, vblk, vd],
                                T.And(width[vb, vg, vblk, vd2] == width[vb, vg, vblk, vd], vd2 < vd)), 1, 0)
                    with T.sblock("store_rank"):
                        rank[vb, vg, vblk, vd] = wider[0]
        for b, g, blk, grp, d in T.grid(B, HG, NB, GROUPS_PER_BLOCK, D):
            with T.sblock("fit"):
                vb, vg, vblk, vgrp, vd = T.axis.remap("SSSSS", [b, g, blk, grp, d])
                if keeps_outliers:
                    T.reads(x8[vb, 0:HKV, vblk * BLK + vgrp * GROUP:vblk * BLK + vgrp * GROUP + GROUP, vd], heads[vg],
                            rank[vb, vg, vblk, vd])
                else:
                    T.reads(x8[vb, 0:HKV, vblk * BLK + vgrp * GROUP:vblk * BLK + vgrp * GROUP + GROUP, vd], heads[vg])
                T.writes(step[vb, vg, vblk, vgrp, vd], zero[vb, vg, vblk, vgrp, vd])
                span = T.sblock_alloc_buffer((2,), "int32")  # min, max of the group
                cand = T.sblock_alloc_buffer((3,), "int32")  # widest step, step tried, its zero
                best = T.sblock_alloc_buffer((2,), "int32")  # least squared error, its step
                err = T.sblock_alloc_buffer((1,), "int32")
                for t in range(GROUP):
                    with T.sblock("range"):
                        vt = T.axis.remap("R", [t])
                        _running_range(span, T.Cast("int32", x8[vb, heads[vg], vblk * BLK + vgrp * GROUP + vt, vd]))
                with T.sblock("init_best"):
                    cand[0] = T.max(1, T.ceildiv(span[1] - span[0], levels))
                    best[0] = MAX_ERROR
                    best[1] = T.max(1, T.ceildiv(span[1] - span[0], levels))
                for i in T.serial(T.floordiv(cand[0], 2) + 1):  # steps widest .. ceil(widest / 2)
                    with T.sblock("candidate"):
                        vi = T.axis.opaque(candidates, i)
                        cand[1] = T.max(cand[0] - vi, 1)
                        cand[2] = _zero_point(span[0], span[1], T.max(cand[0] - vi, 1), levels)
                    for t in range(GROUP):
                        with T.sblock("error"):
                            vi = T.axis.opaque(candidates, i)
                            vt = T.axis.remap("R", [t])
                            with T.init():
                                err[0] = 0
                            err[0] = err[0] + _squared_error(
                                T.Cast("int32", x8[vb, heads[vg], vblk * BLK + vgrp * GROUP + vt, vd]), cand[1], cand[2],
                                levels)
                    with T.sblock("keep_best"):
                        vi = T.axis.opaque(candidates, i)
                        best[1] = T.Select(err[0] < best[0], cand[1], best[1])
                        best[0] = T.min(err[0], best[0])
                if keeps_outliers:
                    with T.sblock("store"):  # the block's n_out widest channels are kept: step 0, zero = slot
                        step[vb, vg, vblk, vgrp, vd] = T.Cast("uint8", T.Select(
                            T.Cast("int64", rank[vb, vg, vblk, vd]) < W - D // per_byte, 0, best[1]))
                        zero[vb, vg, vblk, vgrp, vd] = T.Cast("int8", T.Select(
                            T.Cast("int64", rank[vb, vg, vblk, vd]) < W - D // per_byte, rank[vb, vg, vblk, vd],
                            _zero_point(span[0], span[1], best[1], levels)))
                else:
                    with T.sblock("store"):
                        step[vb, vg, vblk, vgrp, vd] = T.Cast("uint8", best[1])
                        zero[vb, vg, vblk, vgrp, vd] = T.Cast("int8", _zero_point(span[0], span[1], best[1], levels))
        for b, g, blk in T.grid(B, HG, NB):
            with T.sblock("gather_scale"):
                vb, vg, vblk = T.axis.remap("SSS", [b, g, blk])
                scale[vb, vg, vblk] = scale8[vb, heads[vg], vblk]
        for b, g, row, byte, c in T.grid(B, HG, L, D // per_byte, per_byte):
            with T.sblock("pack"):
                vb, vg, vrow, vbyte, vc = T.axis.remap("SSSSR", [b, g, row, byte, c])
                token: T.let[T.int64] = source_token(vrow, vbyte, vc, bits, D, channel_major)
                channel: T.let[T.int64] = source_channel(vrow, vbyte, vc, bits, D, channel_major)
                with T.init():
                    codes[vb, vg, vrow, vbyte] = T.uint8(0)
                codes[vb, vg, vrow, vbyte] = codes[vb, vg, vrow, vbyte] | T.shift_left(
                    T.Cast("uint8", T.Select(
                        _group_param(step, vb, vg, token, channel) == 0, 0,
                        _code(T.Cast("int32", x8[vb, heads[vg], token, channel]),
                              T.Cast("int32", _group_param(zero, vb, vg, token, channel)),
                              T.max(T.Cast("int32", _group_param(step, vb, vg, token, channel)), 1),
                              levels))),
                    T.Cast("uint8", vc * bits))
        if keeps_outliers:
            for b, g, t, slot in T.grid(B, HG, L, W - D // per_byte):
                with T.sblock("keep"):
                    vb, vg, vt, vslot = T.axis.remap("SSSS", [b, g, t, slot])
                    T.reads(rank[vb, vg, vt // BLK, 0:D], x8[vb, 0:HKV, vt, 0:D], heads[vg])
                    T.writes(codes[vb, vg, vt, D // per_byte + vslot])
                    kept = T.sblock_alloc_buffer((1,), "int64")  # the channel of rank `slot`
                    for d in range(D):
                        with T.sblock("find_kept"):
                            vd = T.axis.remap("R", [d])
                            with T.init():
                                kept[0] = T.int64(0)
                            kept[0] = kept[0] + T.Select(T.Cast("int64", rank[vb, vg, vt // BLK, vd]) == vslot, vd, T.int64(0))
                    with T.sblock("store_kept"):
                        codes[vb, vg, vt, D // per_byte + vslot] = T.Cast(
                            "uint8", T.Cast("int32", x8[vb, heads[vg], vt, kept[0]]) + KEPT_BIAS)

    return compress_func


def _group_param(param, b, g, t, d):
    """step or zero of the stage-2 group that holds token t, channel d."""
    return param[b, g, t // BLK, T.floordiv(T.floormod(t, BLK), GROUP), d]


def unpack_code(codes, b, g, t, d, bits, head_dim, channel_major):
    """The bits-wide code of channel d of token t, read from the packed bytes."""
    row, byte, shift = code_position(t, d, bits, head_dim, channel_major)
    return T.Cast("int32", T.bitwise_and(T.shift_right(codes[b, g, row, byte], T.Cast("uint8", shift)),
                                         T.uint8(2**bits - 1)))


def expand(code, step, zero):
    """INT{bits} code -> INT8 value (int32 expression): code * step + zero, capped at 127."""
    return T.min(code * T.Cast("int32", step) + T.Cast("int32", zero), INT8_MAX)


def load_int8(codes, step, zero, b, g, t, d, bits, head_dim, code_width, channel_major):
    """INT8 value of channel d of token t: the expanded code, or (K) the kept byte where step is 0.

    The kept-byte index is clamped into the row, so both operands of the select stay in bounds.
    """
    group_step, group_zero = _group_param(step, b, g, t, d), _group_param(zero, b, g, t, d)
    value = expand(unpack_code(codes, b, g, t, d, bits, head_dim, channel_major), group_step, group_zero)
    if channel_major:  # V: no kept bytes
        return value
    packed_width = head_dim // codes_per_byte(bits)
    slot = T.min(T.max(T.Cast("int64", group_zero), 0), code_width - packed_width - 1)
    kept = T.Cast("int32", codes[b, g, t, packed_width + slot]) - KEPT_BIAS
    return T.Select(group_step == 0, kept, value)


def decompress(bits: int, channel_major: bool):
    """Codes back to INT8 values [B, HG, L, D] (K's kept channels included), for checks and tools."""

    @T.prim_func(s_tir=True)
    def decompress_func(codes_h: T.handle, step_h: T.handle, zero_h: T.handle, x8_h: T.handle):
        B, HG, L, D, NB, W = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        codes = T.match_buffer(codes_h, (B, HG, L, W), "uint8")
        step = T.match_buffer(step_h, (B, HG, NB, GROUPS_PER_BLOCK, D), "uint8")
        zero = T.match_buffer(zero_h, (B, HG, NB, GROUPS_PER_BLOCK, D), "int8")
        x8 = T.match_buffer(x8_h, (B, HG, L, D), "int8")
        for b, g, t, d in T.grid(B, HG, L, D):
            with T.sblock("expand"):
                vb, vg, vt, vd = T.axis.remap("SSSS", [b, g, t, d])
                x8[vb, vg, vt, vd] = T.Cast("int8", load_int8(codes, step, zero, vb, vg, vt, vd, bits, D, W,
                                                              channel_major))

    return decompress_func
