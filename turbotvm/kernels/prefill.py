"""Prefill attention: INT8 Q·Kᵀ -> INT32, SAS online softmax, INT8 P·V -> INT32 (docs/algorithm.md §3-4).

One tile = (batch, query head, 64 query rows); it walks the KV sequence in 64-token tiles
(the FlashQ blocks, so each KV tile has one K and one V scale). GQA: query head h reads KV head
h // (H / H_kv). Causal masks are aligned bottom-right: row i sees keys j <= i + M - N.

The Q tile and each K/V tile are staged in tile buffers (K transposed), zero past N and M, and
the two integer matmuls are written as rank-1 updates whose innermost loop runs along a
contiguous row (keys for Q·Kᵀ, channels for P·V): a vectorizing rule (the CPU's) then turns
each update into a few SIMD multiply-adds, with no bounds test inside (this kernel is the CPU
path; CUDA uses ``prefill_tc``). Integer sums are exact, so the order changes no result.
"""

from tvm.script import tirx as T

from ..algorithm import INT8_MAX, QUANT_BLOCK
from .sas import NEG_BIG, sas_exp

BQ = 64  # query rows per tile (any value works for the math: Q scales are looked up per row)
BK = QUANT_BLOCK  # KV tokens per tile: must equal the quantization block


def prefill(head_dim: int, causal: bool, out_dtype: str):
    D = head_dim

    def visible(row, col, N, M):
        if causal:
            return T.And(T.And(row < N, col < M), col <= row + M - N)
        return T.And(row < N, col < M)

    def num_kv_tiles(qt, N, M):
        if causal:
            last_col = T.min(qt * BQ + BQ, N) + M - N  # one past the last visible key of the tile
            return T.max(T.min(T.ceildiv(T.max(last_col, T.int64(0)), BK), T.ceildiv(M, BK)), T.int64(0))
        return T.ceildiv(M, BK)

    @T.prim_func(s_tir=True)
    def prefill_func(q_h: T.handle, q_scale_h: T.handle, k_h: T.handle, k_scale_h: T.handle,
                     v_h: T.handle, v_scale_h: T.handle, out_h: T.handle, sm_scale: T.float32):
        B, H, HKV, N, M, NQB, NKB = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (B, H, N, D), "int8")
        q_scale = T.match_buffer(q_scale_h, (B, H, NQB), "float32")
        k = T.match_buffer(k_h, (B, HKV, M, D), "int8")
        k_scale = T.match_buffer(k_scale_h, (B, HKV, NKB), "float32")
        v = T.match_buffer(v_h, (B, HKV, M, D), "int8")
        v_scale = T.match_buffer(v_scale_h, (B, HKV, NKB), "float32")
        out = T.match_buffer(out_h, (B, H, N, D), out_dtype)
        for b, h, qt in T.grid(B, H, T.ceildiv(N, BQ)):
            with T.sblock("tile"):
                vb, vh, vqt = T.axis.remap("SSS", [b, h, qt])
                T.reads(q[vb, vh, 0:N, 0:D], q_scale[vb, vh, 0:NQB], k[vb, 0:HKV, 0:M, 0:D],
                        k_scale[vb, 0:HKV, 0:NKB], v[vb, 0:HKV, 0:M, 0:D], v_scale[vb, 0:HKV, 0:NKB])
                T.writes(out[vb, vh, 0:N, 0:D])
                q_tile = T.sblock_alloc_buffer((BQ, D), "int8")
                k_tile_t = T.sblock_alloc_buffer((D, BK), "int8")  # K tile transposed: keys along rows
                v_tile = T.sblock_alloc_buffer((BK, D), "int8")
                s_int = T.sblock_alloc_buffer((BQ, BK), "int32")
                score = T.sblock_alloc_buffer((BQ, BK), "float32")
                p_code = T.sblock_alloc_buffer((BQ, BK), "int8")
                pv_int = T.sblock_alloc_buffer((BQ, D), "int32")
                acc = T.sblock_alloc_buffer((BQ, D), "float32")
                m = T.sblock_alloc_buffer((BQ,), "float32")
                l = T.sblock_alloc_buffer((BQ,), "float32")
                tile_max = T.sblock_alloc_buffer((BQ,), "float32")
                corr = T.sblock_alloc_buffer((BQ,), "float32")
                p_scale = T.sblock_alloc_buffer((BQ,), "float32")
                p_sum = T.sblock_alloc_buffer((BQ,), "int32")
                kvh = vh // (H // HKV)
                for i in range(BQ):
                    with T.sblock("init_state"):
                        vi = T.axis.remap("S", [i])
                        m[vi] = T.float32(NEG_BIG)
                        l[vi] = T.float32(0)
                for i, d in T.grid(BQ, D):
                    with T.sblock("init_acc"):
                        vi, vd = T.axis.remap("SS", [i, d])
                        acc[vi, vd] = T.float32(0)
                for i, d in T.grid(BQ, D):
                    with T.sblock("q_tile"):
                        vi, vd = T.axis.remap("SS", [i, d])
                        q_tile[vi, vd] = T.if_then_else(vqt * BQ + vi < N, q[vb, vh, T.min(vqt * BQ + vi, N - 1), vd],
                                                        T.int8(0))
                for kt in T.serial(num_kv_tiles(vqt, N, M)):
                    for d, j in T.grid(D, BK):
                        with T.sblock("k_tile"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vd, vj = T.axis.remap("SS", [d, j])
                            k_tile_t[vd, vj] = T.if_then_else(vkt * BK + vj < M,
                                                              k[vb, kvh, T.min(vkt * BK + vj, M - 1), vd], T.int8(0))
                    for j, d in T.grid(BK, D):
                        with T.sblock("v_tile"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vj, vd = T.axis.remap("SS", [j, d])
                            v_tile[vj, vd] = T.if_then_else(vkt * BK + vj < M,
                                                            v[vb, kvh, T.min(vkt * BK + vj, M - 1), vd], T.int8(0))
                    for i, j in T.grid(BQ, BK):
                        with T.sblock("init_qk"):
                            vi, vj = T.axis.remap("SS", [i, j])
                            s_int[vi, vj] = 0
                    for i, d, j in T.grid(BQ, D, BK):
                        with T.sblock("qk"):
                            vi, vd, vj = T.axis.remap("SRS", [i, d, j])
                            s_int[vi, vj] = s_int[vi, vj] + T.Cast("int32", q_tile[vi, vd]) * T.Cast(
                                "int32", k_tile_t[vd, vj])
                    for i, j in T.grid(BQ, BK):
                        with T.sblock("score"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vi, vj = T.axis.remap("SS", [i, j])
                            score[vi, vj] = T.if_then_else(
                                visible(vqt * BQ + vi, vkt * BK + vj, N, M),
                                T.Cast("float32", s_int[vi, vj]) * q_scale[vb, vh, (vqt * BQ + vi) // QUANT_BLOCK]
                                * k_scale[vb, kvh, vkt] * sm_scale,
                                T.float32(NEG_BIG))
                    for i, j in T.grid(BQ, BK):
                        with T.sblock("tile_max"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vi, vj = T.axis.remap("SR", [i, j])
                            with T.init():
                                tile_max[vi] = T.float32(NEG_BIG)
                            tile_max[vi] = T.max(tile_max[vi], score[vi, vj])
                    for i in range(BQ):
                        with T.sblock("rescale"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vi = T.axis.remap("S", [i])
                            corr[vi] = sas_exp(m[vi] - T.max(m[vi], tile_max[vi]))
                            p_scale[vi] = sas_exp(tile_max[vi] - T.max(m[vi], tile_max[vi])) / T.float32(INT8_MAX)
                            m[vi] = T.max(m[vi], tile_max[vi])
                    for i, j in T.grid(BQ, BK):
                        with T.sblock("p_quant"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vi, vj = T.axis.remap("SS", [i, j])
                            p_code[vi, vj] = T.Cast("int8", T.if_then_else(
                                T.And(score[vi, vj] > T.float32(NEG_BIG), p_scale[vi] > T.float32(0)),
                                T.min(T.nearbyint(sas_exp(score[vi, vj] - m[vi]) / p_scale[vi]), T.float32(INT8_MAX)),
                                T.float32(0)))
                    for i, j in T.grid(BQ, BK):
                        with T.sblock("p_sum"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vi, vj = T.axis.remap("SR", [i, j])
                            with T.init():
                                p_sum[vi] = 0
                            p_sum[vi] = p_sum[vi] + T.Cast("int32", p_code[vi, vj])
                    for i, d in T.grid(BQ, D):
                        with T.sblock("init_pv"):
                            vi, vd = T.axis.remap("SS", [i, d])
                            pv_int[vi, vd] = 0
                    for i, j, d in T.grid(BQ, BK, D):
                        with T.sblock("pv"):
                            vi, vj, vd = T.axis.remap("SRS", [i, j, d])
                            pv_int[vi, vd] = pv_int[vi, vd] + T.Cast("int32", p_code[vi, vj]) * T.Cast(
                                "int32", v_tile[vj, vd])
                    for i in range(BQ):
                        with T.sblock("update_sum"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vi = T.axis.remap("S", [i])
                            l[vi] = l[vi] * corr[vi] + p_scale[vi] * T.Cast("float32", p_sum[vi])
                    for i, d in T.grid(BQ, D):
                        with T.sblock("update_acc"):
                            vkt = T.axis.opaque(T.ceildiv(M, BK), kt)
                            vi, vd = T.axis.remap("SS", [i, d])
                            acc[vi, vd] = acc[vi, vd] * corr[vi] + p_scale[vi] * v_scale[vb, kvh, vkt] * T.Cast(
                                "float32", pv_int[vi, vd])
                for i, d in T.grid(BQ, D):
                    with T.sblock("store"):
                        vi, vd = T.axis.remap("SS", [i, d])
                        T.where(vqt * BQ + i < N)
                        out[vb, vh, vqt * BQ + vi, vd] = T.Cast(out_dtype, T.if_then_else(
                            l[vi] > T.float32(0), acc[vi, vd] / l[vi], T.float32(0)))

    return prefill_func
