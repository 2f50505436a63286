"""PyTorch custom ops: torch tensors -> checks -> the runtime for their device -> compiled kernels.

- ``turbo_attention(q, k, v, causal=False, scale=None)`` (op ``turbotvm::turbo_attention``): prefill in
  the layout of ``F.scaled_dot_product_attention``: q [B, H, N, D], k/v [B, H_kv, M, D] with H_kv | H.
- ``turbo_decode(q, cache, scale=None)``: one query token over a ``TurboKVCache`` or ``CompressedKV``,
  through op ``turbotvm::turbo_decode``, which takes the cache as its tensors (custom ops take
  tensors, lists and scalars, not Python objects).

Both have fake implementations, so ``torch.compile(fullgraph=True)`` traces them without a graph
break. Tensors reach TVM by DLPack without a copy; CUDA kernels run on torch's current stream
(``turbotvm.torch_stream``). A CPU tensor runs on the LLVM build, a CUDA tensor on the CUDA build
(``turbotvm.runtimes``). Inputs are checked before any kernel runs, in the fake implementations too.
"""

from typing import Optional

import torch
from torch import Tensor

from .algorithm import QUANT_BLOCK, SUPPORTED_HEAD_DIMS
from .attention import DEFAULT_DECODE_SPLITS
from .compressed_kv import CompressedKV
from .kernel_set import SUPPORTED_DTYPES, KernelSetConfig
from .kv_cache import TurboKVCache
from .runtimes import runtime_for
from .validation import (check_attention_inputs, check_head_dim, check_same_device, check_scale, check_tensor,
                         dtype_name)

#: What the fake implementations check against: any head dim and dtype some build can have. The
#: real implementations check again against the build that runs.
_ANY_BUILD = KernelSetConfig(SUPPORTED_HEAD_DIMS, SUPPORTED_DTYPES)


# ---------------------------------------------------------------------------------------- prefill


def _check_prefill(q, k, v, scale):
    check_same_device(q, k=k, v=v)
    check_attention_inputs(q, k, v, _ANY_BUILD, q.device.type)
    check_scale(scale, q.shape[3])


@torch.library.custom_op("turbotvm::turbo_attention", mutates_args=())
def turbo_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """TurboAttention prefill: q [B,H,N,D], k/v [B,H_kv,M,D] (fp32/fp16/bf16, contiguous) -> q's shape and dtype.

    Causal masks are aligned bottom-right, which for N == M is ``is_causal=True``. scale defaults to D**-0.5.
    """
    _check_prefill(q, k, v, scale)
    return runtime_for(q.device).prefill(q, k, v, causal=causal, scale=scale)


@turbo_attention.register_fake
def _turbo_attention_fake(q, k, v, causal=False, scale=None):
    _check_prefill(q, k, v, scale)
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------- decode


@torch.library.custom_op("turbotvm::turbo_decode", mutates_args=())
def turbo_decode_op(q: Tensor, k_mean: Tensor, k_factor: Tensor, packed: list[Tensor], group_bits: list[int],
                    head_bits: list[int], buffer_k: Optional[Tensor], buffer_k_scale: Optional[Tensor],
                    buffer_v: Optional[Tensor], buffer_v_scale: Optional[Tensor],
                    sink_k: Optional[Tensor], sink_k_scale: Optional[Tensor],
                    sink_v: Optional[Tensor], sink_v_scale: Optional[Tensor],
                    length: int, compressed_len: int, scale: Optional[float] = None,
                    num_splits: int = DEFAULT_DECODE_SPLITS) -> Tensor:
    """Decode over a cache passed as tensors (see ``cache_as_op_args``); q [B,H,1,D] -> q's shape and dtype."""
    cache = _cache_from_op_args(q, k_mean, k_factor, packed, group_bits, head_bits, buffer_k, buffer_k_scale,
                                buffer_v, buffer_v_scale, sink_k, sink_k_scale, sink_v, sink_v_scale,
                                length, compressed_len, scale, num_splits)
    return runtime_for(q.device).decode(q, cache, scale=scale, num_splits=num_splits)


