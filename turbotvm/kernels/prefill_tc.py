"""Prefill attention on INT8 tensor cores (CUDA): the math of ``prefill.py`` mapped onto mma.sync.

Same algorithm, same result (checked against turbotvm.reference), but written at warp level
like MLC-LLM's TIR attention kernels, because the mapping *is* the kernel: a CTA of 4 warps (the
default; 2 or 8 as a tuning knob) owns 64 query rows of one (batch, head); warp w owns rows 16w..16w+15 and keeps everything in
registers, FlashAttention-2 style:

* Q·Kᵀ: ``mma.sync.m16n8k32.s32.s8.s8.s32``, Q fragments loaded once, K tiles staged in shared
  memory (rows padded by 16 bytes so fragment loads hit 32 distinct banks);
* SAS online softmax on the INT32 accumulators, which start at MAGIC_BITS so that their bits read as
  the float MAGIC + S (no conversion); row max over the 4 lanes that share a row; a key's SAS
  argument from an exact float difference; the cubic scaled by P's 1/scale so that one FFMA
  rounds the code; P's row sums as one more mma (P·1), so every lane holds its rows' whole sums;
* P codes packed straight from the accumulator layout into A fragments. The accumulator gives a
  thread keys {2t, 2t+1, 8+2t, 9+2t} (+16) of each 32-key step, not the A operand's {4t..4t+3};
  since P·V sums over keys, V is stored with its keys in that same order (``v8t``, made by
  ``quantize_cuda.quantize_vt``: [B, H_kv, D, M padded to 64], transposed so the B operand of
  P·V is a 4-byte load too). See ``key_position``.
"""

from tvm.script import tirx as T

from ..algorithm import INT8_MAX, QUANT_BLOCK, SAS_MAX_INT, SAS_POLY
from .sas import NEG_BIG, SAS_TABLE, sas_exp_from_table, sas_table_entry

BK = QUANT_BLOCK  # keys per tile (= FlashQ block: one K and one V scale per tile)
WARPS = 4  # default warps per CTA (16 query rows each): BQ = 64 rows = one FlashQ block
WARP_CHOICES = (4, 2, 8)  # the tuning knob's values: 32, 64 or 128 query rows per CTA
MIN_BLOCKS_CHOICES = (0, 1, 3)  # the tuning knob's values; 0: the hand choice for the head dim
ROW_PAD_WORDS = 4  # 16 bytes of padding per shared row: conflict-free fragment loads


def hand_min_blocks(head_dim: int) -> int:
    """CTAs per SM asked of ptxas by default. At D=64, 3 (168 registers, from 143-168) was 1-15 % faster
    on the H200 (benchmarks/results/tuning_sm_90.json); at D=128 the 64 fp32 output accumulators need
    ~240 registers, and 3 spilled and was 12 % slower."""
    return 3 if head_dim <= 64 else 1


