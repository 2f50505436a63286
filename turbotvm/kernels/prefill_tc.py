"""Prefill attention on INT8 tensor cores (CUDA): the math of ``prefill.py`` mapped onto mma.sync.

Same algorithm, same result (checked against turbotvm.reference), but written at warp level
like MLC-LLM's TIR attention kernels, because the mapping *is* the kernel: a CTA of 4 warps owns
64 query rows of one (batch, head); warp w owns rows 16w..16w+15 and keeps everything in
registers, FlashAttention-2 style:

* Q·Kᵀ: ``mma.sync.m16n8k32.s32.s8.s8.s32``, Q fragments loaded once, K tiles staged in shared
  memory (rows padded by 16 bytes so fragment loads hit 32 distinct banks);
* SAS online softmax on the INT32 accumulators; row max/sum over the 4 lanes that share a row;
* P codes packed straight from the accumulator layout into A fragments. The accumulator gives a
  thread keys {2t, 2t+1, 8+2t, 9+2t} (+16) of each 32-key step, not the A operand's {4t..4t+3};
  since P·V sums over keys, V is stored with its keys in that same order (``v8t``, made by
  ``quantize_cuda.quantize_vt``: [B, H_kv, D, M padded to 64], transposed so the B operand of
  P·V is a 4-byte load too). See ``key_position``.
"""

from tvm.script import tirx as T

from ..algorithm import INT8_MAX, QUANT_BLOCK
from .sas import NEG_BIG, SAS_TABLE, sas_exp_from_table, sas_table_entry

BQ = 64  # query rows per CTA (= FlashQ block: one Q scale per CTA)
BK = QUANT_BLOCK  # keys per tile (= FlashQ block: one K and one V scale per tile)
WARPS = 4
THREADS = 32 * WARPS
ROW_PAD_WORDS = 4  # 16 bytes of padding per shared row: conflict-free fragment loads


