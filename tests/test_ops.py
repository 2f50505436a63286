"""torch custom ops on the CPU: same numbers as TurboAttention and the float64 reference, torch.compile, checks."""

import numpy as np
import pytest
import torch

from turbotvm import TurboAttention, TurboKVCache, runtimes, set_runtime, turbo_attention, turbo_decode
from turbotvm import reference as ref
from turbotvm.kernel_set import KernelSetConfig
from turbotvm.ops import cache_as_op_args
from turbotvm.testing import cosine, random_qkv, realistic_qkv

SAME_ALGORITHM = 0.9999  # kernel vs reference.py (float32 vs float64 of the same steps)


def tensors(*arrays, dtype=torch.float32):
    return [torch.from_numpy(a).to(dtype) for a in arrays]


def f64(x: torch.Tensor) -> np.ndarray:
    return x.double().numpy()


# ---------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads, q_len, kv_len, head_dim", [(4, 193, 193, 64), (2, 77, 130, 128), (1, 1, 65, 64)])
def test_prefill_op_matches_runtime_and_reference(cpu_ops_runtime, rng, causal, kv_heads, q_len, kv_len, head_dim):
    q, k, v = tensors(*random_qkv(rng, 2, 4, kv_heads, q_len, kv_len, head_dim))
    out = turbo_attention(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out, cpu_ops_runtime.prefill(q, k, v, causal=causal))  # the same kernels, no copy in between
    expected = ref.turbo_prefill(q.numpy(), k.numpy(), v.numpy(), causal)
    print(f"vs reference cos={cosine(out, expected):.8f}")
    assert cosine(out, expected) >= SAME_ALGORITHM
    assert cosine(out, ref.exact_attention(q.numpy(), k.numpy(), v.numpy(), causal)) >= 0.999


def test_prefill_op_bfloat16(cpu_ops_runtime, rng):
    q, k, v = tensors(*realistic_qkv(rng, 1, 8, 2, 150, 150, 128), dtype=torch.bfloat16)
    out = turbo_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    expected = ref.turbo_prefill(f64(q), f64(k), f64(v), True)  # the same bf16 inputs, in float64
    print(f"bf16 vs reference cos={cosine(f64(out), expected):.8f}")
    assert cosine(f64(out), expected) >= SAME_ALGORITHM


def test_prefill_op_explicit_scale(cpu_ops_runtime, rng):
    q, k, v = tensors(*random_qkv(rng, 1, 2, 2, 64, 100, 64))
    out = turbo_attention(q, k, v, scale=0.3)
    assert cosine(out, ref.turbo_prefill(q.numpy(), k.numpy(), v.numpy(), scale=0.3)) >= SAME_ALGORITHM


def test_prefill_op_torch_compile_fullgraph(cpu_ops_runtime, rng):
    q, k, v = tensors(*random_qkv(rng, 1, 4, 2, 70, 70, 64))

    def block(q, k, v):
        return turbo_attention(q * 0.5, k, v, causal=True) + 1.0

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    assert torch.equal(out, block(q, k, v))
    assert cosine(out - 1.0, ref.turbo_prefill(0.5 * q.numpy(), k.numpy(), v.numpy(), True)) >= SAME_ALGORITHM


# ---------------------------------------------------------------------------------------- decode


def test_decode_op_over_compressed_kv(cpu_ops_runtime, rng):
    q, k, v = tensors(*random_qkv(rng, 2, 8, 4, 1, 300, 128))
    bits = [4, 2, 4, 4]
    cache = cpu_ops_runtime.compress_kv(k, v, bits)
    out = turbo_decode(q, cache)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(out, cpu_ops_runtime.decode(q, cache))
    assert cosine(out, ref.turbo_decode(q.numpy(), ref.build_cache(k.numpy(), v.numpy(), bits))) >= SAME_ALGORITHM


