"""FlashQ stage 1: block-wise symmetric INT8 quantization of Q, K or V (docs/algorithm.md §1)."""

from tvm.script import tirx as T

from ..algorithm import INT8_MAX, QUANT_BLOCK

BLK = QUANT_BLOCK


def channel_mean(in_dtype: str):
    """mean[b, h, d] = mean over tokens of x[b, h, :, d]: the K smoothing offset."""

    @T.prim_func(s_tir=True)
    def channel_mean_func(x_h: T.handle, mean_h: T.handle):
        B, H, N, D = T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
        mean = T.match_buffer(mean_h, (B, H, D), "float32")
        for b, h, d in T.grid(B, H, D):
            with T.sblock("channel"):
                vb, vh, vd = T.axis.remap("SSS", [b, h, d])
                T.reads(x[vb, vh, 0:N, vd])
                T.writes(mean[vb, vh, vd])
                total = T.sblock_alloc_buffer((1,), "float32")
                for t in range(N):
                    with T.sblock("sum"):
                        vt = T.axis.remap("R", [t])
                        with T.init():
                            total[0] = T.float32(0)
                        total[0] = total[0] + T.Cast("float32", x[vb, vh, vt, vd])
                with T.sblock("divide"):
                    mean[vb, vh, vd] = total[0] / T.Cast("float32", N)

    return channel_mean_func


def _centered(x, mean, b, h, t, d):
    if mean is None:
        return T.Cast("float32", x[b, h, t, d])
    return T.Cast("float32", x[b, h, t, d]) - mean[b, h, d]


def quantize_int8(in_dtype: str, smoothed: bool):
    """codes = clip(rint((x - mean) / s), ±127), s = absmax / 127 per (b, h, 64-token block)."""

    @T.macro
    def body(x, mean, codes, scale, B, H, N, D, NB):
        for b, h, blk in T.grid(B, H, NB):
            with T.sblock("block"):
                vb, vh, vblk = T.axis.remap("SSS", [b, h, blk])
                if mean is None:
                    T.reads(x[vb, vh, vblk * BLK:vblk * BLK + BLK, 0:D])
                else:
                    T.reads(x[vb, vh, vblk * BLK:vblk * BLK + BLK, 0:D], mean[vb, vh, 0:D])
                T.writes(codes[vb, vh, vblk * BLK:vblk * BLK + BLK, 0:D], scale[vb, vh, vblk])
                absmax = T.sblock_alloc_buffer((1,), "float32")
                inv = T.sblock_alloc_buffer((1,), "float32")
                for t, d in T.grid(BLK, D):
                    with T.sblock("absmax"):
                        vt, vd = T.axis.remap("RR", [t, d])
                        T.where(vblk * BLK + t < N)
                        with T.init():
                            absmax[0] = T.float32(0)
                        absmax[0] = T.max(absmax[0], T.abs(_centered(x, mean, vb, vh, vblk * BLK + vt, vd)))
                with T.sblock("scale"):
                    scale[vb, vh, vblk] = T.Select(absmax[0] > T.float32(0), absmax[0], T.float32(1)) / T.float32(INT8_MAX)
                    inv[0] = T.float32(INT8_MAX) / T.Select(absmax[0] > T.float32(0), absmax[0], T.float32(1))
                for t, d in T.grid(BLK, D):
                    with T.sblock("round"):
                        vt, vd = T.axis.remap("SS", [t, d])
                        T.where(vblk * BLK + t < N)
                        codes[vb, vh, vblk * BLK + vt, vd] = T.Cast(
                            "int8",
                            T.min(T.max(T.nearbyint(_centered(x, mean, vb, vh, vblk * BLK + vt, vd) * inv[0]),
                                        T.float32(-INT8_MAX)), T.float32(INT8_MAX)),
                        )

    if smoothed:

        @T.prim_func(s_tir=True)
        def quantize_smoothed(x_h: T.handle, mean_h: T.handle, codes_h: T.handle, scale_h: T.handle):
            B, H, N, D, NB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
            x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
            mean = T.match_buffer(mean_h, (B, H, D), "float32")
            codes = T.match_buffer(codes_h, (B, H, N, D), "int8")
            scale = T.match_buffer(scale_h, (B, H, NB), "float32")
            body(x, mean, codes, scale, B, H, N, D, NB)

        return quantize_smoothed

    @T.prim_func(s_tir=True)
    def quantize(x_h: T.handle, codes_h: T.handle, scale_h: T.handle):
        B, H, N, D, NB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (B, H, N, D), in_dtype)
        codes = T.match_buffer(codes_h, (B, H, N, D), "int8")
        scale = T.match_buffer(scale_h, (B, H, NB), "float32")
        body(x, None, codes, scale, B, H, N, D, NB)

    return quantize