def key_position(key: int) -> int:
    """Column of key (0..63 within a tile) in the v8t layout: the order the P fragments use."""
    half, k = divmod(key % 32, 16)
    return (key // 32) * 32 + half * 16 + 4 * ((k % 8) // 2) + 2 * (k // 8) + k % 2


def _mma(a_buf, a_off, b_buf, b_off, c_buf, c_off):
    return T.ptx_legacy.mma("m16n8k32", "row", "col", "int8", "int8", "int32",
                            a_buf.data, a_off, b_buf.data, b_off, c_buf.data, c_off, False, dtype="int32")


def prefill_tc(head_dim: int, causal: bool, out_dtype: str):
    D = head_dim
    DW = D // 4  # int32 words per row of D int8 codes
    KSTEPS = D // 32  # k-steps of Q·Kᵀ
    DTILES = D // 8  # n-tiles of P·V
    KW = BK // 4  # words per V^T row of one tile
    K_CHUNKS = BK * DW // 4 // THREADS  # 16-byte chunks per thread to stage a K tile
    V_CHUNKS = D * KW // 4 // THREADS
    # shared tiles are flat so the padding survives buffer compaction
    K_STRIDE = DW + ROW_PAD_WORDS
    V_STRIDE = KW + ROW_PAD_WORDS

    def visible(row, col, N, M):
        if causal:
            return T.And(T.And(row < N, col < M), col <= row + M - N)
        return T.And(row < N, col < M)

    def num_kv_tiles(qt, N, M):
        if causal:
            last_col = T.min(qt * BQ + BQ, N) + M - N
            return T.max(T.min(T.ceildiv(T.max(last_col, 0), BK), T.ceildiv(M, BK)), 0)
        return T.ceildiv(M, BK)

    def query_tile(bx, N):
        if causal:
            return T.ceildiv(N, BQ) - 1 - bx  # the longest rows first: better tail balance
        return bx

    @T.prim_func(s_tir=True)
    def prefill_tc_func(q_h: T.handle, q_scale_h: T.handle, k_h: T.handle, k_scale_h: T.handle,
                        v8t_h: T.handle, v_scale_h: T.handle, out_h: T.handle, sm_scale: T.float32):
        B, H, HKV, N, M, NQB, NKB = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(q_h, (B, H, N, D), "int8")
        q_scale = T.match_buffer(q_scale_h, (B, H, NQB), "float32")
        k = T.match_buffer(k_h, (B, HKV, M, D), "int8")
        k_scale = T.match_buffer(k_scale_h, (B, HKV, NKB), "float32")
        v8t = T.match_buffer(v8t_h, (B, HKV, D, NKB * BK), "int8")
        v_scale = T.match_buffer(v_scale_h, (B, HKV, NKB), "float32")
        out = T.match_buffer(out_h, (B, H, N, D), out_dtype)
        q_w = T.decl_buffer((B, H, N, DW), "int32", data=q.data)
        k_w = T.decl_buffer((B, HKV, M, DW), "int32", data=k.data)
        vt_w = T.decl_buffer((B, HKV, D, NKB * KW), "int32", data=v8t.data)
        for bx in T.thread_binding(T.ceildiv(N, BQ), thread="blockIdx.x"):
            for by in T.thread_binding(B * H, thread="blockIdx.y"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    with T.sblock("attention_tile"):
                        T.reads(q_w[by // H, by % H, 0:N, 0:DW], q_scale[by // H, by % H, 0:NQB],
                                k_w[by // H, 0:HKV, 0:M, 0:DW], k_scale[by // H, 0:HKV, 0:NKB],
                                vt_w[by // H, 0:HKV, 0:D, 0:NKB * KW], v_scale[by // H, 0:HKV, 0:NKB])
                        T.writes(out[by // H, by % H, 0:N, 0:D])
                        k_tile = T.sblock_alloc_buffer((BK * K_STRIDE,), "int32", scope="shared")
                        vt_tile = T.sblock_alloc_buffer((D * V_STRIDE,), "int32", scope="shared")
                        q_frag = T.sblock_alloc_buffer((KSTEPS * 4,), "int32", scope="local")
                        s_acc = T.sblock_alloc_buffer((BK // 8 * 4,), "int32", scope="local")
                        p_code = T.sblock_alloc_buffer((BK // 8 * 4,), "int32", scope="local")
                        p_frag = T.sblock_alloc_buffer((BK // 32 * 4,), "int32", scope="local")
                        pv_acc = T.sblock_alloc_buffer((4,), "int32", scope="local")
                        k_frag = T.sblock_alloc_buffer((2,), "int32", scope="local")
                        v_frag = T.sblock_alloc_buffer((2,), "int32", scope="local")
                        o_acc = T.sblock_alloc_buffer((DTILES * 4,), "float32", scope="local")
                        tile_scale = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        score = T.sblock_alloc_buffer((BK // 8 * 4,), "float32", scope="local")
                        # per owned row (g, g + 8): running max, partial sum, tile max, rescale, P scale
                        m = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        l = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        tile_max = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        corr = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        p_scale = T.sblock_alloc_buffer((2,), "float32", scope="local")
                        p_sum = T.sblock_alloc_buffer((2,), "int32", scope="local")
                        p_inv = T.sblock_alloc_buffer((2,), "float32", scope="local")  # 1 / p_scale
                        sas_table = T.sblock_alloc_buffer((len(SAS_TABLE),), "float32", scope="shared")

                        b: T.let[T.int32] = by // H
                        h: T.let[T.int32] = by % H
                        kvh: T.let[T.int32] = h // (H // HKV)
                        qt: T.let[T.int32] = query_tile(bx, N)
                        warp: T.let[T.int32] = tx // 32
                        g: T.let[T.int32] = tx % 32 // 4
                        t4: T.let[T.int32] = tx % 4
                        row0: T.let[T.int32] = qt * BQ + warp * 16 + g
                        row1: T.let[T.int32] = row0 + 8
                        qk_scale: T.let[T.float32] = q_scale[b, h, qt] * sm_scale

                        if tx < len(SAS_TABLE):
                            sas_table[tx] = sas_table_entry(tx)
                        for ks in T.unroll(KSTEPS):
                            q_frag[ks * 4 + 0] = T.if_then_else(row0 < N, q_w[b, h, row0, ks * 8 + t4], 0)
                            q_frag[ks * 4 + 1] = T.if_then_else(row1 < N, q_w[b, h, row1, ks * 8 + t4], 0)
                            q_frag[ks * 4 + 2] = T.if_then_else(row0 < N, q_w[b, h, row0, ks * 8 + 4 + t4], 0)
                            q_frag[ks * 4 + 3] = T.if_then_else(row1 < N, q_w[b, h, row1, ks * 8 + 4 + t4], 0)
                        for r in T.unroll(2):
                            m[r] = T.float32(NEG_BIG)
                            l[r] = T.float32(0)
                        for i in T.unroll(DTILES * 4):
                            o_acc[i] = T.float32(0)

                        for kt in T.serial(num_kv_tiles(qt, N, M)):
                            # ---- stage K (row-major) and V^T tiles in shared memory
                            T.tvm_storage_sync("shared")
                            for c in T.unroll(K_CHUNKS):
                                for w in T.vectorized(4):
                                    k_tile[(c * THREADS + tx) // (DW // 4) * K_STRIDE + (c * THREADS + tx) % (DW // 4) * 4 + w] = \
                                        T.if_then_else(kt * BK + (c * THREADS + tx) // (DW // 4) < M,
                                                       k_w[b, kvh, kt * BK + (c * THREADS + tx) // (DW // 4),
                                                           (c * THREADS + tx) % (DW // 4) * 4 + w], 0)
                            for c in T.unroll(V_CHUNKS):
                                for w in T.vectorized(4):
                                    vt_tile[(c * THREADS + tx) // (KW // 4) * V_STRIDE + (c * THREADS + tx) % (KW // 4) * 4 + w] = \
                                        vt_w[b, kvh, (c * THREADS + tx) // (KW // 4),
                                             kt * KW + (c * THREADS + tx) % (KW // 4) * 4 + w]
                            T.tvm_storage_sync("shared")

                            # ---- S = Q·Kᵀ (INT32), 8 n-tiles of 8 keys
                            for i in T.unroll(BK // 8 * 4):
                                s_acc[i] = 0
                            for nt in T.unroll(BK // 8):
                                for ks in T.unroll(KSTEPS):
                                    k_frag[0] = k_tile[(nt * 8 + g) * K_STRIDE + ks * 8 + t4]
                                    k_frag[1] = k_tile[(nt * 8 + g) * K_STRIDE + ks * 8 + 4 + t4]
                                    T.evaluate(_mma(q_frag, ks * 4, k_frag, 0, s_acc, nt * 4))

                            # ---- scores, row max over the 4 lanes of a row
                            tile_scale[0] = qk_scale * k_scale[b, kvh, kt]
                            for i in T.unroll(BK // 8 * 4):
                                score[i] = T.if_then_else(
                                    visible(row0 + i % 4 // 2 * 8, kt * BK + i // 4 * 8 + t4 * 2 + i % 2, N, M),
                                    T.Cast("float32", s_acc[i]) * tile_scale[0],
                                    T.float32(NEG_BIG))
                            for r in T.unroll(2):
                                tile_max[r] = T.float32(NEG_BIG)
                            for i in T.unroll(BK // 8 * 4):
                                tile_max[i % 4 // 2] = T.max(tile_max[i % 4 // 2], score[i])
                            for r in T.unroll(2):
                                tile_max[r] = T.cuda.warp_reduce(tile_max[r], "max", 4)
                                corr[r] = sas_exp_from_table(m[r] - T.max(m[r], tile_max[r]), sas_table)
                                p_scale[r] = sas_exp_from_table(tile_max[r] - T.max(m[r], tile_max[r]),
                                                                sas_table) / T.float32(INT8_MAX)
                                p_inv[r] = T.float32(1) / T.max(p_scale[r], T.float32(1e-30))
                                m[r] = T.max(m[r], tile_max[r])
                                p_sum[r] = 0

                            # ---- P codes (INT8 in int32 registers), packed into A fragments
                            for i in T.unroll(BK // 8 * 4):
                                p_code[i] = T.Cast("int32", T.if_then_else(
                                    T.And(score[i] > T.float32(NEG_BIG), p_scale[i % 4 // 2] > T.float32(0)),
                                    T.min(T.nearbyint(sas_exp_from_table(score[i] - m[i % 4 // 2], sas_table)
                                                      * p_inv[i % 4 // 2]), T.float32(INT8_MAX)),
                                    T.float32(0)))
                                p_sum[i % 4 // 2] = p_sum[i % 4 // 2] + p_code[i]
                            for ks in T.unroll(BK // 32):
                                for a in T.unroll(4):
                                    # a: 0 = row g, keys 0-15 of the step; 1 = row g+8; 2, 3: keys 16-31
                                    p_frag[ks * 4 + a] = (
                                        p_code[(ks * 4 + a // 2 * 2) * 4 + a % 2 * 2]
                                        | T.shift_left(p_code[(ks * 4 + a // 2 * 2) * 4 + a % 2 * 2 + 1], 8)
                                        | T.shift_left(p_code[(ks * 4 + a // 2 * 2 + 1) * 4 + a % 2 * 2], 16)
                                        | T.shift_left(p_code[(ks * 4 + a // 2 * 2 + 1) * 4 + a % 2 * 2 + 1], 24))
                            for r in T.unroll(2):
                                l[r] = l[r] * corr[r] + p_scale[r] * T.Cast("float32", p_sum[r])

                            # ---- O = O * corr + p_scale * v_scale * (P·V), one 8-wide d tile at a time
                            for nt in T.unroll(DTILES):
                                for i in T.unroll(4):
                                    pv_acc[i] = 0
                                for ks in T.unroll(BK // 32):
                                    v_frag[0] = vt_tile[(nt * 8 + g) * V_STRIDE + ks * 8 + t4]
                                    v_frag[1] = vt_tile[(nt * 8 + g) * V_STRIDE + ks * 8 + 4 + t4]
                                    T.evaluate(_mma(p_frag, ks * 4, v_frag, 0, pv_acc, 0))
                                for i in T.unroll(4):
                                    o_acc[nt * 4 + i] = o_acc[nt * 4 + i] * corr[i // 2] + p_scale[i // 2] * \
                                        v_scale[b, kvh, kt] * T.Cast("float32", pv_acc[i])

                        # ---- normalise by the row sum (partial per lane: reduce over the row's 4 lanes)
                        for r in T.unroll(2):
                            l[r] = T.cuda.warp_reduce(l[r], "sum", 4)
                        for nt in T.unroll(DTILES):
                            for i in T.unroll(4):
                                if row0 + i // 2 * 8 < N:
                                    out[b, h, row0 + i // 2 * 8, nt * 8 + t4 * 2 + i % 2] = T.Cast(
                                        out_dtype, T.if_then_else(l[i // 2] > T.float32(0),
                                                                  o_acc[nt * 4 + i] / l[i // 2], T.float32(0)))

    return prefill_tc_func
