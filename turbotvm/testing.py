"""Inputs, metrics and checks shared by the tests, the demo and the benchmarks."""

from __future__ import annotations

import numpy as np
import torch

from . import reference as ref
from .algorithm import CACHE_K_OUTLIERS, QUANT_BLOCK
from .kernel_set import decompress_name


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def max_abs_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def random_qkv(rng, batch, heads, kv_heads, q_len, kv_len, head_dim, dtype="float32"):
    q = rng.standard_normal((batch, heads, q_len, head_dim))
    k = rng.standard_normal((batch, kv_heads, kv_len, head_dim))
    v = rng.standard_normal((batch, kv_heads, kv_len, head_dim))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def realistic_qkv(rng, batch, heads, kv_heads, q_len, kv_len, head_dim, outlier_channels=4, dtype="float32"):
    """LLM-like activations: a few K channels x20 with an offset, per-head scales, heavy-tailed V.

    Real K caches have a handful of large-magnitude channels (KIVI, SageAttention observations) and
    heads whose ranges differ by several times; that is what this mimics.
    """
    q, k, v = (x.astype(np.float64) for x in random_qkv(rng, batch, heads, kv_heads, q_len, kv_len, head_dim))
    channels = rng.choice(head_dim, size=outlier_channels, replace=False)
    k[..., channels] = k[..., channels] * 20 + rng.normal(0, 10, size=(batch, kv_heads, 1, outlier_channels))
    head_scale = np.exp(rng.normal(0, 0.6, size=(1, kv_heads, 1, 1)))
    k *= head_scale
    v *= head_scale * np.exp(rng.normal(0, 0.4, size=(1, kv_heads, 1, 1)))
    v += rng.standard_t(4, size=v.shape) * 0.2 * head_scale
    # Trained models keep logits moderate (std ~1-2) even with outlier K channels: queries are
    # small along those channels. Scale q so the logits' std is ~1.5 across heads.
    q *= 1.5 / np.sqrt(np.mean(k**2))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def check_compress_bit_exact(turbo, k: torch.Tensor, v: torch.Tensor, bits: int) -> None:
    """Assert that ``turbo``'s compress kernels equal the integer reference on the kernels' own INT8 codes.

    Stage 2 (INT8 -> INT4/INT2: step, zero, packed codes, K's kept outlier channels, and back) is integer
    arithmetic, so it must match bit for bit; stage 1 (float -> INT8) may differ from float64 by one code
    at rounding ties, which is why the reference starts from the kernels' codes. k, v [B, H_kv, L, D]
    float32 on turbo's device, L a multiple of 64 with at least two blocks (block 0 is the sink).
    """
    b, h, length, d = k.shape
    cache = turbo.compress_kv(k, v, [bits] * h)
    group = cache.groups[0]
    k8, _ = turbo.quantize(k, "float32", turbo.smoothing(k, "float32"))
    v8, _ = turbo.quantize(v, "float32")
    # block 0 is the INT8 sink block, kept verbatim; the groups hold the blocks after it
    assert torch.equal(cache.sink_k, k8[:, :, :QUANT_BLOCK]) and torch.equal(cache.sink_v, v8[:, :, :QUANT_BLOCK])
    packed_len = length - QUANT_BLOCK
    for tensor, x8, codes, step, zero, kept in (("k", k8, group.k_codes, group.k_step, group.k_zero, CACHE_K_OUTLIERS),
                                                ("v", v8, group.v_codes, group.v_step, group.v_zero, 0)):
        assert tuple(codes.shape) == (b, h, packed_len, d * bits // 8 + kept), f"{tensor}_codes shape"
        expected = ref.compress_int8(x8[:, :, QUANT_BLOCK:].cpu().numpy(), bits, kept)
        assert np.array_equal(step.cpu().numpy(), expected[1]), f"{tensor}_step"
        assert np.array_equal(zero.cpu().numpy(), expected[2]), f"{tensor}_zero"
        packed = pack_codes(expected[0], bits, channel_major=tensor == "v")
        assert np.array_equal(codes.cpu().numpy()[..., :d * bits // 8], packed), f"{tensor}_codes"
        out = torch.empty((b, h, packed_len, d), dtype=torch.int8, device=k.device)
        turbo.kernels[decompress_name(bits, tensor)](codes, step, zero, out)
        assert np.array_equal(out.cpu().numpy(), ref.decompress_int8(*expected)), f"{tensor} decompressed"


def pack_codes(code: np.ndarray, bits: int, channel_major: bool) -> np.ndarray:
    """Unpacked codes [B, H, L, D] as the bytes of kv_compress's documented layouts, in numpy."""
    b, h, length, d = code.shape
    per_byte = 8 // bits
    if channel_major:  # per 64-token block: channel after channel, a run of 64 tokens each
        code = code.reshape(b, h, length // QUANT_BLOCK, QUANT_BLOCK, d).transpose(0, 1, 2, 4, 3)
    code = code.reshape(b, h, length * d // per_byte, per_byte).astype(np.uint8)
    packed = np.bitwise_or.reduce([code[..., i] << (bits * i) for i in range(per_byte)])
    return packed.reshape(b, h, length, d // per_byte)
