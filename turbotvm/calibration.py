"""Head-wise mixed precision: which KV heads a compressed cache stores at 2 bits (docs §2.2).

Priority of a KV head = gap * std (gap = max - min) of its V on calibration data. A head's 2-bit
error reaches the output in V's units, so the heads with small, narrow V go to 2 bits and the rest
to 4. K's error is relative to its own scale: its harm depends on the logits' spread, which K's
gap * std does not measure (and K's widest channels stay INT8 at any bit width).
"""

import numpy as np

from .algorithm import DEFAULT_2BIT_HEAD_SHARE


def head_priority(k, v) -> np.ndarray:
    """gap * std of V per KV head; k, v: [B, H_kv, L, D] arrays or CPU tensors (k does not enter)."""
    del k
    x = np.asarray(_to_numpy(v), np.float64)
    flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1)
    return (flat.max(1) - flat.min(1)) * flat.std(1)


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
