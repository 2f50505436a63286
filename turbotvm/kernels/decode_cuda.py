"""Decode over the compressed cache on CUDA: the math of ``decode.py``, mapped by hand onto CTAs.

The results of ``decode_split`` / ``decode_merge`` (checked against turbotvm.reference), written
at thread level like MLC-LLM's decode kernels because decode is bandwidth-bound and the
one-thread-per-tile SIMT rule cannot read the cache at speed.

``decode_step_cuda`` is a whole step for one bit width group in one launch: per query head, CTAs of
128 threads over the splits of the packed 2/4-bit codes (computed on the codes, never expanded) and
one over the INT8 tokens (sink and open block), each quantizing q itself; the head's last CTA to
finish merges their states."""

import re

from tvm.script import tirx as T

from ..algorithm import CACHE_GROUP, CACHE_K_OUTLIERS, INT8_MAX, QUANT_BLOCK
from .cuda_math import fast_reciprocal
from .kv_compress import GROUPS_PER_BLOCK
from .quantize import int8_level
from .sas import NEG_BIG, SAS_TABLE, sas_exp, sas_exp_from_table, sas_table_entry

BK = QUANT_BLOCK
THREADS = 128
WARPS = THREADS // 32


def _dp4a(a, b, c):
    return T.call_pure_extern("int32", "__dp4a", a, b, c)


def _warp_sum(x):
    """Sum of an int32 over the warp: one redux.sync (sm_80+) instead of five shuffles and adds."""
    return T.call_pure_extern("int32", "__reduce_add_sync", T.uint32(0xFFFFFFFF), x)


def _order_key(bits):
    """float32 bits (as int32) <-> an int32 of the same order: negative floats get their magnitude
    bits flipped. Its own inverse."""
    return T.bitwise_xor(bits, T.bitwise_and(T.shift_right(bits, 31), 0x7FFFFFFF))


def _warp_max(x):
    """Max of a float32 over the warp: one redux.sync on order keys (no float redux before sm_100)."""
    return T.reinterpret("float32", _order_key(T.call_pure_extern(
        "int32", "__reduce_max_sync", T.uint32(0xFFFFFFFF), _order_key(T.reinterpret("int32", x)))))


def _warps_max(red, at):
    """Max of the WARPS per-warp values red[at:at + WARPS] (shared memory), as a balanced tree."""
    values = [red[at + w] for w in range(WARPS)]
    while len(values) > 1:
        values = [T.max(values[i], values[i + 1]) for i in range(0, len(values), 2)]
    return values[0]


def _warps_sum(red, at):
    """Sum of the WARPS per-warp values red[at:at + WARPS] (shared memory), in warp order."""
    total = red[at]
    for w in range(1, WARPS):
        total = total + red[at + w]
    return total


def _pack4(b0, b1, b2, b3):
    """Four int32 values in -128..127 packed as the bytes of one word (little end first)."""
    return (T.bitwise_and(b0, 255) | T.shift_left(T.bitwise_and(b1, 255), 8)
            | T.shift_left(T.bitwise_and(b2, 255), 16) | T.shift_left(b3, 24))


def _lane_word(x, stride):
    """x of this lane and of the lanes stride, 2 stride and 3 stride above it, packed as one word."""
    return _pack4(x, *[T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), x, k * stride, 32, 32) for k in (1, 2, 3)])


#: shared memory an SM gives its CTAs (sm_90: 228 KB, 1 KB of it reserved per CTA), and the step
#: kernel's CTAs per SM, which the runtime's split count assumes (one wave)
SMEM_PER_SM = 228 * 1024
SPLIT_CTAS_PER_SM = 8
SPLIT_SMEM_OTHER = 3 * 1024  # the step kernel's shared memory besides its ring, rounded up, + 1 KB reserved
MAX_STAGES = 4


