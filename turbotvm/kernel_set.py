"""Which kernels a build holds: names, the factory behind each, and the configuration they cover.

A ``KernelSetConfig`` (head dims x input dtypes) names every prim_func of a build; the same
names go into the export manifest, so a loaded module can say what it was built for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .algorithm import CACHE_BITS, SUPPORTED_HEAD_DIMS
from .kernels import decode, decode_cuda, kv_compress, prefill, prefill_tc, quantize, quantize_cuda

#: Activation dtypes the kernels take and return.
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")

#: Version of what the Python side and the kernels agree on: kernel names, arguments and the cache's
#: data layouts. Exported modules record it; one built for another version is refused on load.
#: 2: V codes channel-major per 64-token block; compress/decompress per tensor (compress_k_b4, ...).
#: 3: CUDA: decode_int8_d{D}_{dtype} (q's quantization, sink and open blocks) replaces decode_split_b8_d{D}.
#: 4: decode_int8 takes empty_slots (it marks the slots a split launch may leave unwritten).
#: 5: CUDA: decode_step_b{bits}_d{D}_{dtype} (one launch per bit width group) replaces decode_int8,
#:    decode_split and decode_merge.
#: 6: compress_{k,v}_b{bits} take their scratch (K's channel widths and ranks) as two more arguments.
#: 7: append_open_block_{dtype} (CUDA: _d{D}): a cache append's store and re-quantization in one kernel.
KERNEL_ABI = 7


@dataclass(frozen=True)
class KernelSetConfig:
    head_dims: tuple[int, ...] = SUPPORTED_HEAD_DIMS
    dtypes: tuple[str, ...] = ("float32",)

    def __post_init__(self):
        for d in self.head_dims:
            if d not in SUPPORTED_HEAD_DIMS:
                raise ValueError(f"head_dims: expected values in {SUPPORTED_HEAD_DIMS}, got {d}")
        for t in self.dtypes:
            if t not in SUPPORTED_DTYPES:
                raise ValueError(f"dtypes: expected values in {SUPPORTED_DTYPES}, got {t!r}")
        if not self.head_dims or not self.dtypes:
            raise ValueError("head_dims and dtypes: expected at least one value each")

    def to_json(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> KernelSetConfig:
        return cls(head_dims=tuple(int(d) for d in data["head_dims"]), dtypes=tuple(data["dtypes"]))


# --------------------------------------------------------------------------- names


def quantize_name(dtype: str, mode: str) -> str:
    """``mode``: one of kernels.quantize.QUANTIZE_MODES (plain: V; smoothed: K; balanced: Q)."""
    return f"quantize_{'' if mode == 'plain' else mode + '_'}{dtype}"


def channel_smoothing_name(dtype: str) -> str:
    return f"channel_smoothing_{dtype}"


#: The cache's code tensors: K (token-major rows + kept bytes) and V (channel-major per block).
CODE_TENSORS = ("k", "v")


def compress_name(bits: int, tensor: str) -> str:
    return f"compress_{tensor}_b{bits}"


def decompress_name(bits: int, tensor: str) -> str:
    return f"decompress_{tensor}_b{bits}"


def prefill_name(head_dim: int, causal: bool, dtype: str) -> str:
    return f"prefill_{'causal' if causal else 'full'}_d{head_dim}_{dtype}"


def prefill_tc_name(head_dim: int, causal: bool, dtype: str) -> str:
    return f"prefill_tc_{'causal' if causal else 'full'}_d{head_dim}_{dtype}"


def quantize_rows_name(dtype: str, head_dim: int, mode: str) -> str:
    return f"quantize_rows_{'' if mode == 'plain' else mode + '_'}{dtype}_d{head_dim}"


def quantize_vt_name(dtype: str, head_dim: int) -> str:
    return f"quantize_vt_{dtype}_d{head_dim}"


def append_open_block_name(dtype: str, head_dim: int | None = None) -> str:
    """A cache append's new tokens into its open block, K and V re-quantized. CUDA: one per head dim
    (hand-mapped); LLVM: one for every head dim (head_dim None)."""
    return f"append_open_block_{dtype}" + ("" if head_dim is None else f"_d{head_dim}")


#: Function attribute of kernels written already mapped to threads (no schedule rule applies).
HAND_MAPPED = "turbotvm.hand_mapped"


def decode_split_name(head_dim: int, bits: int) -> str:
    """LLVM: one split of a decode step over one bit width group (8: an INT8 region)."""
    return f"decode_split_b{bits}_d{head_dim}"


def decode_step_name(head_dim: int, bits: int, dtype: str) -> str:
    """CUDA: a whole decode step (q's quantization, the INT8 regions, the group's splits, the merge)
    for the query heads of one bit width group, one launch."""
    return f"decode_step_b{bits}_d{head_dim}_{dtype}"


def decode_merge_name(head_dim: int, dtype: str) -> str:
    """LLVM: the merge of a decode step's split states."""
    return f"decode_merge_d{head_dim}_{dtype}"


