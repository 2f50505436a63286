"""Codegen: build a kernel set for a target, emit its CUDA source, export and load modules, cache them."""

from .build import CompiledKernels, build, make_target
from .cuda_source import emit_cuda_source
from .export import export, load
from .module_cache import default_cache_dir, load_or_build

__all__ = ["CompiledKernels", "build", "make_target", "emit_cuda_source", "export", "load", "load_or_build",
           "default_cache_dir"]