def split_stages(head_dim: int, bits: int) -> int:
    """The deepest ring of tiles (at most MAX_STAGES) that keeps SPLIT_CTAS_PER_SM CTAs on an SM."""
    fit = (SMEM_PER_SM // SPLIT_CTAS_PER_SM - SPLIT_SMEM_OTHER) // split_stage_bytes(head_dim, bits)
    return max(2, min(MAX_STAGES, fit))


def _tile_parts(head_dim: int, bits: int) -> tuple:
    """Bytes of a 64-token tile's K codes (rows end with the kept channels' bytes), of its V codes, and
    of each of K's and V's steps and zeros."""
    words = head_dim * bits // 32  # packed words per row
    return BK * (words + CACHE_K_OUTLIERS // 4) * 4, BK * words * 4, GROUPS_PER_BLOCK * head_dim


def split_stage_bytes(head_dim: int, bits: int) -> int:
    """Bytes of one 64-token tile: K codes, V codes, and K's and V's steps and zeros."""
    k_tile, v_tile, meta = _tile_parts(head_dim, bits)
    return k_tile + v_tile + 4 * meta


def has_copy_engine(arch: str | None) -> bool:
    """Whether a CUDA arch has the copy engine's bulk copies and mbarrier transactions: sm_90 on (an
    unnamed arch counts as sm_90, the arch turbotvm is tuned for)."""
    match = re.fullmatch(r"sm_(\d+)[a-z]?", str(arch)) if arch else None
    return match is None or int(match[1]) >= 90


MERGE_SLOTS_IN_FLIGHT = 16  # merge: slots' O a thread loads before it weighs them


def decode_step_cuda(head_dim: int, bits: int, in_dtype: str, stages: int = 0, copy_engine: bool = True):
    """A whole decode step for the query heads of one bit width group, in one launch.

    CTA (x, by), x < num_splits + 1, by = (batch, head of the group, query head of its KV head):
    x < num_splits walks split x's 64-token tiles of the group's 2/4-bit codes; x = num_splits walks
    the INT8 tokens, the sink block's tiles then the open block's (a few tiles: one CTA, so that a
    head's CTAs fit one wave with as many splits as possible). Each writes its online-softmax state to
    slot x of (o_part, m_part, l_part); the last CTA of a head to finish (an atomic count per head in
    ``counters``, reset by it) merges the head's num_splits + 1 slots into ``out``. Every CTA
    quantizes q itself (balanced by K's factor: quantize_rows 'balanced', bit for bit). One launch
    where three were (q and the INT8 tokens, the packed splits, the merge): each launch and the gap
    after it cost several microseconds, a tenth of a B = 1 step at 32K tokens.

    Packed tiles are computed on the codes without expanding them. Expansion is linear (x8 = code *
    step + zero: compression keeps the top code at or below 127), so per stage-2 group of 32 tokens,
    with q' = q * step per channel:
      Q·Kᵀ: s_j = Σ_d q'_d code_jd + Σ_(d: step > 0) q_d zero_d + Σ_slots q_d(slot) kept_j,slot
            -> __dp4a on code bytes (q' split as hi * 128 + lo), one more for K's kept INT8 channels
            (step 0, zero = slot, byte = x8 + 128 after the packed codes; see kv_compress.py);
      P·V:  pv_d = Σ_groups step_d Σ_j p_j code_jd + zero_d Σ_j p_j -> thread d reads channel d's run of
            64 codes (V is channel-major per block) in 16-byte loads and __dp4a's four tokens at a time
            against P codes stored in the matching byte order: no reduction across threads.
    Expanding the codes to INT8 first costs several times the instructions per tile, and decode has
    the bandwidth to spend none. The code tensors hold whole 64-token blocks, as the cache stores them.

    Packed tiles reach shared memory by the copy engine (``cp.async.bulk``, sm_90): a tile's K codes,
    V codes, steps and zeros are each contiguous, so one thread issues 6 bulk copies per tile,
    completing on the stage's mbarrier, ``stages`` tiles ahead of the CTA's compute (a tuning knob; 0:
    split_stages, the deepest ring that keeps 8 CTAs per SM); the first ones before q's quantization.
    Before sm_90 (``copy_engine`` False) the threads load each tile's codes at its start.

    An INT8 tile: K rows staged in shared memory and V transposed ([D][64 tokens]) in the ring's
    space; Q·Kᵀ: two threads per token, ``__dp4a`` over half the channels each; P·V: thread d does
    ``__dp4a`` of the P words with its V row.
    """
    D = head_dim
    COPY_ENGINE = bool(copy_engine)
    STAGES = (stages or split_stages(head_dim, bits)) if COPY_ENGINE else 1
    per_word = 32 // bits  # codes per int32 word
    WPR = D // per_word  # packed words per K token row (V: per row of a block)
    KEPT_WORDS = CACHE_K_OUTLIERS // 4  # K rows end with the kept channels' bytes (V rows do not)
    SPREAD = 8 // bits  # byte vectors per word: (w >> bits*k) & 0x..03/0F.. holds codes k, k+8/b, ...
    mask = 2**bits - 1
    byte_mask = mask * 0x01010101
    QK_WORDS = WPR // 2  # packed words of a token row each of its two threads reads
    QS_READ = QK_WORDS * SPREAD  # q' words a thread multiplies (hi and lo each)
    QS_WORDS = D // 4  # q' words per stage-2 group
    RUN_WORDS = BK // per_word  # words of one V channel's 64 codes
    RUN_VECS = RUN_WORDS // 4  # ... in 16-byte loads
    P_WORDS = BK // 4  # P codes of the tile, four per word
    # a stage of the ring, in bytes: [K codes | V codes | K step | K zero | V step | V zero]
    K_ROW_WORDS = WPR + KEPT_WORDS
    K_TILE, V_TILE, META = _tile_parts(D, bits)
    V_AT, K_STEP_AT, K_ZERO_AT, V_STEP_AT, V_ZERO_AT = (K_TILE, K_TILE + V_TILE, K_TILE + V_TILE + META,
                                                        K_TILE + V_TILE + 2 * META, K_TILE + V_TILE + 3 * META)
    STAGE = split_stage_bytes(D, bits)
    ROW_VECS = WPR // 4  # 16-byte pieces of a V row
    # INT8 tiles, in the ring's space: K rows [64][DW + 4 words], then V^T [D][64 tokens + 4 bytes]
    DW = D // 4
    K8_STRIDE = DW + 4  # padding: conflict-free 16-byte reads
    V8_STRIDE = BK // 4 + 1  # odd: P·V's threads (one row each) read without bank conflicts
    V8_AT = BK * K8_STRIDE  # word of V^T in the ring
    ROW8_WORDS = BK * DW // THREADS  # INT8 K words, and V words, per thread per tile
    HALF8_WORDS = DW // 2
    RING_WORDS = max(STAGES * STAGE // 4 if COPY_ENGINE else 0, V8_AT + D * V8_STRIDE)
    U = MERGE_SLOTS_IN_FLIGHT
    assert all(x % 16 == 0 for x in (K_TILE, V_TILE, META))  # the copy engine moves 16-byte units
    assert CACHE_K_OUTLIERS % 4 == 0 and GROUPS_PER_BLOCK == 2 and RUN_WORDS % 4 == 0 and WPR % 4 == 0
    assert QS_READ % 4 == 0 and D <= THREADS and THREADS % U == 0 and RING_WORDS >= THREADS

    @T.macro
    def bulk_copy(ring, bar, at, src, size):
        """``size`` bytes from src to the ring at byte ``at``. The access is declared a read: the copy
        engine's writes are ordered by the stage's mbarrier, and a write would make TVM's barrier
        planner add a CTA barrier after every wait."""
        T.ptx.cp.async_.bulk.shared__cluster.global_.mbarrier__complete_tx__bytes(
            ring.access_ptr("r", offset=at // 4, extent=size // 4), src, T.uint32(size), bar)

    @T.macro
    def issue_tile(ring, bars, k_codes, v_codes, k_step, k_zero, v_step, v_zero, b, g, tile, stage):
        """One thread: tile ``tile``'s bytes to ring stage ``stage``, completing on its mbarrier."""
        T.ptx.mbarrier.arrive.expect_tx.shared.b64(bars.ptr_to([stage]), T.uint32(STAGE))
        bulk_copy(ring, bars.ptr_to([stage]), stage * STAGE, k_codes.ptr_to([b, g, tile * BK, 0]), K_TILE)
        bulk_copy(ring, bars.ptr_to([stage]), stage * STAGE + V_AT, v_codes.ptr_to([b, g, tile * BK, 0]), V_TILE)
        bulk_copy(ring, bars.ptr_to([stage]), stage * STAGE + K_STEP_AT, k_step.ptr_to([b, g, tile, 0, 0]), META)
        bulk_copy(ring, bars.ptr_to([stage]), stage * STAGE + K_ZERO_AT, k_zero.ptr_to([b, g, tile, 0, 0]), META)
        bulk_copy(ring, bars.ptr_to([stage]), stage * STAGE + V_STEP_AT, v_step.ptr_to([b, g, tile, 0, 0]), META)
        bulk_copy(ring, bars.ptr_to([stage]), stage * STAGE + V_ZERO_AT, v_zero.ptr_to([b, g, tile, 0, 0]), META)

    # A tile's data, read from the ring's stage, or from global memory without the copy engine:
    def k_word(ring, k_w, b, g, tile, stage, token, col):
        """Word ``col`` of the token's K row."""
        if COPY_ENGINE:
            return ring[(stage * STAGE) // 4 + token * K_ROW_WORDS + col]
        return k_w[b, g, tile * BK + token, col]

    def v_piece(ring_vec, v_vec, b, g, tile, stage, piece, w):
        """Word w of the tile's V codes' 16-byte piece ``piece`` (channel-major: channel d's run is
        pieces d * RUN_VECS ...)."""
        if COPY_ENGINE:
            return ring_vec[(stage * STAGE + V_AT) // 16 + piece, w]
        return v_vec[b, g, tile * BK + piece // ROW_VECS, piece % ROW_VECS, w]

    @T.macro
    def codes_to_registers(ring, ring_vec, k_w, v_vec, k_dst, v_dst, b, g, tile, stage, token, side, tx):
        """The tile's codes to registers: the token's half K row (K rows are 4 bytes longer than a
        multiple of 16: word loads), and for thread d < D channel d's V run in 16-byte loads."""
        for i in T.unroll(QK_WORDS):
            k_dst[i] = k_word(ring, k_w, b, g, tile, stage, token, side * QK_WORDS + i)
        for i in T.unroll(KEPT_WORDS):  # zero on the side == 0 thread
            k_dst[QK_WORDS + i] = T.if_then_else(
                side == 1, T.bitwise_xor(k_word(ring, k_w, b, g, tile, stage, token, WPR + i), -2139062144), 0)
        if tx < D:
            for j in T.unroll(RUN_VECS):
                for w in T.vectorized(4):
                    v_dst[j * 4 + w] = v_piece(ring_vec, v_vec, b, g, tile, stage, tx * RUN_VECS + j, w)

    def meta(at, ring_bytes, tensor, b, g, tile, stage, gi, ch):
        """A tile's step or zero (the one at byte ``at`` of a stage) of group gi, channel ch: from the
        ring, or from global memory without the copy engine."""
        if COPY_ENGINE:
            return ring_bytes[stage * STAGE + at + gi * D + ch]
        return tensor[b, g, tile, gi, ch]

    def qs_channel(u, i):
        """Channel of byte i of q' word u = (packed word u // SPREAD, spread u % SPREAD)."""
        return u // SPREAD * per_word + (8 // bits) * i + u % SPREAD

    def p_byte(t):
        """Byte of token t's P code in p_w: word (t // per_word) * SPREAD + spread, byte i, so that
        p_w[j * SPREAD + k] pairs with (V word j >> bits * k) & byte_mask (tokens j * per_word + k + SPREAD * i)."""
        return 4 * ((t // per_word) * SPREAD + t % SPREAD) + (t % per_word) // SPREAD

    @T.macro
    def softmax_update(st, code, red, sas_table):
        """SAS online softmax over a tile, given this thread's score st[2] and each warp's max in
        red[2 WARPS:3 WARPS]: the tile max (st[3]), the rescale of the running state (st[4]), P's scale
        (st[5], and its inverse st[6]), the new running max (st[0]) and this token's P code (code[0])."""
        st[3] = _warps_max(red, 2 * WARPS)
        # rescale SAS(m - new max) and P's scale SAS(tile max - new max) / 127 from one SAS (st[6] until
        # the inverse): one argument is 0, whose SAS is exactly 1; a product and MUFU.RCP, not IEEE
        # divisions (the code's clamp at 127 absorbs the inverse's 2 ulp)
        st[6] = sas_exp_from_table(-T.fabs(st[0] - st[3]), sas_table)
        st[4] = T.if_then_else(st[3] > st[0], st[6], T.float32(1))
        st[5] = T.if_then_else(st[3] > st[0], T.float32(1), st[6]) * T.float32(1.0 / INT8_MAX)
        st[0] = T.max(st[0], st[3])
        st[6] = T.if_then_else(st[5] > T.float32(0), fast_reciprocal(st[5]), T.float32(0))
        code[0] = T.if_then_else(
            T.And(st[2] > T.float32(NEG_BIG), st[5] > T.float32(0)),
            T.Cast("int32", T.min(T.nearbyint(sas_exp_from_table(st[2] - st[0], sas_table) * st[6]),
                                  T.float32(INT8_MAX))),
            0)

    def ldcg(buffer, *index):
        """A load through L2 only: states other CTAs wrote (L1 is not coherent across SMs)."""
        return T.call_pure_extern("float32", "__ldcg", T.address_of(buffer[index]))

    @T.prim_func(s_tir=True)
    def decode_step_func(q_h: T.handle, k_factor_h: T.handle, heads_h: T.handle,
                         k_codes_h: T.handle, k_step_h: T.handle, k_zero_h: T.handle, k_scale_h: T.handle,
                         v_codes_h: T.handle, v_step_h: T.handle, v_zero_h: T.handle, v_scale_h: T.handle,
                         sink_k_h: T.handle, sink_k_scale_h: T.handle, sink_v_h: T.handle, sink_v_scale_h: T.handle,
                         open_k_h: T.handle, open_k_scale_h: T.handle, open_v_h: T.handle, open_v_scale_h: T.handle,
                         o_part_h: T.handle, m_part_h: T.handle, l_part_h: T.handle, counters_h: T.handle,
                         out_h: T.handle, sm_scale: T.float32, group_size: T.int32, num_splits: T.int32,
                         length: T.int32, sink_len: T.int32, open_len: T.int32):
        B, H, HKV, HG, L, NB, NP = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        LS, NS, LO, NO, SLOTS = T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        q = T.match_buffer(q_h, (B, H, 1, D), in_dtype)
        k_factor = T.match_buffer(k_factor_h, (B, HKV, D), "float32")
        heads = T.match_buffer(heads_h, (HG,), "int32")
        k_codes = T.match_buffer(k_codes_h, (B, HG, L, (WPR + KEPT_WORDS) * 4), "uint8")
        k_step = T.match_buffer(k_step_h, (B, HG, NP, GROUPS_PER_BLOCK, D), "uint8")
        k_zero = T.match_buffer(k_zero_h, (B, HG, NP, GROUPS_PER_BLOCK, D), "int8")
        k_scale = T.match_buffer(k_scale_h, (B, HG, NB), "float32")
        v_codes = T.match_buffer(v_codes_h, (B, HG, L, WPR * 4), "uint8")
        v_step = T.match_buffer(v_step_h, (B, HG, NP, GROUPS_PER_BLOCK, D), "uint8")
        v_zero = T.match_buffer(v_zero_h, (B, HG, NP, GROUPS_PER_BLOCK, D), "int8")
        v_scale = T.match_buffer(v_scale_h, (B, HG, NB), "float32")
        sink_k = T.match_buffer(sink_k_h, (B, HKV, LS, D), "int8")
        sink_k_scale = T.match_buffer(sink_k_scale_h, (B, HKV, NS), "float32")
        sink_v = T.match_buffer(sink_v_h, (B, HKV, LS, D), "int8")
        sink_v_scale = T.match_buffer(sink_v_scale_h, (B, HKV, NS), "float32")
        open_k = T.match_buffer(open_k_h, (B, HKV, LO, D), "int8")
        open_k_scale = T.match_buffer(open_k_scale_h, (B, HKV, NO), "float32")
        open_v = T.match_buffer(open_v_h, (B, HKV, LO, D), "int8")
        open_v_scale = T.match_buffer(open_v_scale_h, (B, HKV, NO), "float32")
        o_part = T.match_buffer(o_part_h, (B, H, SLOTS, D), "float32")
        m_part = T.match_buffer(m_part_h, (B, H, SLOTS), "float32")
        l_part = T.match_buffer(l_part_h, (B, H, SLOTS), "float32")
        counters = T.match_buffer(counters_h, (B, H), "int32")
        out = T.match_buffer(out_h, (B, H, 1, D), in_dtype)
        k_w = T.decl_buffer((B, HG, L, WPR + KEPT_WORDS), "int32", data=k_codes.data)
        # V rows as 16-byte pieces: a constant innermost extent makes each load one vector access
        v_vec = T.decl_buffer((B, HG, L, ROW_VECS, 4), "int32", data=v_codes.data)
        sink_kw = T.decl_buffer((B, HKV, LS, DW), "int32", data=sink_k.data)
        sink_vw = T.decl_buffer((B, HKV, LS, DW), "int32", data=sink_v.data)
        open_kw = T.decl_buffer((B, HKV, LO, DW), "int32", data=open_k.data)
        open_vw = T.decl_buffer((B, HKV, LO, DW), "int32", data=open_v.data)
        for cta in T.thread_binding(num_splits + 1, thread="blockIdx.x"):
            for by in T.thread_binding(B * HG * group_size, thread="blockIdx.y"):
                for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                    # registers for SPLIT_CTAS_PER_SM CTAs per SM (at most 64), as the split count assumes
                    T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", SPLIT_CTAS_PER_SM)
                    with T.sblock("decode_step"):
                        T.reads(q[0:B, 0:H, 0, 0:D], k_factor[0:B, 0:HKV, 0:D], heads[0:HG],
                                k_w[0:B, 0:HG, 0:L, 0:K_ROW_WORDS], k_step[0:B, 0:HG, 0:NP, 0:GROUPS_PER_BLOCK, 0:D],
                                k_zero[0:B, 0:HG, 0:NP, 0:GROUPS_PER_BLOCK, 0:D], k_scale[0:B, 0:HG, 0:NB],
                                v_vec[0:B, 0:HG, 0:L, 0:ROW_VECS, 0:4], v_step[0:B, 0:HG, 0:NP, 0:GROUPS_PER_BLOCK, 0:D],
                                v_zero[0:B, 0:HG, 0:NP, 0:GROUPS_PER_BLOCK, 0:D], v_scale[0:B, 0:HG, 0:NB],
                                sink_kw[0:B, 0:HKV, 0:LS, 0:DW], sink_k_scale[0:B, 0:HKV, 0:NS],
                                sink_vw[0:B, 0:HKV, 0:LS, 0:DW], sink_v_scale[0:B, 0:HKV, 0:NS],
                                open_kw[0:B, 0:HKV, 0:LO, 0:DW], open_k_scale[0:B, 0:HKV, 0:NO],
                                open_vw[0:B, 0:HKV, 0:LO, 0:DW], open_v_scale[0:B, 0:HKV, 0:NO])
                        T.writes(o_part[0:B, 0:H, 0:SLOTS, 0:D], m_part[0:B, 0:H, 0:SLOTS], l_part[0:B, 0:H, 0:SLOTS],
                                 counters[0:B, 0:H], out[0:B, 0:H, 0, 0:D])
                        # the ring of tiles the copy engine fills, one mbarrier per stage; an INT8 CTA
                        # stages its K rows and V^T there. Views: 16-byte pieces (V runs), bytes
                        ring = T.sblock_alloc_buffer((RING_WORDS,), "int32", scope="shared", align=128)
                        ring_vec = T.decl_buffer((RING_WORDS // 4, 4), "int32", data=ring.data, scope="shared")
                        ring_u8 = T.decl_buffer((RING_WORDS * 4,), "uint8", data=ring.data, scope="shared")
                        ring_i8 = T.decl_buffer((RING_WORDS * 4,), "int8", data=ring.data, scope="shared")
                        ring_f32 = T.decl_buffer((RING_WORDS,), "float32", data=ring.data, scope="shared")
                        bars = T.sblock_alloc_buffer((STAGES,), "uint64", scope="shared", align=8)
                        q_sh = T.sblock_alloc_buffer((D,), "int32", scope="shared")  # q's INT8 codes
                        q_words = T.sblock_alloc_buffer((DW,), "int32", scope="shared")  # ... four per word
                        qs_lo = T.sblock_alloc_buffer((GROUPS_PER_BLOCK * QS_WORDS,), "int32", scope="shared")
                        qs_hi = T.sblock_alloc_buffer((GROUPS_PER_BLOCK * QS_WORDS,), "int32", scope="shared")
                        q_kept = T.sblock_alloc_buffer((CACHE_K_OUTLIERS,), "int32", scope="shared")
                        p_w = T.sblock_alloc_buffer((P_WORDS,), "int32", scope="shared")
                        # views: q' and P words in 16-byte pieces, P codes as bytes
                        qs_lo_vec = T.decl_buffer((GROUPS_PER_BLOCK * QS_WORDS // 4, 4), "int32", data=qs_lo.data,
                                                  scope="shared")
                        qs_hi_vec = T.decl_buffer((GROUPS_PER_BLOCK * QS_WORDS // 4, 4), "int32", data=qs_hi.data,
                                                  scope="shared")
                        p_vec = T.decl_buffer((P_WORDS // 4, 4), "int32", data=p_w.data, scope="shared")
                        p_bytes = T.decl_buffer((BK,), "int8", data=p_w.data, scope="shared")
                        # SAS's integer part as a table (a select chain of 10 compares was ~60 instructions a tile)
                        sas_table = T.sblock_alloc_buffer((len(SAS_TABLE),), "float32", scope="shared")
                        # per warp: Σ q·zero of group 0 and of group 1, tile max, P sum
                        red = T.sblock_alloc_buffer((4 * WARPS,), "float32", scope="shared")
                        k_reg = T.sblock_alloc_buffer((QK_WORDS + KEPT_WORDS,), "int32", scope="local")
                        v_reg = T.sblock_alloc_buffer((RUN_WORDS,), "int32", scope="local")
                        qs_h = T.sblock_alloc_buffer((QS_READ,), "int32", scope="local")
                        qs_l = T.sblock_alloc_buffer((QS_READ,), "int32", scope="local")
                        p_reg = T.sblock_alloc_buffer((P_WORDS,), "int32", scope="local")
                        qsw = T.sblock_alloc_buffer((2,), "int32", scope="local")
                        s_acc = T.sblock_alloc_buffer((2,), "int32", scope="local")  # hi, lo
                        q_zero = T.sblock_alloc_buffer((GROUPS_PER_BLOCK,), "int32", scope="local")  # Σ q·zero
                        pv = T.sblock_alloc_buffer((GROUPS_PER_BLOCK,), "int32", scope="local")
                        k8_reg = T.sblock_alloc_buffer((ROW8_WORDS,), "int32", scope="local")
                        v8_reg = T.sblock_alloc_buffer((ROW8_WORDS,), "int32", scope="local")
                        q_frag = T.sblock_alloc_buffer((HALF8_WORDS,), "int32", scope="local")
                        k_vec = T.sblock_alloc_buffer((HALF8_WORDS,), "int32", scope="local")
                        v8_vec = T.sblock_alloc_buffer((BK // 4,), "int32", scope="local")
                        slot_o = T.sblock_alloc_buffer((U,), "float32", scope="local")
                        acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
                        # m, l, score, tile max, rescale, P scale, 1 / P scale, Σ q·zero (x2), P sum (x2),
                        # q' (then q's absmax), q's scale
                        st = T.sblock_alloc_buffer((13,), "float32", scope="local")
                        code = T.sblock_alloc_buffer((1,), "int32", scope="local")
                        kept_slot = T.sblock_alloc_buffer((1,), "int32", scope="local")
                        arrived = T.sblock_alloc_buffer((1,), "int32", scope="local")
                        mine = T.sblock_alloc_buffer((8,), "int32", scope="local")  # thread 0: ids, below

                        # batch, group head, KV head, query head, tile range, INT8 tiles of this CTA,
                        # through shared memory (as expressions of runtime sizes ptxas would redo their
                        # divisions at every use); thread 0 also starts the first tiles' copies
                        ids = T.sblock_alloc_buffer((9,), "int32", scope="shared")
                        if tx == 0:  # in registers first: the planner would put barriers between shared stores and loads
                            mine[0] = T.truncdiv(by, HG * group_size)
                            mine[1] = T.truncdiv(T.truncmod(by, HG * group_size), group_size)
                            mine[2] = heads[mine[1]]
                            mine[3] = mine[2] * group_size + T.truncmod(by, group_size)
                            mine[4] = T.min(cta * T.ceildiv(T.ceildiv(length, BK), num_splits), T.ceildiv(length, BK))
                            mine[5] = T.min((cta + 1) * T.ceildiv(T.ceildiv(length, BK), num_splits),
                                            T.ceildiv(length, BK))
                            # the INT8 CTA's tiles of the sink and of the open block (a split CTA: none)
                            mine[6] = T.if_then_else(cta == num_splits, T.ceildiv(sink_len, BK), 0)
                            mine[7] = T.if_then_else(cta == num_splits, T.ceildiv(open_len, BK), 0)
                            for i in T.unroll(8):
                                ids[i] = mine[i]
                            if COPY_ENGINE:
                                for i in T.unroll(STAGES):
                                    T.ptx.mbarrier.init.shared.b64(bars.ptr_to([i]), T.uint32(1))
                                T.ptx.fence.mbarrier_init.release.cluster()
                                for i in T.unroll(STAGES):
                                    if mine[4] + i < mine[5]:  # (an INT8 CTA's span is empty)
                                        issue_tile(ring, bars, k_codes, v_codes, k_step, k_zero, v_step, v_zero,
                                                   mine[0], mine[1], mine[4] + i, i)
                        if tx < len(SAS_TABLE):  # ordered before its first read by the barriers below
                            sas_table[tx] = sas_table_entry(tx)
                        T.tvm_storage_sync("shared")
                        b: T.let[T.int32] = ids[0]
                        g: T.let[T.int32] = ids[1]
                        kvh: T.let[T.int32] = ids[2]
                        hq: T.let[T.int32] = ids[3]
                        first: T.let[T.int32] = ids[4]
                        last: T.let[T.int32] = ids[5]
                        sink_tiles: T.let[T.int32] = ids[6]
                        open_tiles: T.let[T.int32] = ids[7]
                        token: T.let[T.int32] = tx // 2  # Q·Kᵀ: two threads per token
                        side: T.let[T.int32] = tx % 2
                        grp: T.let[T.int32] = tx // (2 * CACHE_GROUP)  # the token's stage-2 group

                        # ---- q' = q · K's factor (channel tx), to INT8 by the absmax over its channels
                        st[11] = T.if_then_else(tx < D, T.Cast("float32", q[b, hq, 0, tx % D]) * k_factor[b, kvh, tx % D],
                                                T.float32(0))
                        st[12] = T.cuda.warp_reduce(T.abs(st[11]), "max", 32)
                        if tx % 32 == 0:
                            red[tx // 32] = st[12]
                        T.tvm_storage_sync("shared")
                        st[12] = _warps_max(red, 0)
                        st[12] = T.Select(st[12] > T.float32(0), st[12], T.float32(1))
                        code[0] = T.Cast("int32", int8_level(st[11], T.float32(INT8_MAX) / st[12]))
                        st[12] = st[12] / T.float32(INT8_MAX)
                        # channels 4j..4j+3 sit on lanes 4j..4j+3: gather one word
                        q_word_of_lane: T.let[T.int32] = _lane_word(code[0], 1)
                        if tx < D:
                            q_sh[tx] = code[0]
                            if tx % 4 == 0:
                                q_words[tx // 4] = q_word_of_lane
                        st[0] = T.float32(NEG_BIG)
                        st[1] = T.float32(0)
                        acc[0] = T.float32(0)
                        T.tvm_storage_sync("shared")
                        for i in T.unroll(HALF8_WORDS):
                            q_frag[i] = q_words[side * HALF8_WORDS + i]

                        # ======== split `cta` of the packed 2/4-bit tokens (an INT8 CTA has no tiles)
                        for kt in T.serial(last - first):
                            T.tvm_storage_sync("shared")
                            tile: T.let[T.int32] = first + kt
                            stage: T.let[T.int32] = kt % STAGES
                            if COPY_ENGINE:
                                # every thread is done with tile kt - 1: its stage takes tile kt - 1 + STAGES
                                if tx == 0 and kt > 0 and kt - 1 + STAGES < last - first:
                                    issue_tile(ring, bars, k_codes, v_codes, k_step, k_zero, v_step, v_zero, b, g,
                                               first + kt - 1 + STAGES, (kt - 1) % STAGES)
                                T.cuda.mbarrier_wait(bars.ptr_to([stage]), (kt // STAGES) % 2)
                            codes_to_registers(ring, ring_vec, k_w, v_vec, k_reg, v_reg, b, g, tile, stage, token,
                                               side, tx)
                            # ---- q' = q * step (0 on kept channels) as hi * 128 + lo bytes, per group
                            if tx < GROUPS_PER_BLOCK * QS_WORDS:
                                qsw[0] = 0
                                qsw[1] = 0
                                for i in T.unroll(4):
                                    code[0] = q_sh[qs_channel(tx % QS_WORDS, i)] * T.Cast("int32", meta(
                                        K_STEP_AT, ring_u8, k_step, b, g, tile, stage, tx // QS_WORDS,
                                        qs_channel(tx % QS_WORDS, i)))
                                    qsw[0] = qsw[0] | T.shift_left(T.bitwise_and(code[0], 127), 8 * i)
                                    qsw[1] = qsw[1] | T.shift_left(T.bitwise_and(T.shift_right(code[0], 7), 255),
                                                                   8 * i)
                                qs_lo[tx] = qsw[0]
                                qs_hi[tx] = qsw[1]
                            # Σ q·zero over coded channels, per group; kept channels hand q to their slot
                            q_zero[0] = 0
                            q_zero[1] = 0
                            if tx < D:
                                for gi in T.unroll(GROUPS_PER_BLOCK):
                                    q_zero[gi] = T.if_then_else(
                                        meta(K_STEP_AT, ring_u8, k_step, b, g, tile, stage, gi, tx) > T.uint8(0),
                                        q_sh[tx] * T.Cast("int32",
                                                          meta(K_ZERO_AT, ring_i8, k_zero, b, g, tile, stage, gi, tx)),
                                        0)
                                # a kept channel's slot (masked into range: a corrupt cache cannot write past
                                # q_kept), through a register: a branch may not test shared memory here
                                kept_slot[0] = T.if_then_else(
                                    meta(K_STEP_AT, ring_u8, k_step, b, g, tile, stage, 0, tx) == T.uint8(0),
                                    T.bitwise_and(
                                        T.Cast("int32", meta(K_ZERO_AT, ring_i8, k_zero, b, g, tile, stage, 0, tx)),
                                        CACHE_K_OUTLIERS - 1),
                                    -1)
                                if kept_slot[0] >= 0:
                                    q_kept[kept_slot[0]] = q_sh[tx]
                            for gi in T.unroll(GROUPS_PER_BLOCK):
                                q_zero[gi] = _warp_sum(q_zero[gi])
                                if tx % 32 == 0:
                                    red[gi * WARPS + tx // 32] = T.Cast("float32", q_zero[gi])
                            T.tvm_storage_sync("shared")

                            # ---- Q·Kᵀ on the packed codes; the token's two threads add their halves
                            for j in T.unroll(QS_READ // 4):
                                for w in T.vectorized(4):
                                    qs_h[j * 4 + w] = qs_hi_vec[(grp * QS_WORDS + side * QS_READ) // 4 + j, w]
                                for w in T.vectorized(4):
                                    qs_l[j * 4 + w] = qs_lo_vec[(grp * QS_WORDS + side * QS_READ) // 4 + j, w]
                            s_acc[0] = 0
                            s_acc[1] = 0
                            for i in T.unroll(QK_WORDS):
                                for k in T.unroll(SPREAD):
                                    s_acc[0] = _dp4a(qs_h[i * SPREAD + k],
                                                     T.bitwise_and(T.shift_right(k_reg[i], bits * k), byte_mask),
                                                     s_acc[0])
                                    s_acc[1] = _dp4a(qs_l[i * SPREAD + k],
                                                     T.bitwise_and(T.shift_right(k_reg[i], bits * k), byte_mask),
                                                     s_acc[1])
                            s_acc[0] = s_acc[0] * 128 + s_acc[1]
                            for i in T.unroll(KEPT_WORDS):  # zero on the side == 0 thread
                                s_acc[0] = _dp4a(_pack4(*[q_kept[4 * i + c] for c in range(4)]),
                                                 k_reg[QK_WORDS + i], s_acc[0])
                            s_acc[0] = s_acc[0] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), s_acc[0], 1, 32, 32)
                            st[7] = T.if_then_else(grp == 0, _warps_sum(red, 0), _warps_sum(red, WARPS))
                            st[2] = T.if_then_else(tile * BK + token < length,
                                                   (T.Cast("float32", s_acc[0]) + st[7]) * st[12]
                                                   * k_scale[b, g, tile] * sm_scale, T.float32(NEG_BIG))
                            st[3] = _warp_max(st[2])
                            if tx % 32 == 0:
                                red[2 * WARPS + tx // 32] = st[3]
                            T.tvm_storage_sync("shared")

                            # ---- SAS online softmax over the tile; P codes to shared memory (P·V's byte order)
                            softmax_update(st, code, red, sas_table)
                            if side == 0:
                                p_bytes[p_byte(token)] = T.Cast("int8", code[0])
                            code[0] = _warp_sum(T.if_then_else(side == 0, code[0], 0))
                            if tx % 32 == 0:
                                red[3 * WARPS + tx // 32] = T.Cast("float32", code[0])
                            T.tvm_storage_sync("shared")

                            # ---- P·V: thread d, channel d's 64 codes, four tokens per __dp4a
                            if tx < D:
                                for j in T.unroll(P_WORDS // 4):
                                    for w in T.vectorized(4):
                                        p_reg[j * 4 + w] = p_vec[j, w]
                                pv[0] = 0
                                pv[1] = 0
                                for j in T.unroll(RUN_WORDS):
                                    for k in T.unroll(SPREAD):
                                        pv[j // (RUN_WORDS // 2)] = _dp4a(
                                            p_reg[j * SPREAD + k],
                                            T.bitwise_and(T.shift_right(v_reg[j], bits * k), byte_mask),
                                            pv[j // (RUN_WORDS // 2)])
                                # P sums: warps 0-1 hold the tokens of group 0, warps 2-3 those of group 1
                                st[9] = red[3 * WARPS] + red[3 * WARPS + 1]
                                st[10] = red[3 * WARPS + 2] + red[3 * WARPS + 3]
                                st[7] = T.float32(0)
                                for gi in T.unroll(GROUPS_PER_BLOCK):
                                    st[7] = st[7] + T.Cast("float32", pv[gi] * T.Cast(
                                        "int32", meta(V_STEP_AT, ring_u8, v_step, b, g, tile, stage, gi, tx))) + T.Cast(
                                        "float32", meta(V_ZERO_AT, ring_i8, v_zero, b, g, tile, stage, gi, tx)) \
                                        * st[9 + gi]
                                acc[0] = acc[0] * st[4] + st[5] * v_scale[b, g, tile] * st[7]
                                st[1] = st[1] * st[4] + st[5] * (st[9] + st[10])

                        @T.inline
                        def int8_tile(k_w8, v_w8, k_scale8, v_scale8, kt, length):
                            """INT8 tile kt of a region (sink or open block) into the running state, on
                            the step's registers and shared buffers (inline: it sees them by name, as a
                            loop body would). One loop per region, not one over both choosing per tile:
                            that choice cost registers, and the 2-bit kernel spilled under the cap."""
                            T.tvm_storage_sync("shared")
                            # ---- K and V rows as words to registers (tokens past ``length`` read as 0),
                            # all loads issued together, so the CTA waits for global memory once; then K
                            # rows as they are (4 codes per word) and V transposed to [D][64 tokens]
                            for w in T.unroll(ROW8_WORDS):
                                row: T.let[T.int32] = kt * BK + (w * THREADS + tx) // DW
                                k8_reg[w] = T.if_then_else(row < length, k_w8[b, kvh, row, tx % DW], 0)
                                v8_reg[w] = T.if_then_else(row < length, v_w8[b, kvh, row, tx % DW], 0)
                            for w in T.unroll(ROW8_WORDS):
                                ring[(w * THREADS + tx) // DW * K8_STRIDE + tx % DW] = k8_reg[w]
                                for j in T.unroll(4):  # byte j of the word: channel 4 * (tx % DW) + j
                                    ring_i8[(V8_AT + (4 * (tx % DW) + j) * V8_STRIDE) * 4
                                            + (w * THREADS + tx) // DW] = T.Cast("int8", T.shift_right(v8_reg[w], 8 * j))
                            T.tvm_storage_sync("shared")

                            # ---- score of token tx // 2 (both threads of the pair hold it)
                            s_acc[0] = 0
                            for i4 in T.unroll(HALF8_WORDS // 4):
                                for w in T.vectorized(4):
                                    k_vec[i4 * 4 + w] = ring[token * K8_STRIDE + side * HALF8_WORDS + i4 * 4 + w]
                            for i in T.unroll(HALF8_WORDS):
                                s_acc[0] = _dp4a(q_frag[i], k_vec[i], s_acc[0])
                            s_acc[0] = s_acc[0] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), s_acc[0], 1, 32, 32)
                            st[2] = T.if_then_else(
                                kt * BK + token < length,
                                T.Cast("float32", s_acc[0]) * st[12] * k_scale8[b, kvh, kt] * sm_scale,
                                T.float32(NEG_BIG))
                            st[3] = T.cuda.warp_reduce(st[2], "max", 32)
                            if tx % 32 == 0:
                                red[2 * WARPS + tx // 32] = st[3]
                            T.tvm_storage_sync("shared")
                            softmax_update(st, code, red, sas_table)
                            # tokens 4j..4j+3 sit on lanes 8j, +2, +4, +6: gather and store one word
                            p_word_of_lane: T.let[T.int32] = _lane_word(code[0], 2)
                            if tx % 8 == 0:
                                p_w[tx // 8] = p_word_of_lane
                            T.tvm_storage_sync("shared")

                            # ---- P·V for channel tx, P sum from the same words
                            pv[0] = 0
                            pv[1] = 0
                            if tx < D:
                                for i in T.unroll(BK // 4):
                                    v8_vec[i] = ring[V8_AT + tx * V8_STRIDE + i]
                                for i in T.unroll(BK // 4):
                                    pv[0] = _dp4a(p_w[i], v8_vec[i], pv[0])
                                    pv[1] = _dp4a(p_w[i], 0x01010101, pv[1])
                                acc[0] = acc[0] * st[4] + st[5] * v_scale8[b, kvh, kt] * T.Cast("float32", pv[0])
                                st[1] = st[1] * st[4] + st[5] * T.Cast("float32", pv[1])

                        # ======== the INT8 sink block's tiles, then the open block's (cta == num_splits);
                        # a split CTA has none. Loops, not branches: TVM plans barriers in loops
                        for kt in T.serial(sink_tiles):
                            int8_tile(sink_kw, sink_vw, sink_k_scale, sink_v_scale, kt, sink_len)
                        for kt in T.serial(open_tiles):
                            int8_tile(open_kw, open_vw, open_k_scale, open_v_scale, kt, open_len)

                        # ======== this CTA's state to slot `cta`; the head's last CTA merges every slot
                        if tx < D:
                            o_part[b, hq, cta, tx] = acc[0]
                        if tx == 0:
                            m_part[b, hq, cta] = st[0]
                            l_part[b, hq, cta] = st[1]
                        T.evaluate(T.call_extern("void", "__threadfence"))  # the state, visible GPU-wide ...
                        T.tvm_storage_sync("shared")  # ... from every thread, before the count says so
                        if tx == 0:
                            ids[8] = T.call_extern("int32", "atomicAdd", T.address_of(counters[b, hq]), 1)
                        T.tvm_storage_sync("shared")
                        arrived[0] = ids[8]  # through a register: a branch may not test shared memory here
                        # the merge, by the last CTA: a loop of 0 or 1 rounds (TVM plans barriers in loops,
                        # not in branches)
                        for _last in T.serial(T.if_then_else(arrived[0] == num_splits, 1, 0)):
                            T.evaluate(T.call_extern("void", "__threadfence"))
                            # ---- the max over the slots: strided over the CTA, then across warps
                            st[0] = T.float32(NEG_BIG)
                            for i in T.serial(T.ceildiv(num_splits + 1, THREADS)):
                                if i * THREADS + tx < num_splits + 1:
                                    st[0] = T.max(st[0], ldcg(m_part, b, hq, i * THREADS + tx))
                            st[0] = _warp_max(st[0])
                            if tx % 32 == 0:
                                red[2 * WARPS + tx // 32] = st[0]
                            T.tvm_storage_sync("shared")
                            st[0] = _warps_max(red, 2 * WARPS)
                            # ---- THREADS slots at a time: thread t weighs slot t (weight to shared
                            # memory, weighted l to its sum), then thread d sums channel d's O over them
                            st[1] = T.float32(0)
                            acc[0] = T.float32(0)
                            for i in T.serial(T.ceildiv(num_splits + 1, THREADS)):
                                T.tvm_storage_sync("shared")
                                st[2] = T.if_then_else(i * THREADS + tx < num_splits + 1,
                                                       ldcg(m_part, b, hq, i * THREADS + tx), T.float32(NEG_BIG))
                                st[3] = T.if_then_else(i * THREADS + tx < num_splits + 1, sas_exp(st[2] - st[0]),
                                                       T.float32(0))
                                ring_f32[tx] = st[3]
                                st[1] = st[1] + T.if_then_else(i * THREADS + tx < num_splits + 1,
                                                               st[3] * ldcg(l_part, b, hq, i * THREADS + tx),
                                                               T.float32(0))
                                T.tvm_storage_sync("shared")
                                if tx < D:
                                    for j in T.serial(T.ceildiv(T.min(THREADS, num_splits + 1 - i * THREADS), U)):
                                        for u in T.unroll(U):
                                            slot_o[u] = T.if_then_else(
                                                i * THREADS + j * U + u < num_splits + 1,
                                                ldcg(o_part, b, hq, i * THREADS + j * U + u, tx), T.float32(0))
                                        for u in T.unroll(U):
                                            acc[0] = acc[0] + ring_f32[j * U + u] * slot_o[u]
                            st[1] = T.cuda.warp_reduce(st[1], "sum", 32)
                            if tx % 32 == 0:
                                red[3 * WARPS + tx // 32] = st[1]
                            T.tvm_storage_sync("shared")
                            st[1] = _warps_sum(red, 3 * WARPS)
                            if tx < D:
                                out[b, hq, 0, tx] = T.Cast(in_dtype, T.if_then_else(
                                    st[1] > T.float32(0), acc[0] / st[1], T.float32(0)))
                            if tx == 0:
                                counters[b, hq] = 0  # for the next step

    return decode_step_func
