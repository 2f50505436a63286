"""Variants of decode_cuda.py whose CTAs are dispatched INT8-first or long-splits-first (dev A/B)."""
from pathlib import Path
src = Path("turbotvm/kernels/decode_cuda.py").read_text()

def variant(head, split):
    s = src
    rep = [
        ('mine = T.sblock_alloc_buffer((8,), "int32", scope="local")', 'mine = T.sblock_alloc_buffer((10,), "int32", scope="local")'),
        ('ids = T.sblock_alloc_buffer((9,), "int32", scope="shared")', 'ids = T.sblock_alloc_buffer((10,), "int32", scope="shared")'),
        ("                            mine[0] = T.truncdiv(by, HG * group_size)\n",
         f"                            mine[8] = {head}\n                            mine[9] = {split}\n"
         "                            mine[0] = T.truncdiv(mine[8], HG * group_size)\n"),
        ("mine[1] = T.truncdiv(T.truncmod(by, HG * group_size), group_size)", "mine[1] = T.truncdiv(T.truncmod(mine[8], HG * group_size), group_size)"),
        ("mine[3] = mine[2] * group_size + T.truncmod(by, group_size)", "mine[3] = mine[2] * group_size + T.truncmod(mine[8], group_size)"),
        ("mine[4] = T.min(cta * T.ceildiv", "mine[4] = T.min(mine[9] * T.ceildiv"),
        ("mine[5] = T.min((cta + 1) * T.ceildiv", "mine[5] = T.min((mine[9] + 1) * T.ceildiv"),
        ("mine[6] = T.if_then_else(cta == num_splits", "mine[6] = T.if_then_else(mine[9] == num_splits"),
        ("mine[7] = T.if_then_else(cta == num_splits", "mine[7] = T.if_then_else(mine[9] == num_splits"),
        ("                            for i in T.unroll(8):\n                                ids[i] = mine[i]\n",
         "                            for i in T.unroll(8):\n                                ids[i] = mine[i]\n                            ids[9] = mine[9]\n"),
        ("                        open_tiles: T.let[T.int32] = ids[7]\n",
         "                        open_tiles: T.let[T.int32] = ids[7]\n                        slot: T.let[T.int32] = ids[9]\n"),
        ("o_part[b, hq, cta, tx] = acc[0]", "o_part[b, hq, slot, tx] = acc[0]"),
        ("m_part[b, hq, cta] = st[0]", "m_part[b, hq, slot] = st[0]"),
        ("l_part[b, hq, cta] = st[1]", "l_part[b, hq, slot] = st[1]"),
    ]
    for a, b in rep:
        assert s.count(a) == 1, a
        s = s.replace(a, b)
    return s

LIN = "(by * (num_splits + 1) + cta)"
HBG = "(B * HG * group_size)"
Path("out/dev/decode_cuda_int8first.py").write_text(variant(
    f"T.if_then_else({LIN} < {HBG}, {LIN}, T.truncdiv({LIN} - {HBG}, num_splits))",
    f"T.if_then_else({LIN} < {HBG}, num_splits, T.truncmod({LIN} - {HBG}, num_splits))"))
Path("out/dev/decode_cuda_longfirst.py").write_text(variant(
    f"T.if_then_else({LIN} < num_splits * {HBG}, T.truncdiv({LIN}, num_splits), {LIN} - num_splits * {HBG})",
    f"T.if_then_else({LIN} < num_splits * {HBG}, T.truncmod({LIN}, num_splits), num_splits)"))
