"""ONNX models on TurboAttention through Relax: import, swap the attention for the INT8 kernels, build, run.

    mod = import_onnx("layer.onnx")
    mod, report = rewrite_attention(mod)      # turbotvm.relax_rewrite: what matches and what stays exact
    run = RelaxRunner(build_relax(mod))
    y = run(x)

Weights stay constants in the module (``keep_params_in_input=False``): the module is self-contained,
and the rewrite's constant folding turns mask and scale subgraphs into the constants it reads.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx

from .codegen.build import make_target, schedule_module
from .relax_rewrite import KERNEL_ATTR, MatchedAttention, RewriteReport, rewrite_attention

__all__ = ["import_onnx", "rewrite_attention", "RewriteReport", "MatchedAttention", "build_relax", "RelaxRunner"]


def import_onnx(model_or_path, shape_dict: dict | None = None) -> tvm.IRModule:
    """A Relax IRModule (function ``main``) from an ``onnx.ModelProto`` or a path to one."""
    model = onnx.load(os.fspath(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    return from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)


def _schedule_kernels(mod: tvm.IRModule, target) -> tvm.IRModule:
    """The turbotvm kernels of a rewritten module get the hand schedule of a kernel build (the rest is legalized)."""
    kernels = {gv.name_hint: f for gv, f in mod.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and KERNEL_ATTR in f.attrs}
    if not kernels:
        return mod
    scheduled = schedule_module(kernels, target)
    mod = mod.clone()
    for gv in list(mod.get_global_vars()):
        if gv.name_hint in kernels:
            mod.update_func(gv, scheduled[gv.name_hint])
    return mod


def build_relax(mod: tvm.IRModule, target="llvm"):
    """``relax.build`` of a (rewritten or plain) module for the CPU; returns the Executable."""
    target = make_target(target)
    if target.kind.name != "llvm":
        raise ValueError(f"target: the Relax path builds for the CPU ('llvm'), got {target.kind.name!r}")
    return relax.build(_schedule_kernels(mod, target), target=target)


def _as_tensor(x, device):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return tvm.runtime.tensor(np.ascontiguousarray(x), device)


def _as_numpy(out):
    if isinstance(out, tvm.runtime.Tensor):
        return out.numpy()
    return [_as_numpy(o) for o in out]


class RelaxRunner:
    """Calls ``main`` of a built module on numpy arrays or torch tensors; returns numpy (a list for tuples)."""

    def __init__(self, executable, device=None):
        self.device = device or tvm.cpu()
        self.vm = relax.VirtualMachine(executable, self.device)

    def __call__(self, *inputs):
        return _as_numpy(self.vm["main"](*(_as_tensor(x, self.device) for x in inputs)))
