"""CUDA C source of a kernel set, generated without a GPU (TVM keeps a source-only module)."""

from pathlib import Path

from ..kernel_set import KernelSetConfig
from .build import build


def emit_cuda_source(arch: str = "sm_90", config: KernelSetConfig | None = None, out: Path | None = None,
                     progress: bool = False) -> str:
    """Build for {"kind": "cuda", "arch": arch} and return (and optionally write) the .cu text."""
    compiled = build({"kind": "cuda", "arch": arch}, config or KernelSetConfig(dtypes=("float16",)), progress)
    source = compiled.cuda_source()
    if out is not None:
        Path(out).write_text(source)
    return source
