"""Input checks run before any kernel: each failure names the argument and what was expected."""

from __future__ import annotations

import numpy as np
import torch

from .kernel_set import KernelSetConfig

_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


#: Bytes TVM assumes every buffer's data is aligned to (its default): the kernels load aligned vectors
#: (AVX-512 on the CPU, 16-byte words on the GPU), which fault on a tensor that starts elsewhere.
DATA_ALIGNMENT = 64


def as_tensor(name: str, x) -> torch.Tensor:
    """torch tensors pass through; numpy arrays are wrapped without a copy."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


#: Elements a tensor may hold in one call of the hand-mapped CUDA kernels: they index in int32 (cheaper
#: address arithmetic than the generic kernels' int64). Larger batches are split; larger single entries refused.
CUDA_INDEX_LIMIT = 2**31


def aligned(x: torch.Tensor) -> torch.Tensor:
    """x itself, or a copy when its data does not start DATA_ALIGNMENT-aligned: numpy aligns its arrays to
    16 bytes only, and a view can start anywhere in its storage (torch allocates 64-byte aligned on the
    CPU, 512 on CUDA). For real tensors about to reach a kernel (not the fake ones torch.compile traces)."""
    return x if x.data_ptr() % DATA_ALIGNMENT == 0 else x.clone()  # (clone keeps the strides)


def dtype_name(name: str, x: torch.Tensor, config: KernelSetConfig) -> str:
    dtype = _TORCH_DTYPE_NAMES.get(x.dtype)
    if dtype is None or dtype not in config.dtypes:
        raise TypeError(f"{name}: expected dtype in {config.dtypes} (this build), got {x.dtype}")
    return dtype


def check_tensor(name: str, x: torch.Tensor, rank: int, device_type: str) -> None:
    if x.dim() != rank:
        raise ValueError(f"{name}: expected rank {rank} [batch, heads, tokens, head_dim], got shape {tuple(x.shape)}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name}: expected no zero-length dimension, got shape {tuple(x.shape)}")
    if x.device.type != device_type:
        raise ValueError(f"{name}: expected a tensor on {device_type!r} (this build's target), got {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous()), got strides {x.stride()}")


def check_same_device(q: torch.Tensor, **tensors) -> None:
    """Each named tensor (None: absent) on q's device."""
    for name, x in tensors.items():
        if x is not None and x.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} (same as q), got {x.device}")


def check_attention_inputs(q, k, v, config: KernelSetConfig, device_type: str):
    """Checks q [B,H,N,D], k/v [B,H_kv,M,D]; returns (q, k, v, dtype name)."""
    q, k, v = as_tensor("q", q), as_tensor("k", k), as_tensor("v", v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4, device_type)
    dtype = dtype_name("q", q, config)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (same as q), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (same as q), got {x.device}")
    if k.shape != v.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    b, h, _, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"k: expected batch {b} (same as q), got {k.shape[0]}")
    if h % k.shape[1] != 0:
        raise ValueError(f"k: expected a number of heads dividing q's {h} (grouped-query attention), got {k.shape[1]}")
    if k.shape[3] != d:
        raise ValueError(f"k: expected head_dim {d} (same as q), got {k.shape[3]}")
    check_head_dim("q", d, config)
    return q, k, v, dtype


def check_head_dim(name: str, d: int, config: KernelSetConfig) -> None:
    if d not in config.head_dims:
        raise ValueError(f"{name}: head_dim {d} is not supported; expected one of {config.head_dims} (this build)")


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    scale = float(scale)
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a finite positive float, got {scale}")
    return scale
