"""Codegen: build a kernel set for a target, emit its CUDA source, export and load modules."""

from .build import CompiledKernels, build, make_target
from .cuda_source import emit_cuda_source
from .export import export, load

__all__ = ["CompiledKernels", "build", "make_target", "emit_cuda_source", "export", "load"]
