"""FlashQ stage 2: INT8 KV blocks <-> packed INT4/INT2 codes with integer step and zero point.

Per (batch, head, 64-token block, channel): step = max(1, ceil((max-min)/levels)),
zero = min(min, 127 - levels * step) (so the top code expands to at most 127: no clamp needed),
code = round_half_even((x - zero) / step) in integers (docs/algorithm.md §2). Codes of one token
are packed along the channel axis, low bits first: byte i holds channels i*k .. i*k+k-1, k = 8/bits.
The kernels gather a group of heads (all heads of one bit width) through ``heads``.
"""

from tvm.script import tirx as T

from ..algorithm import INT8_MAX, QUANT_BLOCK, codes_per_byte

BLK = QUANT_BLOCK


def _code(value, zero, step, levels):
    """round_half_even((value - zero) / step), capped at levels; all int32."""
    quot = T.floordiv(value - zero, step)
    rem = T.floormod(value - zero, step)
    up = T.Select(T.Or(rem * 2 > step, T.And(rem * 2 == step, T.floormod(quot, 2) == 1)), 1, 0)
    return T.min(quot + up, levels)


def compress(bits: int):
    per_byte = codes_per_byte(bits)
    levels = 2**bits - 1

    @T.prim_func(s_tir=True)
    def compress_func(x8_h: T.handle, scale8_h: T.handle, heads_h: T.handle, codes_h: T.handle,
                      step_h: T.handle, zero_h: T.handle, scale_h: T.handle):
        B, HKV, HG, L, D, NB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x8 = T.match_buffer(x8_h, (B, HKV, L, D), "int8")
        scale8 = T.match_buffer(scale8_h, (B, HKV, NB), "float32")
        heads = T.match_buffer(heads_h, (HG,), "int32")
        codes = T.match_buffer(codes_h, (B, HG, L, D // per_byte), "uint8")
        step = T.match_buffer(step_h, (B, HG, NB, D), "uint8")
        zero = T.match_buffer(zero_h, (B, HG, NB, D), "int8")
        scale = T.match_buffer(scale_h, (B, HG, NB), "float32")
        for b, g, blk, d in T.grid(B, HG, NB, D):
            with T.sblock("step_zero"):
                vb, vg, vblk, vd = T.axis.remap("SSSS", [b, g, blk, d])
                T.reads(x8[vb, 0:HKV, vblk * BLK:vblk * BLK + BLK, vd], heads[vg])
                T.writes(step[vb, vg, vblk, vd], zero[vb, vg, vblk, vd])
                lo = T.sblock_alloc_buffer((1,), "int32")
                hi = T.sblock_alloc_buffer((1,), "int32")
                for t in range(BLK):
                    with T.sblock("range"):
                        vt = T.axis.remap("R", [t])
                        with T.init():
                            lo[0] = INT8_MAX
                            hi[0] = -INT8_MAX
                        lo[0] = T.min(lo[0], T.Cast("int32", x8[vb, heads[vg], vblk * BLK + vt, vd]))
                        hi[0] = T.max(hi[0], T.Cast("int32", x8[vb, heads[vg], vblk * BLK + vt, vd]))
                with T.sblock("store"):
                    step[vb, vg, vblk, vd] = T.Cast("uint8", T.max(1, T.ceildiv(hi[0] - lo[0], levels)))
                    # top code at or below 127: expansion is linear (levels * step <= 255 keeps this int8)
                    zero[vb, vg, vblk, vd] = T.Cast("int8", T.min(
                        lo[0], INT8_MAX - levels * T.max(1, T.ceildiv(hi[0] - lo[0], levels))))
        for b, g, blk in T.grid(B, HG, NB):
            with T.sblock("gather_scale"):
                vb, vg, vblk = T.axis.remap("SSS", [b, g, blk])
                scale[vb, vg, vblk] = scale8[vb, heads[vg], vblk]
        for b, g, t, byte, c in T.grid(B, HG, L, D // per_byte, per_byte):
            with T.sblock("pack"):
                vb, vg, vt, vbyte, vc = T.axis.remap("SSSSR", [b, g, t, byte, c])
                with T.init():
                    codes[vb, vg, vt, vbyte] = T.uint8(0)
                codes[vb, vg, vt, vbyte] = codes[vb, vg, vt, vbyte] | T.shift_left(
                    T.Cast("uint8", _code(T.Cast("int32", x8[vb, heads[vg], vt, vbyte * per_byte + vc]),
                                          T.Cast("int32", zero[vb, vg, vt // BLK, vbyte * per_byte + vc]),
                                          T.Cast("int32", step[vb, vg, vt // BLK, vbyte * per_byte + vc]), levels)),
                    T.Cast("uint8", vc * bits))

    return compress_func


def unpack_code(codes, b, g, t, d, bits):
    """The bits-wide code of channel d of token t, read from the packed bytes."""
    per_byte = codes_per_byte(bits)
    byte = codes[b, g, t, d // per_byte]
    shift = T.Cast("uint8", T.floormod(d, per_byte) * bits)
    return T.Cast("int32", T.bitwise_and(T.shift_right(byte, shift), T.uint8(2**bits - 1)))


def expand(code, step, zero):
    """INT{bits} code -> INT8 value (int32 expression): code * step + zero, capped at 127."""
    return T.min(code * T.Cast("int32", step) + T.Cast("int32", zero), INT8_MAX)


def decompress(bits: int):
    per_byte = codes_per_byte(bits)

    @T.prim_func(s_tir=True)
    def decompress_func(codes_h: T.handle, step_h: T.handle, zero_h: T.handle, x8_h: T.handle):
        B, HG, L, D, NB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        codes = T.match_buffer(codes_h, (B, HG, L, D // per_byte), "uint8")
        step = T.match_buffer(step_h, (B, HG, NB, D), "uint8")
        zero = T.match_buffer(zero_h, (B, HG, NB, D), "int8")
        x8 = T.match_buffer(x8_h, (B, HG, L, D), "int8")
        for b, g, t, d in T.grid(B, HG, L, D):
            with T.sblock("expand"):
                vb, vg, vt, vd = T.axis.remap("SSSS", [b, g, t, d])
                x8[vb, vg, vt, vd] = T.Cast("int8", expand(
                    unpack_code(codes, vb, vg, vt, vd, bits), step[vb, vg, vt // BLK, vd], zero[vb, vg, vt // BLK, vd]))

    return decompress_func
