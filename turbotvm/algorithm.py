"""The numbers that define TurboAttention as turbotvm implements it (docs/algorithm.md).

Kernels and the float64 reference both read these, so a change here changes the algorithm
for both; nothing else in the package hard-codes them.
"""

import math

#: Tokens per FlashQ block: one INT8 scale per (batch, head, 64 tokens) for Q, K and V, the
#: KV tile of the online softmax, and the unit in which the decode buffer is compressed.
QUANT_BLOCK = 64

#: K channel balancing (SmoothQuant-style migration): K channel c is divided by f_c and Q's channel c
#: multiplied by f_c, with f_c = (max_t |K_tc - mean_c|) ** K_BALANCE_EXPONENT; Q·Kᵀ is unchanged. 0.5
#: splits an outlier channel's range evenly between K and Q, so a few wide K channels no longer set
#: the whole block's INT8 scale.
K_BALANCE_EXPONENT = 0.5

#: Symmetric INT8 range used for Q, K, V and P (-127..127; -128 is never produced).
INT8_MAX = 127

#: SAS: e^x for x <= 0 is LUT[n] * poly(-f) with n = floor(-x), f = -x - n.
#: Entries with n > SAS_MAX_INT (x < -(SAS_MAX_INT + 1)) are exactly zero (the sparsity).
SAS_MAX_INT = 9
SAS_LUT = tuple(math.exp(-n) for n in range(SAS_MAX_INT + 1))
#: Cubic for e^y on y in [-1, 0], highest degree first (Horner's rule): minimax in relative error
#: (4.5e-4) under two pins. poly(0) = 1 exactly, so SAS(0) = 1 and an online-softmax state whose max
#: does not move is rescaled by exactly 1: with poly(0) = 0.99941 (the unpinned fit) every such tile
#: shrank the state, weighing a token T tiles back by 0.99941**T (0.74 at 32K tokens).
#: poly(-1) = e^-1 (1 + 2^-21): SAS still decreases across the table's steps, also in float32.
SAS_POLY = (0.1004844986, 0.4613724595, 0.9930083443, 1.0)

#: Head dims with kernels (the tiles assume D a multiple of 32 and at most 128).
SUPPORTED_HEAD_DIMS = (64, 128)

#: Bit widths of the compressed KV cache.
CACHE_BITS = (2, 4)

#: Tokens per stage-2 group: one integer step and zero point per (KV head, group, channel), two
#: groups per 64-token block. Half the block's width per group cuts the 4-bit error by a quarter.
CACHE_GROUP = 32

#: K channels per (KV head, 64-token block) kept at INT8 in the cache: the widest ones, which
#: carry the logits when K has outlier channels (dense-and-sparse). V keeps none.
CACHE_K_OUTLIERS = 4

#: Share of KV heads stored at 2 bits in a mixed-precision cache (lowest gap*std first).
DEFAULT_2BIT_HEAD_SHARE = 0.25


def codes_per_byte(bits: int) -> int:
    return 8 // bits