@dataclass
class KernelSet:
    """The prim_funcs of one build, by exported name (unscheduled)."""

    config: KernelSetConfig
    funcs: dict = field(default_factory=dict)


def kernel_set_for(config: KernelSetConfig, target) -> KernelSet:
    """make_kernel_set for a TVM Target: its kind and, on CUDA, its arch."""
    return make_kernel_set(config, target.kind.name, target.attrs.get("arch"))


def make_kernel_set(config: KernelSetConfig, target_kind: str = "llvm", arch: str | None = None) -> KernelSet:
    """All kernels for a target kind: on CUDA, prefill and decode are the hand-mapped kernels.
    arch (CUDA: "sm_80", ...): decode's step kernels use the copy engine from sm_90 on (the default)."""
    funcs, hand_mapped = {}, {}
    copy_engine = decode_cuda.has_copy_engine(arch)
    for dtype in config.dtypes:
        if target_kind == "cuda":  # quantization: the hand-mapped quantize_rows kernels, per head dim below
            hand_mapped[channel_smoothing_name(dtype)] = quantize_cuda.channel_smoothing(dtype)
        else:
            for mode in quantize.QUANTIZE_MODES:
                funcs[quantize_name(dtype, mode)] = quantize.quantize_int8(dtype, mode)
            funcs[channel_smoothing_name(dtype)] = quantize.channel_smoothing(dtype)
            funcs[append_open_block_name(dtype)] = quantize.append_open_block(dtype)
    for bits in CACHE_BITS:
        for tensor in CODE_TENSORS:
            funcs[compress_name(bits, tensor)] = kv_compress.compress(bits, channel_major=tensor == "v")
            funcs[decompress_name(bits, tensor)] = kv_compress.decompress(bits, channel_major=tensor == "v")
    for d in config.head_dims:
        for dtype in config.dtypes:
            if target_kind == "cuda":
                for causal in (False, True):
                    hand_mapped[prefill_tc_name(d, causal, dtype)] = prefill_tc.prefill_tc(d, causal, dtype)
                for mode in quantize.QUANTIZE_MODES:
                    hand_mapped[quantize_rows_name(dtype, d, mode)] = quantize_cuda.quantize_rows(
                        dtype, d, mode, transposed=False)
                hand_mapped[quantize_vt_name(dtype, d)] = quantize_cuda.quantize_rows(
                    dtype, d, "plain", transposed=True)
                hand_mapped[append_open_block_name(dtype, d)] = quantize_cuda.append_open_block(dtype, d)
            else:
                for causal in (False, True):
                    funcs[prefill_name(d, causal, dtype)] = prefill.prefill(d, causal, dtype)
            if target_kind == "cuda":
                for bits in CACHE_BITS:
                    hand_mapped[decode_step_name(d, bits, dtype)] = decode_cuda.decode_step_cuda(
                        d, bits, dtype, copy_engine=copy_engine)
            else:
                funcs[decode_merge_name(d, dtype)] = decode.decode_merge(d, dtype)
        if target_kind != "cuda":
            for bits in CACHE_BITS + (8,):
                funcs[decode_split_name(d, bits)] = decode.decode_split(d, bits)
    funcs = {name: f.with_attr("global_symbol", name) for name, f in funcs.items()}
    funcs.update({name: f.with_attr("global_symbol", name).with_attr(HAND_MAPPED, True)
                  for name, f in hand_mapped.items()})
    return KernelSet(config, funcs)
