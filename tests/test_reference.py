"""The float64 oracle itself: SAS, FlashQ and the compression step behave as docs/algorithm.md says."""

import numpy as np

from turbotvm import reference as ref
from turbotvm.algorithm import INT8_MAX, QUANT_BLOCK, SAS_MAX_INT
from turbotvm.testing import cosine, random_qkv


def test_sas_close_to_exp_and_sparse_below_cutoff():
    x = np.linspace(-(SAS_MAX_INT + 1) + 1e-9, 0, 100001)
    rel = np.abs(ref.sas_exp(x) / np.exp(x) - 1)
    assert rel.max() < 1e-3
    assert np.all(ref.sas_exp(np.array([-(SAS_MAX_INT + 1) - 1e-6, -50.0, -1e30])) == 0)


def test_quantize_int8_blocks_error_within_half_step(rng):
    x = rng.standard_normal((2, 3, 150, 64)) * rng.uniform(0.1, 10, size=(2, 3, 1, 1))
    codes, scale = ref.quantize_int8(x)
    assert codes.dtype == np.int8 and scale.shape == (2, 3, 3)
    assert np.abs(codes).max() == INT8_MAX
    back = codes * np.repeat(scale, QUANT_BLOCK, axis=2)[:, :, :150, None]
    step = np.repeat(scale, QUANT_BLOCK, axis=2)[:, :, :150, None]
    assert np.all(np.abs(back - x) <= step / 2 + 1e-12)


def test_compress_roundtrip_error_bounded_by_step(rng):
    x8 = rng.integers(-127, 128, size=(1, 2, 128, 64)).astype(np.int8)
    for bits in (4, 2):
        code, step, zero = ref.compress_int8(x8, bits)
        assert code.max() <= 2**bits - 1
        back = ref.decompress_int8(code, step, zero).astype(np.int64)
        step_full = np.repeat(step, QUANT_BLOCK, axis=2).astype(np.int64)
        assert np.all(np.abs(back - x8) <= step_full // 2)
        # expansion is linear: no code lands above 127, so the CUDA decode may skip the clamp
        linear = code * step_full + np.repeat(zero, QUANT_BLOCK, axis=2).astype(np.int64)
        np.testing.assert_array_equal(linear, back)
        assert linear.max() <= 127 and linear.min() >= -128


def test_compress_rounding_is_unbiased(rng):
    """Ties go to even codes: the mean error over many blocks stays near zero."""
    x8 = rng.integers(-100, 100, size=(1, 4, 64 * 64, 64)).astype(np.int8)
    back = ref.decompress_int8(*ref.compress_int8(x8, 4)).astype(np.float64)
    assert abs(np.mean(back - x8)) < 0.05


def test_turbo_prefill_close_to_exact(rng):
    q, k, v = random_qkv(rng, 1, 4, 2, 256, 256, 64)
    assert cosine(ref.turbo_prefill(q, k, v, causal=True), ref.exact_attention(q, k, v, causal=True)) > 0.999


def test_exact_attention_matches_softmax_formula(rng):
    q, k, v = random_qkv(rng, 1, 2, 1, 5, 7, 64)
    s = np.einsum("bhid,bhjd->bhij", q.astype(float), np.repeat(k, 2, 1).astype(float)) / 8
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ np.repeat(v, 2, 1)
    np.testing.assert_allclose(ref.exact_attention(q, k, v), expected, rtol=1e-10)
