"""Run TVM's CUDA kernels on torch's current stream, so they order correctly with torch's own work.

TVM's CUDA runtime launches every kernel on the stream that tvm-ffi holds for the device
(``TVMFFIEnvGetStream``). ``on_torch_stream`` sets that stream to ``torch.cuda.current_stream(device)``
(through ``tvm_ffi.use_raw_stream``) for the whole sequence of kernels of one TurboAttention call,
and restores the previous one afterwards. Outputs are allocated by torch's caching allocator on the
same stream, so no extra synchronisation is needed; under ``torch.cuda.stream(s)`` the kernels run on s.

(tvm-ffi 0.1.14 also sets the stream per call when a torch CUDA tensor is an argument, through
torch's DLPack exchange API; doing it here keeps the rule explicit and in one place.)
"""

from __future__ import annotations

import contextlib
import functools

import torch
import tvm_ffi


def _stream_object_handle(index: int) -> int:
    return torch.cuda.current_stream(index).cuda_stream


# torch's own raw query (its compiled code uses it): torch.cuda.current_stream builds a Stream object,
# ~5 us of host time per call on the H100 machine, twice per decode step
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or _stream_object_handle


def current_stream_handle(device: torch.device) -> int:
    """The raw handle (cudaStream_t as an int) of torch's current stream on CUDA ``device``."""
    return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())


def torch_stream(device: torch.device):
    """Context: TVM kernels on ``device`` launch on torch's current stream of that device (no-op off CUDA)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tvm_ffi.use_raw_stream(tvm_ffi.device("cuda", index), _raw_stream(index))


def on_torch_stream(method):
    """Decorator for TurboAttention methods: run the kernels on the stream of the first CUDA tensor argument."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.device_type != "cuda":
            return method(self, *args, **kwargs)
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_cuda), None)
        if device is None:  # no CUDA tensor: the method's own checks reject the call
            return method(self, *args, **kwargs)
        with torch_stream(device):
            return method(self, *args, **kwargs)

    return wrapper
