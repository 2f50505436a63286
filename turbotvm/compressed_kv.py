"""The compressed KV cache as tensors: what the decode kernels read (docs/algorithm.md §2, §5).

Three regions, in token order:

- Tokens [0, sink_len): the sink block. The first 64-token block of every KV head stays at its
  FlashQ INT8 codes (``sink_k``/``sink_v`` [B, H_kv, 64, D] int8, one scale each [B, H_kv, 1]) and is
  never compressed to 4/2 bits: token 0 is the attention sink of most heads (docs/algorithm.md §2).
  sink_len is 64 once the cache holds a whole block, else 0 (no sink tensors).
- Tokens [sink_len, compressed_len): stored per bit width group (heads of equal bits together):
  packed codes [B, HG, Lp, D*bits/8 + kept] uint8, integer step/zero [B, HG, Lp/64, 64/CACHE_GROUP, D],
  the FlashQ INT8 scale [B, HG, Lp/64] and the group's global KV head ids, Lp = compressed_len -
  sink_len (``packed_len``): row 0 of a group tensor is global token 64, its block 0 global block 1.
  K's code rows end with kept = CACHE_K_OUTLIERS bytes: its widest channels of each 64-token block at
  INT8 (step 0, zero = the byte's slot; see kernels/kv_compress.py); V keeps none, and its codes are
  channel-major within each block (a channel's 64 codes together, for P·V). Dim 2 of every tensor is
  the token or the 64-token block axis.
- Tokens [compressed_len, length) stay INT8 (the buffer of recent tokens, compressed once it holds 64).

``compressed_len`` is the tokens before the open block (sink + packed), a multiple of 64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PackedGroup:
    bits: int
    heads: torch.Tensor  # [HG] int32: global KV head ids
    k_codes: torch.Tensor
    k_step: torch.Tensor
    k_zero: torch.Tensor
    k_scale: torch.Tensor
    v_codes: torch.Tensor
    v_step: torch.Tensor
    v_zero: torch.Tensor
    v_scale: torch.Tensor

    def tensors(self):
        return (self.k_codes, self.k_step, self.k_zero, self.k_scale, self.v_codes, self.v_step, self.v_zero, self.v_scale)


#: names of PackedGroup.tensors(); the ones the CUDA split kernel's copy engine reads need 16-byte addresses
GROUP_TENSOR_NAMES = ("k_codes", "k_step", "k_zero", "k_scale", "v_codes", "v_step", "v_zero", "v_scale")
BULK_COPIED = ("k_codes", "k_step", "k_zero", "v_codes", "v_step", "v_zero")


class SinkLayout:
    """Token ranges of a cache with an INT8 sink block (``sink_k``) before its packed groups, and its
    INT8 regions (``CompressedKV`` and ``TurboKVCache`` alike)."""

    @property
    def sink_len(self) -> int:
        """Tokens of the INT8 sink block: 64, or 0 while the cache holds no whole block."""
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    @property
    def packed_len(self) -> int:
        """Tokens in the 4/2-bit groups: [sink_len, compressed_len)."""
        return self.compressed_len - self.sink_len

    def _open_block_tensors(self) -> tuple:
        """(k, k_scale, v, v_scale) of the open block as the kernels read them (rows: at least its tokens)."""
        return (self.buffer_k, self.buffer_k_scale, self.buffer_v, self.buffer_v_scale)

    def int8_regions(self) -> tuple:
        """((sink tensors, tokens), (open block tensors, tokens)): the INT8 regions a decode reads, each
        (k, k_scale, v, v_scale). Kernels take both; an absent one is the other's tensors with 0 tokens."""
        sink = (self.sink_k, self.sink_k_scale, self.sink_v, self.sink_v_scale)
        open_block = self._open_block_tensors()
        return ((sink if sink[0] is not None else open_block, self.sink_len),
                (open_block if open_block[0] is not None else sink, self.length - self.compressed_len))


@dataclass
class CompressedKV(SinkLayout):
    head_bits: tuple  # bits per KV head
    head_dim: int
    length: int
    compressed_len: int
    k_mean: torch.Tensor  # [B, H_kv, D] float32: K smoothing offset, reused for later tokens
    k_factor: torch.Tensor  # [B, H_kv, D] float32: K's balance factor (K / factor, Q * factor), likewise
    groups: list = field(default_factory=list)  # PackedGroup per bit width present
    buffer_k: torch.Tensor | None = None  # [B, H_kv, >= L - Lc, D] int8: rows past L - Lc unused
    buffer_k_scale: torch.Tensor | None = None  # [B, H_kv, 1] float32
    buffer_v: torch.Tensor | None = None
    buffer_v_scale: torch.Tensor | None = None
    sink_k: torch.Tensor | None = None  # [B, H_kv, 64, D] int8: block 0, never compressed
    sink_k_scale: torch.Tensor | None = None  # [B, H_kv, 1] float32
    sink_v: torch.Tensor | None = None
    sink_v_scale: torch.Tensor | None = None

    @property
    def num_kv_heads(self) -> int:
        return len(self.head_bits)

    def nbytes(self) -> int:
        """Bytes held, scales and offsets included."""
        tensors = [self.k_mean, self.k_factor] + [t for g in self.groups for t in g.tensors()]
        tensors += [t for t in (self.buffer_k, self.buffer_k_scale, self.buffer_v, self.buffer_v_scale,
                                self.sink_k, self.sink_k_scale, self.sink_v, self.sink_v_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fp16_nbytes(self) -> int:
        """Bytes the same K and V take in fp16, for the compression ratio."""
        return 2 * 2 * self.k_mean.shape[0] * self.num_kv_heads * self.length * self.head_dim