def test_decode_plain_eager_calls_skip_the_op(cpu_ops_runtime, rng, monkeypatch):
    """A plain eager call goes to the runtime directly (the op's dispatch cost ~40 us of host time, more than a
    short step's kernels); under autograd or a dispatch mode the op runs, so torch sees it: same numbers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import turbotvm.ops as ops

    class SeenOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = tensors(*random_qkv(rng, 1, 4, 2, 1, 150, 64))
    cache = TurboKVCache(head_bits=[4, 2])
    cache.append(k, v)
    expected = cpu_ops_runtime.decode(q, cache)
    op_calls = []
    real_op = ops.turbo_decode_op
    monkeypatch.setattr(ops, "turbo_decode_op", lambda *args: op_calls.append(1) or real_op(*args))
    assert torch.equal(turbo_decode(q, cache), expected) and op_calls == []
    with SeenOps() as seen:
        out = turbo_decode(q, cache)
    assert op_calls == [1] and "turbotvm.turbo_decode.default" in seen.names
    assert torch.equal(out, expected)
    assert torch.equal(turbo_decode(q.clone().requires_grad_(), cache), expected) and op_calls == [1, 1]


def test_decode_op_torch_compile_fullgraph(cpu_ops_runtime, rng):
    _, k, v = tensors(*random_qkv(rng, 1, 4, 2, 1, 150, 64))
    cache = TurboKVCache(head_bits=[4, 2])
    cache.append(k, v)
    compiled = torch.compile(lambda q: turbo_decode(q, cache) * 2.0, fullgraph=True, backend="aot_eager")
    for step in range(3):  # the cache grows between calls; the compiled function sees the new tokens
        (q,) = tensors(rng.standard_normal((1, 4, 1, 64)))
        out = compiled(q)
        assert torch.equal(out, 2.0 * turbo_decode(q, cache))
        k_new, v_new = tensors(rng.standard_normal((1, 2, 1, 64)), rng.standard_normal((1, 2, 1, 64)))
        cache.append(k_new, v_new)
        k, v = torch.cat((k, k_new), 2), torch.cat((v, v_new), 2)
    expected = ref.turbo_decode(q.numpy(), ref.build_cache(k[:, :, :-1].numpy(), v[:, :, :-1].numpy(), [4, 2],
                                                           ref.smoothing(k[:, :, :150].numpy())))
    assert cosine(out / 2.0, expected) >= SAME_ALGORITHM


def test_opcheck(cpu_ops_runtime, rng):
    """torch.library.opcheck: schema, fake implementations and AOT dispatch agree with the real ops."""
    q, k, v = tensors(*random_qkv(rng, 1, 4, 2, 70, 70, 64))
    torch.library.opcheck(torch.ops.turbotvm.turbo_attention.default, (q, k, v), {"causal": True})
    cache = TurboKVCache(head_bits=[4, 2])
    cache.append(k, v)
    torch.library.opcheck(torch.ops.turbotvm.turbo_decode.default, (q[:, :, :1].contiguous(), *cache_as_op_args(cache)))


# ---------------------------------------------------------------------------------------- bad inputs


class _NoKernels:
    """Stands in for compiled kernels: any kernel call fails the test (checks must come first)."""

    target_kind = "llvm"
    config = KernelSetConfig((64, 128), ("float32",))

    def __getitem__(self, name):
        raise AssertionError(f"kernel {name} ran on a bad input")


@pytest.fixture
def no_kernels():
    previous = set_runtime("cpu", TurboAttention(_NoKernels()))
    yield
    set_runtime("cpu", previous)


def qkv(shape_q=(1, 4, 8, 64), shape_kv=(1, 2, 8, 64), dtype=torch.float32):
    return torch.randn(shape_q, dtype=dtype), torch.randn(shape_kv, dtype=dtype), torch.randn(shape_kv, dtype=dtype)


def test_bad_device_mix(no_kernels):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k: expected a tensor on cpu \(same as q\), got meta"):
        turbo_attention(q, k.to("meta"), v)


def test_bad_dtype_mismatch(no_kernels):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"k: expected dtype torch.float32 \(same as q\), got torch.float16"):
        turbo_attention(q, k.half(), v.half())


def test_bad_dtype_unsupported(no_kernels):
    q, k, v = qkv(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"q: expected dtype in .* got torch.float64"):
        turbo_attention(q, k, v)


def test_bad_dtype_not_in_this_build(no_kernels):
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"q: expected dtype in \('float32',\) \(this build\), got torch.bfloat16"):
        turbo_attention(q, k, v)


def test_bad_layout_non_contiguous(no_kernels):
    q, k, v = qkv()
    q_bthd = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B,H,N,D] view of a [B,N,H,D] tensor
    with pytest.raises(ValueError, match=r"q: expected a contiguous tensor"):
        turbo_attention(q_bthd, k, v)


def test_bad_head_dim(no_kernels):
    q, k, v = qkv((1, 4, 8, 96), (1, 2, 8, 96))
    with pytest.raises(ValueError, match=r"q: head_dim 96 is not supported"):
        turbo_attention(q, k, v)


def test_bad_gqa_heads(no_kernels):
    q, k, v = qkv((1, 4, 8, 64), (1, 3, 8, 64))
    with pytest.raises(ValueError, match=r"k: expected a number of heads dividing q's 4"):
        turbo_attention(q, k, v)


def test_bad_rank(no_kernels):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q: expected rank 4"):
        turbo_attention(q[0], k, v)


def test_bad_scale(no_kernels):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"scale: expected a finite positive float"):
        turbo_attention(q, k, v, scale=-1.0)


def test_bad_decode_query_length(no_kernels, rng):
    cache = int8_buffer_cache(rng)
    with pytest.raises(ValueError, match=r"q: expected one token per sequence"):
        turbo_decode(torch.randn(1, 4, 2, 64), cache)


def test_bad_decode_cache_device(no_kernels, rng):
    cache = int8_buffer_cache(rng)
    cache.buffer_k = cache.buffer_k.to("meta")
    with pytest.raises(ValueError, match=r"buffer_k: expected a tensor on cpu \(same as q\), got meta"):
        turbo_decode(torch.randn(1, 4, 1, 64), cache)


@pytest.mark.parametrize("buffer_v, expected", [
    (lambda v8: v8[:, :, :30], r"buffer_v contiguous with at least 40 token rows, got shape \(1, 2, 30, 64\)"),
    (lambda v8: torch.cat((v8, v8), 3)[..., :64], r"buffer_v contiguous .* strides \(10240, 5120, 128, 1\)"),
])
def test_bad_decode_cache_open_block(no_kernels, rng, buffer_v, expected):
    """The kernels read the open block's first length - compressed_len rows of compact tensors."""
    cache = int8_buffer_cache(rng)
    cache.buffer_v = buffer_v(cache.buffer_v)
    with pytest.raises(ValueError, match=expected):
        turbo_decode(torch.randn(1, 4, 1, 64), cache)


