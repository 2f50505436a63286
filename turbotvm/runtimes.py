"""Which TurboAttention runtime serves a torch device: one per (device type, device index).

``runtime_for(device)`` creates it on first use through the module cache
(``TurboAttention.cached``: built once, then loaded from disk): LLVM for the CPU, CUDA for the
GPU's own architecture. ``set_runtime(device, runtime)`` installs another one instead, for example
a module loaded from an export or a build with fewer dtypes.
"""

from __future__ import annotations

import threading

import torch

from .attention import TurboAttention
from .kernel_set import SUPPORTED_DTYPES

#: What a runtime created on demand holds: both head dims and every activation dtype.
DEFAULT_HEAD_DIMS = (64, 128)
DEFAULT_DTYPES = SUPPORTED_DTYPES

_runtimes: dict[tuple[str, int], TurboAttention] = {}
_lock = threading.Lock()


def device_key(device) -> tuple[str, int]:
    """(type, index) of a torch device; a CUDA device without an index means the current one."""
    device = torch.device(device)
    if device.type == "cpu":
        return ("cpu", 0)
    if device.type == "cuda":
        return ("cuda", device.index if device.index is not None else torch.cuda.current_device())
    raise ValueError(f"device: expected a 'cpu' or 'cuda' device, got {device}")


def default_target(device):
    """The target a runtime created on demand is built for: this CPU, or the GPU's sm_XY."""
    kind, index = device_key(device)
    if kind == "cpu":
        return "llvm"
    major, minor = torch.cuda.get_device_capability(index)
    return {"kind": "cuda", "arch": f"sm_{major}{minor}"}


def runtime_for(device) -> TurboAttention:
    """The runtime for ``device``: the one installed by ``set_runtime``, else created now (once)."""
    key = device_key(device)
    with _lock:
        runtime = _runtimes.get(key)
        if runtime is None:
            runtime = TurboAttention.cached(default_target(device), DEFAULT_HEAD_DIMS, DEFAULT_DTYPES)
            _runtimes[key] = runtime
        return runtime


def set_runtime(device, runtime: TurboAttention | None) -> TurboAttention | None:
    """Install ``runtime`` for ``device`` (a build for the device's type); None removes it.

    Returns the runtime it replaces (None if there was none), so a caller can put it back.
    """
    key = device_key(device)
    if runtime is not None:
        if not isinstance(runtime, TurboAttention):
            raise TypeError(f"runtime: expected a TurboAttention, got {type(runtime).__name__}")
        if runtime.device_type != key[0]:
            raise ValueError(f"runtime: expected a build for {key[0]!r} (the device's type), got one for {runtime.device_type!r}")
    with _lock:
        previous = _runtimes.pop(key, None)
        if runtime is not None:
            _runtimes[key] = runtime
        return previous
