"""What a tuning task measures: one kernel of the set, specialized to a concrete shape bucket.

Kernels are built with symbolic batch, heads and sequence, but meta-schedule measures concrete
shapes. A tuning workload is the kernel with its symbolic sizes and scalar arguments bound to a
``ShapeBucket`` and a ``turbotvm.tuning`` attribute saying which kernel, architecture, bucket, TVM
version and kernel source it stands for. TVM stores that attribute with the workload in
``database_workload.json``, so a tuning log describes itself and lookup needs no side file.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from dataclasses import asdict, dataclass

import tvm
import tvm_ffi
from tvm import tirx
from tvm.sym.analyzer import Analyzer

from ..algorithm import CACHE_BITS, CACHE_K_OUTLIERS, QUANT_BLOCK

#: Version of what turbotvm writes into the workload attribute; another value is a foreign log.
FORMAT = "turbotvm-tuning/1"
#: Function attribute of a tuning workload (a JSON string, see ``workload_meta``).
ATTR = "turbotvm.tuning"

#: ``--kernels`` families: the kernel-name prefixes each one selects.
FAMILIES = {
    "quantize": ("quantize_", "channel_smoothing_"),
    "prefill": ("prefill_",),
    "decode": ("decode_split_", "decode_merge_", "decode_step_"),
    "compress": ("compress_", "decompress_"),
}


@dataclass(frozen=True)
class ShapeBucket:
    """The concrete sizes a kernel is measured at (batch, heads and sequence are symbolic in builds)."""

    batch: int = 1
    heads: int = 8
    kv_heads: int = 2
    seq_len: int = 1024
    splits: int = 4  # decode: KV splits per head

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"shape bucket: {name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"shape bucket: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")

    def sizes(self, head_dim: int, bits: int | None = None) -> dict:
        """Values of the kernels' symbolic size variables, by name (``bits``: of a compressed cache)."""
        blocks = -(-self.seq_len // QUANT_BLOCK)
        packed = head_dim * bits // 8 if bits in CACHE_BITS else head_dim  # bytes of codes per token
        kept = CACHE_K_OUTLIERS if bits in CACHE_BITS else 0  # K rows also hold the kept outlier channels
        return {"B": self.batch, "H": self.heads, "HKV": self.kv_heads, "HG": self.kv_heads, "N": self.seq_len,
                "M": self.seq_len, "L": self.seq_len, "NB": blocks, "NQB": blocks, "NKB": blocks, "NP": blocks,
                "S": self.splits, "D": head_dim, "NC": blocks, "W": packed + kept, "KW": packed + kept,
                "VW": packed, "SLOTS": self.splits + 1, "LS": QUANT_BLOCK, "NS": 1, "LO": QUANT_BLOCK, "NO": 1}

    def scalars(self, head_dim: int) -> dict:
        """Values of the kernels' scalar arguments, by name."""
        return {"sm_scale": head_dim ** -0.5, "group_size": self.heads // self.kv_heads, "num_splits": self.splits,
                "slot_offset": 0, "length": self.seq_len,
                # the CUDA decode step's INT8 regions: a whole sink block and an open block of 63
                "sink_len": QUANT_BLOCK, "open_len": QUANT_BLOCK - 1}

    def to_json(self) -> dict:
        return asdict(self)


def select_kernels(funcs: dict, families) -> dict:
    """The kernels of ``funcs`` (name -> prim_func) that belong to ``families`` (names of FAMILIES)."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"kernels: expected families from {sorted(FAMILIES)}, got {unknown}")
    prefixes = tuple(p for f in families for p in FAMILIES[f])
    return {name: func for name, func in funcs.items() if name.startswith(prefixes)}


def host_cpu() -> str:
    try:
        return str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # TVM built without LLVM
        return platform.processor() or "unknown"


def arch_name(target) -> str:
    """Folder name of a target's tuning logs: the CUDA arch (``sm_90``) or ``llvm-<host cpu>``."""
    if target.kind.name == "cuda":
        return str(target.attrs.get("arch", "cuda"))
    return f"llvm-{host_cpu()}"


def kernel_fingerprint(func: tirx.PrimFunc) -> str:
    """Hash of the unscheduled kernel (attributes aside): a record tuned for other kernel code is stale."""
    bare = func
    for key in list(func.attrs.keys()) if func.attrs else ():
        bare = bare.without_attr(key)
    return f"{tvm_ffi.structural_hash(bare) & (2**64 - 1):016x}"


def specialize(func: tirx.PrimFunc, sizes: dict, scalars: dict) -> tirx.PrimFunc:
    """``func`` with every buffer shape and scalar argument bound to a concrete value."""
    bindings = {}
    for param in func.params:
        if isinstance(param.ty, tirx.buffer.BufferType) and not all(isinstance(s, (tirx.Var, tirx.IntImm))
                                                                    for s in param.shape):
            continue  # a derived shape (e.g. NKB * 64): concrete once the other buffers bind its variables
        if isinstance(param.ty, tirx.buffer.BufferType):
            analyzer = Analyzer()
            for shape in param.shape:
                for var in tirx.analysis.undefined_vars(shape):
                    if var.name not in sizes:
                        raise ValueError(f"shape bucket: no size for variable {var.name!r} of buffer {param.name!r}")
                    analyzer.bind(var, tirx.IntImm(var.ty.dtype, sizes[var.name]))
            bindings[param] = tirx.decl_buffer([analyzer.simplify(s) for s in param.shape], param.dtype, param.name)
        else:
            if param.name not in scalars:
                raise ValueError(f"shape bucket: no value for scalar argument {param.name!r}")
            bindings[param] = tirx.const(scalars[param.name], param.ty.dtype)
    return func.specialize(bindings)


def workload_meta(name: str, func: tirx.PrimFunc, target, bucket: ShapeBucket, head_dim: int) -> dict:
    return {"format": FORMAT, "kernel": name, "arch": arch_name(target), "target_kind": target.kind.name,
            "tvm": tvm.__version__, "kernel_hash": kernel_fingerprint(func), "head_dim": head_dim,
            "bucket": bucket.to_json()}


def tuning_workload(name: str, func: tirx.PrimFunc, target, bucket: ShapeBucket, head_dim: int) -> tvm.IRModule:
    """The IRModule meta-schedule tunes for kernel ``name``: specialized, tagged, as ``main``."""
    meta = workload_meta(name, func, target, bucket, head_dim)
    bits = re.search(r"_b(\d+)", name)
    special = specialize(func, bucket.sizes(head_dim, int(bits[1]) if bits else None), bucket.scalars(head_dim))
    special = special.with_attr("global_symbol", "main").with_attr("tirx.noalias", True)
    return tvm.IRModule({"main": special.with_attr(ATTR, json.dumps(meta, sort_keys=True))})


def head_dim_of(name: str, head_dims) -> int:
    """The head dim a kernel name is built for (``..._d128...``); kernels for any D use the largest."""
    for part in name.split("_"):
        if part.startswith("d") and part[1:].isdigit():
            return int(part[1:])
    return max(head_dims)


def content_hash(*paths) -> str:
    """SHA-256 over files (missing ones count as empty): the module cache keys tuned builds by it."""
    digest = hashlib.sha256()
    for path in paths:
        data = path.read_bytes() if path.is_file() else b""
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
