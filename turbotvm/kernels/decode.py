"""Decode attention over the compressed cache, split along the sequence (flash-decoding).

``decode_split(D, bits)`` covers one group of KV heads stored at ``bits`` (2 or 4: packed codes,
K's kept channels read as they are, see kv_compress; 8: the INT8 buffer of recent tokens, whose
step/zero arguments are unused placeholders of shape [B, HG, 1, D]). The code tensors may hold more
rows than ``length`` (a cache's spare capacity); only the first ``length`` tokens are read. Tile =
(batch, KV head of the group, query head of its GQA group, split); it writes an unnormalised partial
state (acc, m, l) into slot ``slot_offset + split``. ``decode_merge(D)`` combines the slots with SAS
weights (docs/algorithm.md §5). Same tile math as prefill, with one query row.

Packed groups are computed on the codes, never expanded: expansion is linear (x8 = code * step +
zero, never capped, docs/algorithm.md §2), so per 32-token stage-2 group
q·x8 = Σ (q * step) * code + Σ q * zero (coded channels) + Σ q * kept, and
Σ p * x8 = step * Σ p * code + zero * Σ p, the same integers as expanding first (the CUDA kernel
does the same). Tiles are staged with K transposed and tokens past ``length`` at 0, so every
integer product is a rank-1 update along a contiguous row, which the CPU rule vectorizes.
"""

from tvm import ir, tirx
from tvm.script import tirx as T

from ..algorithm import CACHE_GROUP, CACHE_K_OUTLIERS, INT8_MAX, QUANT_BLOCK, codes_per_byte
from .kv_compress import GROUPS_PER_BLOCK, KEPT_BIAS, unpack_code
from .sas import NEG_BIG, sas_exp

BK = QUANT_BLOCK


def _v_code(codes, b, g, t, d, bits, head_dim):
    """V's INT8 value (bits = 8) or its packed code (2/4 bits, channel-major blocks), as int32."""
    if bits == 8:
        return T.Cast("int32", codes[b, g, t, d])
    return unpack_code(codes, b, g, t, d, bits, head_dim, channel_major=True)


def _whole(buf):
    """The whole of ``buf`` as a read region (step/zero differ in rank between the variants)."""
    return tirx.BufferRegion(buf, [ir.Range.from_min_extent(0, n) for n in buf.shape])


