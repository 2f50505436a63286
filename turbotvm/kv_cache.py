"""TurboKVCache: one attention layer's KV cache, quantized and compressed as tokens arrive.

Storage (docs/algorithm.md §2, §5):

- The first 64-token block [0, 64), once it closes: the sink block, kept at its INT8 codes and
  scales (``sink_*``), never compressed: token 0 is the attention sink of most heads, and its 2-bit
  codes cost the most accuracy.
- Later whole 64-token blocks [64, compressed_len): packed INT4/INT2 codes per bit-width group (a
  ``PackedGroup``), with integer step/zero and the INT8 block scale. They live in tensors with spare
  capacity along dim 2 that grow by doubling, so appending a block copies only that block
  (amortised). Row 0 of them is token 64; the decode kernels read ``packed_len = compressed_len - 64``
  tokens of them.
- The open block [compressed_len, length), fewer than 64 tokens: the INT8 codes the decode kernels
  read, plus the same tokens in their input dtype, in tensors of one whole block written in place.
  FlashQ gives a block one INT8 scale, the absmax of all its tokens, so each append re-quantizes the
  open block from the exact values (one kernel stores the new tokens and re-quantizes K and V).
  Re-quantizing INT8 codes instead would round twice, and the block's INT4/INT2 codes would differ
  from a cache compressed in one go. That costs at most 63 tokens per KV head, whatever the length.
  A block that fills is compressed from those tensors, which then take the next block.

K's smoothing (channel mean and balance factor) is fixed by the first append (usually the prompt) and
never recomputed. Subtracting any fixed per-channel offset μ moves every score of a query by the same
q·μ, which softmax cancels, and any fixed factor f cancels between K / f and Q · f, so any fixed pair
is valid. Recomputing them would change the INT8 codes of every block already compressed.

The cache exposes the attributes of ``CompressedKV`` (head_bits, head_dim, length, compressed_len,
k_mean, k_factor, groups, buffer_*, sink_*; buffer_k and buffer_v are views of the open block's tokens),
so ``TurboAttention.decode`` and ``turbotvm.ops.turbo_decode`` read it directly.

Appends and decodes order by torch's current stream. The open block is written in place, so a decode
queued on another stream must finish before the next append (as with any in-place cache).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .algorithm import CACHE_BITS, DEFAULT_2BIT_HEAD_SHARE, QUANT_BLOCK
from .attention import TurboAttention
from .calibration import select_head_bits
from .compressed_kv import PackedGroup, SinkLayout
from .runtimes import runtime_for
from .torch_stream import current_stream_handle
from .validation import check_head_dim, dtype_name


class TurboKVCache(SinkLayout):
    """Compressed K/V of one layer. ``append(k, v)`` adds tokens; decode with ``turbotvm.turbo_decode``.

    head_bits: bits per KV head (2 or 4). If None, the first append picks them with
    ``select_head_bits(k, v, share_2bit)``: the lowest-priority ``share_2bit`` of the heads go to 2 bits
    (default ``DEFAULT_2BIT_HEAD_SHARE``). runtime: the TurboAttention whose kernels compress and
    decode; default: ``runtime_for`` the device of the first append. reserve_tokens: tokens to allocate
    for at the first compressed block (for example prompt + maximum new tokens; the packed groups get
    that, rounded up to whole blocks, less the 64-token sink block), so the storage does not grow until
    then; beyond it, it doubles.
    """

    def __init__(self, head_bits=None, share_2bit: float | None = None, runtime: TurboAttention | None = None,
                 reserve_tokens: int = 0):
        if head_bits is not None and share_2bit is not None:
            raise ValueError("head_bits, share_2bit: expected at most one (given bits, or a 2-bit share to choose them)")
        if runtime is not None and not isinstance(runtime, TurboAttention):
            raise TypeError(f"runtime: expected a TurboAttention, got {type(runtime).__name__}")
        self._requested_bits = head_bits
        self._share_2bit = DEFAULT_2BIT_HEAD_SHARE if share_2bit is None else float(share_2bit)
        self.runtime = runtime
        self.head_bits: tuple | None = None
        self.head_dim: int | None = None
        self.k_mean: torch.Tensor | None = None  # [B, H_kv, D] float32, fixed by the first append
        self.k_factor: torch.Tensor | None = None  # [B, H_kv, D] float32: K's balance factor, likewise
        self.groups: list[PackedGroup] = []  # tensors with spare capacity along dim 2
        self.compressed_len = 0
        self.sink_k = self.sink_k_scale = self.sink_v = self.sink_v_scale = None  # INT8 block 0, once closed
        # the open block, in tensors of one whole block made by the first append: its tokens in the input
        # dtype (k, v) [B, H_kv, 64, D] and their INT8 codes and scales (k8, k_scale, v8, v_scale)
        self._open_tokens: tuple | None = None
        self._open_codes: tuple | None = None
        self._open_len = 0  # tokens the open block holds
        # raw handles of the CUDA streams that allocated the open block's tensors and the group tensors
        self._open_stream: int | None = None
        self._groups_stream: int | None = None
        self._capacity = 0  # tokens the group tensors can hold
        # whole blocks, less the sink block (kept apart from the packed groups)
        self._reserve = max(0, -(-int(reserve_tokens) // QUANT_BLOCK) * QUANT_BLOCK - QUANT_BLOCK)
        self._dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ what it holds

    @property
    def length(self) -> int:
        return self.compressed_len + self._open_len

    @property
    def buffer_k(self) -> torch.Tensor | None:
        """The open block's K codes [B, H_kv, length - compressed_len, D] int8 (a view); None if it is empty."""
        return self._open_codes[0][:, :, :self._open_len] if self._open_len else None

    @property
    def buffer_k_scale(self) -> torch.Tensor | None:
        return self._open_codes[1] if self._open_len else None

    @property
    def buffer_v(self) -> torch.Tensor | None:
        return self._open_codes[2][:, :, :self._open_len] if self._open_len else None

    @property
    def buffer_v_scale(self) -> torch.Tensor | None:
        return self._open_codes[3] if self._open_len else None

    def _open_block_tensors(self) -> tuple:
        """The kernels read the open block's whole-block tensors (compact), ``length - compressed_len`` rows."""
        return self._open_codes or (None,) * 4

    @property
    def capacity(self) -> int:
        """Tokens the packed group tensors can hold before they grow (doubling); the sink block is apart."""
        return self._capacity

    @property
    def num_kv_heads(self) -> int:
        return len(self.head_bits) if self.head_bits is not None else 0

    @property
    def device(self) -> torch.device | None:
        return None if self.k_mean is None else self.k_mean.device

    def nbytes(self, capacity: bool = False) -> int:
        """Bytes of the tokens held, every scale, zero, offset and the open block included.

        capacity=True counts the spare capacity of the growing tensors as well (what is allocated).
        """
        if self.k_mean is None:
            return 0
        total = _nbytes(self.k_mean) + _nbytes(self.k_factor)
        for group in self.groups:
            total += _nbytes(group.heads)
            for t in group.tensors():
                rows = t.shape[2] if capacity else self._rows(t, self._capacity, self.packed_len)
                total += _nbytes(t) // t.shape[2] * rows
        for t in (self.sink_k, self.sink_k_scale, self.sink_v, self.sink_v_scale):
            total += 0 if t is None else _nbytes(t)
        if self._open_tokens is not None:
            for t in (*self._open_tokens, *self._open_codes):  # codes: rows are tokens; scales: one row
                total += _nbytes(t) // t.shape[2] * (t.shape[2] if capacity else min(t.shape[2], self._open_len))
        return total

    def fp16_nbytes(self) -> int:
        """Bytes the same K and V take in fp16, for the compression ratio."""
        if self.k_mean is None:
            return 0
        return 2 * 2 * self.k_mean.shape[0] * self.num_kv_heads * self.length * self.head_dim

    # ------------------------------------------------------------------ append

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add new tokens k, v [B, H_kv, T, D] (T >= 1, any strides; the cache copies what it keeps)."""
        runtime = self._check(k, v)
        dtype = dtype_name("k", k, runtime.config)
        if self.k_mean is None:
            self._start(runtime, k, v, dtype)
        stream = _current_stream(k.device)
        tokens = k.shape[2]
        # blocks start at multiples of 64: fill the open block (if one is open), then whole blocks go
        # straight to compression, and the rest opens the next block
        into_open = min(tokens, QUANT_BLOCK - self._open_len) if self._open_len else 0
        whole_end = into_open + (tokens - into_open) // QUANT_BLOCK * QUANT_BLOCK
        if into_open:
            self._into_open_block(runtime, k[:, :, :into_open], v[:, :, :into_open], stream)
        if whole_end > into_open:
            k8, k_scale = runtime.quantize(k[:, :, into_open:whole_end].contiguous(), dtype, (self.k_mean, self.k_factor))
            v8, v_scale = runtime.quantize(v[:, :, into_open:whole_end].contiguous(), dtype)
            self._close_blocks(runtime, k8, k_scale, v8, v_scale, stream)
        if whole_end < tokens:
            self._into_open_block(runtime, k[:, :, whole_end:], v[:, :, whole_end:], stream)

    def _into_open_block(self, runtime: TurboAttention, k, v, stream: int | None) -> None:
        """k, v (no more tokens than the open block lacks) into the open block, in place; once full, it is
        compressed and the tensors take the next block."""
        if self._open_tokens is None:
            b, h, _, d = k.shape
            self._open_tokens = tuple(torch.empty((b, h, QUANT_BLOCK, d), dtype=k.dtype, device=k.device)
                                      for _ in range(2))
            codes, scale = ((b, h, QUANT_BLOCK, d), torch.int8), ((b, h, 1), torch.float32)
            self._open_codes = tuple(torch.empty(shape, dtype=dtype, device=k.device)
                                     for shape, dtype in (codes, scale, codes, scale))
            self._open_stream = stream
        else:  # read (a decode, the last compression) and written on the current stream
            _used_on(stream, self._open_stream, *self._open_tokens, *self._open_codes)
        runtime.append_open_block(k.contiguous(), v.contiguous(), (self.k_mean, self.k_factor), self._open_tokens,
                                  self._open_codes, self._open_len)
        self._open_len += k.shape[2]
        if self._open_len == QUANT_BLOCK:
            self._close_blocks(runtime, *self._open_codes, stream)
            self._open_len = 0

    def _close_blocks(self, runtime: TurboAttention, k8, k_scale, v8, v_scale, stream: int | None) -> None:
        """Whole blocks' INT8 codes [B, H_kv, 64 n, D] and scales [B, H_kv, n] into the cache: the cache's
        first block is the sink block (kept at INT8, copied), the others are compressed into the groups."""
        first = 0
        if self.sink_k is None:
            self.sink_k, self.sink_v = _compact(k8[:, :, :QUANT_BLOCK]), _compact(v8[:, :, :QUANT_BLOCK])
            self.sink_k_scale, self.sink_v_scale = _compact(k_scale[:, :, :1]), _compact(v_scale[:, :, :1])
            self.compressed_len += QUANT_BLOCK
            first = 1
        blocks = k8.shape[2] // QUANT_BLOCK
        if blocks > first:
            new_groups = runtime.compress_blocks(
                k8[:, :, first * QUANT_BLOCK:].contiguous(), k_scale[:, :, first:].contiguous(),
                v8[:, :, first * QUANT_BLOCK:].contiguous(), v_scale[:, :, first:].contiguous(), self.head_bits)
            self._store(new_groups, (blocks - first) * QUANT_BLOCK, stream)

    def _check(self, k, v) -> TurboAttention:
        for name, x in (("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4 or any(s == 0 for s in x.shape):
                raise ValueError(f"{name}: expected shape [batch, kv_heads, tokens >= 1, head_dim], got {tuple(x.shape)}")
        if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
            raise ValueError(f"v: expected shape {tuple(k.shape)}, dtype {k.dtype} and device {k.device} (those of k), "
                             f"got {tuple(v.shape)}, {v.dtype}, {v.device}")
        if self.k_mean is not None:
            b, h, d = self.k_mean.shape
            if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d) or k.dtype != self._dtype or k.device != self.device:
                raise ValueError(f"k: expected [{b}, {h}, T, {d}] {self._dtype} on {self.device} (the cache's), "
                                 f"got {tuple(k.shape)} {k.dtype} on {k.device}")
        runtime = self.runtime or runtime_for(k.device)
        if runtime.device_type != k.device.type:
            raise ValueError(f"k: expected a tensor on {runtime.device_type!r} (the runtime's target), got {k.device}")
        check_head_dim("k", k.shape[3], runtime.config)
        return runtime

    def _start(self, runtime: TurboAttention, k, v, dtype: str) -> None:
        """First append: fix the runtime, dtype, head bits and K's smoothing (mean and balance factor)."""
        hkv = k.shape[1]
        if self._requested_bits is None:
            bits = select_head_bits(k, v, self._share_2bit)
        else:
            bits = self._requested_bits
        bits = tuple(int(b) for b in np.asarray(bits).reshape(-1))
        if len(bits) != hkv or any(b not in CACHE_BITS for b in bits):
            raise ValueError(f"head_bits: expected {hkv} values (one per KV head) from {CACHE_BITS}, got {bits}")
        self.runtime, self._dtype, self.head_bits, self.head_dim = runtime, k.dtype, bits, k.shape[3]
        self.k_mean, self.k_factor = runtime.smoothing(k.contiguous(), dtype)

    # ------------------------------------------------------------------ growing storage

    def _store(self, new_groups: list[PackedGroup], tokens: int, stream: int | None) -> None:
        """Write freshly compressed blocks after the stored ones, growing every group's tensors if full."""
        held = self.packed_len
        needed = held + tokens
        # the stored tensors are copied (growing) or written (below) on the current stream
        _used_on(stream, self._groups_stream, *(t for group in self.groups for t in group.tensors()))
        if needed > self._capacity:
            capacity = max(needed, 2 * self._capacity, self._reserve)
            self.groups = [self._grown(old, new, tokens, capacity) for old, new in
                           zip(self.groups or [None] * len(new_groups), new_groups)]
            self._capacity = capacity
            self._groups_stream = stream
        for stored, new in zip(self.groups, new_groups):
            for dst, src in zip(stored.tensors(), new.tensors()):
                start = self._rows(src, tokens, held)
                dst[:, :, start:start + src.shape[2]].copy_(src)
        self.compressed_len += tokens

    def _grown(self, old: PackedGroup | None, new: PackedGroup, tokens: int, capacity: int) -> PackedGroup:
        """A group like ``new`` whose tensors hold ``capacity`` tokens, the stored ones copied over."""
        if old is not None and old.bits != new.bits:
            raise RuntimeError(f"compress_blocks returned group bits={new.bits} where bits={old.bits} is stored")
        grown = {}
        for name, src in zip(_tensor_fields(new), new.tensors()):
            rows = self._rows(src, tokens, capacity)
            t = torch.empty((*src.shape[:2], rows, *src.shape[3:]), dtype=src.dtype, device=src.device)
            if old is not None:
                kept = self._rows(src, tokens, self.packed_len)
                t[:, :, :kept].copy_(getattr(old, name)[:, :, :kept])
            grown[name] = t
        return dataclasses.replace(new, **grown)

    @staticmethod
    def _rows(t: torch.Tensor, tokens_in_t: int, tokens: int) -> int:
        """Rows of dim 2 that ``tokens`` take in a tensor like t, which holds ``tokens_in_t`` tokens.

        Dim 2 is the token axis (codes) or the 64-token block axis (step, zero, scale).
        """
        if t.shape[2] == tokens_in_t:
            return tokens
        if t.shape[2] * QUANT_BLOCK == tokens_in_t:
            return tokens // QUANT_BLOCK
        raise ValueError(f"PackedGroup tensor of shape {tuple(t.shape)}: expected dim 2 to be the token axis "
                         f"({tokens_in_t}) or the 64-token block axis ({tokens_in_t // QUANT_BLOCK})")


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy that owns its memory."""
    return t.clone(memory_format=torch.contiguous_format)


def _current_stream(device: torch.device) -> int | None:
    """Raw handle of torch's current stream on ``device``; None off CUDA."""
    return current_stream_handle(device) if device.type == "cuda" else None


def _used_on(stream: int | None, made_on: int | None, *tensors) -> None:
    """Tensors made on stream ``made_on`` are used on ``stream``: ``record_stream`` them there unless the same.

    The caching allocator hands a freed tensor's memory to the next allocation of the stream that made
    it; work still queued on another stream must finish first. On the making stream itself the order is
    the stream's own, so the common case (one stream) costs one raw handle query and no Stream object.
    """
    if stream is None or stream == made_on:
        return
    current = None
    for t in tensors:
        if t is not None:
            current = current or torch.cuda.current_stream(t.device)
            t.record_stream(current)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tensor_fields(group: PackedGroup) -> list[str]:
    """Names of the dataclass fields that ``group.tensors()`` returns, in its order."""
    by_id = {id(getattr(group, f.name)): f.name for f in dataclasses.fields(group)}
    return [by_id[id(t)] for t in group.tensors()]
