"""Head-wise mixed precision: which KV heads a compressed cache stores at 2 bits (docs §2.3).

Priority of a KV head = gap * std (gap = max - min) of its K plus the same of its V, on
calibration data. Low priority heads have small, narrow values: their 2-bit error is smallest
in absolute terms, so they go to 2 bits and the rest to 4.
"""

import numpy as np

from .algorithm import DEFAULT_2BIT_HEAD_SHARE


def head_priority(k, v) -> np.ndarray:
    """gap * std per KV head of K plus that of V; k, v: [B, H_kv, L, D] arrays or CPU tensors."""

    def one(x):
        x = np.asarray(x, np.float64)
        flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
        return (flat.max(1) - flat.min(1)) * flat.std(1)

    return one(_to_numpy(k)) + one(_to_numpy(v))


def select_head_bits(k, v, share_2bit: float = DEFAULT_2BIT_HEAD_SHARE) -> np.ndarray:
    """Bits per KV head: the round(share * H_kv) lowest-priority heads get 2 bits, the rest 4."""
    if not 0.0 <= share_2bit <= 1.0:
        raise ValueError(f"share_2bit: expected a fraction in [0, 1], got {share_2bit}")
    priority = head_priority(k, v)
    bits = np.full(len(priority), 4, np.int64)
    bits[np.argsort(priority, kind="stable")[: int(round(share_2bit * len(priority)))]] = 2
    return bits


def _to_numpy(x):
    if hasattr(x, "detach"):
        return x.detach().to("cpu").double().numpy()
    return x