def key_position(key: int) -> int:
    """Column of key (0..63 within a tile) in the v8t layout: the order the P fragments use.

    Within a 32-key step ks, the accumulator gives lane t the keys 8e' + 2t + e'' that fill byte
    e = 2e' + e'' of its A word j = t (keys 0-15) or j = 4 + t (keys 16-31). Words are then laid
    out per lane (word (j % 4) * 4 + ks * 2 + j // 4) so one 16-byte load gives a lane its B words.
    """
    ks, k = divmod(key % 64, 32)
    half, kk = divmod(k, 16)
    j = half * 4 + (kk % 8) // 2
    e = 2 * (kk // 8) + kk % 2
    return ((j % 4) * 4 + ks * 2 + j // 4) * 4 + e


def d_word(ks: int, j: int, t4, ksteps: int):
    """Physical int32 word of Q/K rows that feeds k-slot word j (0..7) of step ks for lane t4.

    Q·Kᵀ sums over d, so any order of the d words shared by Q and K is valid; this one puts a
    lane's words of every k-step side by side (two 16-byte shared loads per K row for D=128).
    """
    return t4 * (2 * ksteps) + 2 * ks + j // 4


MAGIC = 12582912.0  # 1.5 * 2**23: float + MAGIC puts an integer |i| < 2**22 in the low mantissa bits
MAGIC_BITS = 0x4B400000


def _round_to_int(x_plus_magic):
    """int32 of a float already offset by MAGIC (round half to even happened in that add)."""
    return T.reinterpret("int32", x_plus_magic) - MAGIC_BITS


def _mma(a_buf, a_off, b_buf, b_off, c_buf, c_off):
    return T.ptx_legacy.mma("m16n8k32", "row", "col", "int8", "int8", "int32",
                            a_buf.data, a_off, b_buf.data, b_off, c_buf.data, c_off, False, dtype="int32")


def prefill_tc(head_dim: int, causal: bool, out_dtype: str, warps: int = WARPS, min_blocks: int = 0):
    """warps (a tuning knob): 16 query rows each. More warps share each staged K/V tile among more
    rows (less traffic per row); fewer give smaller CTAs for the tail and for short sequences.
    min_blocks (a tuning knob): CTAs per SM that ptxas must fit (``__launch_bounds__``), trading
    registers for warps that hide each other's latency; 0 = ``hand_min_blocks(head_dim)``."""
    if warps not in WARP_CHOICES:
        raise ValueError(f"warps: expected one of {WARP_CHOICES}, got {warps}")
    if min_blocks < 0:
        raise ValueError(f"min_blocks: expected 0 (hand choice) or a positive count, got {min_blocks}")
    min_blocks = min_blocks or hand_min_blocks(head_dim)
    BQ = 16 * warps  # query rows per CTA
    THREADS = 32 * warps
    D = head_dim
    DW = D // 4  # int32 words per row of D int8 codes
    KSTEPS = D // 32  # k-steps of Q·Kᵀ
    DTILES = D // 8  # n-tiles of P·V
    KW = BK // 4  # words per V^T row of one tile
    K_CHUNKS = BK * DW // 4 // THREADS  # 16-byte chunks per thread to stage a K tile
    V_CHUNKS = D * KW // 4 // THREADS
    # Shared rows: a quarter-warp's 16-byte fragment loads (rows g, g+1) must hit 32 distinct banks.
    # The tiles are flat so this padding survives TVM's buffer compaction.
    K_STRIDE = DW + (4 if DW == 32 else 0)
    V_STRIDE = KW

    def masked(row, col, N, M):
        if causal:
            return T.Or(T.Or(row >= N, col >= M), col > row + M - N)
        return T.Or(row >= N, col >= M)

    def tile_needs_mask(qt, kt, N, M):
        if causal:
            return T.Or(kt * BK + BK > M, kt * BK + BK - 1 > qt * BQ + M - N)
        return kt * BK + BK > M

    def num_kv_tiles(qt, N, M):
        if causal:
            last_col = T.min(qt * BQ + BQ, N) + M - N
            return T.max(T.min(T.ceildiv(T.max(last_col, 0), BK), T.ceildiv(M, BK)), 0)
        return T.ceildiv(M, BK)

    def query_tile(bx, N):
        if causal:
            return T.ceildiv(N, BQ) - 1 - bx  # the longest rows first: better tail balance
        return bx

    def sas_code_bits(t, coef, r, table):
        """An int32 whose low byte is rint(SAS(-t) * p_inv), for t in [0, SAS_MAX_INT + 1].

        floor by a round-down add, table, cubic (coefficients pre-scaled by p_inv), rint by the
        add of MAGIC. The code needs no clamp at 127: SAS never increases with t, so no key of a
        tile exceeds the tile's largest, which maps to 127 (tests/test_reference.py checks this).
        """
        floor_t = T.call_pure_extern("float32", "__fadd_rd", t, T.float32(MAGIC))
        y = (floor_t - T.float32(MAGIC)) - t
        poly = ((coef[r * 4] * y + coef[r * 4 + 1]) * y + coef[r * 4 + 2]) * y + coef[r * 4 + 3]
        return T.reinterpret("int32", table[_round_to_int(floor_t)] * poly + T.float32(MAGIC))

    def pack_codes(a, b, c, d):
        """Low bytes of four code words -> one word (three byte permutes)."""
        return T.call_pure_extern("int32", "__byte_perm", T.call_pure_extern("int32", "__byte_perm", a, b, 0x0040),
                                  T.call_pure_extern("int32", "__byte_perm", c, d, 0x0040), 0x5410)

    @T.macro
    def load_tile(k_w, vt_w, k_stage, v_stage, b, kvh, kt, tx, M):
        """KV tile kt from global memory into registers, 16 bytes per load (K rows past M read as 0)."""
        for c in T.unroll(K_CHUNKS):
            for w in T.vectorized(4):
                k_stage[c * 4 + w] = T.if_then_else(
                    kt * BK + (c * THREADS + tx) // (DW // 4) < M,
                    k_w[b, kvh, kt * BK + (c * THREADS + tx) // (DW // 4), (c * THREADS + tx) % (DW // 4) * 4 + w], 0)
        for c in T.unroll(V_CHUNKS):
            for w in T.vectorized(4):
                v_stage[c * 4 + w] = vt_w[b, kvh, (c * THREADS + tx) // (KW // 4), kt * KW + (c * THREADS + tx) % (KW // 4) * 4 + w]

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
            # heads on y and batch on z: b and h need no division by the runtime H
            for by in T.thread_binding(H, thread="blockIdx.y"):
                for bz in T.thread_binding(B, thread="blockIdx.z"):
                    for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                        T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", min_blocks)
                        with T.sblock("attention_tile"):
                            T.reads(q_w[bz, by, 0:N, 0:DW], q_scale[bz, by, 0:NQB],
                                    k_w[bz, 0:HKV, 0:M, 0:DW], k_scale[bz, 0:HKV, 0:NKB],
                                    vt_w[bz, 0:HKV, 0:D, 0:NKB * KW], v_scale[bz, 0:HKV, 0:NKB])
                            T.writes(out[bz, by, 0:N, 0:D])
                            k_tile = T.sblock_alloc_buffer((BK * K_STRIDE,), "int32", scope="shared")
                            vt_tile = T.sblock_alloc_buffer((D * V_STRIDE,), "int32", scope="shared")
                            sas_table = T.sblock_alloc_buffer((len(SAS_TABLE),), "float32", scope="shared")
                            k_stage = T.sblock_alloc_buffer((K_CHUNKS * 4,), "int32", scope="local")
                            v_stage = T.sblock_alloc_buffer((V_CHUNKS * 4,), "int32", scope="local")
                            q_frag = T.sblock_alloc_buffer((KSTEPS * 4,), "int32", scope="local")
                            # fragments are loaded 16 bytes at a time into *_vec, which TVM retypes as
                            # int4; the mma operands must stay int32-indexed, hence the register copies
                            k_vec = T.sblock_alloc_buffer((KSTEPS * 2,), "int32", scope="local")
                            v_vec = T.sblock_alloc_buffer((4,), "int32", scope="local")
                            k_frag = T.sblock_alloc_buffer((KSTEPS * 2,), "int32", scope="local")
                            v_frag = T.sblock_alloc_buffer((4,), "int32", scope="local")
                            # INT32 accumulators start at MAGIC_BITS: read as float32 they are MAGIC + the sum
                            s_acc = T.sblock_alloc_buffer((BK // 8 * 4,), "int32", scope="local")
                            t_key = T.sblock_alloc_buffer((BK // 8 * 4,), "float32", scope="local")
                            p_code = T.sblock_alloc_buffer((BK // 8 * 4,), "int32", scope="local")
                            p_frag = T.sblock_alloc_buffer((BK // 32 * 4,), "int32", scope="local")
                            pv_acc = T.sblock_alloc_buffer((4,), "int32", scope="local")
                            ones = T.sblock_alloc_buffer((2,), "int32", scope="local")
                            row_sum = T.sblock_alloc_buffer((4,), "int32", scope="local")
                            o_acc = T.sblock_alloc_buffer((DTILES * 4,), "float32", scope="local")
                            tile_scale = T.sblock_alloc_buffer((1,), "float32", scope="local")
                            # per owned row (g, g + 8): running max, row sum, tile max, rescale, P scale
                            m = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            l = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            tile_max = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            tile_max_acc = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            t_offset = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            coef = T.sblock_alloc_buffer((8,), "float32", scope="local")
                            pv_bias = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            corr = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            p_scale = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            p_inv = T.sblock_alloc_buffer((2,), "float32", scope="local")
                            pv_scale = T.sblock_alloc_buffer((2,), "float32", scope="local")

                            # truncating division: all non-negative, and it spares floordiv's sign fix-ups
                            b: T.let[T.int32] = bz
                            h: T.let[T.int32] = by
                            # The KV head goes through shared memory: as an expression of the runtime H
                            # and HKV, ptxas recomputes its two integer divisions at every K/V address
                            # of the tile loop (240 live registers), which made the kernel 1.5x slower.
                            kvh_sh = T.sblock_alloc_buffer((1,), "int32", scope="shared")
                            if tx == 0:
                                kvh_sh[0] = T.truncdiv(h, T.truncdiv(H, HKV))
                            T.tvm_storage_sync("shared")
                            kvh: T.let[T.int32] = kvh_sh[0]
                            qt: T.let[T.int32] = query_tile(bx, N)
                            warp: T.let[T.int32] = tx // 32
                            g: T.let[T.int32] = tx % 32 // 4
                            t4: T.let[T.int32] = tx % 4
                            row0: T.let[T.int32] = qt * BQ + warp * 16 + g
                            row1: T.let[T.int32] = row0 + 8
                            # the warp's rows lie in one FlashQ block (clamped: a warp past N reads a valid scale)
                            qk_scale: T.let[T.float32] = q_scale[
                                b, h, T.min(T.truncdiv(qt * BQ + warp * 16, QUANT_BLOCK), NQB - 1)] * sm_scale

                            if tx < len(SAS_TABLE):  # 11 entries: fewer than the smallest CTA
                                sas_table[tx] = sas_table_entry(tx)
                            for ks in T.unroll(KSTEPS):
                                q_frag[ks * 4 + 0] = T.if_then_else(row0 < N, q_w[b, h, row0, d_word(ks, 0, t4, KSTEPS)], 0)
                                q_frag[ks * 4 + 1] = T.if_then_else(row1 < N, q_w[b, h, row1, d_word(ks, 0, t4, KSTEPS)], 0)
                                q_frag[ks * 4 + 2] = T.if_then_else(row0 < N, q_w[b, h, row0, d_word(ks, 4, t4, KSTEPS)], 0)
                                q_frag[ks * 4 + 3] = T.if_then_else(row1 < N, q_w[b, h, row1, d_word(ks, 4, t4, KSTEPS)], 0)
                            for r in T.unroll(2):
                                m[r] = T.float32(NEG_BIG)
                                l[r] = T.float32(0)
                            for i in T.unroll(DTILES * 4):
                                o_acc[i] = T.float32(0)
                            for w in T.unroll(2):
                                ones[w] = 0x01010101  # B operand of P·1: the row sums of P on the tensor cores

                            if num_kv_tiles(qt, N, M) > 0:
                                load_tile(k_w, vt_w, k_stage, v_stage, b, kvh, 0, tx, M)
                            for kt in T.serial(num_kv_tiles(qt, N, M)):
                                # ---- the prefetched tile goes to shared memory; the next one is loaded
                                # into registers while this one is computed (global latency hidden)
                                T.tvm_storage_sync("shared")
                                for c in T.unroll(K_CHUNKS):
                                    for w in T.vectorized(4):
                                        k_tile[(c * THREADS + tx) // (DW // 4) * K_STRIDE + (c * THREADS + tx) % (DW // 4) * 4 + w] = k_stage[c * 4 + w]
                                for c in T.unroll(V_CHUNKS):
                                    for w in T.vectorized(4):
                                        vt_tile[(c * THREADS + tx) // (KW // 4) * V_STRIDE + (c * THREADS + tx) % (KW // 4) * 4 + w] = v_stage[c * 4 + w]
                                T.tvm_storage_sync("shared")
                                if kt + 1 < num_kv_tiles(qt, N, M):
                                    load_tile(k_w, vt_w, k_stage, v_stage, b, kvh, kt + 1, tx, M)

                                # ---- S = Q·Kᵀ (INT32), 8 n-tiles of 8 keys
                                for i in T.unroll(BK // 8 * 4):
                                    s_acc[i] = MAGIC_BITS
                                for nt in T.unroll(BK // 8):
                                    for c in T.unroll(KSTEPS // 2):
                                        for w in T.vectorized(4):
                                            k_vec[c * 4 + w] = k_tile[(nt * 8 + g) * K_STRIDE + t4 * KSTEPS * 2 + c * 4 + w]
                                    for w in T.unroll(KSTEPS * 2):
                                        k_frag[w] = k_vec[w]
                                    for ks in T.unroll(KSTEPS):
                                        T.evaluate(_mma(q_frag, ks * 4, k_frag, ks * 2, s_acc, nt * 4))

                                # ---- row maxima on the raw sums (as floats MAGIC + S: ordered like S); a masked
                                # key becomes 0.0, below every sum, on the tiles that cross an edge
                                if tile_needs_mask(qt, kt, N, M):
                                    for i in T.unroll(BK // 8 * 4):
                                        if masked(row0 + i % 4 // 2 * 8, kt * BK + i // 4 * 8 + t4 * 2 + i % 2, N, M):
                                            s_acc[i] = 0
                                for r in T.unroll(2):
                                    tile_max_acc[r] = T.float32(0)
                                for i in T.unroll(BK // 8 * 4):
                                    tile_max_acc[i % 4 // 2] = T.max(tile_max_acc[i % 4 // 2],
                                                                     T.reinterpret("float32", s_acc[i]))
                                tile_scale[0] = qk_scale * k_scale[b, kvh, kt]
                                for r in T.unroll(2):
                                    tile_max_acc[r] = T.cuda.warp_reduce(tile_max_acc[r], "max", 4)
                                    # NEG_BIG for a row with no visible key in this tile
                                    tile_max[r] = T.if_then_else(tile_max_acc[r] > T.float32(0),
                                                                 (tile_max_acc[r] - T.float32(MAGIC)) * tile_scale[0],
                                                                 T.float32(NEG_BIG))
                                    corr[r] = sas_exp_from_table(m[r] - T.max(m[r], tile_max[r]), sas_table)
                                    p_scale[r] = sas_exp_from_table(tile_max[r] - T.max(m[r], tile_max[r]),
                                                                    sas_table) / T.float32(INT8_MAX)
                                    # P = 0 for a row with no visible key yet (max still NEG_BIG) and for a
                                    # tile entirely below the SAS threshold (p_scale = 0)
                                    p_inv[r] = T.if_then_else(T.And(tile_max[r] > T.float32(NEG_BIG), p_scale[r] > T.float32(0)),
                                                              T.float32(1) / p_scale[r], T.float32(0))
                                    pv_scale[r] = p_scale[r] * v_scale[b, kvh, kt]
                                    pv_bias[r] = T.float32(-MAGIC) * pv_scale[r]
                                    m[r] = T.max(m[r], tile_max[r])
                                    # a key's t = m - score = (row max sum - sum) * scale + (m - tile max): the
                                    # first term is an exact float difference, so t >= 0 holds exactly
                                    t_offset[r] = m[r] - tile_max[r]
                                    coef[r * 4 + 0] = T.float32(SAS_POLY[0]) * p_inv[r]
                                    coef[r * 4 + 1] = T.float32(SAS_POLY[1]) * p_inv[r]
                                    coef[r * 4 + 2] = T.float32(SAS_POLY[2]) * p_inv[r]
                                    coef[r * 4 + 3] = T.float32(SAS_POLY[3]) * p_inv[r]

                                # ---- P codes (0..127; masked keys get t past the threshold -> 0)
                                for i in T.unroll(BK // 8 * 4):
                                    t_key[i] = T.min(
                                        (tile_max_acc[i % 4 // 2] - T.reinterpret("float32", s_acc[i])) * tile_scale[0]
                                        + t_offset[i % 4 // 2], T.float32(SAS_MAX_INT + 1))
                                if tile_needs_mask(qt, kt, N, M):
                                    for i in T.unroll(BK // 8 * 4):
                                        if masked(row0 + i % 4 // 2 * 8, kt * BK + i // 4 * 8 + t4 * 2 + i % 2, N, M):
                                            t_key[i] = T.float32(SAS_MAX_INT + 1)
                                for i in T.unroll(BK // 8 * 4):
                                    p_code[i] = sas_code_bits(t_key[i], coef, i % 4 // 2, sas_table)
                                for ks in T.unroll(BK // 32):
                                    for a in T.unroll(4):
                                        # a: 0 = row g, keys 0-15 of the step; 1 = row g+8; 2, 3: keys 16-31
                                        p_frag[ks * 4 + a] = pack_codes(
                                            p_code[(ks * 4 + a // 2 * 2) * 4 + a % 2 * 2],
                                            p_code[(ks * 4 + a // 2 * 2) * 4 + a % 2 * 2 + 1],
                                            p_code[(ks * 4 + a // 2 * 2 + 1) * 4 + a % 2 * 2],
                                            p_code[(ks * 4 + a // 2 * 2 + 1) * 4 + a % 2 * 2 + 1])
                                for i in T.unroll(4):
                                    row_sum[i] = 0
                                for ks in T.unroll(BK // 32):
                                    T.evaluate(_mma(p_frag, ks * 4, ones, 0, row_sum, 0))
                                for r in T.unroll(2):
                                    l[r] = l[r] * corr[r] + p_scale[r] * T.Cast("float32", row_sum[r * 2])

                                # ---- O = O * corr + p_scale * v_scale * (P·V), one 8-wide d tile at a time
                                for nt in T.unroll(DTILES):
                                    for i in T.unroll(4):
                                        pv_acc[i] = MAGIC_BITS
                                    for w in T.vectorized(4):
                                        v_vec[w] = vt_tile[(nt * 8 + g) * V_STRIDE + t4 * 4 + w]
                                    for w in T.unroll(4):
                                        v_frag[w] = v_vec[w]
                                    for ks in T.unroll(BK // 32):
                                        T.evaluate(_mma(p_frag, ks * 4, v_frag, ks * 2, pv_acc, 0))
                                    for i in T.unroll(4):
                                        # (MAGIC + PV) * s - MAGIC * s: one FFMA, off by at most 0.75 s (a unit of PV)
                                        o_acc[nt * 4 + i] = o_acc[nt * 4 + i] * corr[i // 2] + (
                                            T.reinterpret("float32", pv_acc[i]) * pv_scale[i // 2] + pv_bias[i // 2])

                            # ---- normalise by the row sum (every lane of the row holds all of it: P·1)
                            for nt in T.unroll(DTILES):
                                for i in T.unroll(4):
                                    if row0 + i // 2 * 8 < N:
                                        out[b, h, row0 + i // 2 * 8, nt * 8 + t4 * 2 + i % 2] = T.Cast(
                                            out_dtype, T.if_then_else(l[i // 2] > T.float32(0),
                                                                      o_acc[nt * 4 + i] / l[i // 2], T.float32(0)))

    return prefill_tc_func
