"""Inputs and metrics shared by the tests, the demo and the benchmarks."""

from __future__ import annotations

import numpy as np


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
