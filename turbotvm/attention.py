"""TurboAttention on compiled kernels: torch/numpy arrays in, kernels called in order, arrays out.

The path of the data: tensors -> checks (turbotvm.validation) -> FlashQ quantize kernels ->
prefill or decode kernels -> output tensor. Tensors pass to TVM by DLPack without a copy.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from . import kernel_set as names
from .algorithm import CACHE_BITS, CACHE_GROUP, CACHE_K_OUTLIERS, QUANT_BLOCK
from .codegen import CompiledKernels, build, load, load_or_build
from .compressed_kv import BULK_COPIED, GROUP_TENSOR_NAMES, CompressedKV, PackedGroup
from .kernel_set import KernelSetConfig
from .kernels.decode_cuda import SPLIT_CTAS_PER_SM
from .kernels.sas import NEG_BIG
from .torch_stream import current_stream_handle, on_torch_stream
from .validation import (CUDA_INDEX_LIMIT, aligned, as_tensor, check_attention_inputs, check_head_dim,
                         check_same_device, check_scale, check_tensor, dtype_name)

#: 0 = choose: 4 on the CPU; on a GPU as many splits as fit one wave of 8 CTAs per SM (decode is
#: bandwidth-bound; a second, partial wave leaves SMs idle at its end).
DEFAULT_DECODE_SPLITS = 0
CPU_DECODE_SPLITS = 4
DECODE_WORKSPACES = 8  # decode scratch sets kept per TurboAttention (one per recent shape/stream/thread)
#: a cache's INT8 tensors: the open block and the sink block
INT8_REGION_NAMES = ("buffer_k", "buffer_k_scale", "buffer_v", "buffer_v_scale", "sink_k", "sink_k_scale", "sink_v",
                     "sink_v_scale")


def step_kernel_args(q, cache: CompressedKV, group: PackedGroup, regions, workspace, out, scale: float,
                     group_size: int, splits: int) -> tuple:
    """A CUDA decode step kernel's arguments in its parameter order (``kernels/decode_cuda.py``).

    regions: ``cache.int8_regions()``; workspace: ``TurboAttention._decode_workspace``'s tuple."""
    (sink, sink_len), (open_block, open_len) = regions
    _, o_part, m_part, l_part, counters = workspace
    return (q, cache.k_factor, group.heads, *group.tensors(), *sink, *open_block, o_part, m_part, l_part, counters,
            out, scale, group_size, splits, cache.packed_len, sink_len, open_len)


