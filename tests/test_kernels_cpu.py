"""CPU (LLVM) kernels against the float64 reference of the same algorithm and against exact attention."""

import numpy as np
import pytest
import torch

from turbotvm import reference as ref
from turbotvm.algorithm import CACHE_K_OUTLIERS, QUANT_BLOCK
from turbotvm.calibration import select_head_bits
from turbotvm.testing import cosine, max_abs_error, random_qkv, realistic_qkv

SAME_ALGORITHM = 0.9999  # kernel vs reference.py (float32 vs float64 of the same steps)


def check_prefill(turbo, q, k, v, causal, min_exact):
    out = turbo.prefill(q, k, v, causal=causal)
    expected = ref.turbo_prefill(q, k, v, causal)
    exact = ref.exact_attention(q, k, v, causal)
    print(f"vs reference cos={cosine(out, expected):.8f} max|err|={max_abs_error(out, expected):.2e}; "
          f"vs exact cos={cosine(out, exact):.6f}")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert cosine(out, expected) >= SAME_ALGORITHM
    assert max_abs_error(out, expected) < 0.05 * np.abs(exact).max()
    assert cosine(out, exact) >= min_exact
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_prefill_random(turbo_cpu, rng, head_dim, causal):
    q, k, v = random_qkv(rng, 2, 4, 4, 193, 193, head_dim)
    check_prefill(turbo_cpu, q, k, v, causal, 0.999)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_prefill_gqa_odd_lengths(turbo_cpu, rng, kv_heads):
    q, k, v = random_qkv(rng, 1, 6, kv_heads, 77, 130, 64)
    check_prefill(turbo_cpu, q, k, v, False, 0.999)
    check_prefill(turbo_cpu, q, k, v, True, 0.999)


def test_prefill_outlier_channels(turbo_cpu, rng):
    q, k, v = realistic_qkv(rng, 1, 8, 2, 384, 384, 128)
    check_prefill(turbo_cpu, q, k, v, True, 0.995)
    check_prefill(turbo_cpu, q, k, v, False, 0.995)


def test_prefill_long_sequence(turbo_cpu, rng):
    q, k, v = random_qkv(rng, 1, 2, 1, 4096, 4096, 64)
    check_prefill(turbo_cpu, q, k, v, True, 0.999)


def test_prefill_single_token_and_first_causal_row(turbo_cpu, rng):
    q, k, v = random_qkv(rng, 1, 2, 2, 1, 1, 64)
    out = check_prefill(turbo_cpu, q, k, v, True, 0.999)
    # one visible key: the output is that key's value up to INT8 quantization of V
    np.testing.assert_allclose(out, v, atol=np.abs(v).max() / 127)
    q, k, v = random_qkv(rng, 1, 2, 2, 70, 70, 64)
    out = turbo_cpu.prefill(q, k, v, causal=True)
    np.testing.assert_allclose(out[:, :, 0], v[:, :, 0], atol=np.abs(v[:, :, :64]).max() / 127)


def test_prefill_fully_masked_rows_are_zero(turbo_cpu, rng):
    """N > M with bottom-right causal alignment: the first N - M rows see no key."""
    q, k, v = random_qkv(rng, 1, 2, 2, 100, 30, 64)
    out = check_prefill(turbo_cpu, q, k, v, True, 0.999)
    assert np.all(out[:, :, :70] == 0)
    assert np.all(np.abs(out[:, :, 70:]).sum(-1) > 0)


def test_prefill_torch_tensors_zero_copy(turbo_cpu, rng):
    q, k, v = (torch.from_numpy(x) for x in random_qkv(rng, 1, 2, 2, 64, 64, 64))
    out = turbo_cpu.prefill(q, k, v)
    assert isinstance(out, torch.Tensor)
    assert cosine(out.numpy(), ref.turbo_prefill(q.numpy(), k.numpy(), v.numpy())) >= SAME_ALGORITHM