@turbo_decode_op.register_fake
def _turbo_decode_fake(q, k_mean, k_factor, packed, group_bits, head_bits, buffer_k, buffer_k_scale, buffer_v,
                       buffer_v_scale, sink_k, sink_k_scale, sink_v, sink_v_scale, length, compressed_len, scale=None,
                       num_splits=DEFAULT_DECODE_SPLITS):
    _cache_from_op_args(q, k_mean, k_factor, packed, group_bits, head_bits, buffer_k, buffer_k_scale,
                        buffer_v, buffer_v_scale, sink_k, sink_k_scale, sink_v, sink_v_scale,
                        length, compressed_len, scale, num_splits)
    return torch.empty_like(q)


def turbo_decode(q: Tensor, cache, scale: Optional[float] = None, num_splits: int = DEFAULT_DECODE_SPLITS) -> Tensor:
    """Attention of one query token q [B, H, 1, D] over ``cache`` (a TurboKVCache or CompressedKV).

    Called plainly (no torch.compile, tracing, mode, transform or autograd around it) it goes to the runtime
    directly, with the same checks: the op's dispatch and the cache's round trip through op arguments cost
    ~40 us of host time per call (measured on a 2-core CPU with no-op kernels), more than a short step's kernels.
    Anything that must see the op (torch.compile, torch.export, fake tensors, ...) gets it."""
    if _plain_eager_call(q):
        _check_cache(cache)
        return runtime_for(q.device).decode(q, cache, scale=scale, num_splits=num_splits)
    return turbo_decode_op(q, *cache_as_op_args(cache), scale, num_splits)


def _plain_eager_call(q) -> bool:
    """True when no torch machinery would record or transform the call (then the op adds only overhead)."""
    try:
        return (type(q) is Tensor and q.device.type in ("cpu", "cuda") and not q.requires_grad
                and not torch.compiler.is_compiling() and torch._C._get_tracing_state() is None
                and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
                and not torch._C._are_functorch_transforms_active())
    except AttributeError:  # a torch without one of these queries: always the op
        return False


def cache_as_op_args(cache) -> tuple:
    """The cache as the op takes it: (k_mean, k_factor, packed, group_bits, head_bits, buffer_k, buffer_k_scale,
    buffer_v, buffer_v_scale, sink_k, sink_k_scale, sink_v, sink_v_scale, length, compressed_len).

    ``packed`` lists each group's head ids then its ``PackedGroup.tensors()``, group after group; every
    group has the same number of tensors. The group tensors hold tokens [64, compressed_len) and may hold
    more (a growing cache's spare capacity): the kernels read ``compressed_len - 64`` of them; likewise
    the buffer_* tensors (the open block) hold ``length - compressed_len`` tokens or more, and are present
    iff that is > 0. The sink tensors (the INT8 block 0) are present iff compressed_len > 0.
    """
    _check_cache(cache)
    packed = [t for group in cache.groups for t in (group.heads, *group.tensors())]
    _, (open_block, open_len) = cache.int8_regions()  # the tensors the kernels read (a view is not compact)
    return (cache.k_mean, cache.k_factor, packed, [int(g.bits) for g in cache.groups],
            [int(b) for b in cache.head_bits], *(open_block if open_len else (None,) * 4),
            cache.sink_k, cache.sink_k_scale, cache.sink_v, cache.sink_v_scale,
            cache.length, cache.compressed_len)


def _check_cache(cache) -> None:
    if not isinstance(cache, (TurboKVCache, CompressedKV)):
        raise TypeError(f"cache: expected a TurboKVCache or CompressedKV, got {type(cache).__name__}")
    if cache.k_mean is None:
        raise ValueError("cache: expected at least one appended token, got an empty TurboKVCache")


class _GroupTensors:
    """A PackedGroup as the decode op receives it: what ``TurboAttention.decode`` reads of a group."""

    def __init__(self, bits: int, heads: Tensor, tensors: list):
        self.bits, self.heads, self._tensors = bits, heads, tuple(tensors)

    def tensors(self) -> tuple:
        return self._tensors