@pytest.mark.parametrize("name", ["k_mean", "k_factor"])
def test_bad_decode_cache_smoothing_device(no_kernels, rng, name):
    """The plain eager call (runtime) and the op name the same tensor in the same words."""
    cache = int8_buffer_cache(rng)
    setattr(cache, name, getattr(cache, name).to("meta"))
    q = torch.randn(1, 4, 1, 64)
    message = rf"{name}: expected a tensor on cpu \(same as q\), got meta"
    with pytest.raises(ValueError, match=message):
        turbo_decode(q, cache)
    with pytest.raises(ValueError, match=message):
        torch.ops.turbotvm.turbo_decode(q, *cache_as_op_args(cache))


def test_bad_decode_sink_args(no_kernels, rng):
    cache = int8_buffer_cache(rng)
    # (k_mean, k_factor, packed, group_bits, head_bits, buffer_* x4, sink_* x4, length, compressed_len)
    args = list(cache_as_op_args(cache))
    q = torch.randn(1, 4, 1, 64)
    sink = [torch.zeros((1, 2, 64, 64), dtype=torch.int8), torch.ones((1, 2, 1)),
            torch.zeros((1, 2, 64, 64), dtype=torch.int8), torch.ones((1, 2, 1))]
    with pytest.raises(ValueError, match=r"sink_\*: expected all four tensors when compressed_len > 0 \(it is 0\), else none"):
        torch.ops.turbotvm.turbo_decode(q, *args[:9], *sink, *args[13:])
    # a cache of 104 tokens: the sink block, no packed block, 40 in the buffer
    args[13:15] = [104, 64]
    with pytest.raises(ValueError, match=r"sink_\*: expected all four tensors .* got \['sink_k'\]"):
        torch.ops.turbotvm.turbo_decode(q, *args[:9], sink[0], None, None, None, *args[13:])
    with pytest.raises(ValueError, match=r"sink_v_scale: expected shape \(1, 2, 1\) and dtype torch.float32"):
        torch.ops.turbotvm.turbo_decode(q, *args[:9], *sink[:3], torch.ones((1, 2, 2)), *args[13:])
    with pytest.raises(ValueError, match=r"sink_k: expected shape \(1, 2, 64, 64\) and dtype torch.int8"):
        torch.ops.turbotvm.turbo_decode(q, *args[:9], sink[0][:, :, :40], *sink[1:], *args[13:])
    with pytest.raises(ValueError, match=r"sink_v: expected a tensor on cpu \(same as q\), got meta"):
        torch.ops.turbotvm.turbo_decode(q, *args[:9], *sink[:2], sink[2].to("meta"), sink[3], *args[13:])


