"""Prefill a prompt, compress its KV cache to mixed 2/4-bit, decode one token: all on the CPU kernels."""

import numpy as np
import torch

from turbotvm import TurboAttention, select_head_bits
from turbotvm import reference as ref
from turbotvm.testing import cosine, realistic_qkv


def main():
    rng = np.random.default_rng(0)
    turbo = TurboAttention.build("llvm", head_dims=(128,))
    q, k, v = (torch.from_numpy(x) for x in realistic_qkv(rng, 1, 8, 2, 1024, 1024, 128))
    out = turbo.prefill(q, k, v, causal=True)
    print(f"prefill cos vs exact: {cosine(out, ref.exact_attention(q, k, v, causal=True)):.5f}")
    cache = turbo.compress_kv(k, v, select_head_bits(k, v, 0.5))
    print(f"cache: {cache.nbytes() / 1e6:.2f} MB, {cache.nbytes() / cache.fp16_nbytes():.3f}x fp16, bits per head {cache.head_bits}")
    q_new = torch.from_numpy(realistic_qkv(rng, 1, 8, 2, 1, 1, 128)[0])
    token = turbo.decode(q_new, cache)
    print(f"decode cos vs exact: {cosine(token, ref.exact_attention(q_new, k, v)):.5f}")


if __name__ == "__main__":
    main()
