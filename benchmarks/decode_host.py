"""Host time of one decode call (B=1, H=32, D=128, 4-bit): what an eager step pays before its kernel runs.

    python benchmarks/decode_host.py            # on a GPU: real kernels, a short cache so the GPU waits on the host
    python benchmarks/decode_host.py --no-gpu   # anywhere: the step kernels replaced by no-op LLVM functions
                                                # with their exact signatures (TVM's argument checks included)

Prints microseconds per call for ``TurboAttention.decode``, ``turbotvm.turbo_decode`` (plain eager: the same
path) and the ``turbotvm::turbo_decode`` op (what torch.compile records), then the Python profile of the
runtime's call. On a GPU also the pieces: the kernel call alone, torch's stream query, TVM's stream switch.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from turbotvm import TurboAttention, turbo_decode
from turbotvm import ops
from turbotvm.attention import step_kernel_args

D = 128


def per_call_us(fn, n=3000) -> float:
    """Host microseconds per call, calls back to back (a kernel queue that fills would make it GPU time)."""
    for _ in range(100):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def no_gpu_runtime() -> TurboAttention:
    """A CUDA-kind runtime on CPU tensors: no-op step kernels, torch's CUDA queries stubbed."""
    import tvm
    from tvm import tirx

    from turbotvm import attention
    from turbotvm.codegen.build import CompiledKernels
    from turbotvm.kernel_set import KernelSetConfig
    from turbotvm.kernels.decode_cuda import decode_step_cuda

    noops = {}
    for bits in (4, 2):
        name = f"decode_step_b{bits}_d{D}_float16"
        func = decode_step_cuda(D, bits, "float16").with_body(tirx.Evaluate(0)).with_attr("global_symbol", name)
        noops[name] = tvm.compile(tvm.IRModule({name: func}), target="llvm")[name]
    kernels = CompiledKernels(module=None, config=KernelSetConfig((D,), ("float16",)), target_kind="cuda",
                              target="cuda", names=tuple(noops))
    kernels._functions.update(noops)
    turbo = TurboAttention(kernels)
    turbo._sm_count[torch.device("cpu")] = 132  # an H100's
    attention.current_stream_handle = lambda device: 0
    check_tensor = attention.check_tensor
    attention.check_tensor = lambda name, x, rank, device_type: check_tensor(name, x, rank, "cpu")
    return turbo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-gpu", action="store_true", help="no-op kernels on CPU tensors")
    parser.add_argument("--tokens", type=int, default=256 + 17, help="cache length (short: the host bounds a step)")
    args = parser.parse_args(argv)
    gpu = not args.no_gpu
    if gpu and not torch.cuda.is_available():
        raise SystemExit("decode_host: no CUDA GPU here (use --no-gpu)")
    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        arch = {"kind": "cuda", "arch": "sm_%d%d" % torch.cuda.get_device_capability()}
        turbo = TurboAttention.build(arch, head_dims=(D,), dtypes=("float16",))
        compressor = turbo
    else:
        turbo = no_gpu_runtime()
        compressor = TurboAttention.build("llvm", head_dims=(D,), dtypes=("float16",))
    ops.runtime_for = lambda device: turbo  # the op and turbo_decode use this runtime
    k = torch.randn(1, 32, args.tokens, D, device=device, dtype=torch.float16)
    cache = compressor.compress_kv(k, k, [4] * 32)
    q = torch.randn(1, 32, 1, D, device=device, dtype=torch.float16)
    op_args = ops.cache_as_op_args(cache)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    rows = {"TurboAttention.decode": lambda: turbo.decode(q, cache),
            "turbo_decode (plain eager)": lambda: turbo_decode(q, cache),
            "turbotvm::turbo_decode op": lambda: ops.turbo_decode_op(q, *op_args, None, 0)}
    for label, fn in rows.items():
        fn()  # the op's first call initialises torch's custom-op machinery (~1 s)
        print(f"{label:28s} {per_call_us(fn):7.1f} us/call")
        sync()
    if gpu:
        from turbotvm.torch_stream import current_stream_handle, torch_stream

        group = cache.groups[0]
        splits = turbo._auto_splits(q, cache.packed_len)
        out = torch.empty_like(q)
        kernel = turbo.kernels[f"decode_step_b4_d{D}_float16"]
        kernel_args = step_kernel_args(q, cache, group, cache.int8_regions(), turbo._decode_workspace(q, splits + 1),
                                       out, D**-0.5, 1, splits)
        print(f"{'step kernel call alone':28s} {per_call_us(lambda: kernel(*kernel_args)):7.1f} us/call")
        sync()

        def switch():
            with torch_stream(device):
                pass

        print(f"{'torch.cuda.current_stream':28s} {per_call_us(lambda: torch.cuda.current_stream(device)):7.2f} us")
        print(f"{'current_stream_handle':28s} {per_call_us(lambda: current_stream_handle(device)):7.2f} us")
        print(f"{'torch_stream enter + exit':28s} {per_call_us(switch):7.2f} us")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        turbo.decode(q, cache)
    sync()
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(16)


if __name__ == "__main__":
    main()