def decode_split(head_dim: int, bits: int):
    D = head_dim
    code_dtype = "int8" if bits == 8 else "uint8"
    per_byte = codes_per_byte(bits) if bits != 8 else 1

    def step_shape(B, HG, NP):
        """Packed groups: one step/zero per (64-token block, stage-2 group, channel)."""
        return (B, HG, NP, D) if bits == 8 else (B, HG, NP, GROUPS_PER_BLOCK, D)

    @T.prim_func(s_tir=True)
    def decode_split_func(q_h: T.handle, q_scale_h: T.handle, heads_h: T.handle,
                          k_codes_h: T.handle, k_step_h: T.handle, k_zero_h: T.handle, k_scale_h: T.handle,
                          v_codes_h: T.handle, v_step_h: T.handle, v_zero_h: T.handle, v_scale_h: T.handle,
                          o_part_h: T.handle, m_part_h: T.handle, l_part_h: T.handle,
                          sm_scale: T.float32, group_size: T.int64, num_splits: T.int64, slot_offset: T.int64,
                          length: T.int64):
        B, H, HG, L, NB, NP, S = T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        KW, VW = T.int64(), T.int64()  # bytes per token row: packed codes (+ K's kept channels)
        q = T.match_buffer(q_h, (B, H, 1, D), "int8")
        q_scale = T.match_buffer(q_scale_h, (B, H, 1), "float32")
        heads = T.match_buffer(heads_h, (HG,), "int32")
        k_codes = T.match_buffer(k_codes_h, (B, HG, L, KW), code_dtype)
        k_step = T.match_buffer(k_step_h, step_shape(B, HG, NP), "uint8")
        k_zero = T.match_buffer(k_zero_h, step_shape(B, HG, NP), "int8")
        k_scale = T.match_buffer(k_scale_h, (B, HG, NB), "float32")
        v_codes = T.match_buffer(v_codes_h, (B, HG, L, VW), code_dtype)
        v_step = T.match_buffer(v_step_h, step_shape(B, HG, NP), "uint8")
        v_zero = T.match_buffer(v_zero_h, step_shape(B, HG, NP), "int8")
        v_scale = T.match_buffer(v_scale_h, (B, HG, NB), "float32")
        o_part = T.match_buffer(o_part_h, (B, H, S, D), "float32")
        m_part = T.match_buffer(m_part_h, (B, H, S), "float32")
        l_part = T.match_buffer(l_part_h, (B, H, S), "float32")
        for b, g, r, s in T.grid(B, HG, group_size, num_splits):
            with T.sblock("tile"):
                vb, vg, vr, vs = T.axis.remap("SSSS", [b, g, r, s])
                T.reads(q[vb, 0:H, 0, 0:D], q_scale[vb, 0:H, 0], heads[0:HG],
                        k_codes[vb, vg, 0:L, 0:KW], _whole(k_step), _whole(k_zero),
                        k_scale[vb, vg, 0:NB], v_codes[vb, vg, 0:L, 0:VW], _whole(v_step),
                        _whole(v_zero), v_scale[vb, vg, 0:NB])
                T.writes(o_part[vb, 0:H, 0:S, 0:D], m_part[vb, 0:H, 0:S], l_part[vb, 0:H, 0:S])
                k_tile_t = T.sblock_alloc_buffer((D, BK), "int8")  # K tile (INT8 or codes), transposed
                v_tile = T.sblock_alloc_buffer((BK, D), "int8")  # V tile (INT8 or codes)
                # packed groups: q' = q * step, Σ q * zero and q of the kept channels per stage-2 group,
                # K's kept bytes, P·codes and Σ P per group
                q_step = T.sblock_alloc_buffer((GROUPS_PER_BLOCK, D), "int32")
                q_zero = T.sblock_alloc_buffer((GROUPS_PER_BLOCK,), "int32")
                q_kept = T.sblock_alloc_buffer((CACHE_K_OUTLIERS,), "int32")
                kept_t = T.sblock_alloc_buffer((CACHE_K_OUTLIERS, BK), "int32")
                p_codes = T.sblock_alloc_buffer((GROUPS_PER_BLOCK, D), "int32")
                p_group_sum = T.sblock_alloc_buffer((GROUPS_PER_BLOCK,), "int32")
                s_int = T.sblock_alloc_buffer((BK,), "int32")
                score = T.sblock_alloc_buffer((BK,), "float32")
                p_code = T.sblock_alloc_buffer((BK,), "int8")
                pv_int = T.sblock_alloc_buffer((D,), "int32")
                acc = T.sblock_alloc_buffer((D,), "float32")
                state = T.sblock_alloc_buffer((5,), "float32")  # m, l, tile_max, corr, p_scale
                p_sum = T.sblock_alloc_buffer((1,), "int32")
                hq = T.Cast("int64", heads[vg]) * group_size + vr
                per_split = T.ceildiv(T.ceildiv(length, BK), num_splits)
                first = T.min(vs * per_split, T.ceildiv(length, BK))
                with T.sblock("init_state"):
                    state[0] = T.float32(NEG_BIG)
                    state[1] = T.float32(0)
                for d in range(D):
                    with T.sblock("init_acc"):
                        vd = T.axis.remap("S", [d])
                        acc[vd] = T.float32(0)
                for kt in T.serial(T.min(first + per_split, T.ceildiv(length, BK)) - first):
                    if bits == 8:
                        for j, d in T.grid(BK, D):
                            with T.sblock("k_load"):
                                vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                                vj, vd = T.axis.remap("SS", [j, d])
                                k_tile_t[vd, vj] = T.if_then_else((first + vkt) * BK + vj < length, k_codes[
                                    vb, vg, T.min((first + vkt) * BK + vj, length - 1), vd], T.int8(0))
                        for j in range(BK):
                            with T.sblock("init_qk"):
                                vj = T.axis.remap("S", [j])
                                s_int[vj] = 0
                        for d, j in T.grid(D, BK):
                            with T.sblock("qk"):
                                vd, vj = T.axis.remap("RS", [d, j])
                                s_int[vj] = s_int[vj] + T.Cast("int32", q[vb, hq, 0, vd]) * T.Cast("int32", k_tile_t[vd, vj])
                    else:
                        # on the codes: q·x8' = Σ (q·step)·code + Σ q·zero (coded channels) + Σ q·kept
                        for gi, d in T.grid(GROUPS_PER_BLOCK, D):
                            with T.sblock("q_step"):
                                vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                                vgi, vd = T.axis.remap("SS", [gi, d])
                                q_step[vgi, vd] = T.Cast("int32", q[vb, hq, 0, vd]) * T.Cast(
                                    "int32", k_step[vb, vg, first + vkt, vgi, vd])
                        for gi, d in T.grid(GROUPS_PER_BLOCK, D):
                            with T.sblock("q_zero"):
                                vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                                vgi, vd = T.axis.remap("SR", [gi, d])
                                with T.init():
                                    q_zero[vgi] = 0
                                q_zero[vgi] = q_zero[vgi] + T.if_then_else(
                                    k_step[vb, vg, first + vkt, vgi, vd] > T.uint8(0),
                                    T.Cast("int32", q[vb, hq, 0, vd]) * T.Cast("int32", k_zero[vb, vg, first + vkt, vgi, vd]), 0)
                        for o, d in T.grid(CACHE_K_OUTLIERS, D):
                            with T.sblock("q_kept"):
                                vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                                vo, vd = T.axis.remap("SR", [o, d])
                                with T.init():
                                    q_kept[vo] = 0
                                q_kept[vo] = q_kept[vo] + T.if_then_else(
                                    T.And(k_step[vb, vg, first + vkt, 0, vd] == T.uint8(0),
                                          T.Cast("int32", k_zero[vb, vg, first + vkt, 0, vd]) == vo),
                                    T.Cast("int32", q[vb, hq, 0, vd]), 0)
                        for j, d in T.grid(BK, D):
                            with T.sblock("k_unpack"):
                                vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                                vj, vd = T.axis.remap("SS", [j, d])
                                k_tile_t[vd, vj] = T.if_then_else((first + vkt) * BK + vj < length, T.Cast("int8", unpack_code(
                                    k_codes, vb, vg, T.min((first + vkt) * BK + vj, length - 1), vd, bits, D,
                                    channel_major=False)), T.int8(0))
                        for o, j in T.grid(CACHE_K_OUTLIERS, BK):
                            with T.sblock("k_kept"):
                                vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                                vo, vj = T.axis.remap("SS", [o, j])
                                kept_t[vo, vj] = T.if_then_else((first + vkt) * BK + vj < length, T.Cast("int32", k_codes[
                                    vb, vg, T.min((first + vkt) * BK + vj, length - 1), D // per_byte + vo]) - KEPT_BIAS, 0)
                        for j in range(BK):
                            with T.sblock("init_qk"):
                                vj = T.axis.remap("S", [j])
                                s_int[vj] = q_zero[vj // CACHE_GROUP]
                        for o, j in T.grid(CACHE_K_OUTLIERS, BK):
                            with T.sblock("qk_kept"):
                                vo, vj = T.axis.remap("RS", [o, j])
                                s_int[vj] = s_int[vj] + q_kept[vo] * kept_t[vo, vj]
                        for gi, d, jj in T.grid(GROUPS_PER_BLOCK, D, CACHE_GROUP):
                            with T.sblock("qk"):
                                vgi, vd, vjj = T.axis.remap("SRS", [gi, d, jj])
                                s_int[vgi * CACHE_GROUP + vjj] = s_int[vgi * CACHE_GROUP + vjj] + q_step[vgi, vd] * T.Cast(
                                    "int32", k_tile_t[vd, vgi * CACHE_GROUP + vjj])
                    for j in range(BK):
                        with T.sblock("score"):
                            vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                            vj = T.axis.remap("S", [j])
                            score[vj] = T.if_then_else(
                                (first + vkt) * BK + vj < length,
                                T.Cast("float32", s_int[vj]) * q_scale[vb, hq, 0] * k_scale[vb, vg, first + vkt] * sm_scale,
                                T.float32(NEG_BIG))
                    for j in range(BK):
                        with T.sblock("tile_max"):
                            vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                            vj = T.axis.remap("R", [j])
                            with T.init():
                                state[2] = T.float32(NEG_BIG)
                            state[2] = T.max(state[2], score[vj])
                    with T.sblock("rescale"):
                        vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                        state[3] = sas_exp(state[0] - T.max(state[0], state[2]))
                        state[4] = sas_exp(state[2] - T.max(state[0], state[2])) / T.float32(INT8_MAX)
                        state[0] = T.max(state[0], state[2])
                    for j in range(BK):
                        with T.sblock("p_quant"):
                            vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                            vj = T.axis.remap("S", [j])
                            p_code[vj] = T.Cast("int8", T.if_then_else(
                                T.And(score[vj] > T.float32(NEG_BIG), state[4] > T.float32(0)),
                                T.min(T.nearbyint(sas_exp(score[vj] - state[0]) / state[4]), T.float32(INT8_MAX)),
                                T.float32(0)))
                    for j in range(BK):
                        with T.sblock("p_sum"):
                            vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                            vj = T.axis.remap("R", [j])
                            with T.init():
                                p_sum[0] = 0
                            p_sum[0] = p_sum[0] + T.Cast("int32", p_code[vj])
                    # in the codes' order: token-major INT8 rows, channel-major packed runs
                    for o, i in T.grid(BK if bits == 8 else D, D if bits == 8 else BK):
                        with T.sblock("v_load"):
                            vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                            vj = T.axis.spatial(BK, o if bits == 8 else i)
                            vd = T.axis.spatial(D, i if bits == 8 else o)
                            v_tile[vj, vd] = T.if_then_else((first + vkt) * BK + vj < length, T.Cast("int8", _v_code(
                                v_codes, vb, vg, T.min((first + vkt) * BK + vj, length - 1), vd, bits, D)), T.int8(0))
                    if bits == 8:
                        for d in range(D):
                            with T.sblock("init_pv"):
                                vd = T.axis.remap("S", [d])
                                pv_int[vd] = 0
                        for j, d in T.grid(BK, D):
                            with T.sblock("pv"):
                                vj, vd = T.axis.remap("RS", [j, d])
                                pv_int[vd] = pv_int[vd] + T.Cast("int32", p_code[vj]) * T.Cast("int32", v_tile[vj, vd])
                    else:
                        # on the codes: Σ_j p·x8' = Σ_groups step·Σ_j p·code + zero·Σ_j p
                        for gi, d in T.grid(GROUPS_PER_BLOCK, D):
                            with T.sblock("init_p_codes"):
                                vgi, vd = T.axis.remap("SS", [gi, d])
                                p_codes[vgi, vd] = 0
                        for gi, jj, d in T.grid(GROUPS_PER_BLOCK, CACHE_GROUP, D):
                            with T.sblock("p_codes"):
                                vgi, vjj, vd = T.axis.remap("SRS", [gi, jj, d])
                                p_codes[vgi, vd] = p_codes[vgi, vd] + T.Cast("int32", p_code[vgi * CACHE_GROUP + vjj]) * T.Cast(
                                    "int32", v_tile[vgi * CACHE_GROUP + vjj, vd])
                        for gi, jj in T.grid(GROUPS_PER_BLOCK, CACHE_GROUP):
                            with T.sblock("p_group_sum"):
                                vgi, vjj = T.axis.remap("SR", [gi, jj])
                                with T.init():
                                    p_group_sum[vgi] = 0
                                p_group_sum[vgi] = p_group_sum[vgi] + T.Cast("int32", p_code[vgi * CACHE_GROUP + vjj])
                        for d in range(D):
                            with T.sblock("pv"):
                                vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                                vd = T.axis.remap("S", [d])
                                pv_int[vd] = (T.Cast("int32", v_step[vb, vg, first + vkt, 0, vd]) * p_codes[0, vd]
                                              + T.Cast("int32", v_zero[vb, vg, first + vkt, 0, vd]) * p_group_sum[0]
                                              + T.Cast("int32", v_step[vb, vg, first + vkt, 1, vd]) * p_codes[1, vd]
                                              + T.Cast("int32", v_zero[vb, vg, first + vkt, 1, vd]) * p_group_sum[1])
                    for d in range(D):
                        with T.sblock("update_acc"):
                            vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                            vd = T.axis.remap("S", [d])
                            acc[vd] = acc[vd] * state[3] + state[4] * v_scale[vb, vg, first + vkt] * T.Cast(
                                "float32", pv_int[vd])
                    with T.sblock("update_sum"):
                        vkt = T.axis.opaque(T.ceildiv(L, BK), kt)
                        state[1] = state[1] * state[3] + state[4] * T.Cast("float32", p_sum[0])
                for d in range(D):
                    with T.sblock("store"):
                        vd = T.axis.remap("S", [d])
                        o_part[vb, hq, slot_offset + vs, vd] = acc[vd]
                with T.sblock("store_state"):
                    m_part[vb, hq, slot_offset + vs] = state[0]
                    l_part[vb, hq, slot_offset + vs] = state[1]

    return decode_split_func


def decode_merge(head_dim: int, out_dtype: str):
    D = head_dim

    @T.prim_func(s_tir=True)
    def decode_merge_func(o_part_h: T.handle, m_part_h: T.handle, l_part_h: T.handle, out_h: T.handle):
        B, H, S = T.int64(), T.int64(), T.int64()
        o_part = T.match_buffer(o_part_h, (B, H, S, D), "float32")
        m_part = T.match_buffer(m_part_h, (B, H, S), "float32")
        l_part = T.match_buffer(l_part_h, (B, H, S), "float32")
        out = T.match_buffer(out_h, (B, H, 1, D), out_dtype)
        for b, h in T.grid(B, H):
            with T.sblock("row"):
                vb, vh = T.axis.remap("SS", [b, h])
                T.reads(o_part[vb, vh, 0:S, 0:D], m_part[vb, vh, 0:S], l_part[vb, vh, 0:S])
                T.writes(out[vb, vh, 0, 0:D])
                m_all = T.sblock_alloc_buffer((1,), "float32")
                l_all = T.sblock_alloc_buffer((1,), "float32")
                acc = T.sblock_alloc_buffer((D,), "float32")
                for s in range(S):
                    with T.sblock("max"):
                        vs = T.axis.remap("R", [s])
                        with T.init():
                            m_all[0] = T.float32(NEG_BIG)
                        m_all[0] = T.max(m_all[0], m_part[vb, vh, vs])
                for s in range(S):
                    with T.sblock("sum"):
                        vs = T.axis.remap("R", [s])
                        with T.init():
                            l_all[0] = T.float32(0)
                        l_all[0] = l_all[0] + sas_exp(m_part[vb, vh, vs] - m_all[0]) * l_part[vb, vh, vs]
                for d in range(D):
                    with T.sblock("init_acc"):
                        vd = T.axis.remap("S", [d])
                        acc[vd] = T.float32(0)
                for s, d in T.grid(S, D):
                    with T.sblock("weighted"):
                        vs, vd = T.axis.remap("RS", [s, d])
                        acc[vd] = acc[vd] + sas_exp(m_part[vb, vh, vs] - m_all[0]) * o_part[vb, vh, vs, vd]
                for d in range(D):
                    with T.sblock("store"):
                        vd = T.axis.remap("S", [d])
                        out[vb, vh, 0, vd] = T.Cast(out_dtype, T.if_then_else(
                            l_all[0] > T.float32(0), acc[vd] / l_all[0], T.float32(0)))

    return decode_merge_func