class TurboAttention:
    """Prefill and decode with one compiled kernel set (built here or loaded from an export)."""

    def __init__(self, kernels: CompiledKernels):
        self.kernels = kernels
        self.device_type = "cuda" if kernels.target_kind == "cuda" else "cpu"
        self._decode_constants: dict = {}
        self._sm_count: dict = {}
        self._head_id_tensors: dict = {}  # (device, heads) -> int32 tensor: a packed group's KV head ids
        self._workspaces: dict = {}  # decode scratch by (device, stream, thread, shape), least recently used first
        #: elements one kernel call may index in a tensor (None: no limit); more are split by batch entries
        self.index_limit = CUDA_INDEX_LIMIT if self.device_type == "cuda" else None

    @classmethod
    def build(cls, target="llvm", head_dims=(64, 128), dtypes=("float32",), progress=False,
              tuning_log=None) -> TurboAttention:
        """``tuning_log``: a ``turbotvm tune`` output directory; kernels without a record use the hand schedule."""
        return cls(build(target, KernelSetConfig(tuple(head_dims), tuple(dtypes)), progress, tuning_log))

    @classmethod
    def load(cls, module_dir) -> TurboAttention:
        return cls(load(module_dir))

    @classmethod
    def cached(cls, target="llvm", head_dims=(64, 128), dtypes=("float32",), cache_dir=None,
               progress=False, tuning_log=None) -> TurboAttention:
        """Load from the module cache (default ``$TURBOTVM_CACHE_DIR`` or ~/.cache/turbotvm); build on a miss.

        With ``tuning_log`` the entry is keyed by the log's content too (a re-tuned log rebuilds).
        """
        return cls(load_or_build(target, KernelSetConfig(tuple(head_dims), tuple(dtypes)), cache_dir, progress,
                                 tuning_log))

    @property
    def config(self) -> KernelSetConfig:
        return self.kernels.config

    # ------------------------------------------------------------------ FlashQ stage 1

    def _empty(self, like, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=like.device)

    @on_torch_stream
    def quantize(self, x: torch.Tensor, dtype: str, smoothing: tuple | None = None,
                 balance: torch.Tensor | None = None):
        """INT8 codes and per-64-token scales of x [B, H, N, D].

        ``smoothing`` (mean, factor) [B, H, D]: quantize (x - mean) / factor (K). ``balance`` [B, H_kv, D]:
        quantize x * balance of each head's KV head (Q). Neither: x itself (V).
        """
        x = aligned(as_tensor("x", x))
        b, h, n, d = x.shape
        if smoothing is not None and not (isinstance(smoothing, tuple) and len(smoothing) == 2):
            raise TypeError(f"smoothing: expected a (mean, factor) pair, got {type(smoothing).__name__}")
        chunks = self._batch_chunks("x", b, x[0].numel())
        if len(chunks) > 1:  # every (batch, head) is quantized on its own: split the batch
            parts = [self.quantize(x[c], dtype, None if smoothing is None else (smoothing[0][c], smoothing[1][c]),
                                   None if balance is None else balance[c]) for c in chunks]
            return torch.cat([codes for codes, _ in parts]), torch.cat([scale for _, scale in parts])
        codes = self._empty(x, (b, h, n, d), torch.int8)
        scale = self._empty(x, (b, h, -(-n // QUANT_BLOCK)), torch.float32)
        mode, extra = (("smoothed", smoothing) if smoothing is not None else
                       ("balanced", (balance,)) if balance is not None else ("plain", ()))
        if self.device_type == "cuda":
            # one CTA per 64-token block (the prefill's kernels): the generic kernel ran one thread per
            # block, ~1 ms for a one-token cache append
            check_head_dim("x", d, self.config)
            kernel = self.kernels[names.quantize_rows_name(dtype, d, mode)]
        else:
            kernel = self.kernels[names.quantize_name(dtype, mode)]
        kernel(x, *extra, codes, scale)
        return codes, scale

    @on_torch_stream
    def append_open_block(self, k: torch.Tensor, v: torch.Tensor, smoothing: tuple, open_block: tuple,
                          codes: tuple, open_len: int) -> None:
        """New tokens k, v [B, H_kv, T, D] into a cache's open block, which is then re-quantized whole.

        open_block: (k_open, v_open) [B, H_kv, 64, D] in k's dtype, tokens [0, open_len) held; codes:
        (k8, k_scale, v8, v_scale), [B, H_kv, 64, D] int8 and [B, H_kv, 1] float32, written for tokens
        [0, open_len + T); smoothing: K's (mean, factor). All in place, one kernel (TurboKVCache.append).
        """
        k, v = as_tensor("k", k), as_tensor("v", v)
        b, h, t, d = k.shape
        if not 1 <= t <= QUANT_BLOCK - open_len:
            raise ValueError(f"k: expected 1 to {QUANT_BLOCK - open_len} tokens (the open block holds {open_len} "
                             f"of {QUANT_BLOCK}), got {t}")
        dtype = dtype_name("k", k, self.config)
        name = names.append_open_block_name(dtype, d if self.device_type == "cuda" else None)
        if self.device_type == "cuda":
            check_head_dim("k", d, self.config)
        if self.index_limit is not None and open_block[0].numel() > self.index_limit:
            raise ValueError(f"k: expected at most {self.index_limit // (QUANT_BLOCK * d)} sequences x KV heads "
                             f"(this build's kernels index in int32), got {b} x {h}: split the batch over caches")
        self.kernels[name](aligned(k), aligned(v), *smoothing, *open_block, *codes, open_len)

    @on_torch_stream
    def smoothing(self, k: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        """K's channel mean and balance factor [B, H_kv, D] float32 (docs/algorithm.md §1)."""
        k = as_tensor("k", k)
        check_tensor("k", k, 4, self.device_type)
        check_head_dim("k", k.shape[3], self.config)  # the CUDA kernel covers 64-channel groups
        if dtype_name("k", k, self.config) != dtype:
            raise TypeError(f"k: expected dtype {dtype} (the dtype argument), got {k.dtype}")
        k = aligned(k)
        chunks = self._batch_chunks("k", k.shape[0], k[0].numel())
        if len(chunks) > 1:
            parts = [self.smoothing(k[c], dtype) for c in chunks]
            return torch.cat([mean for mean, _ in parts]), torch.cat([factor for _, factor in parts])
        mean = self._empty(k, (k.shape[0], k.shape[1], k.shape[3]), torch.float32)
        factor = self._empty(k, (k.shape[0], k.shape[1], k.shape[3]), torch.float32)
        self.kernels[names.channel_smoothing_name(dtype)](k, mean, factor)
        return mean, factor

    # ------------------------------------------------------------------ prefill

    @on_torch_stream
    def prefill(self, q, k, v, causal: bool = False, scale: float | None = None):
        """Attention of q [B,H,N,D] over k, v [B,H_kv,M,D]; returns q's type, dtype and shape.

        Causal masks are aligned bottom-right (key j visible to query i iff j <= i + M - N), as in
        FlashAttention; for N == M this is torch's ``is_causal``.
        """
        was_numpy = isinstance(q, np.ndarray)
        q, k, v, dtype = check_attention_inputs(q, k, v, self.config, self.device_type)
        q, k, v = aligned(q), aligned(k), aligned(v)
        scale = check_scale(scale, q.shape[3])
        b, h, n, d = q.shape
        hkv, m = k.shape[1], k.shape[2]
        # an entry's largest tensor: q or the output, or V transposed and padded to whole blocks
        chunks = self._batch_chunks("q", b, max(h * n * d, hkv * d * -(-m // QUANT_BLOCK) * QUANT_BLOCK))
        if len(chunks) > 1:
            out = torch.cat([self.prefill(q[c], k[c], v[c], causal, scale) for c in chunks])
            return out.numpy() if was_numpy else out
        if self.device_type == "cuda":
            out = self._prefill_tensor_cores(q, k, v, bool(causal), scale, dtype)
            return out
        k_mean, k_factor = self.smoothing(k, dtype)
        q8, q_scale = self.quantize(q, dtype, balance=k_factor)
        k8, k_scale = self.quantize(k, dtype, (k_mean, k_factor))
        v8, v_scale = self.quantize(v, dtype)
        out = torch.empty_like(q)
        kernel = self.kernels[names.prefill_name(q.shape[3], bool(causal), dtype)]
        kernel(q8, q_scale, k8, k_scale, v8, v_scale, out, scale)
        return out.numpy() if was_numpy else out

    def _prefill_tensor_cores(self, q, k, v, causal, scale, dtype):
        """CUDA: quantize into the layouts of the INT8 tensor-core kernel (V transposed, see prefill_tc)."""
        b, h, n, d = q.shape
        hkv, m = k.shape[1], k.shape[2]
        nqb, nkb = -(-n // QUANT_BLOCK), -(-m // QUANT_BLOCK)
        q8, q_scale = self._empty(q, (b, h, n, d), torch.int8), self._empty(q, (b, h, nqb), torch.float32)
        k8, k_scale = self._empty(k, (b, hkv, m, d), torch.int8), self._empty(k, (b, hkv, nkb), torch.float32)
        v8t, v_scale = self._empty(v, (b, hkv, d, nkb * QUANT_BLOCK), torch.int8), self._empty(v, (b, hkv, nkb), torch.float32)
        k_mean, k_factor = self.smoothing(k, dtype)
        self.kernels[names.quantize_rows_name(dtype, d, "balanced")](q, k_factor, q8, q_scale)
        self.kernels[names.quantize_rows_name(dtype, d, "smoothed")](k, k_mean, k_factor, k8, k_scale)
        self.kernels[names.quantize_vt_name(dtype, d)](v, v8t, v_scale)
        out = torch.empty_like(q)
        self.kernels[names.prefill_tc_name(d, causal, dtype)](q8, q_scale, k8, k_scale, v8t, v_scale, out, scale)
        return out

    # ------------------------------------------------------------------ KV cache

    @on_torch_stream
    def compress_kv(self, k, v, head_bits) -> CompressedKV:
        """Quantize K (smoothed and balanced) and V to INT8; keep the first 64-token block at INT8 (the sink block) and
        compress each later full block to its head's bits."""
        k, v = as_tensor("k", k), as_tensor("v", v)
        for name, x in (("k", k), ("v", v)):
            check_tensor(name, x, 4, self.device_type)
        dtype = dtype_name("k", k, self.config)
        if v.dtype != k.dtype or v.shape != k.shape:
            raise ValueError(f"v: expected shape {tuple(k.shape)} and dtype {k.dtype} (same as k), got {tuple(v.shape)}, {v.dtype}")
        check_head_dim("k", k.shape[3], self.config)
        head_bits = tuple(int(b) for b in np.asarray(head_bits).reshape(-1))
        if len(head_bits) != k.shape[1] or any(b not in CACHE_BITS for b in head_bits):
            raise ValueError(f"head_bits: expected {k.shape[1]} values (one per KV head) from {CACHE_BITS}, got {head_bits}")
        k, v = aligned(k), aligned(v)
        b, hkv, length, d = k.shape
        k_mean, k_factor = self.smoothing(k, dtype)
        k8, k_scale = self.quantize(k, dtype, (k_mean, k_factor))
        v8, v_scale = self.quantize(v, dtype)
        nblocks = length // QUANT_BLOCK
        compressed_len = nblocks * QUANT_BLOCK
        cache = CompressedKV(head_bits, d, length, compressed_len, k_mean, k_factor)
        if nblocks:  # block 0: the sink, kept at its INT8 codes
            cache.sink_k, cache.sink_v = k8[:, :, :QUANT_BLOCK].contiguous(), v8[:, :, :QUANT_BLOCK].contiguous()
            cache.sink_k_scale, cache.sink_v_scale = k_scale[:, :, :1].contiguous(), v_scale[:, :, :1].contiguous()
        if nblocks > 1:
            k8_full, v8_full = k8[:, :, QUANT_BLOCK:compressed_len].contiguous(), v8[:, :, QUANT_BLOCK:compressed_len].contiguous()
            ks_full, vs_full = k_scale[:, :, 1:nblocks].contiguous(), v_scale[:, :, 1:nblocks].contiguous()
            cache.groups = self.compress_blocks(k8_full, ks_full, v8_full, vs_full, head_bits)
        if compressed_len < length:
            cache.buffer_k = k8[:, :, compressed_len:].contiguous()
            cache.buffer_v = v8[:, :, compressed_len:].contiguous()
            cache.buffer_k_scale = k_scale[:, :, nblocks:].contiguous()
            cache.buffer_v_scale = v_scale[:, :, nblocks:].contiguous()
        return cache

    @on_torch_stream
    def compress_blocks(self, k8, k_scale, v8, v_scale, head_bits) -> list[PackedGroup]:
        """INT8 K/V of whole 64-token blocks ([B, H_kv, 64*n, D] + scales [B, H_kv, n]) -> one PackedGroup per bit width."""
        groups = []
        for bits in CACHE_BITS:
            heads = [h for h, hb in enumerate(head_bits) if hb == bits]
            if heads:
                groups.append(self._compress_group(bits, heads, k8, k_scale, v8, v_scale))
        return groups

    def _batch_chunks(self, name: str, batch: int, entry_elements: int) -> list:
        """Slices of the batch whose tensors (``entry_elements`` per entry at most) one kernel call can index."""
        if self.index_limit is None or batch * entry_elements <= self.index_limit:
            return [slice(0, batch)]
        if entry_elements > self.index_limit:
            raise ValueError(f"{name}: expected at most {self.index_limit} elements per batch entry in a tensor "
                             f"(this build's kernels index in int32), got {entry_elements}")
        per = self.index_limit // entry_elements
        return [slice(i, min(i + per, batch)) for i in range(0, batch, per)]

    def _head_ids(self, heads: list, device) -> torch.Tensor:
        """A group's KV head ids on the device, made once: a host-to-device copy from pageable memory
        waits for the stream's queued work, which stalled every block-closing cache append."""
        key = (device, tuple(heads))
        ids = self._head_id_tensors.get(key)
        if ids is None:
            ids = self._head_id_tensors[key] = torch.tensor(heads, dtype=torch.int32, device=device)
        return ids

    def _compress_group(self, bits, heads, k8, k_scale, v8, v_scale) -> PackedGroup:
        b, _, length, d = k8.shape
        hg, nblocks = len(heads), length // QUANT_BLOCK
        head_ids = self._head_ids(heads, k8.device)
        # the kernels' scratch (K's channel widths and ranks), from torch's stream-ordered allocator
        width, rank = (self._empty(k8, (b, hg, nblocks, d), torch.int32) for _ in range(2))
        parts = []
        # K's code rows end with CACHE_K_OUTLIERS bytes for its kept channels; the kernels read the width
        for tensor, x8, scale, kept in (("k", k8, k_scale, CACHE_K_OUTLIERS), ("v", v8, v_scale, 0)):
            codes = self._empty(x8, (b, hg, length, d * bits // 8 + kept), torch.uint8)
            step = self._empty(x8, (b, hg, nblocks, QUANT_BLOCK // CACHE_GROUP, d), torch.uint8)
            zero = self._empty(x8, (b, hg, nblocks, QUANT_BLOCK // CACHE_GROUP, d), torch.int8)
            group_scale = self._empty(x8, (b, hg, nblocks), torch.float32)
            self.kernels[names.compress_name(bits, tensor)](x8, scale, head_ids, codes, step, zero, group_scale,
                                                            width, rank)
            parts += [codes, step, zero, group_scale]
        return PackedGroup(bits, head_ids, *parts)

    # ------------------------------------------------------------------ decode

    def _decode_workspace(self, q, slots: int) -> tuple:
        """Scratch of one decode: (partial states, o_part, m_part, l_part, counters).

        On CUDA it is reused by the next call of the same shape on the same stream and thread: the
        kernels of consecutive calls on one stream run in order, so the reuse is safe, and another
        stream or thread gets its own. Allocating the scratch per step cost about 30 us of host time
        on the H200 machine, a third of a short decode step. ``counters`` (CUDA: [B, H] int32, zero)
        count each head's finished CTAs; the last one merges and sets its count back to zero.
        """
        b, h, _, d = q.shape

        def partials():
            """(all, o_part, m_part, l_part): views of one buffer, so one fill marks every slot empty.
            Each view starts 64-byte aligned, as TVM buffers are by default."""
            o_size, m_size = b * h * slots * d, -(-b * h * slots // 16) * 16
            state = self._empty(q, (o_size + 2 * m_size,), torch.float32)
            m_l = state[o_size:].view(2, m_size)[:, :b * h * slots]
            return state, state[:o_size].view(b, h, slots, d), m_l[0].view(b, h, slots), m_l[1].view(b, h, slots)

        if self.device_type != "cuda":
            return (*partials(), None)
        key = (q.device, current_stream_handle(q.device), threading.get_ident(), b, h, d, slots)
        workspace = self._workspaces.pop(key, None)
        if workspace is None:
            if len(self._workspaces) >= DECODE_WORKSPACES:
                self._workspaces.pop(next(iter(self._workspaces)))  # the least recently used
            workspace = (*partials(), torch.zeros((b, h), dtype=torch.int32, device=q.device))
        self._workspaces[key] = workspace
        return workspace

    def _int8_constants(self, device, batch: int, kv_heads: int, head_dim: int) -> tuple:
        """Head ids and the (unread) step/zero arguments of the CPU's INT8 decode (sink and open block): made once per shape.

        Allocating them per call cost three kernel launches per decoded token.
        """
        key = (device, batch, kv_heads, head_dim)
        constants = self._decode_constants.get(key)
        if constants is None:
            constants = self._decode_constants[key] = (
                torch.arange(kv_heads, dtype=torch.int32, device=device),
                torch.zeros((batch, kv_heads, 1, head_dim), dtype=torch.uint8, device=device),
                torch.zeros((batch, kv_heads, 1, head_dim), dtype=torch.int8, device=device))
        return constants

    def _no_packed_group(self, device, batch: int, kv_heads: int, head_dim: int) -> PackedGroup:
        """A stand-in 4-bit group of every KV head with one zero block, for a CUDA step over a cache
        with no packed tokens (its launch reads none of them: it attends to the INT8 regions and merges)."""
        key = ("no packed group", device, batch, kv_heads, head_dim)
        group = self._decode_constants.get(key)
        if group is None:
            def zeros(*shape, dtype=torch.uint8):
                return torch.zeros((batch, kv_heads, *shape), dtype=dtype, device=device)

            meta = (1, QUANT_BLOCK // CACHE_GROUP, head_dim)
            group = self._decode_constants[key] = PackedGroup(
                4, torch.arange(kv_heads, dtype=torch.int32, device=device),
                zeros(QUANT_BLOCK, head_dim // 2 + CACHE_K_OUTLIERS), zeros(*meta), zeros(*meta, dtype=torch.int8),
                zeros(1, dtype=torch.float32), zeros(QUANT_BLOCK, head_dim // 2), zeros(*meta),
                zeros(*meta, dtype=torch.int8), zeros(1, dtype=torch.float32))
        return group

    def _auto_splits(self, q, compressed_len: int, heads: int | None = None) -> int:
        """Splits for a launch over ``heads`` query heads (default: all of q's) of every sequence."""
        if self.device_type != "cuda":
            return CPU_DECODE_SPLITS
        sms = self._sm_count.get(q.device)
        if sms is None:
            sms = self._sm_count[q.device] = torch.cuda.get_device_properties(q.device).multi_processor_count
        tiles = max(1, -(-compressed_len // QUANT_BLOCK))
        # a head's share of one wave: its splits and one short CTA over its INT8 tokens. With a share of
        # 2 or less the INT8 CTA does not take a split's place: halving the long CTAs would cost more
        # than the INT8 CTAs' short second wave
        ctas_per_head = SPLIT_CTAS_PER_SM * sms // (q.shape[0] * (heads or q.shape[1]))
        splits = max(1, min(tiles, ctas_per_head - 1 if ctas_per_head > 2 else ctas_per_head))
        return -(-tiles // -(-tiles // splits))  # only as many as get tiles (each takes ceil(tiles / splits))

    def _group_splits(self, q, cache, groups, num_splits: int, group_size: int) -> list:
        """Splits of each group's launch: ``num_splits``, or (0) chosen for the group's query heads."""
        return [num_splits or self._auto_splits(q, cache.packed_len, len(group.heads) * group_size)
                for group in groups]

    @on_torch_stream
    def decode(self, q, cache: CompressedKV, scale: float | None = None, num_splits: int = DEFAULT_DECODE_SPLITS):
        """Attention of one query token q [B,H,1,D] over the whole compressed cache."""
        was_numpy = isinstance(q, np.ndarray)
        q = as_tensor("q", q)
        check_tensor("q", q, 4, self.device_type)
        dtype = dtype_name("q", q, self.config)
        b, h, n, d = q.shape
        if n != 1:
            raise ValueError(f"q: expected one token per sequence for decode ([B, H, 1, D]), got {n}")
        if d != cache.head_dim:
            raise ValueError(f"q: expected head_dim {cache.head_dim} (the cache's), got {d}")
        if h % cache.num_kv_heads or b != cache.k_mean.shape[0]:
            raise ValueError(f"q: expected batch {cache.k_mean.shape[0]} and heads a multiple of "
                             f"{cache.num_kv_heads} (the cache's), got shape {tuple(q.shape)}")
        check_same_device(q, k_mean=cache.k_mean, k_factor=cache.k_factor,
                          **{name: getattr(cache, name) for name in INT8_REGION_NAMES})
        if int(num_splits) < 0:
            raise ValueError(f"num_splits: expected a positive integer (or 0: choose), got {num_splits}")
        packed_len = cache.packed_len  # tokens the group kernels read
        if cache.sink_k is None and cache.buffer_k is None:
            raise ValueError("cache: expected at least one token (neither a sink block nor an open block)")
        for group in cache.groups:  # what decode reads of a group (the torch op passes a stand-in)
            for name, tensor in zip(GROUP_TENSOR_NAMES, group.tensors()):
                if name.endswith("codes"):  # whole 64-token blocks of codes (V: channel-major per block)
                    rows = tensor.shape[2]
                    if tensor.device != q.device or rows % QUANT_BLOCK or rows < packed_len:
                        raise ValueError(f"cache: expected the {group.bits}-bit group's {name} on {q.device} with "
                                         f"whole 64-token blocks for its {packed_len} tokens, got {rows} rows on "
                                         f"{tensor.device}")
                elif tensor.shape[2] * QUANT_BLOCK < packed_len:  # per block
                    raise ValueError(f"cache: expected the {group.bits}-bit group's {name} for at least "
                                     f"{-(-packed_len // QUANT_BLOCK)} blocks, got {tensor.shape[2]}")
                if self.index_limit is not None and tensor.numel() > self.index_limit:
                    raise ValueError(f"cache: expected the {group.bits}-bit group's {name} to hold at most "
                                     f"{self.index_limit} elements (this build's kernels index in int32), got "
                                     f"{tensor.numel()}: split the batch over several caches")
                if name in BULK_COPIED and tensor.data_ptr() % 16:  # the CUDA kernel's copy engine needs it
                    raise ValueError(f"cache: expected the {group.bits}-bit group's {name} at a 16-byte aligned "
                                     f"address, got {tensor.data_ptr():#x}")
        check_head_dim("q", d, self.config)
        scale = check_scale(scale, d)
        q = aligned(q)
        group_size = h // cache.num_kv_heads
        regions = cache.int8_regions()
        for prefix, (tensors, tokens) in zip(("sink", "buffer"), regions):  # the INT8 regions' codes
            for name, codes in ((f"{prefix}_k", tensors[0]), (f"{prefix}_v", tensors[2])):
                if tokens and (codes.shape[2] < tokens or not codes.is_contiguous()):
                    raise ValueError(f"cache: expected {name} contiguous with at least {tokens} token rows, got "
                                     f"shape {tuple(codes.shape)} and strides {codes.stride()}")
        if self.device_type == "cuda":
            out = self._decode_steps(q, cache, dtype, scale, int(num_splits), group_size, regions)
        else:
            out = self._decode_generic(q, cache, dtype, scale, int(num_splits), group_size, regions)
        return out.numpy() if was_numpy else out

    def _decode_steps(self, q, cache, dtype, scale, num_splits, group_size, regions):
        """CUDA: one step kernel per bit width group (a cache with no packed tokens: one over a
        stand-in group), each attending to its heads' packed splits and INT8 regions and merging them.

        Each launch picks its own splits (a group of few heads takes more, to fill the GPU); a head's
        slots are [0, splits) for its splits, then one for its INT8 tokens (sink and open block)."""
        b, _, _, d = q.shape
        groups = cache.groups or [self._no_packed_group(q.device, b, cache.num_kv_heads, d)]
        group_splits = self._group_splits(q, cache, groups, num_splits, group_size)
        workspace = self._decode_workspace(q, max(group_splits) + 1)
        out = torch.empty_like(q)
        for group, splits in zip(groups, group_splits):
            self.kernels[names.decode_step_name(d, group.bits, dtype)](
                *step_kernel_args(q, cache, group, regions, workspace, out, scale, group_size, splits))
        return out

    def _decode_generic(self, q, cache, dtype, scale, num_splits, group_size, regions):
        """LLVM: q's quantization, each INT8 region as a one-split group, the packed groups' splits,
        then the merge, as separate kernels.

        Slots [0, S) hold the packed splits (S: the most splits of a group), then one for the sink
        and one for the open block. Each split writes its slot (an empty split the neutral state);
        heads of a group with fewer splits than S leave slots unwritten, so then slots [0, S) are
        first marked empty (m = NEG_BIG, finite: its weight in the merge is 0)."""
        b, _, _, d = q.shape
        group_splits = self._group_splits(q, cache, cache.groups, num_splits, group_size)
        split_slots = max(group_splits, default=0)
        partial_states, o_part, m_part, l_part, _ = self._decode_workspace(q, split_slots + 2)
        if len(set(group_splits)) > 1:
            partial_states.fill_(NEG_BIG)
        q8, q_scale = self.quantize(q, dtype, balance=cache.k_factor)  # balanced by K's factor
        heads, unused_step, unused_zero = self._int8_constants(q.device, b, cache.num_kv_heads, d)
        for slot, ((k8, k8_scale, v8, v8_scale), tokens) in enumerate(regions, split_slots):
            self.kernels[names.decode_split_name(d, 8)](
                q8, q_scale, heads, k8, unused_step, unused_zero, k8_scale, v8, unused_step, unused_zero, v8_scale,
                o_part, m_part, l_part, scale, group_size, 1, slot, tokens)
        for group, splits in zip(cache.groups, group_splits):
            self.kernels[names.decode_split_name(d, group.bits)](
                q8, q_scale, group.heads, *group.tensors(), o_part, m_part, l_part, scale, group_size, splits, 0,
                cache.packed_len)
        out = torch.empty_like(q)
        self.kernels[names.decode_merge_name(d, dtype)](o_part, m_part, l_part, out)
        return out