def _cache_from_op_args(q, k_mean, k_factor, packed, group_bits, head_bits, buffer_k, buffer_k_scale, buffer_v,
                        buffer_v_scale, sink_k, sink_k_scale, sink_v, sink_v_scale, length, compressed_len, scale,
                        num_splits) -> CompressedKV:
    """Checks the op's arguments (before any kernel) and reassembles the CompressedKV they flatten."""
    check_tensor("q", q, 4, q.device.type)
    dtype_name("q", q, _ANY_BUILD)
    check_head_dim("q", q.shape[3], _ANY_BUILD)
    check_scale(scale, q.shape[3])
    buffers = {"buffer_k": buffer_k, "buffer_k_scale": buffer_k_scale, "buffer_v": buffer_v, "buffer_v_scale": buffer_v_scale}
    sinks = {"sink_k": sink_k, "sink_k_scale": sink_k_scale, "sink_v": sink_v, "sink_v_scale": sink_v_scale}
    check_same_device(q, k_mean=k_mean, k_factor=k_factor, **buffers, **sinks,
                       **{f"packed[{i}]": t for i, t in enumerate(packed)})
    if q.shape[2] != 1:
        raise ValueError(f"q: expected one token per sequence for decode ([B, H, 1, D]), got shape {tuple(q.shape)}")
    if group_bits and len(packed) % len(group_bits):
        raise ValueError(f"packed: expected the same number of tensors for each of the {len(group_bits)} groups, "
                         f"got {len(packed)} tensors")
    if not 0 <= compressed_len <= length or compressed_len % QUANT_BLOCK:
        raise ValueError(f"compressed_len: expected a multiple of {QUANT_BLOCK} in [0, length={length}], got {compressed_len}")
    has_buffer = [t is not None for t in buffers.values()]
    # bool() first: under torch.compile, length is a SymInt, and a bool compared to a SymBool fails
    if any(has_buffer) != all(has_buffer) or all(has_buffer) != bool(length > compressed_len):
        raise ValueError(f"buffer_*: expected all four tensors when length > compressed_len ({length} > {compressed_len}), "
                         f"else none; got {[n for n, t in buffers.items() if t is not None]}")
    has_sink = [t is not None for t in sinks.values()]
    if any(has_sink) != all(has_sink) or all(has_sink) != (compressed_len > 0):
        raise ValueError(f"sink_*: expected all four tensors when compressed_len > 0 (it is {compressed_len}), else none; "
                         f"got {[n for n, t in sinks.items() if t is not None]}")
    if all(has_sink):
        b, hkv, d = k_mean.shape
        codes, scales = ((b, hkv, QUANT_BLOCK, d), torch.int8), ((b, hkv, 1), torch.float32)
        for name, x, (shape, dtype) in (("sink_k", sink_k, codes), ("sink_k_scale", sink_k_scale, scales),
                                        ("sink_v", sink_v, codes), ("sink_v_scale", sink_v_scale, scales)):
            if tuple(x.shape) != shape or x.dtype != dtype:
                raise ValueError(f"{name}: expected shape {shape} and dtype {dtype} (the INT8 sink block), "
                                 f"got {tuple(x.shape)}, {x.dtype}")
    if k_factor.shape != k_mean.shape or k_factor.dtype != k_mean.dtype:
        raise ValueError(f"k_factor: expected shape {tuple(k_mean.shape)} and dtype {k_mean.dtype} (those of k_mean), "
                         f"got {tuple(k_factor.shape)}, {k_factor.dtype}")
    per_group = len(packed) // len(group_bits) if group_bits else 0
    groups = [_GroupTensors(bits, packed[i * per_group], packed[i * per_group + 1:(i + 1) * per_group])
              for i, bits in enumerate(group_bits)]
    return CompressedKV(tuple(head_bits), k_mean.shape[2], length, compressed_len, k_mean, k_factor, groups,
                        buffer_k, buffer_k_scale, buffer_v, buffer_v_scale, sink_k, sink_k_scale, sink_v, sink_v_scale)