def test_bad_decode_k_factor(no_kernels, rng):
    args = list(cache_as_op_args(int8_buffer_cache(rng)))
    q = torch.randn(1, 4, 1, 64)
    with pytest.raises(ValueError, match=r"k_factor: expected shape \(1, 2, 64\) and dtype torch.float32 \(those of"):
        torch.ops.turbotvm.turbo_decode(q, args[0], args[1][:, :1], *args[2:])
    with pytest.raises(ValueError, match=r"k_factor: expected a tensor on cpu \(same as q\), got meta"):
        torch.ops.turbotvm.turbo_decode(q, args[0], args[1].to("meta"), *args[2:])


def test_bad_decode_cache_object(no_kernels):
    with pytest.raises(TypeError, match=r"cache: expected a TurboKVCache or CompressedKV, got dict"):
        turbo_decode(torch.randn(1, 4, 1, 64), {})
    with pytest.raises(ValueError, match=r"cache: expected at least one appended token"):
        turbo_decode(torch.randn(1, 4, 1, 64), TurboKVCache(head_bits=[4, 4]))


def int8_buffer_cache(rng):
    """A CompressedKV of 40 INT8 buffer tokens made without kernels (the checks only read shapes)."""
    from turbotvm.compressed_kv import CompressedKV

    k8 = torch.from_numpy(rng.integers(-127, 128, (1, 2, 40, 64), dtype=np.int8))
    scale = torch.ones((1, 2, 1))
    return CompressedKV((4, 4), 64, 40, 0, torch.zeros((1, 2, 64)), torch.ones((1, 2, 64)), [], k8, scale, k8.clone(),
                        scale.clone())


# ---------------------------------------------------------------------------------------- runtimes


def test_runtime_for_creates_the_default_build_once(monkeypatch):
    calls = []

    def fake_cached(target, head_dims, dtypes):
        calls.append((target, head_dims, dtypes))
        return TurboAttention(_NoKernels())

    monkeypatch.setattr(TurboAttention, "cached", staticmethod(fake_cached))
    previous = set_runtime("cpu", None)
    try:
        first = runtimes.runtime_for(torch.device("cpu"))
        assert runtimes.runtime_for("cpu") is first
        assert calls == [("llvm", (64, 128), ("float32", "float16", "bfloat16"))]
    finally:
        set_runtime("cpu", previous)


def test_set_runtime_refuses_a_build_for_another_device(turbo_cpu_bf16):
    with pytest.raises(ValueError, match=r"runtime: expected a build for 'cuda'"):
        set_runtime("cuda:0", turbo_cpu_bf16)
    with pytest.raises(TypeError, match=r"runtime: expected a TurboAttention"):
        set_runtime("cpu", object())
    with pytest.raises(ValueError, match=r"device: expected a 'cpu' or 'cuda' device, got meta"):
        set_runtime("meta", turbo_cpu_bf16)