@pytest.mark.parametrize("bits", [4, 2])
def test_compress_kernels_bit_exact(turbo_cpu, rng, bits):
    _, k, v = realistic_qkv(rng, 2, 4, 4, 1, 256, 128)
    cache = turbo_cpu.compress_kv(k, v, [bits] * 4)
    group = cache.groups[0]
    # stage 2 is integer-exact: feed the reference the kernel's own INT8 codes (float32 vs float64
    # stage 1 may differ by one code at rounding ties)
    k_t = torch.from_numpy(k)
    k8, _ = turbo_cpu.quantize(k_t, "float32", turbo_cpu.smoothing_mean(k_t, "float32"))
    v8, _ = turbo_cpu.quantize(torch.from_numpy(v), "float32")
    unpacked = turbo_cpu.kernels[f"decompress_b{bits}"]
    for x8, codes, step, zero, kept in ((k8, group.k_codes, group.k_step, group.k_zero, CACHE_K_OUTLIERS),
                                        (v8, group.v_codes, group.v_step, group.v_zero, 0)):
        assert codes.shape == (2, 4, 256, 128 * bits // 8 + kept)
        expected = ref.compress_int8(x8.numpy(), bits, kept)
        assert np.array_equal(step.numpy(), expected[1]) and np.array_equal(zero.numpy(), expected[2])
        out = torch.empty((2, 4, 256, 128), dtype=torch.int8)
        unpacked(codes, step, zero, out)
        assert np.array_equal(out.numpy(), ref.decompress_int8(*expected))


def check_decode(turbo, q, k, v, head_bits, num_splits, min_exact):
    cache = turbo.compress_kv(k, v, head_bits)
    out = turbo.decode(q, cache, num_splits=num_splits)
    expected = ref.turbo_decode(q, ref.build_cache(k, v, head_bits), num_splits=num_splits)
    exact = ref.exact_attention(q, k, v)
    print(f"bits={[int(b) for b in head_bits]} ratio={cache.nbytes() / cache.fp16_nbytes():.3f} vs reference "
          f"cos={cosine(out, expected):.8f} max|err|={max_abs_error(out, expected):.2e}; vs exact cos={cosine(out, exact):.5f}")
    assert out.shape == q.shape
    assert cosine(out, expected) >= SAME_ALGORITHM
    assert cosine(out, exact) >= min_exact
    return cache


def int8_cache_cosine(q, k, v, num_splits):
    """cos vs exact of decode over the INT8 stage-1 cache alone: the floor that stage 2 builds on."""
    k8, k_scale = ref.quantize_int8(k, ref.smoothing_mean(k))
    v8, v_scale = ref.quantize_int8(v)
    cache = ref.ReferenceCache(k8, k_scale, v8, v_scale, k.shape[2] // QUANT_BLOCK * QUANT_BLOCK)
    return cosine(ref.turbo_decode(q, cache, num_splits=num_splits), ref.exact_attention(q, k, v))


# Bounds below: the targets where they hold per draw; figures are the reference's decode vs exact
# attention over 120 fresh seeds of the same configuration (mean / min; docs/algorithm.md §2.1).


@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_4bit_random(turbo_cpu, rng, head_dim):
    q, k, v = random_qkv(rng, 2, 8, 4, 1, 4096 + 5, head_dim)
    # target 0.99: D=64 0.9939 / 0.9925, D=128 0.9938 / 0.9924
    cache = check_decode(turbo_cpu, q, k, v, [4] * 4, 4, 0.99)
    assert cache.nbytes() <= 0.3 * cache.fp16_nbytes()


def test_decode_4bit_realistic_long_gqa(turbo_cpu, rng):
    q, k, v = realistic_qkv(rng, 1, 8, 2, 1, 4096 + 5, 64)
    # target 0.99: 0.9959 / 0.9932
    cache = check_decode(turbo_cpu, q, k, v, [4] * 2, 4, 0.99)
    assert cache.nbytes() <= 0.3 * cache.fp16_nbytes()


def test_decode_4bit_realistic(turbo_cpu, rng):
    q, k, v = realistic_qkv(rng, 2, 8, 4, 1, 2048 + 40, 128)
    # 0.9948 / 0.9874: at D = 128 the INT8 stage alone goes down to 0.9908 (four x20 channels set each
    # block's scale, leaving the other 124 channels about 2 INT8 codes of spread), so the target 0.99 holds
    # on average only. What stage 2 controls, its loss over the INT8 cache, is at most 0.0044.
    cache = check_decode(turbo_cpu, q, k, v, [4] * 4, 3, 0.98)
    int8_floor = int8_cache_cosine(q, k, v, 3)
    exact = cosine(turbo_cpu.decode(q, cache, num_splits=3), ref.exact_attention(q, k, v))
    print(f"INT8 cache alone cos={int8_floor:.5f}; stage-2 loss {int8_floor - exact:.5f}")
    assert int8_floor - exact <= 0.0075


def test_decode_mixed_precision_realistic(turbo_cpu, rng):
    q, k, v = realistic_qkv(rng, 2, 8, 4, 1, 2048, 128)
    head_bits = select_head_bits(k, v, 0.25)
    assert sorted(head_bits.tolist()) == [2, 4, 4, 4]
    # target 0.97: 0.9941 / 0.9811 (V's gap * std picks the heads: with K's as well, down to 0.9751)
    cache = check_decode(turbo_cpu, q, k, v, head_bits, 4, 0.97)
    assert cache.nbytes() < turbo_cpu.compress_kv(k, v, [4] * 4).nbytes()


def test_decode_mixed_precision_random(turbo_cpu, rng):
    q, k, v = random_qkv(rng, 1, 8, 8, 1, 1024, 64)
    # i.i.d. heads, no head cheaper than another: 0.9738 / 0.9559 (240 seeds). 0.97 per draw is out of reach of
    # 2-bit scalar codes here (docs §2.2); the bound is the minimum less a margin
    check_decode(turbo_cpu, q, k, v, select_head_bits(k, v, 0.25), 2, 0.94)


def test_decode_buffer_only_and_no_buffer(turbo_cpu, rng):
    q, k, v = random_qkv(rng, 1, 4, 2, 1, 40, 64)  # shorter than one block: INT8 buffer only
    cache = check_decode(turbo_cpu, q, k, v, [4, 2], 2, 0.999)
    assert cache.groups == [] and cache.buffer_k.shape[2] == 40
    q, k, v = random_qkv(rng, 1, 4, 2, 1, 128, 64)  # exact blocks: no buffer
    cache = check_decode(turbo_cpu, q, k, v, [4, 4], 5, 0.98)
    assert cache.buffer_k is None
